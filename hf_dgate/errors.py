"""The errors hf_dgate raises on purpose. Each message says what went wrong and what to do instead."""

from __future__ import annotations


class ExportError(ValueError):
    """The model cannot be exported as asked (or the export would not compute what the gated model computes)."""


class NonFiniteError(ValueError):
    """A gate, the loss or the penalty is NaN or infinite: training diverged, so nothing built on it can be trusted."""


# Remedies, spelled once for Python callers; `hf-dgate` rewrites each into its own flag (CLI_REMEDIES), so that a
# message always names something the reader can do where they are.
REMEDY_ALLOW_INEXACT = "pass allow_inexact=True"
REMEDY_LOWER_THRESHOLD = "pass a lower threshold"
REMEDY_RELATIVE = "set get_bank(model).config.threshold_mode='relative'"
REMEDY_OVERWRITE = "pass overwrite=True (CLI: --overwrite)"
REMEDY_FORCE = "pass force=True (CLI: --force)"

CLI_REMEDIES: dict[str, str] = {
    REMEDY_ALLOW_INEXACT: "pass --allow-inexact",
    REMEDY_LOWER_THRESHOLD: "pass a lower --threshold",
    REMEDY_RELATIVE: "pass --threshold-mode relative",
    REMEDY_OVERWRITE: "pass --overwrite",
    REMEDY_FORCE: "pass --force",
    "(threshold_mode='relative')": "(--threshold-mode relative)",
    "allow_inexact=True": "--allow-inexact",
}
