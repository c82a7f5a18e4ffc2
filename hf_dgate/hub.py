"""Model card and Hub upload for exported models (kept apart from the pruning so the math never needs the network)."""

from __future__ import annotations

import os
from typing import Any

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
