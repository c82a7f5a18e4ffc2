"""Save and restore gated models: the model's own files, `dgate_config.json`, and `dgate_manifest.json`, which
names the weight files the save wrote and records how the gates in them were made (method, depth, targets and
shapes). Loading reads exactly those files and refuses a config that would read the gates differently."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .config import DGateConfig
from .methods import METHODS, get_method
from .patch import BANK_NAME, apply_dgate, get_bank, unwrap

GATE_PREFIX = BANK_NAME + "."
MANIFEST_NAME = "dgate_manifest.json"
MANIFEST_FORMAT = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def save_gated(model: nn.Module, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """`model.save_pretrained(dir)` (gates included as `dgate.*` tensors), the DGateConfig and the manifest.

    Atomic: the save is written to a temporary folder beside `save_directory` and swapped in when complete, so a
    failure midway (a full disk) leaves the previous save loadable. Files of the folder this save does not write
    (a tokenizer, a README, subfolders) are kept; the previous save's weight files are not. A PEFT model's adapter
    configs go into the manifest, so `load_gated` rebuilds the adapters and restores every tensor."""
    from .codefree import no_code_references, strip_code_references
    from .outdir import updating

    bank = get_bank(model)
    base = unwrap(model)
    previous = _previous_save_files(save_directory)
    with updating(save_directory, carry=lambda name: name not in previous) as tmp:
        with no_code_references(base):  # no source model's remote code rides along (hf_dgate/codefree.py)
            base.save_pretrained(tmp, **save_kwargs)
        strip_code_references(tmp)
        bank.config.save_pretrained(tmp)
        write_manifest(bank, tmp, _loaded_weight_files(tmp), peft=peft_record(model))


def _previous_save_files(directory: str | os.PathLike) -> set[str]:
    """The weight files an earlier save in `directory` wrote (not carried into a new save: they would be stale)."""
    try:
        manifest = read_manifest(directory)
    except ValueError:
        manifest = None
    files = set(manifest["weights"]) if manifest else set()
    if os.path.isdir(directory):
        files |= {n for n in os.listdir(directory) if n.startswith("model") and n.endswith(".safetensors")}
    return files | {INDEX_NAME}


def peft_record(model: nn.Module) -> dict[str, Any] | None:
    """The adapter configs of a PEFT model (JSON-ready), or None for a plain model."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(model, "get_base_model"):
        return None
    adapters = {}
    for name, cfg in configs.items():
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
        adapters[name] = {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}
    active = getattr(model, "active_adapter", None)
    return {"adapters": adapters, "active": active if isinstance(active, str) else None}


# ---- the manifest ---------------------------------------------------------------------------------------------
def gate_record(bank: Any) -> dict[str, Any]:
    """How the gates were made: what reading them back needs to agree with."""
    return {
        "method": bank.method,
        "depth": bank.depth,
        "targets": list(bank.gammas.keys()),
        "gates": {t: list(p.shape) for t, p in bank.gammas.items()},  # DTensor shapes are global shapes
    }


def weight_files_state(directory: str | os.PathLike) -> dict[str, tuple[int, int, int] | None]:
    """Identity and modification time of the weight file and the shard index, taken before a save."""
    state: dict[str, tuple[int, int, int] | None] = {}
    for name in (WEIGHTS_NAME, INDEX_NAME):
        try:
            st = os.stat(os.path.join(directory, name))
            state[name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            state[name] = None
    return state


def written_weight_files(directory: str | os.PathLike, before: dict[str, tuple[int, int, int] | None]) -> list[str]:
    """The safetensors files a save just wrote (transformers leaves older ones of another layout in place)."""
    after = weight_files_state(directory)
    if after[INDEX_NAME] is not None and after[INDEX_NAME] != before.get(INDEX_NAME):
        return _index_files(directory)
    if after[WEIGHTS_NAME] is not None and after[WEIGHTS_NAME] != before.get(WEIGHTS_NAME):
        return [WEIGHTS_NAME]
    return _loaded_weight_files(directory)  # a rewrite within the clock's resolution: what transformers loads


def _loaded_weight_files(directory: str | os.PathLike) -> list[str]:
    """The files transformers itself loads from a folder: `model.safetensors`, else the shards of the index."""
    if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        return [WEIGHTS_NAME]
    if os.path.isfile(os.path.join(directory, INDEX_NAME)):
        return _index_files(directory)
    return []


def write_manifest(
    bank: Any, directory: str | os.PathLike, weight_files: list[str], peft: dict[str, Any] | None = None
) -> str:
    """Write `dgate_manifest.json`: the weight files holding this save's gates, how the gates were made and (PEFT
    models) the adapter configs."""
    path = os.path.join(directory, MANIFEST_NAME)
    data = {"format": MANIFEST_FORMAT, "weights": list(weight_files), **gate_record(bank)}
    if peft is not None:
        data["peft"] = peft
    with open(path, "w") as f:
        json.dump(data, f, indent=2, allow_nan=False)
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The validated manifest of a save, or None for folders saved before manifests existed."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path!r} is not valid JSON ({e}); re-save the model with hf_dgate.save_gated.") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path!r} is not a manifest hf_dgate wrote (format {MANIFEST_FORMAT}); re-save the model.")
    files = data.get("weights")
    if not isinstance(files, list) or not all(_plain_safetensors_name(f) for f in files):
        raise ValueError(f"{path!r}: field 'weights' must list safetensors files in the folder; re-save the model.")
    gates = data.get("gates")
    ok = isinstance(gates, dict) and all(
        isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in s) for s in gates.values()
    )
    if not ok:
        raise ValueError(f"{path!r}: field 'gates' must map each target to its gate shape; re-save the model.")
    return data


def _plain_safetensors_name(name: Any) -> bool:
    """A file directly in the folder: no directories, no '..', no hidden files."""
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and os.path.basename(name) == name
        and not name.startswith(".")
    )


def _index_files(directory: str | os.PathLike) -> list[str]:
    path = os.path.join(directory, INDEX_NAME)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path!r} is not a valid shard index ({e}); re-save the model.") from None
    if not all(_plain_safetensors_name(f) for f in files):
        raise ValueError(f"{path!r} names files outside the folder; re-save the model with hf_dgate.save_gated.")
    return files


def gate_weight_files(directory: str | os.PathLike) -> list[str]:
    """The files that hold the gates: those the manifest names; for older folders the file transformers itself
    loads (`model.safetensors`, else the shard index). Never every `*.safetensors`: a stray copy would count."""
    manifest = read_manifest(directory)
    if manifest is not None:
        files = manifest["weights"]
        if WEIGHTS_NAME not in files and os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            raise ValueError(
                f"{directory!r} holds a {WEIGHTS_NAME} that the last save did not write (it wrote {files}); "
                "transformers would load that stale file instead. Move it away, or re-save into an empty folder."
            )
    else:
        files = _loaded_weight_files(directory)
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ValueError(f"{directory!r} lacks the weight file(s) {missing} its save wrote; copy the whole folder.")
    return files


def load_gates(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `dgate.*` tensors of a saved gated model, without the `dgate.` prefix, read from the saved files only."""
    from safetensors import safe_open

    gates: dict[str, torch.Tensor] = {}
    for name in gate_weight_files(directory):
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(GATE_PREFIX):
                    gates[key[len(GATE_PREFIX) :]] = f.get_tensor(key)
    return gates


def check_gates_match(
    directory: str | os.PathLike, dconfig: DGateConfig, gates: dict[str, torch.Tensor], expected: dict[str, Any]
) -> None:
    """Refuse a `dgate_config.json` that would read the saved gates differently from how they were trained.

    `expected` is `gate_record` of the bank the config builds on this model. The manifest (when there is one)
    says how the gates were made; without one the saved shapes still tell depth and targets apart, and gates
    that moved away from 1 tell that a gate-free method ('direct', 'slimming') would ignore them.
    """
    where = os.path.join(directory, "dgate_config.json")
    saved = {k[len("gammas.") :]: v for k, v in gates.items() if k.startswith("gammas.")}
    manifest = read_manifest(directory)
    if manifest is not None:
        conflict = record_conflict(manifest, expected)
        if conflict is not None:
            key, was, now = conflict
            raise ValueError(
                f"{where!r} says {key}={now!r}, but the saved gates were trained with {key}={was!r} (per "
                f"{MANIFEST_NAME}); restore {key} in dgate_config.json, or gate the model afresh with apply_dgate."
            )
    if sorted(saved) != sorted(expected["targets"]) and manifest is not None:  # the config agrees with the manifest
        raise ValueError(
            f"The weight files in {os.fspath(directory)!r} hold gates for {sorted(saved)} but {MANIFEST_NAME} says the "
            f"save wrote {sorted(manifest.get('targets') or [])}: the files were changed after saving. Re-save the "
            "model with hf_dgate.save_gated."
        )
    if sorted(saved) != sorted(expected["targets"]):
        raise ValueError(
            f"{where!r} gates the targets {sorted(expected['targets'])} but the saved gates are for {sorted(saved)}; "
            "set the target in dgate_config.json back to what was trained."
        )
    for t, shape in expected["gates"].items():
        if list(saved[t].shape) != shape:
            rows, want = saved[t].shape[0], shape[0]
            hint = (
                f"the saved gates have {rows} row(s), i.e. depth={rows + 1} for method='dgate' (1 for 'l0')"
                if rows != want
                else f"the saved gates cover {saved[t].shape[1]} groups, the model has {shape[1]}"
            )
            raise ValueError(
                f"The gates for {t!r} in {directory!r} have shape {tuple(saved[t].shape)} but {where!r} (depth="
                f"{dconfig.depth}, method={dconfig.method!r}) needs {tuple(shape)}: {hint}. Fix dgate_config.json."
            )
    if manifest is None and not get_method(expected["method"]).trainable_gates:
        moved = [t for t, g in saved.items() if not torch.all(g == 1)]
        if moved:
            gated = " or ".join(repr(n) for n, m in METHODS.items() if m.trainable_gates)
            raise ValueError(
                f"{where!r} says method={expected['method']!r}, which uses no gates, but the saved gates for {moved} "
                f"were trained (not all 1) and would be ignored; set method back to {gated}."
            )


def record_conflict(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first of method, targets and (for D-Gating) depth on which a saved gate record and the current bank
    differ, as (field, saved value, current value); None when the saved gates can be read as they were made."""
    for key in get_method(current["method"]).record_keys():  # (only D-Gating reads the depth off the gates)
        was, now = saved.get(key), current[key]
        if (sorted(was) if isinstance(was, list) else was) != (sorted(now) if isinstance(now, list) else now):
            return key, was, now
    return None


def load_gated(directory: str | os.PathLike, model_class: type | None = None, **from_pretrained_kwargs) -> nn.Module:
    """Rebuild a model saved by `save_gated` / `DGateTrainer.save_model`, gates included, ready to train or export.

    Every tensor is restored or the load is refused: transformers' own loading report is checked (a weight missing
    from the files, or a tensor the model has no place for, raises ValueError naming it), and a PEFT model saved
    with its adapters is rebuilt with them and checked tensor by tensor."""
    import transformers

    from .loading import transformers_model_class

    dconfig = DGateConfig.from_pretrained(directory)
    gates = load_gates(directory)
    if not gates:
        raise ValueError(
            f"{directory!r} has a dgate_config.json but its weight files {gate_weight_files(directory)} hold no "
            "'dgate.*' gate tensors; save the gated model with hf_dgate.save_gated."
        )
    if model_class is None:
        model_class = transformers_model_class(transformers.AutoConfig.from_pretrained(directory))
        if model_class is None:
            raise ValueError(f"Cannot tell the model class of {directory!r}; pass load_gated(dir, model_class=...).")
    adapters = (read_manifest(directory) or {}).get("peft")
    model, info = _from_pretrained(model_class, directory, quiet=adapters is not None, **from_pretrained_kwargs)
    if adapters is not None:
        model = _with_adapters(model, adapters, directory)
    else:
        check_loading_info(directory, info)
    apply_dgate(model, dconfig)
    bank = get_bank(model)
    check_gates_match(directory, dconfig, gates, gate_record(bank))
    if adapters is not None:  # every tensor of the files, into the rebuilt adapter model, key for key
        _load_all(unwrap(model), directory)
        return model
    missing, unexpected = bank.load_state_dict(gates, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"The gates in {directory!r} do not fit the model gated with its dgate_config.json "
            f"(missing {missing}, unexpected {unexpected}); re-save the model with hf_dgate.save_gated."
        )
    return model


RESHAPED = "whose shape does not match the model config.json builds"
GATE_KEY_PATTERN = r"(^|\.)" + BANK_NAME + r"\."


def _from_pretrained(model_class: type, directory: Any, quiet: bool, **kwargs) -> tuple[nn.Module, dict[str, Any]]:
    """`model_class.from_pretrained` with its loading report; the `dgate.*` tensors are declared expected (so the
    report names only real problems and transformers' logging is left as the user set it). `quiet`: the adapter
    layout of a PEFT save is checked by `_load_all` instead, so transformers' report on it would only mislead."""
    import transformers

    attr = "_keys_to_ignore_on_load_unexpected"
    own = attr in vars(model_class)
    before = getattr(model_class, attr, None)
    setattr(model_class, attr, [*(before or []), GATE_KEY_PATTERN])
    verbosity = transformers.logging.get_verbosity()
    if quiet:
        transformers.logging.set_verbosity_error()
    try:
        return model_class.from_pretrained(directory, output_loading_info=True, **kwargs)
    except RuntimeError as e:
        if "mismatched" not in str(e) and "size mismatch" not in str(e):
            raise
        _refuse(directory, {RESHAPED: _reshaped(model_class, directory)})
        raise
    finally:
        transformers.logging.set_verbosity(verbosity)
        if own:
            setattr(model_class, attr, before)
        else:
            delattr(model_class, attr)


def _reshaped(model_class: type, directory: Any) -> list[str]:
    """Tensors of the save's files whose shape differs from the model the config builds (read from the headers)."""
    import transformers
    from safetensors import safe_open

    from .compat import build_on_meta

    shapes = {k: tuple(v.shape) for k, v in build_on_meta(model_class, transformers.AutoConfig.from_pretrained(
        directory)).state_dict().items()}  # fmt: skip
    out = []
    for name in gate_weight_files(directory):
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            out += [k for k in f.keys() if k in shapes and tuple(f.get_slice(k).get_shape()) != shapes[k]]
    return sorted(out)


SAVE_REMEDY = (
    "The folder is damaged or was not written by hf_dgate.save_gated for this model class; re-save it, or pass the "
    "right model_class."
)


def check_loading_info(
    directory: Any, info: dict[str, Any], remedy: str = SAVE_REMEDY, error: type[Exception] = ValueError
) -> None:
    """`error` naming the tensors transformers did not restore (missing, unexpected or of another shape): its
    loader only logs them, and a model with random or dropped tensors must not come back as if loaded."""
    import re

    gate = re.compile(GATE_KEY_PATTERN)
    problems = {
        "missing from the files (they would be random)": sorted(info.get("missing_keys") or []),
        "in the files but not in the model": sorted(k for k in info.get("unexpected_keys") or [] if not gate.search(k)),
        RESHAPED: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []),
    }
    _refuse(directory, problems, remedy, error)


def _refuse(
    directory: Any, problems: dict[str, list[str]], remedy: str = SAVE_REMEDY, error: type[Exception] = ValueError
) -> None:
    parts = [f"{len(keys)} tensor(s) {what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for what, keys in problems.items() if keys]  # fmt: skip
    if parts:
        raise error(f"Cannot load {os.fspath(directory)!r} completely: {'; '.join(parts)}. {remedy}")


def _with_adapters(model: nn.Module, record: dict[str, Any], directory: Any) -> nn.Module:
    """Wrap `model` in the PEFT adapters the save recorded (their weights are loaded afterwards by `_load_all`)."""
    try:
        import peft
        from peft.config import PeftConfig
    except ImportError:
        raise ValueError(f"{os.fspath(directory)!r} holds a PEFT model; install peft to load it.") from None
    adapters = record.get("adapters")
    if not isinstance(adapters, dict) or not adapters or not all(isinstance(v, dict) for v in adapters.values()):
        raise ValueError(f"{os.path.join(directory, MANIFEST_NAME)!r}: field 'peft' is malformed; re-save the model.")
    names = list(adapters)
    configs = {n: PeftConfig.from_peft_type(**{k: v for k, v in adapters[n].items()}) for n in names}
    for cfg in configs.values():
        cfg.inference_mode = False
    wrapped = peft.get_peft_model(model, configs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        wrapped.add_adapter(n, configs[n])
    if record.get("active") in configs:
        wrapped.set_adapter(record["active"])
    return wrapped


def _load_all(model: nn.Module, directory: Any) -> None:
    """Load every tensor of the save's weight files into `model`, refusing any key either side lacks (a tied
    weight counts as restored when the tensor it shares is)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for name in gate_weight_files(directory):
        state.update(load_file(os.path.join(directory, name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(t) for n, t in _named_tensors(model) if n in state}
    missing = [k for k in missing if id(dict(_named_tensors(model)).get(k)) not in loaded]
    _refuse(directory, {
        "missing from the files (they would be random)": sorted(missing),
        "in the files but not in the model": sorted(unexpected),
    })  # fmt: skip


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
