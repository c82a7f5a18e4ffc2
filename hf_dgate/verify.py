"""One rule for every export path: the exported model must compute what the gated model computes.

Groups below the threshold are removed on the assumption that they are zero. When training has not driven them
to exact zeros (too few steps, a threshold above where the norms settled) that assumption is wrong and the
export would silently compute something else. So every export (`export_pruned`, `export_to_dir`,
`DGateTrainer.export_pruned`, `hf-dgate export`) runs the gated and the exported model on one probe batch and
compares their first outputs (logits, last_hidden_state or the output tensor):

    exact  <=>  every removed group was numerically zero                       (the certificate)
           and  max |exported - gated| <= atol + rtol * max |gated|             (the probe confirms it)

with (atol, rtol) = (1e-4, 1e-4) for float32/float64 models, (1e-3, 1e-2) for float16 and (1e-2, 5e-2) for
bfloat16 (`TOLERANCES`). Exactness is certified from what was removed: a half-precision tolerance is wide enough
to hide changed predictions (a bf16 export whose removed groups were not zero changed 4.7% of greedy tokens
within it), so the probe only confirms. Half-precision models are compared in float32 copies (cast in place and
restored bit for bit), so the tolerance covers the rounding of the folded weights and not the rounding of the
half-precision forward pass, and the number of positions whose argmax changed is counted and stated. Otherwise
the export raises `ExportError` naming the removed groups that were not numerically zero, unless the caller opts
in with `allow_inexact=True`; the measured difference is then stated in the result (and in the model card).
Where no probe batch can be built or run, the export is reported as not verified (a warning and
`verified: False`), never as exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .choices import ThresholdMode
from .errors import REMEDY_ALLOW_INEXACT, REMEDY_LOWER_THRESHOLD, REMEDY_RELATIVE, ExportError

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-4, 1e-4),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}
ZERO_RTOL = 1e-6  # a removed group is "numerically zero" when its norm is <= this fraction of its target's largest
PROBE_SEQ_LEN, PROBE_BATCH = 32, 2

__all__ = [
    "ExportCheck",
    "ExportInexactWarning",
    "ExportNotVerifiedWarning",
    "TOLERANCES",
    "Verification",
    "first_output",
]


class ExportNotVerifiedWarning(UserWarning):
    """The export could not be compared with the gated model (no probe batch, or a probe it does not accept)."""


class ExportInexactWarning(UserWarning):
    """The export was compared with the gated model, differs beyond the tolerance, and was written anyway because
    the caller passed allow_inexact=True (a verified result, so not an ExportNotVerifiedWarning)."""


@dataclass
class Verification:
    """What the comparison of the exported with the gated model found (`to_dict()` goes into summaries)."""

    verified: bool  # the outputs were compared
    exact: bool  # compared and within the tolerance
    max_abs_diff: float | None = None
    tolerance: float | None = None
    atol: float | None = None
    rtol: float | None = None
    probe: str | None = None  # the batch the models ran on
    reason: str | None = None  # why not verified
    allowed_inexact: bool = False
    removed: dict[str, dict[str, Any]] = field(default_factory=dict)  # per target: counts and norm range
    certified: bool | None = None  # every removed group was numerically zero
    compared_in: str | None = None  # the dtype the two models were run in
    changed_argmax: int | None = None  # positions whose argmax (predicted token / class) changed
    positions: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One plain sentence on how the export relates to the gated model."""
        if not self.verified:
            return f"NOT verified against the gated model ({self.reason})"
        if self.exact:
            return (
                f"computes the same outputs as the gated model: every removed group was zero, and on the probe the "
                f"outputs differ by {self.max_abs_diff:.2e} (tolerance {self.tolerance:.1e}{self._measured()})"
            )
        where = "above" if self.max_abs_diff > self.tolerance else "within"
        return (
            f"is NOT exact: its outputs differ from the gated model's by up to {self.max_abs_diff:.2e}, {where} the "
            f"tolerance {self.tolerance:.1e}{self._measured()}; {_removed_text(self.removed)}"
        )

    def _measured(self) -> str:
        """How the probe was compared: in which dtype, and how many predictions changed."""
        out = f", compared in {self.compared_in}" if self.compared_in and self.compared_in != "float32" else ""
        if self.changed_argmax is not None and self.positions:
            out += f"; argmax changed at {self.changed_argmax} of {self.positions} positions"
        return out


def first_output(out: Any) -> torch.Tensor:
    """The tensor two models' outputs are compared on: logits, else last_hidden_state, else the first output."""
    for key in ("logits", "last_hidden_state"):
        val = getattr(out, key, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, dict):
        out = next(iter(out.values()), None)
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, not a tensor")
    return out


class ExportCheck:
    """Started on the gated model before anything is pruned (so in-place exports can be checked too), finished
    on the exported model."""

    def __init__(
        self,
        model: nn.Module,
        bank: Any,
        threshold: float,
        *,
        inputs: Any = None,
        verify: bool = True,
        targets: tuple[str, ...] | None = None,
    ):
        self.removed = removed_groups(bank, threshold, targets)
        self.threshold, self.relative = threshold, bank.config.threshold_mode == ThresholdMode.RELATIVE
        self.feature_width = _feature_width(model, bank)
        self.inputs, self.ref, self.reason = None, None, None
        if not verify:
            self.reason = "verification switched off (verify=False)"
            return
        self.inputs = inputs if inputs is not None else probe_inputs(model, bank)
        if self.inputs is None:
            self.reason = (
                "no probe batch could be built for this model; pass example_inputs=... or set "
                "DGateConfig(example_input_shape=[...])"
            )
            return
        self.half = _half_dtype(model)
        try:
            with _as_float32(model, self.half):
                self.ref = _run(model, _inputs_as(self.inputs, self.half)).detach().clone()
        except Exception as e:  # a guessed probe the model does not accept: say so, never claim exactness
            self.reason = f"the gated model did not run on the probe batch {describe_inputs(self.inputs)}: {_short(e)}"
            self.inputs = None
            return
        if not bool(torch.isfinite(self.ref).all()):
            self.reason = "the gated model's outputs on the probe batch are NaN or infinite"
            self.ref = None

    def finish(self, pruned: nn.Module, allow_inexact: bool = False) -> Verification:
        """Compare, then raise ExportError (inexact without `allow_inexact`) or warn (unverified or inexact)."""
        inputs = self._adapt_inputs(pruned) if self.ref is not None else None
        if self.ref is not None and inputs is None:
            self.reason = (
                "the export reads only the kept input features, and the probe batch is not the gated first Linear's "
                "input, so it cannot be fed to both models"
            )
        if inputs is None:
            warnings.warn(f"The export was not verified: {self.reason}.", ExportNotVerifiedWarning, stacklevel=3)
            return Verification(False, False, reason=self.reason, allowed_inexact=allow_inexact, removed=self.removed)
        try:
            with _as_float32(pruned, self.half):
                out = _run(pruned, _inputs_as(inputs, self.half))
        except Exception as e:
            raise ExportError(
                f"The exported model failed on the probe batch {describe_inputs(self.inputs)} that the gated model "
                f"runs ({_short(e)}); this is a bug in hf_dgate's surgery for this model, please report it."
            ) from e
        ref = self.ref.to(out.device)
        atol, rtol = TOLERANCES.get(self.half or ref.dtype, TOLERANCES[torch.float32])
        tol = atol + rtol * float(ref.float().abs().max()) if ref.numel() else atol
        diff = float((out.float() - ref.float()).abs().max()) if out.shape == ref.shape and ref.numel() else 0.0
        if out.shape != ref.shape or not diff < float("inf"):  # a broken export, not a question of tolerance
            what = f"shape {tuple(out.shape)} instead of {tuple(ref.shape)}" if out.shape != ref.shape else "NaN/inf"
            raise ExportError(
                f"The exported model's outputs on the probe batch are {what} where the gated model's are finite; this "
                "is a bug in hf_dgate's surgery for this model, please report it."
            )
        certified = not any(r["not_zero"] for r in self.removed.values())
        changed, positions = _changed_argmax(ref, out)
        result = Verification(
            True, diff <= tol and certified, diff, tol, atol, rtol, describe_inputs(self.inputs), None, allow_inexact,
            self.removed, certified, "float32" if self.half else str(ref.dtype).replace("torch.", ""), changed,
            positions,
        )  # fmt: skip
        if result.exact:
            return result
        if not allow_inexact:
            raise ExportError(self.error_message(result))
        msg = f"Exported with allow_inexact=True: the export {result.describe()}."
        warnings.warn(msg, ExportInexactWarning, stacklevel=3)
        return result

    def run_problem(self, pruned: nn.Module) -> str | None:
        """Why the export fails on the probe batch (None: it runs, or there is no probe to run)."""
        inputs = self._adapt_inputs(pruned) if self.ref is not None else None
        if inputs is None:
            return None
        try:
            with _as_float32(pruned, self.half):
                _run(pruned, _inputs_as(inputs, self.half))
        except Exception as e:  # noqa: BLE001 - any failure is the reason
            return _short(e)
        return None

    def _adapt_inputs(self, pruned: nn.Module) -> Any:
        """An export without some input features reads only the kept columns (`dgate_kept_features`); that is
        only well defined when the probe is the gated first Linear's input (flattened). None otherwise."""
        kept = getattr(pruned, "dgate_kept_features", None)
        if kept is None:
            return self.inputs
        x = self.inputs
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.flatten(1).shape[1] != self.feature_width:
            return None
        return x.flatten(1)[:, kept.to(x.device)]

    def error_message(self, result: Verification) -> str:
        """At most ~300 characters: the CLI prints it on one line."""
        within = ""  # within the tolerance, the count of changed predictions says what the tolerance would hide
        if result.max_abs_diff <= result.tolerance:
            within = ", within it" + (f", {result.changed_argmax}/{result.positions} argmax changed" if (
                result.positions) else "")  # fmt: skip
        head = (
            f"Export not exact: outputs differ by {result.max_abs_diff:.2e} (tolerance {result.tolerance:.1e}{within})"
        )
        if self.removed.get("experts", {}).get("removed"):
            return (
                f"{head}: removing routed experts changes which experts the router picks for tokens that had a "
                f"removed one in their top-k, so such an export cannot be exact; {REMEDY_ALLOW_INEXACT} to export "
                "it with the difference stated, or gate 'neurons' (expert units go exactly)."
            )
        if not any(r["not_zero"] for r in self.removed.values()):
            return (
                f"{head} although every removed group was numerically zero: a bug in hf_dgate's surgery for this "
                f"model, please report it; {REMEDY_ALLOW_INEXACT} to export anyway."
            )
        mode = "" if self.relative else f", {REMEDY_RELATIVE}"
        return (
            f"{head}; {_removed_text(self.removed)}. Train longer, {REMEDY_LOWER_THRESHOLD} (now {self.threshold:g})"
            f"{mode}, or {REMEDY_ALLOW_INEXACT}."
        )


@torch.no_grad()
def removed_groups(bank: Any, threshold: float, targets: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Per target: how many groups the threshold removes, how many of those are not numerically zero (norm above
    ZERO_RTOL of the target's largest), how many are grey (within GREY_DECADES below their threshold), and the
    norm range of the removed groups."""
    out: dict[str, dict[str, Any]] = {}
    for t in bank.targets:
        if targets is not None and t not in targets:
            continue
        norms = bank.effective_norms(t).detach().float().cpu()
        dead = bank.zero_groups(t, threshold).cpu()
        grey = bank.grey_groups(t, threshold).cpu()
        gone = norms[dead]
        largest = float(norms.max()) if norms.numel() else 0.0
        out[t] = {
            "removed": int(dead.sum()),
            "not_zero": int((gone > ZERO_RTOL * largest).sum()),
            "grey": int(grey.sum()),
            "norm_min": float(gone.min()) if gone.numel() else None,
            "norm_max": float(gone.max()) if gone.numel() else None,
        }
    return out


def probe_inputs(model: nn.Module, bank: Any) -> Any:
    """A deterministic batch the gated model should accept, or None: token ids / pixels for HF models, else
    `DGateConfig.example_input_shape`, else (input features) a batch as wide as the gated first Linear."""
    from .flops import example_inputs
    from .patch import unwrap

    base = unwrap(model)
    if getattr(base, "config", None) is not None and hasattr(base.config, "to_dict"):
        return example_inputs(base, seq_len=PROBE_SEQ_LEN, batch_size=PROBE_BATCH)
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else None
    gen = torch.Generator().manual_seed(0)
    shape = bank.config.example_input_shape
    if shape:
        return torch.randn(*shape, generator=gen).to(device)
    width = _feature_width(model, bank)
    return None if width is None else torch.randn(PROBE_BATCH, width, generator=gen).to(device)


def describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, dict):
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
    if isinstance(inputs, torch.Tensor):
        return f"input {tuple(inputs.shape)}"
    return type(inputs).__name__


def _feature_width(model: nn.Module, bank: Any) -> int | None:
    """Input width of the Linear whose input features are gated (None without a features target)."""
    from .patch import unwrap
    from .targets import get_target

    for gs in bank.group_sets:
        width = get_target(gs.target, bank.config).probe_width(unwrap(model), gs)
        if width is not None:
            return width
    return None


def _run(model: nn.Module, inputs: Any) -> torch.Tensor:
    """First output of one eval-mode forward pass; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(inputs, dict):
                out = model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                out = model(*inputs)
            else:
                out = model(inputs)
        return first_output(out)
    finally:
        model.train(was_training)


def _half_dtype(model: nn.Module) -> torch.dtype | None:
    """float16 / bfloat16 when the model computes in half precision (its first floating parameter), else None."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in (torch.float16, torch.bfloat16) else None
    return None


@contextmanager
def _as_float32(model: nn.Module, half: torch.dtype | None) -> Iterator[None]:
    """Run `model` in float32 for the block: half-precision tensors are upcast in place (each a new float32 copy)
    and restored afterwards bit for bit (float32 holds every float16 / bfloat16 value exactly)."""
    if half is None:
        yield
        return
    kept: list[tuple[Any, str, torch.Tensor]] = []
    seen: set[int] = set()
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or id(t) in seen or t.dtype not in (torch.float16, torch.bfloat16):
                    continue
                seen.add(id(t))
                kept.append((t, name, t.data))
                t.data = t.data.float()
    try:
        yield
    finally:
        for t, _, data in kept:
            t.data = data


def _inputs_as(inputs: Any, half: torch.dtype | None) -> Any:
    """The probe with its half-precision tensors (pixels, features) as float32 when the models run in float32."""
    if half is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
    if isinstance(inputs, dict):
        return {k: _inputs_as(v, half) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_inputs_as(v, half) for v in inputs)
    return inputs


def _changed_argmax(ref: torch.Tensor, out: torch.Tensor) -> tuple[int | None, int | None]:
    """Positions whose argmax over the last axis (the predicted token or class) differs; None for one output."""
    if ref.dim() < 2 or ref.shape[-1] < 2 or ref.shape != out.shape:
        return None, None
    changed = int((ref.argmax(-1) != out.argmax(-1)).sum())
    return changed, ref.numel() // ref.shape[-1]


def _removed_text(removed: dict[str, dict[str, Any]]) -> str:
    parts = []
    for t, r in removed.items():
        if r["not_zero"]:
            grey = f", {r['grey']} near the threshold" if r["grey"] else ""
            parts.append(f"{r['not_zero']} {t} (norms {r['norm_min']:.1e} to {r['norm_max']:.1e}{grey})")
    return "removed groups were not zero: " + ", ".join(parts) if parts else "every removed group was numerically zero"


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
