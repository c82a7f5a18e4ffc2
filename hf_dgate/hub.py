"""An export leaves the process: a directory (weights, config, summary, model card) written atomically, and the
Hub upload. Kept apart from the pruning so that the surgery never needs the network."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from torch import nn

from .export import ExportError, export_pruned, pruned_structure
from .loading import write_remote_code
from .patch import _unwrap, get_bank, remove_dgate

CARD_TEMPLATE = """---
{card_data}
---

# {title}

This model was pruned with hf_dgate (D-Gating, Kolb et al., NeurIPS 2025): groups
(attention heads, MLP neurons, layers) trained to exact zeros under a structured `L_{{2,2/D}}` penalty were
removed, which leaves the model's outputs unchanged up to float rounding (max |logit difference| to the gated
model on a test batch: {max_diff}).

- Base model: {base_model}
- Loading: {loading}

## Size and cost

| | before | after | ratio |
|---|---:|---:|---:|
| parameters | {params_before:,} | {params_after:,} | {params_ratio:.2f}x |
| forward FLOPs ({flops_input}) | {flops_before:,} | {flops_after:,} | {flops_ratio:.2f}x |
| forward latency ({device}) | {lat_before} | {lat_after} | {speedup} |

## Kept structure

{structure_table}

## D-Gating configuration

```json
{dgate_config}
```
"""


def build_model_card(summary: dict[str, Any]) -> Any:
    """A `huggingface_hub.ModelCard` describing an export (summary as produced by `export_to_dir`)."""
    import json

    from huggingface_hub import ModelCard, ModelCardData

    base = summary.get("base_model") or None
    data = ModelCardData(
        library_name="transformers",
        base_model=base if base and not os.path.isdir(base) else None,
        tags=["hf-dgate", "d-gating", "pruned", "structured-sparsity"],
    )
    loading = (
        "`transformers.AutoModel*.from_pretrained` (the config expresses the pruned shape)"
        if summary.get("native")
        else "`hf_dgate.AutoPrunedModel.from_pretrained` (layers keep different numbers of heads/neurons)"
    )
    if not summary.get("native") and summary.get("remote_code"):
        auto = summary["remote_code"]
        loading += f", or without hf_dgate `transformers.{auto}.from_pretrained(..., trust_remote_code=True)`"
    lat_b, lat_a = summary.get("latency_before_s"), summary.get("latency_after_s")
    text = CARD_TEMPLATE.format(
        card_data=data.to_yaml(),
        title=summary.get("title") or f"Pruned {base or 'model'} (D-Gating)",
        max_diff=_fmt(summary.get("max_abs_diff")),
        base_model=base or "unknown",
        loading=loading,
        params_before=summary["params_before"],
        params_after=summary["params_after"],
        params_ratio=summary["params_before"] / max(summary["params_after"], 1),
        flops_input=summary.get("flops_input", "one batch"),
        flops_before=summary["flops_before"],
        flops_after=summary["flops_after"],
        flops_ratio=summary["flops_before"] / max(summary["flops_after"], 1),
        device=summary.get("device", "cpu"),
        lat_before=f"{1e3 * lat_b:.2f} ms" if lat_b else "not measured",
        lat_after=f"{1e3 * lat_a:.2f} ms" if lat_a else "not measured",
        speedup=f"{lat_b / lat_a:.2f}x measured" if lat_b and lat_a else "-",
        structure_table=structure_table(summary.get("structure") or {}),
        dgate_config=json.dumps(summary.get("dgate_config", {}), indent=2),
    )
    return ModelCard(text)


def structure_table(structure: dict[str, Any]) -> str:
    """Markdown table: per kept layer, its original index and the heads / key-value heads / neurons it keeps."""
    heads, kv, neurons = structure.get("heads"), structure.get("kv_heads"), structure.get("neurons")
    if not heads:
        return "(no per-layer structure recorded)"
    layers = structure.get("layers") or list(range(len(heads)))
    n_orig = structure.get("num_hidden_layers_original", len(layers))
    dropped = sorted(set(range(n_orig)) - set(layers))
    rows = ["| layer (original) | heads kept | key/value heads kept | neurons kept |", "|---:|---|---:|---:|"]
    for i, h in enumerate(heads):
        rows.append(f"| {i} ({layers[i] if i < len(layers) else '?'}) | {len(h)}: {h} | {kv[i]} | {neurons[i]} |")
    rows.append("")
    rows.append(f"Layers removed entirely: {dropped if dropped else 'none'}.")
    return "\n".join(rows)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload model pruned with hf_dgate",
) -> str:
    """Create the Hub repo if needed and upload every file of `folder`; returns the repo id."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return repo_id


def _fmt(x: Any) -> str:
    return f"{x:.2e}" if isinstance(x, float) else "not measured"


SUMMARY_NAME = "dgate_export.json"


def export_to_dir(
    model: nn.Module,
    output_dir: str | os.PathLike,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    threshold: float | None = None,
    *,
    measure: bool = True,
    seq_len: int = 128,
    overwrite: bool = True,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    progress: bool = False,
    remote_code: bool = True,
) -> dict[str, Any]:
    """Export a gated model to `output_dir`: weights, config, `dgate_export.json` and a model card.

    The card gives the base model, the DGateConfig, the kept heads/neurons per layer, parameters and FLOPs
    before and after, the measured speed-up, and the largest output difference to the gated model. Files are
    written to a temporary directory beside `output_dir` and renamed into place, so a failure never leaves a
    half-written export. Where the config cannot express the pruned shape, `remote_code` adds a generated
    modeling file so that `AutoModel*.from_pretrained(dir, trust_remote_code=True)` loads it without hf_dgate.
    With `push_to_hub` the directory is uploaded to `hub_model_id`. Returns the summary.
    """
    from tqdm.auto import tqdm

    from . import flops as F

    if push_to_hub and not hub_model_id:
        raise ExportError("push_to_hub=True needs hub_model_id='user/name'.")
    bank = get_bank(model)
    try:
        thr = bank.check_threshold(threshold)
    except ValueError as e:
        raise ExportError(str(e)) from None
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir) and not overwrite:
        raise ExportError(f"{output_dir!r} exists; choose another directory or pass overwrite=True.")
    steps = tqdm(total=5, desc="hf-dgate export", disable=not progress, unit="step")
    base = _unwrap(model)
    steps.set_postfix_str("pruning")
    pruned = export_pruned(model, thr)
    steps.update()
    summary: dict[str, Any] = {
        "base_model": base_model or getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        "dgate_config": bank.config.to_dict(),
        "threshold": float(thr),
        "structure": pruned_structure(pruned),
        "native": bool((pruned_structure(pruned) or {}).get("native")),
        "params_before": F.count_params(base),
        "params_after": F.count_params(pruned),
    }
    steps.set_postfix_str("measuring")
    with torch.no_grad():
        # the dense reference for timing is the folded model without hooks (a second copy, only when measuring)
        dense = _folded_copy(base) if measure else None
        inputs = F.example_inputs(pruned, seq_len=seq_len)
        summary["flops_input"] = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
        summary["flops_before"] = F.count_flops(dense if dense is not None else model, inputs)
        summary["flops_after"] = F.count_flops(pruned, inputs)
        was_training = base.training
        base.eval()
        ref, out = _first_output(model(**inputs)), _first_output(pruned(**inputs))
        base.train(was_training)
        summary["max_abs_diff"] = float((ref.float() - out.float()).abs().max()) if ref.numel() else 0.0
        steps.update()
        if dense is not None:
            summary["device"] = str(next(pruned.parameters()).device)
            summary["latency_before_s"] = F.forward_latency(dense, inputs, repeats=5)
            summary["latency_after_s"] = F.forward_latency(pruned, inputs, repeats=5)
            summary["speedup"] = summary["latency_before_s"] / summary["latency_after_s"]
        del dense
    summary["flops_ratio"] = summary["flops_before"] / max(summary["flops_after"], 1)
    steps.update()
    steps.set_postfix_str("writing")
    parent = os.path.dirname(output_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hf-dgate-export-", dir=parent)
    try:
        if not summary["native"] and remote_code:
            summary["remote_code"] = write_remote_code(pruned, tmp)
        pruned.save_pretrained(tmp)
        with open(os.path.join(tmp, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2)
        build_model_card(summary).save(os.path.join(tmp, "README.md"))
        _atomic_replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps.update()
    summary["path"] = output_dir
    if push_to_hub:
        steps.set_postfix_str("uploading")
        summary["hub_repo"] = push_folder(output_dir, hub_model_id, private=private, token=token)
    steps.update()
    steps.close()
    return summary


def _folded_copy(base: nn.Module) -> nn.Module:
    dense = copy.deepcopy(base)
    remove_dgate(dense, merge=True)
    return dense.eval()


def _first_output(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        val = getattr(out, key, None)
        if isinstance(val, torch.Tensor):
            return val
    return out[0] if isinstance(out, (tuple, list)) else out


def _atomic_replace(src: str, dst: str) -> None:
    """Move the finished directory `src` to `dst`; an existing `dst` is swapped out, then deleted."""
    if not os.path.exists(dst):
        os.replace(src, dst)
        return
    old = f"{dst}.old-{os.getpid()}-{int(time.time())}"
    os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
