"""Save and restore gated models: the model's own files plus `dgate_config.json`; gates ride in the weights."""

from __future__ import annotations

import glob
import os

import torch
from torch import nn

from .config import DGateConfig
from .patch import BANK_NAME, _unwrap, apply_dgate, get_bank

GATE_PREFIX = BANK_NAME + "."


def save_gated(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """`model.save_pretrained(dir)` (gates included as `dgate.*` tensors) and the DGateConfig beside it."""
    bank = get_bank(model)
    _unwrap(model).save_pretrained(save_directory, **save_kwargs)
    bank.config.save_pretrained(save_directory)


def load_gates(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `dgate.*` tensors of a saved gated model, without the `dgate.` prefix."""
    from safetensors import safe_open

    gates: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.startswith(GATE_PREFIX):
                    gates[key[len(GATE_PREFIX) :]] = f.get_tensor(key)
    return gates


def load_gated(directory: str | os.PathLike, model_class: type | None = None, **from_pretrained_kwargs) -> nn.Module:
    """Rebuild a model saved by `save_gated` / `DGateTrainer.save_model`, gates included, ready to train or export."""
    import transformers

    dconfig = DGateConfig.from_pretrained(directory)
    gates = load_gates(directory)
    if not gates:
        raise ValueError(f"{directory!r} has a dgate_config.json but no 'dgate.*' gate tensors in its safetensors.")
    if model_class is None:
        hf_config = transformers.AutoConfig.from_pretrained(directory)
        arch = (getattr(hf_config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise ValueError(f"Cannot tell the model class of {directory!r}; pass load_gated(dir, model_class=...).")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the gate tensors are "unexpected" to the plain model class
    try:
        model = model_class.from_pretrained(directory, **from_pretrained_kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    apply_dgate(model, dconfig)
    bank = get_bank(model)
    missing, unexpected = bank.load_state_dict(gates, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The gates in {directory!r} do not match the model gated with its dgate_config.json "
            f"(missing {missing}, unexpected {unexpected})."
        )
    return model
