"""Inject and remove D-Gating: the verbs users call on a model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import find_group_sets
from .config import DGateConfig
from .groups import GateBank

BANK_NAME = "dgate"


def apply_dgate(model: nn.Module, config: DGateConfig | None = None, example_inputs: Any = None, **kwargs) -> nn.Module:
    """Gate `model` in place and return it.

    Gates are parameters of one submodule, `model.dgate`, so optimizers, `state_dict`, `.to()` and accelerate
    see them; the model's own parameters and names are untouched. Gates start at 1, so outputs are unchanged.
    Keyword arguments build the config when none is given: `apply_dgate(model, target="heads", lam=1e-3)`.
    `example_inputs` (a batch) lets target='filters' trace coupled channels; otherwise the config's
    `example_input_shape` is used.
    """
    if config is None:
        config = DGateConfig(**kwargs)
    elif kwargs:
        raise TypeError("Pass either a DGateConfig or keyword arguments, not both.")
    if get_bank(model, required=False) is not None:
        raise ValueError("The model is already gated; call hf_dgate.remove_dgate(model) first to re-gate it.")
    base = _unwrap(model)
    sets = find_group_sets(base, config, example_inputs)
    bank = GateBank(base, sets, config)
    ref = next((p for p in base.parameters()), None)
    if ref is not None:  # gates in fp32 (fp64 for fp64 models), on the model's device
        bank.to(device=ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
    bank.train(base.training)
    base.add_module(BANK_NAME, bank)
    bank.attach()
    return model


def remove_dgate(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove hooks and gates; with `merge`, first fold each group's gate product into its weights."""
    bank = get_bank(model)
    if merge:
        bank.fold()
    bank.detach()
    delattr(_unwrap(model), BANK_NAME)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """PEFT model -> plain gated model: fold the gates into base + LoRA weights, merge the adapters
    (`merge_and_unload`) and gate the merged model again with gates at 1. Zero groups stay zero (their weights
    are), so the result is ready for `export_pruned`."""
    if not hasattr(model, "merge_and_unload"):
        raise ValueError("merge_adapters expects a PEFT model (with merge_and_unload); this model has no adapters.")
    config = get_bank(model).config
    remove_dgate(model, merge=True)
    return apply_dgate(model.merge_and_unload(), config)


def get_bank(model: nn.Module, required: bool = True) -> GateBank | None:
    """The `GateBank` of a gated model (also through PEFT, DDP and compile wrappers)."""
    for m in (model, _unwrap(model)):
        bank = getattr(m, BANK_NAME, None)
        if isinstance(bank, GateBank):
            return bank
    for m in model.modules():
        if isinstance(m, GateBank):
            return m
    if required:
        raise ValueError("This model is not gated: call hf_dgate.apply_dgate(model, DGateConfig(...)) first.")
    return None


def is_gated(model: nn.Module) -> bool:
    return get_bank(model, required=False) is not None


def penalty(model: nn.Module, lam: float | None = None) -> torch.Tensor:
    """The smooth surrogate R = (lam/D) sum_g (||w_g||^2 + sum_d gamma_{g,d}^2), lam included; add it to the loss."""
    return get_bank(model).penalty(lam)


def induced_penalty(model: nn.Module, lam: float | None = None) -> torch.Tensor:
    """lam * sum_g ||theta_g||^(2/D), the non-smooth penalty the surrogate solves (R >= it)."""
    return get_bank(model).induced_penalty(lam)


def misalignment(model: nn.Module, lam: float | None = None) -> torch.Tensor:
    """R - induced penalty (>= 0, 0 when every group is balanced)."""
    return get_bank(model).misalignment(lam)


def effective_norms(model: nn.Module, target: str) -> torch.Tensor:
    """||theta_g||_2 of every group of `target`, in layer order."""
    return get_bank(model).effective_norms(target)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters carry the model's names (through DDP/compile wrappers and PEFT)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model
