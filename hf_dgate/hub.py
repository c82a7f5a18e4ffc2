"""An export leaves the process: a directory (weights, config, summary, model card) written atomically, and the
Hub upload. Kept apart from the pruning so that the surgery never needs the network."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .export import ExportError, export_checked, pruned_structure
from .outdir import OutputDir, local_source, resolve
from .patch import get_bank, remove_dgate, unwrap
from .record import PruningRecord, StackRecord
from .verify import Verification

CARD_TEMPLATE = """---
{card_data}
---

# {title}
{loading_section}
This model was pruned with hf_dgate (D-Gating, Kolb et al., NeurIPS 2025): groups (attention heads, MLP
neurons, layers) that training under a structured `L_{{2,2/D}}` penalty drove below the threshold were removed.

{outputs}
{serving}
- Base model: {base_model}
- Loading: {loading}

## Size and cost

| | before | after | ratio |
|---|---:|---:|---:|
| parameters | {params_before:,} | {params_after:,} | {params_ratio:.2f}x |
| forward FLOPs ({flops_input}) | {flops_before:,} | {flops_after:,} | {flops_ratio:.2f}x |
| forward latency ({device}) | {lat_before} | {lat_after} | {speedup} |

{compression_section}## Kept structure

Gated: {targets}.

{structure_table}

## D-Gating configuration

```json
{dgate_config}
```
"""


def _loading_section(auto: str | None, reason: str) -> str:
    """First thing in the card of a non-native export: the folder transformers' trust_remote_code error points to."""
    lines = [
        "",
        "## How to load",
        "",
        f"The plain transformers classes cannot build this model ({reason})"
        + (
            " (config.json has its own model type, so a plain `from_pretrained` asks for `trust_remote_code=True`):"
            if auto
            else ":"
        ),
        "",
        "```python",
        "import hf_dgate",
        'model = hf_dgate.AutoPrunedModel.from_pretrained("<this folder or repo>")',
    ]
    if auto:
        lines += [
            "# or without hf_dgate, through the generated modeling_dgate_pruned.py:",
            f"from transformers import {auto}",
            f'model = {auto}.from_pretrained("<this folder or repo>", trust_remote_code=True)',
        ]
    return "\n".join([*lines, "```", ""])


def build_model_card(summary: dict[str, Any]) -> Any:
    """A `huggingface_hub.ModelCard` describing an export (summary as produced by `export_to_dir`)."""
    import json

    from huggingface_hub import ModelCard, ModelCardData

    base = hub_model_name(summary.get("base_model"))
    fmt = summary.get("format") or "native"
    data = ModelCardData(
        library_name="gguf" if fmt == "gguf" else "transformers",
        base_model=base,
        tags=["hf-dgate", "d-gating", "pruned", "structured-sparsity"],
    )
    loading = (
        "`transformers.AutoModel*.from_pretrained` (the config expresses the pruned shape)"
        if summary.get("native")
        else f"`hf_dgate.AutoPrunedModel.from_pretrained` ({nonnative_reason(summary.get('structure') or {})})"
    )
    if not summary.get("native") and summary.get("remote_code"):
        auto = summary["remote_code"]
        loading += f", or without hf_dgate `transformers.{auto}.from_pretrained(..., trust_remote_code=True)`"
    reason = "" if summary.get("native") else nonnative_reason(summary.get("structure") or {})
    section = "" if summary.get("native") else _loading_section(summary.get("remote_code"), reason)
    if fmt != "native":  # the folder holds another engine's files: say how that engine runs them
        loading, section = _format_loading(summary)
    lat_b, lat_a = summary.get("latency_before_s"), summary.get("latency_after_s")
    text = CARD_TEMPLATE.format(
        loading_section=section,
        card_data=data.to_yaml(),
        title=summary.get("title") or f"Pruned {base or 'model'} (D-Gating)",
        outputs=outputs_statement(summary),
        serving=_serving_statement(summary),
        base_model=base or LOCAL_MODEL,
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
        speedup=summary.get("speedup_text") or (f"{lat_b / lat_a:.2f}x measured" if lat_b and lat_a else "-"),
        structure_table=structure_table(summary.get("structure") or {}),
        compression_section=_compression_section(summary.get("compression")),
        targets=_describe_targets(summary.get("dgate_config") or {}),
        dgate_config=json.dumps(summary.get("dgate_config", {}), indent=2, allow_nan=False),
    )
    return ModelCard(text)


def _format_loading(summary: dict[str, Any]) -> tuple[str, str]:
    """(the card's loading line, its "How to run" section) for a GGUF or DeciLM export."""
    if summary.get("gguf"):
        name = summary["gguf"]["file"]
        code = [
            "```bash",
            f"llama-cli -m {name} -p 'Hello'   # llama.cpp",
            "```",
            "",
            "```python",
            "from llama_cpp import Llama",
            f'llm = Llama("{name}")',
            "```",
        ]
        line = f"llama.cpp (`{name}`, architecture `deci`: per-layer head and FFN counts)"
    else:
        code = [
            "```bash",
            "vllm serve <this folder or repo> --trust-remote-code   # DeciLMForCausalLM",
            "```",
            "",
            "```python",
            "from hf_dgate.formats.decilm import load_decilm",
            'model = load_decilm("<this folder>")   # PyTorch, for checking',
            "```",
        ]
        line = "vLLM's `DeciLMForCausalLM` (`--trust-remote-code`), or `hf_dgate.formats.decilm.load_decilm`"
    return line, "\n".join(["", "## How to run", "", *code, ""])


def _serving_statement(summary: dict[str, Any]) -> str:
    """The card's paragraphs on padding (uniform / rounded counts and their cost) and on a non-native format."""
    from .formats.shape import padding_statement

    parts = [padding_statement(summary)]
    g = summary.get("gguf")
    if g:
        lay = g["layout"]
        check = g.get("llama_cpp") or {}
        ran = (
            f"run in llama.cpp and compared with the PyTorch export: max |logit difference| {check['max_abs_diff']:.2e}"
            f" on {check['probe_tokens']} tokens (tolerance {check['tolerance']:.2e})"
            if check.get("verified")
            else f"not run in llama.cpp here ({check.get('reason', 'not checked')})"
        )
        parts.append(
            f"Format: GGUF `{g['file']}` ({g['dtype']}, llama.cpp architecture `deci`, per-layer query heads "
            f"{lay['head_count']}, key/value heads {lay['head_count_kv']}, FFN widths {lay['feed_forward_length']}); "
            f"{ran}. Tokenizer: {g['vocab']}.\n"
        )
    d = summary.get("decilm")
    if d:
        parts.append(f"Format: DeciLM `block_configs` for vLLM's DeciLMForCausalLM ({d['statement']}).\n")
    text = "\n".join(p for p in parts if p)
    return f"\n{text}" if text else ""


def _compression_section(compression: dict[str, Any] | None) -> str:
    """The card's account of the training that produced the zeros (the finish of `hf_dgate.finish`), if any."""
    if not compression:
        return ""
    return f"## Compression run\n\n{compression.get('text', '')}\n\n"


def outputs_statement(summary: dict[str, Any]) -> str:
    """The card's sentence on how the export's outputs relate to the gated model's, from the shared check's result
    (hf_dgate.verify): the same within the tolerance, a prominent NOT-exact notice, or not verified."""
    v = summary.get("verification")
    if not isinstance(v, dict):  # a summary from before the shared check: a number, no claim
        return f"Max |output difference| to the gated model on a test batch: {_fmt(summary.get('max_abs_diff'))}."
    if not v.get("verified"):
        return (
            "> **Not verified:** this export was not compared with the gated model "
            f"({v.get('reason') or 'no probe batch'}), so it is not known to compute the same outputs."
        )
    probe = f" on a probe batch ({v['probe']})" if v.get("probe") else ""
    if v.get("compared_in"):
        probe += f", compared in {v['compared_in']}"
    if isinstance(v.get("changed_argmax"), int) and v.get("positions"):
        probe += f"; the argmax changed at {v['changed_argmax']} of {v['positions']} positions"
    removed = [
        f"{r['not_zero']} {t} (norms {_fmt(r['norm_min'])} to {_fmt(r['norm_max'])})"
        for t, r in (v.get("removed") or {}).items()
        if r.get("not_zero")
    ]
    if v.get("exact") and not removed:  # certified from what was removed, confirmed by the probe
        return (
            "It computes the same outputs as the gated model: every removed group was zero, and the outputs differ "
            f"by at most {_fmt(v['max_abs_diff'])}{probe} (tolerance {_fmt(v['tolerance'])})."
        )
    diff, tol = v.get("max_abs_diff"), v.get("tolerance")
    within = diff is not None and tol is not None and diff <= tol
    return (
        f"> **This export is NOT exact:** removed groups that were not zero: {', '.join(removed) or 'none'}; "
        f"its outputs differ from the gated model's by up to {_fmt(v['max_abs_diff'])}{probe}, "
        f"{'within' if within else 'above'} the tolerance {_fmt(v['tolerance'])}. It was written with "
        "`allow_inexact=True`."
    )


def _describe_targets(dgate_config: dict[str, Any]) -> str:
    """The gated targets as they describe themselves (targets/), e.g. "heads (attention heads ...)"."""
    from .targets import BUILTIN

    names = dgate_config.get("target") or []
    names = [names] if isinstance(names, str) else list(names)
    parts = [f"{n} ({BUILTIN[n].description})" if n in BUILTIN else n for n in names]
    parts += [f"{g.get('name')} (user rule)" for g in dgate_config.get("groups") or []]
    return "; ".join(parts) or "nothing"


def nonnative_reason(structure: dict[str, Any] | PruningRecord) -> str:
    """Why a plain `from_pretrained` cannot build this export, read from its recorded structure (the card states
    it; native.py tried every config form the installed transformers accepts)."""
    record = structure if isinstance(structure, PruningRecord) else PruningRecord.from_dict(structure or {})
    if record.multi_stack:
        return "the model has several block stacks, whose pruned shapes its config cannot state"
    stack = record.single
    counts = [len(h) for h in stack.kept("heads")]
    if stack.cross_heads:
        return "cross-attention heads were removed, which no config field can state"
    if counts and 0 in counts:
        return "some layers keep no attention heads, and the model's attention cannot be built with none"
    if len(set(counts)) > 1:
        return "layers keep different numbers of heads, and this transformers cannot state per-layer counts for it"
    if len({n for n in stack.kept("neurons") if n is not None}) > 1:
        return "layers keep different numbers of MLP neurons, and this transformers cannot state per-layer counts"
    if stack.experts:
        return "experts were removed, and the config cannot state the kept experts per layer"
    return (
        "the config cannot state the pruned shape: e.g. it derives the head size from hidden size / heads, so fewer "
        "heads would change the head size"
    )


def structure_table(structure: dict[str, Any] | PruningRecord) -> str:
    """Markdown: per kept layer, its original index and the heads / key-value heads / neurons (and cross-attention
    heads, experts) it keeps; one table per block stack for multi-stack models."""
    record = structure if isinstance(structure, PruningRecord) else PruningRecord.from_dict(structure or {})
    if record.multi_stack:
        parts = [f"### {path}\n\n{_stack_table(stack)}" for path, stack in record.stacks.items()]
        return "\n\n".join(parts) if parts else "(no per-layer structure recorded)"
    return _stack_table(record.single)


def _stack_table(record: StackRecord) -> str:
    heads, kv, neurons = record.heads, record.kv_heads, record.neurons
    if heads is None:
        return "(no per-layer structure recorded)"
    layers = record.layers or list(range(len(heads)))
    n_orig = record.num_hidden_layers_original if record.num_hidden_layers_original is not None else len(layers)
    dropped = sorted(set(range(n_orig)) - set(layers))
    columns = [("heads kept", lambda i: f"{len(heads[i])}: {heads[i]}"), ("key/value heads kept", lambda i: kv[i])]
    if record.cross_heads:
        columns.append(("cross-attention heads kept", lambda i: len(record.cross_heads[i])))
    if any(n is not None for n in neurons or []):
        columns.append(("neurons kept", lambda i: neurons[i] if neurons[i] is not None else "-"))
    if record.experts:
        for title, key in (("experts kept", "experts"), ("units per expert", "expert_units")):  # "-": a dense layer
            columns.append((title, lambda i, key=key: "-" if record.kept(key)[i] is None else record.kept(key)[i]))
    rows = ["| layer (original) | " + " | ".join(c for c, _ in columns) + " |", "|---:|" + "---|" * len(columns)]
    for i in range(len(heads)):
        cells = " | ".join(str(f(i)) for _, f in columns)
        rows.append(f"| {i} ({layers[i] if i < len(layers) else '?'}) | {cells} |")
    rows.append("")
    rows.append(f"Layers removed entirely: {dropped if dropped else 'none'}.")
    if record.dead_layers_kept:
        rows.append(
            f"Layers zeroed but kept as identity blocks (no other layer can take their place, or this transformers "
            f"cannot load or run the model without them): "
            f"{record.dead_layers_kept}."
        )
    return "\n".join(rows)


class UploadError(ExportError):
    """The export was written, but the upload to the Hub failed (the message says where the export is)."""


def _short_error(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:160]}"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload model pruned with hf_dgate",
) -> str:
    """Create the Hub repo if needed and upload every file of `folder`; returns the repo id.

    The repo id is validated, the folder's text files are checked for absolute local paths (this machine's
    folder names must not be published) and for code references other than the generated loader
    (`hf_dgate.codefree`) before anything is sent."""
    from huggingface_hub import HfApi

    from .codefree import check_no_foreign_code
    from .loading import REMOTE_CODE_FILE

    check_repo_id(repo_id)
    check_no_local_paths(folder)
    check_no_foreign_code(folder, REMOTE_CODE_FILE)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo, "repo_id", repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return repo_id


LOCAL_MODEL = "a local model"  # what the card says when the base model has no Hub id (its folder is not published)
_TEXT_FILES = (".json", ".md", ".txt", ".py", ".yaml", ".yml", ".jinja")


def check_repo_id(repo_id: str) -> None:
    """ExportError unless `repo_id` is a valid Hub repo id (huggingface_hub's own rules), before any work."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"{repo_id!r} is not a valid Hub repo id ({e}); pass 'user/name'.") from None


def hub_model_name(name: Any) -> str | None:
    """`name` when it can be a Hub model id, None when it is a local path (absolute, relative to an existing folder
    or file, or not a valid repo id): a model loaded from a folder must not publish where that folder is."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or name.startswith(("~", ".")):
        return None
    if os.path.exists(name):
        return None
    try:
        check_repo_id(name)
    except ExportError:
        return None
    return name


def _local_roots(extra: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Absolute folder names of this machine that must not appear in anything uploaded (longest first)."""
    roots = {resolve(p) for p in (os.getcwd(), "~", *extra)} | {os.path.abspath(os.fspath(p)) for p in extra}
    return sorted((r for r in roots if len(r.strip(os.sep)) > 1), key=len, reverse=True)


def scrub_paths(obj: Any, roots: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like `obj` in which absolute local paths are replaced by '<local path>'."""
    roots = list(roots)
    if isinstance(obj, dict):
        return {k: scrub_paths(v, roots) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_paths(v, roots) for v in obj]
    if isinstance(obj, str):
        if os.path.isabs(obj) or obj.startswith("~"):
            return "<local path>"
        for r in roots:
            obj = obj.replace(r, "<local path>")
    return obj


def check_no_local_paths(folder: str | os.PathLike) -> None:
    """ExportError when a text file in `folder` names an absolute local folder (the current one, the home folder
    or `folder` and its parent): it would be published with the upload."""
    folder = os.fspath(folder)
    roots = _local_roots([folder, os.path.dirname(resolve(folder))])
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            if not n.endswith(_TEXT_FILES) or os.path.getsize(path) > 50_000_000:
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            hit = next((r for r in roots if r in text), None)
            if hit is not None:
                raise ExportError(
                    f"{os.path.relpath(path, folder)!r} in {folder!r} contains the local path {hit!r}, which would be "
                    "published; remove it from that file, then upload again."
                )


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
    overwrite: bool = False,
    force: bool = False,
    source_dirs: Iterable[str | os.PathLike] = (),
    protected_dirs: Iterable[str | os.PathLike] = (),
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    progress: bool = False,
    remote_code: bool = True,
    allow_inexact: bool = False,
    format: str = "native",
    shape: str = "per_layer",
    multiple_of: int | dict[str, int] | str | None = None,
    gguf_dtype: str = "f16",
    tokenizer: Any = None,
    compression: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export a gated model to `output_dir`: weights, config, `dgate_export.json` and a model card.

    The card gives the base model, the DGateConfig, the kept heads/neurons per layer, parameters and FLOPs
    before and after, the measured speed-up, and the largest output difference to the gated model. Files are
    written to a temporary directory beside `output_dir` and renamed into place, so a failure never leaves a
    half-written export. An existing `output_dir` is kept unless it is empty, or a previous export and
    `overwrite=True`, or `force=True`; the model's source folder (a local `config._name_or_path`, `source_dirs`),
    `protected_dirs`, the current and home folders are never replaced (see `hf_dgate.outdir`). The base model is
    named by its Hub id only (`base_model`, else the config's name when it is not a local path). Where the config
    cannot express the pruned shape, `remote_code` adds a generated modeling file so that
    `AutoModel*.from_pretrained(dir, trust_remote_code=True)` loads it without hf_dgate.
    With `push_to_hub` the directory is uploaded to `hub_model_id`. Returns the summary.

    The export is checked like `export_pruned` (`hf_dgate.verify`), on the FLOPs batch: outputs beyond the
    tolerance raise ExportError before anything is written, unless `allow_inexact=True`; the summary's
    `verification` (`verified`, `exact`, `max_abs_diff`, `tolerance`, removed-group norms) and the card say plainly
    what was found. NaN/inf gates or weights raise NonFiniteError.

    `format` picks the writer (hf_dgate.formats): "native" (transformers), "gguf" (llama.cpp's deci architecture,
    `gguf_dtype` f32/f16/bf16/q8_0, `tokenizer` a tokenizer or folder; run and compared in llama.cpp where
    llama-cpp-python is installed; neuron counts rounded up to multiples of 64 unless `multiple_of` is given, e.g.
    1 to keep them exact) or "decilm" (vLLM's DeciLMForCausalLM). `shape="uniform"` and `multiple_of` pad
    layers with their own zero groups (see `export_pruned`); the summary's `padding` and the card state what that
    costs in parameters and FLOPs against the non-uniform export.
    """
    from tqdm.auto import tqdm

    plan = plan_export(
        model,
        output_dir,
        hub_model_id=hub_model_id,
        push_to_hub=push_to_hub,
        threshold=threshold,
        seq_len=seq_len,
        overwrite=overwrite,
        force=force,
        source_dirs=source_dirs,
        protected_dirs=protected_dirs,
        base_model=base_model,
        remote_code=remote_code,
        format=format,
        gguf_dtype=gguf_dtype,
        tokenizer=tokenizer,
    )
    steps = tqdm(total=5, desc="hf-dgate export", disable=not progress, unit="step")
    steps.set_postfix_str("pruning")
    try:
        pruned, verification = export_checked(
            model,
            plan.threshold,
            False,
            allow_inexact=allow_inexact,
            inputs=plan.inputs,
            shape=shape,
            # GGUF: neuron counts in multiples of 64 unless the caller says otherwise (formats/gguf.py)
            multiple_of=plan.format.default_multiple_of if multiple_of is None else multiple_of,
        )
    except BaseException:
        steps.close()  # before the error is printed: a refusal is the last line the user sees
        raise
    try:  # the bar is closed before any error (or Ctrl-C) reaches the user: the message is the last line
        steps.update()
        steps.set_postfix_str("measuring")
        summary = measure_export(plan, pruned, verification, measure=measure, compression=compression)
        steps.update(2)
        steps.set_postfix_str("writing")
        write_export(plan, pruned, summary)
        steps.update()
        if push_to_hub:
            steps.set_postfix_str("uploading")
            try:
                summary["hub_repo"] = push_folder(plan.target.path, hub_model_id, private=private, token=token)
            except Exception as e:  # the export itself is complete: say where it is and how to upload it later
                raise UploadError(
                    f"The export is complete on disk at {plan.target.path!r}, but uploading it to {hub_model_id!r} "
                    f"failed ({_short_error(e)}); upload it later with hf_dgate.hub.push_folder(dir, "
                    f"{hub_model_id!r}) or `hf upload {hub_model_id} <dir>`."
                ) from e
        steps.update()
    finally:
        steps.close()
    return summary


@dataclass
class ExportPlan:
    """What `plan_export` checked before any work: the gated model, the threshold, the writer and its options,
    the output folder (not yet touched) and the probe batch that both the check and the FLOPs count use."""

    model: nn.Module
    base: nn.Module
    bank: Any
    threshold: float
    format: Any
    format_options: dict[str, Any]
    target: OutputDir
    inputs: Any
    base_model: str | None


def plan_export(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    hub_model_id: str | None = None,
    push_to_hub: bool = False,
    threshold: float | None = None,
    seq_len: int = 128,
    overwrite: bool = False,
    force: bool = False,
    source_dirs: Iterable[str | os.PathLike] = (),
    protected_dirs: Iterable[str | os.PathLike] = (),
    base_model: str | None = None,
    remote_code: bool = True,
    format: str = "native",
    gguf_dtype: str = "f16",
    tokenizer: Any = None,
) -> ExportPlan:
    """Every check that needs no pruning: Hub names, a finite model, the threshold, whether the format can write
    this model, and the output folder's rules (`hf_dgate.outdir`). Refuses before any work is done."""
    from . import flops as F
    from .formats import get_format

    if push_to_hub and not hub_model_id:
        raise ExportError("push_to_hub=True needs hub_model_id='user/name'.")
    if hub_model_id:
        check_repo_id(hub_model_id)
    if base_model is not None:
        if os.path.isabs(base_model) or base_model.startswith(("~", ".")):
            raise ExportError(
                f"base_model={base_model!r} is a local path, which would be published; pass the Hub id of the model "
                "it was trained from (e.g. 'meta-llama/Llama-3.2-1B') or leave it out."
            )
        check_repo_id(base_model)
    bank = get_bank(model)
    bank.assert_finite("export")
    try:
        thr = bank.check_threshold(threshold)
    except ValueError as e:
        raise ExportError(str(e)) from None
    base = unwrap(model)
    fmt = get_format(format)
    fmt_options = dict(remote_code=remote_code, gguf_dtype=gguf_dtype, tokenizer=tokenizer)
    fmt.check(base, **fmt_options)  # a format that cannot write this model refuses before any work
    target = OutputDir.plan(
        output_dir,
        sources=[*source_dirs, local_source(base)],
        protected=protected_dirs,
        overwrite=overwrite,
        force=force,
    )
    inputs = F.example_inputs(base, seq_len=seq_len)  # the probe of the shared check and the FLOPs batch
    name = base_model or hub_model_name(getattr(getattr(base, "config", None), "_name_or_path", None))
    return ExportPlan(model, base, bank, float(thr), fmt, fmt_options, target, inputs, name)


def measure_export(
    plan: ExportPlan,
    pruned: nn.Module,
    verification: Verification,
    *,
    measure: bool = True,
    compression: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary: settings, kept structure, parameters and FLOPs before and after (and what padding cost), the
    verification result, and with `measure` the latency of the folded dense model against the pruned one."""
    from . import flops as F
    from .formats.shape import padding_statement  # noqa: F401  (the card reads the summary's padding)

    base, inputs, record = plan.base, plan.inputs, pruned_structure(pruned)
    summary: dict[str, Any] = {
        "base_model": plan.base_model,
        "dgate_config": plan.bank.config.to_dict(),
        "threshold": plan.threshold,
        "structure": record,
        "native": bool((record or {}).get("native")),
        "params_before": F.count_params(base),
        "params_after": F.count_params(pruned),
        "format": plan.format.name,
        "padding": getattr(pruned, "dgate_padding", None),
    }
    if compression is not None:  # what the training run's finish did (hf_dgate.finish.FinishRecord), for the card
        summary["compression"] = compression
    with torch.no_grad():
        # the dense reference for timing is the folded model without hooks (a second copy, only when measuring)
        dense = _folded_copy(base) if measure else None
        summary["flops_input"] = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
        summary["flops_before"] = F.count_flops(dense if dense is not None else plan.model, inputs)
        summary["flops_after"] = F.count_flops(pruned, inputs)
        if summary["padding"] and summary["padding"]["groups_added"]:  # what padding costs, measured
            with warnings.catch_warnings():  # unverified on purpose: only its size is measured
                warnings.simplefilter("ignore")
                unpadded, _ = export_checked(plan.model, plan.threshold, False, allow_inexact=True, verify=False)
            summary["padding"]["params_unpadded"] = F.count_params(unpadded)
            summary["padding"]["flops_unpadded"] = F.count_flops(unpadded, inputs)
            del unpadded
        # measured once, by export's shared check (hf_dgate.verify) on this batch; None when not verified
        summary["max_abs_diff"] = verification.max_abs_diff
        summary["exact"] = verification.exact
        summary["verification"] = verification.to_dict()
        summary["flops_ratio"] = summary["flops_before"] / max(summary["flops_after"], 1)
        if dense is not None:
            speed = F.paired_speedup(dense, pruned, inputs, flops_ratio=summary["flops_ratio"])
            summary["device"] = str(next(pruned.parameters()).device)
            summary["latency_before_s"], summary["latency_after_s"] = speed.latency_before_s, speed.latency_after_s
            summary["speedup"] = speed.median
            summary["speedup_middle_half"] = [speed.low, speed.high]
            summary["speedup_pairs"], summary["speedup_threads"] = speed.pairs, speed.threads
            summary["speedup_noise"] = speed.noise  # above the FLOPs ratio: not caused by the removal
            summary["speedup_text"] = speed.describe()
        del dense
    return summary


def write_export(plan: ExportPlan, pruned: nn.Module, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the model in the planned format, `dgate_export.json` and the model card into a temporary folder that
    replaces the output folder only when complete; `summary` gains what the writer reports and `path`."""
    target = plan.target
    with target.writing() as tmp:
        summary.update(plan.format.write(pruned, tmp, **plan.format_options))
        summary.setdefault("remote_code", None)
        scrubbed = scrub_paths(summary, _local_roots([target.path, *target.sources]))  # it is published as is
        summary.clear()
        summary.update(scrubbed)
        with open(os.path.join(tmp, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2, allow_nan=False)
        build_model_card(summary).save(os.path.join(tmp, "README.md"))
    summary["path"] = target.path
    return summary


def _folded_copy(base: nn.Module) -> nn.Module:
    dense = copy.deepcopy(base)
    remove_dgate(dense, merge=True)
    return dense.eval()
