"""Inject and remove D-Gating: the verbs users call on a model."""

from __future__ import annotations

import contextlib
import math
import types
from typing import Any

import torch
from torch import nn

from .config import DGateConfig
from .errors import NonFiniteError
from .groups import GateBank
from .targets import find_group_sets

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
    base = unwrap(model)
    # under `with torch.device("meta")` the index vectors would hold no values: build them on the CPU
    cpu = torch.device("cpu") if torch.get_default_device().type == "meta" else contextlib.nullcontext()
    with cpu:
        sets = find_group_sets(base, config, example_inputs)
        check_adapters(base, sets)
        bank = GateBank(base, sets, config)
    ref = next((p for p in base.parameters()), None)
    if ref is not None:  # gates in fp32 (fp64 for fp64 models), on the model's device
        bank.to(device=ref.device, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
    bank.train(base.training)
    base.add_module(BANK_NAME, bank)
    bank.attach()
    if _is_peft_model(model):  # PEFT's own merge would drop the gates' hooks with the adapter layers
        model.merge_and_unload = types.MethodType(_gated_merge_and_unload, model)
    return model


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None))


def _gated_merge_and_unload(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """`merge_and_unload()` of a gated PEFT model: PEFT replaces each adapter layer by a plain one, and the gates'
    hooks sit on the adapter layers, so the merged model would silently compute without its gates. Here the gates
    are folded into base and adapter weights first and the merged model is gated again (`merge_adapters`): the
    outputs stay the same and the zero groups stay zero."""
    if args or kwargs:
        raise ValueError(
            "merge_and_unload() on a gated model takes no arguments (the gates are folded, the adapters merged and "
            "the merged model gated again); call hf_dgate.remove_dgate(model) first to use PEFT's options."
        )
    return merge_adapters(self)


def remove_dgate(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove hooks and gates; with `merge`, first fold each group's gate product into its weights."""
    bank = get_bank(model)
    if merge:
        bank.fold()
    bank.detach()
    delattr(unwrap(model), BANK_NAME)
    vars(model).pop("merge_and_unload", None)  # PEFT's own merge applies again
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """PEFT model -> plain gated model: fold the gates into base + LoRA weights, merge the adapters
    (`merge_and_unload`) and gate the merged model again with gates at 1. Zero groups stay zero (their weights
    are), so the result is ready for `export_pruned`."""
    if not hasattr(model, "merge_and_unload"):
        raise ValueError("merge_adapters expects a PEFT model (with merge_and_unload); this model has no adapters.")
    bank = get_bank(model)
    known = {id(m) for m in bank._modules_by_name.values()}
    added = [n for n, m in unwrap(model).named_modules() if _is_tuner_layer(m) and id(m) not in known]
    if added:
        raise ValueError(
            f"The adapters on {added[:3]} were added after apply_dgate, so the gates do not scale them and folding "
            "would be wrong. Gate the PEFT model itself: apply_dgate(get_peft_model(model, ...), config)."
        )
    check_adapters(unwrap(model), bank.group_sets)
    config = bank.config
    remove_dgate(model, merge=True)
    return apply_dgate(model.merge_and_unload(), config)  # PEFT's own: remove_dgate took the gated override away


def _is_tuner_layer(module: nn.Module) -> bool:
    """A PEFT adapter layer or a PEFT wrapper (modules_to_save), recognised without importing PEFT."""
    names = {c.__name__ for c in type(module).__mro__}
    return bool(names & {"BaseTunerLayer", "AuxiliaryTrainingWrapper"})


def check_adapters(model: nn.Module, group_sets: list) -> None:
    """Accept only the PEFT adapters whose gate fold is implemented and tested: plain LoRA on Linear/Conv1D.

    A gate scales a group's activation; folding it into the weights must give the same function. For LoRA that is
    W + BA with the rows of W and B (or the columns of W and A) scaled. DoRA renormalises every row by its norm,
    which cancels a row scale (a fold would silently undo the gate); LoRA with a trained bias, other variants and
    other adapter types (IA3, LoHa, LoKr, AdaLoRA, ...) are not folded either, so they are refused where a gate
    touches them. Adapters on modules no gate touches (say LoRA or DoRA on q_proj) are merged exactly on export.
    """
    gated = {site.module for gs in group_sets for site in gs.sites}
    gated |= {sl.module for gs in group_sets for sl in gs.primary}
    for name, module in model.named_modules():
        if not _is_tuner_layer(module):
            continue
        inside = any(g == name or g.startswith(name + ".") for g in gated)  # the adapter wraps a gated layer
        around = any(name.startswith(g + ".") for g in gated)  # the adapter sits inside a gated whole module
        if not inside and not around:
            continue
        kind = _adapter_kind(module)
        if around or kind != "LoRA":
            where = "inside a module gated as a whole" if around else "on a gated layer"
            raise ValueError(
                f"apply_dgate supports plain LoRA adapters only, but {name!r} {where} is {kind}, whose gates "
                "cannot be folded exactly. Merge that adapter first (peft_model.merge_and_unload()) and gate the "
                "merged model, or use plain LoRA (use_dora=False, lora_bias=False) on the gated modules."
            )
    modules = dict(model.named_modules())
    for gs in group_sets:  # a gate on an adapter layer must fold into its base weight (and so into the adapter)
        folded = {sl.module for sl in gs.primary}
        for site in gs.sites:
            if _is_tuner_layer(modules.get(site.module, model)) and f"{site.module}.base_layer" not in folded:
                raise ValueError(
                    f"The {gs.target!r} gate on adapter layer {site.module!r} scales no slice of its base weight, "
                    "so folding it would skip the adapter (a GroupRule with kind='module' on a PEFT layer?). Use "
                    "kind='out' or 'in' there, or merge the adapter first (peft_model.merge_and_unload())."
                )


def _adapter_kind(module: nn.Module) -> str:
    """'LoRA' for a plain LoRA Linear (the one kind the fold supports), else a short name of what it is."""
    cls = type(module)
    if not (cls.__name__ == "Linear" and cls.__module__.startswith("peft.tuners.lora.")):
        family = cls.__module__.split(".")[2] if cls.__module__.startswith("peft.tuners.") else "PEFT"
        return f"a PEFT {family}.{cls.__name__} layer"
    if any(getattr(module, "use_dora", {}).values()) or len(getattr(module, "lora_magnitude_vector", {})):
        return "DoRA (use_dora=True)"
    variants = getattr(module, "lora_variant", {})
    if variants:
        return f"a LoRA variant ({', '.join(sorted({type(v).__name__ for v in variants.values()}))})"
    if any(getattr(module, "lora_bias", {}).values()):
        return "LoRA with lora_bias=True"
    return "LoRA"


def get_bank(model: nn.Module, required: bool = True) -> GateBank | None:
    """The `GateBank` of a gated model (also through PEFT, DDP and compile wrappers)."""
    for m in (model, unwrap(model)):
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
    """The smooth surrogate R = (lam/D) sum_g (||w_g||^2 + sum_d gamma_{g,d}^2), lam included; add it to the loss.

    Raises NonFiniteError when a gate or the penalty is NaN/inf (training diverged): one fused check per call, no
    per-group work. Skipped while torch.compile traces, so a compiled train step stays one graph.
    """
    bank = get_bank(model)
    pen = bank.penalty(lam)
    if not torch.compiler.is_compiling():
        probe = pen.detach()
        for t in bank.targets:  # 0 * NaN and 0 * inf are NaN, 0 * any finite gate is 0: no overflow, one sync
            probe = probe + (bank.gates(t).detach() * 0).sum()
        if not math.isfinite(float(probe)):
            bank.assert_finite("compute the D-Gating penalty", weights=True)
            raise NonFiniteError(
                f"The D-Gating penalty is {float(pen)} although every gate and weight is finite (lam="
                f"{bank.lam if lam is None else lam:g} "
                "times the group norms overflows); lower lam or rescale the weights."
            )
    return pen


def induced_penalty(model: nn.Module, lam: float | None = None) -> torch.Tensor:
    """lam * sum_g ||theta_g||^(2/D), the non-smooth penalty the surrogate solves (R >= it)."""
    return get_bank(model).induced_penalty(lam)


def misalignment(model: nn.Module, lam: float | None = None) -> torch.Tensor:
    """R - induced penalty (>= 0, 0 when every group is balanced)."""
    return get_bank(model).misalignment(lam)


def effective_norms(model: nn.Module, target: str) -> torch.Tensor:
    """||theta_g||_2 of every group of `target`, in layer order."""
    return get_bank(model).effective_norms(target)


def unwrap(model: nn.Module) -> nn.Module:
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


_unwrap = unwrap  # (its name before it was public)
