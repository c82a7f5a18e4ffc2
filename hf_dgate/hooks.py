"""Every place a gate acts on a model: one base class (`BankHook`) for the hooks and replacement forwards that the
`GateBank` installs (`install`), that read their scale from it (`scale`), and that `GateBank.detach` removes (found by
type and owning bank, so it also works on a deep copy). Nothing here knows about methods or targets."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .choices import Where
from .gated_linear import gated_linear


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) as the whole tensor, differentiably; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def scale_along(x: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """`x` times `scale` laid along `axis`."""
    scale = scale.to(x.dtype)
    if axis in (-1, x.dim() - 1):
        return x * scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return x * scale.reshape(shape)


def broadcast(factor: torch.Tensor, axis: int | tuple[int, int], ndim: int) -> torch.Tensor:
    """`factor` laid along `axis` (one axis, or two in order) of an `ndim`-dimensional tensor."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    shape = [1] * ndim
    for a, n in zip(axes, factor.shape if len(axes) > 1 else (-1,)):
        shape[a] = n
    return factor.reshape(shape)


class BankHook:
    """Something a bank installed on a module; `bank` is how `detach` recognises its own."""

    replaces_forward = False  # True: installed as `module.forward` (an instance attribute), else a (pre-)hook

    def __init__(self, bank: Any):
        self.bank = bank

    def site_scale(self, site: SiteRef) -> torch.Tensor:
        """The forward scale of one gated site, one entry per position along its axis."""
        return self.bank.site_scale(site.target, site.buf, site.ungated)

    @classmethod
    def installed(cls, module: nn.Module, bank: Any) -> list[tuple[dict, Any]]:
        """Where `bank`'s hooks sit on `module`: (dict, key) pairs, `module.__dict__` for a replaced forward."""
        found = []
        replaced = module.__dict__.get("forward")
        if isinstance(replaced, BankHook) and replaced.bank is bank:
            found.append((module.__dict__, "forward"))
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            found += [(hooks, k) for k, h in hooks.items() if isinstance(h, BankHook) and h.bank is bank]
        return found


class SiteRef:
    """A gated site as installed: its target and module, the bank's index buffer that maps positions to groups,
    whether some positions are ungated, and where it acts (input, output or param; axis, parameter)."""

    __slots__ = ("target", "module", "where", "axis", "param", "buf", "ungated")

    def __init__(self, target: str, module: str, where: str, axis: Any, param: str | None, buf: str, ungated: bool):
        self.target, self.module, self.where, self.axis = target, module, where, axis
        self.param, self.buf, self.ungated = param, buf, ungated


class OutputHook(BankHook):
    """Forward hook: scale the module's output along the site's axis."""

    def __init__(self, bank: Any, site: SiteRef):
        super().__init__(bank)
        self.site = site

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        scale = self.site_scale(self.site)
        if isinstance(output, tuple):
            return (scale_along(output[0], scale, self.site.axis), *output[1:])
        return scale_along(output, scale, self.site.axis)


class InputHook(BankHook):
    """Forward pre-hook: scale the module's first input along the site's axis."""

    def __init__(self, bank: Any, site: SiteRef):
        super().__init__(bank)
        self.site = site

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (scale_along(args[0], self.site_scale(self.site), self.site.axis), *args[1:])


class GatedLinearForward(BankHook):
    """Replacement forward of a gated Linear/Conv1D: the gates scale the weight inside one autograd function."""

    replaces_forward = True

    def __init__(self, bank: Any, module: nn.Module, sites: list[SiteRef]):
        super().__init__(bank)
        self.module = module
        self.outputs = [s for s in sites if s.where == Where.OUTPUT]
        self.inputs = [s for s in sites if s.where == Where.INPUT]
        self.transposed = type(module).__name__ == "Conv1D"

    def _scale(self, sites: list[SiteRef]) -> torch.Tensor | None:
        scale = None
        for site in sites:
            s = self.site_scale(site)
            scale = s if scale is None else scale * s
        return scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return gated_linear(x, m.weight, m.bias, self._scale(self.outputs), self._scale(self.inputs), self.transposed)

    @staticmethod
    def suits(module: nn.Module, sites: list[SiteRef]) -> bool:
        """Plain Linear/Conv1D whose forward nobody else replaced (accelerate's offload hooks, PEFT layers)."""
        plain = type(module) is nn.Linear or type(module).__name__ == "Conv1D"
        return (
            plain
            and "forward" not in module.__dict__
            and not hasattr(module, "_hf_hook")
            and all(site.axis in (-1,) for site in sites)
        )


class GatedParamForward(BankHook):
    """Replacement forward of a module whose groups live inside its parameters (a mixture of experts' stacked
    expert tensors, where no module boundary separates one expert's units): the module's own forward runs on
    theta = w * s (through `torch.func.functional_call`), so names, state dict and activations stay untouched."""

    replaces_forward = True

    def __init__(self, bank: Any, module: nn.Module, sites: list[SiteRef]):
        super().__init__(bank)
        self.module = module
        self.sites = sites
        self.inside = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.inside:  # functional_call re-enters the module: run its own forward on the gated tensors
            return type(self.module).forward(self.module, *args, **kwargs)
        gated: dict[str, torch.Tensor] = {}
        for site in self.sites:
            w = gated.get(site.param, getattr(self.module, site.param))
            s = self.site_scale(site).to(w.dtype)
            gated[site.param] = w * broadcast(s, site.axis, w.dim())
        self.inside = True
        try:
            return torch.func.functional_call(self.module, gated, args, kwargs, strict=False)
        finally:
            self.inside = False
