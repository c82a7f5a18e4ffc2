"""The errors hf_dgate raises on purpose. Each message says what went wrong and what to do instead."""

from __future__ import annotations


class ExportError(ValueError):
    """The model cannot be exported as asked (or the export would not compute what the gated model computes)."""


class NonFiniteError(ValueError):
    """A gate, the loss or the penalty is NaN or infinite: training diverged, so nothing built on it can be trusted."""
