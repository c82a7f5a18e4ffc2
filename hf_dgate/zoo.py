"""The zoo sweep: every model type of the installed transformers' auto mappings, built tiny, gated and exported.

For each model type of the causal-LM, masked-LM, seq2seq-LM and image-classification auto mappings, a tiny model is
built from the family's default config with its sizes shrunk generically (hidden 64, 2 layers, 4 heads, 2 key/value
heads, intermediate 128, small vocabulary; nested text/vision configs too). For each target (heads, neurons,
layers) the sweep gates the model, zeroes all groups of the first layer and about half of the others, exports and
compares the export's outputs with the gated model's, then reloads the export the way a user would. Each cell ends
as one `Outcome`; a refusal is "inherent" when its message names one of the `Inherent` reasons (the structure
itself forbids an exact removal), else it is a refusal to fix.

    python -m hf_dgate.zoo                      # the whole zoo, all four mappings (minutes; subprocess workers)
    python -m hf_dgate.zoo --mapping causal-lm --json zoo.json --write-docs

The same code runs a fixed small sample in tests/test_zoo.py.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch

TARGETS = ("heads", "neurons", "layers")
MAPPINGS = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}
VOCAB = 256
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 128


class Outcome(str, Enum):
    EXACT = "exact"
    INHERENT = "refused (inherent)"
    REFUSED = "refused (to fix)"
    CRASH = "crash"
    WRONG = "silently wrong"


class Inherent(str, Enum):
    """Why a structure forbids an exact removal (not a gap in hf_dgate). The value is the short text of the table;
    `PHRASES` are what the refusal messages say."""

    POST_NORM = "post-norm blocks cannot drop layers"
    QK_NORM = "a query/key norm spans all heads"
    SHARED_POSITION_BIAS = "a position bias shared across layers"
    NO_HEADS = "no attention heads (recurrent or convolutional mixer)"
    NO_MLP = "no MLP in the blocks"
    SIDE_BRANCHES = "branches beside attention and MLP (the block is not x + f(x))"
    LAYER_INDEX = "other parts read hidden states by layer index"
    SHARED_KV = "layers share keys and values"
    NOT_A_TRANSFORMER = "no transformer blocks (a convolutional network: gate 'filters')"
    HEADS_MIXED = "heads are mixed before the output projection"
    ACTIVATION_CUTOFF = "a cutoff computed over all units"
    OLD_TRANSFORMERS = "the installed transformers' module cannot run with fewer heads"
    UNIT_NORM = "a norm spans all MLP units"
    SHARED_PARAMS = "blocks share parameters"


PHRASES: dict[Inherent, tuple[str, ...]] = {
    Inherent.POST_NORM: ("pre-norm", "post-norm", "normalises after the residual add"),
    Inherent.QK_NORM: ("norm spans all heads", "RMSNorm spans"),
    Inherent.SHARED_POSITION_BIAS: ("relative position bias", "position bias shared"),
    Inherent.NO_HEADS: ("no attention heads",),
    Inherent.NO_MLP: ("have no MLP", "has no MLP"),
    Inherent.SIDE_BRANCHES: ("AltUp", "beside attention and MLP", "beside the residual branches"),
    Inherent.LAYER_INDEX: ("by layer index",),
    Inherent.SHARED_KV: ("reuse the keys and values",),
    Inherent.NOT_A_TRANSFORMER: ("no transformer blocks",),
    Inherent.HEADS_MIXED: ("mixes its heads",),
    Inherent.ACTIVATION_CUTOFF: ("activation_sparsity_pattern",),
    Inherent.OLD_TRANSFORMERS: ("width of its input", "a fixed number of shards"),
    Inherent.UNIT_NORM: ("normalises every MLP unit by statistics over all units",),
    Inherent.SHARED_PARAMS: ("module shared by blocks",),
}


def inherent_reason(message: str) -> Inherent | None:
    for reason, phrases in PHRASES.items():
        if any(p in message for p in phrases):
            return reason
    return None


@dataclass
class Cell:
    mapping: str
    family: str
    target: str
    outcome: str  # an Outcome value
    detail: str = ""  # the reason, the error or the measured difference
    reload: str = ""  # "from_pretrained" | "AutoPrunedModel" | "AutoPrunedModel + remote code"
    seconds: float = 0.0


@dataclass
class Family:
    mapping: str
    family: str
    builds: bool
    why: str = ""  # why it does not build tiny (or run a forward)
    cells: list[Cell] = field(default_factory=list)


# ---- building tiny models --------------------------------------------------------------------------------------
SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "word_embed_proj_dim"), HIDDEN),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
         "num_decoder_layers", "num_encoder_layers"),
        LAYERS,
    ),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
         "decoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads"),
        HEADS,
    ),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), KV_HEADS),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "ffn_hidden_size",
         "hidden_dim", "ff_dim", "dim_feedforward", "decoder_intermediate_size"),
        INTERMEDIATE,
    ),
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
         "share_expert_dim", "moe_ffn_hidden_size"),
        64,
    ),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_selected_experts", "moe_k"), 2),
    **dict.fromkeys(
        ("head_dim", "d_kv", "d_head", "attention_head_dim", "kv_channels", "v_head_dim", "qk_nope_head_dim"), 16
    ),
    **dict.fromkeys(("qk_rope_head_dim", "rotary_dim", "rotary_emb_dim"), 8),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 32),
    **dict.fromkeys(("embedding_size", "hidden_size_per_layer_input"), HIDDEN),
    "image_size": 32,
    "patch_size": 8,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "n_ctx": 128,
    "sliding_window": 16,
}
VOCAB_FIELDS = ("vocab_size", "vocab_size_per_layer_input", "n_vocab")
LAYER_SCALE_FIELDS = ("layer_scale_init_value", "layer_scale_initial_scale", "layerscale_value")
LAYER_COUNT_FIELDS = (
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers", "num_decoder_layers",
)


def _shrink(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the SIZES fields set, per-layer lists cut to the new depth (keeping one layer of each
    kind where the list mixes kinds), token ids folded into the small vocabulary; sub-configs likewise."""
    out = dict(d)
    old_layers = next((d[k] for k in LAYER_COUNT_FIELDS if isinstance(d.get(k), int)), None)
    layers = LAYERS
    if old_layers:  # a per-layer list mixing kinds: keep the first layer of each kind (at least LAYERS)
        for v in d.values():
            if isinstance(v, list) and len(v) == old_layers and all(isinstance(x, (str, int, bool)) for x in v):
                kinds = list(dict.fromkeys(map(str, v)))
                layers = max(layers, min(len(kinds), 4))
    for key, value in d.items():  # a repeating pattern of block kinds ("recurrent", "recurrent", "attention")
        if isinstance(value, list) and 2 <= len(value) <= 4 and all(isinstance(x, str) for x in value):
            if len(set(value)) > 1 and "layer" in key or "block" in key:
                layers = max(layers, len(value))
    picks: list[int] | None = None
    for key, value in d.items():
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")):
            out[key] = _shrink(value)
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = layers if key in LAYER_COUNT_FIELDS else min(value, SIZES[key])
        elif key in VOCAB_FIELDS and isinstance(value, int) and value > VOCAB:
            out[key] = VOCAB
        elif old_layers and isinstance(value, list) and len(value) == old_layers and old_layers > layers:
            if picks is None:
                seen: dict[str, int] = {}
                for i, x in enumerate(value):
                    seen.setdefault(str(x), i)
                picks = sorted(seen.values())[:layers]
                picks += [i for i in range(old_layers) if i not in picks][: layers - len(picks)]
                picks.sort()
            out[key] = [value[i] for i in picks]
    if old_layers and isinstance(d.get("per_layer_config"), dict):  # per-layer overrides of the kept layers
        keep = picks or list(range(layers))
        per = {int(k): v for k, v in d["per_layer_config"].items()}
        out["per_layer_config"] = {i: per[old] for i, old in enumerate(keep) if old in per} or None
    if old_layers:  # layer indices of a second kind of block (attention layers of a hybrid): the last layer
        for key, value in d.items():
            if "layer" in key and isinstance(value, list) and value and all(type(x) is int for x in value):
                if key not in out or out[key] is value and max(value) >= layers and len(value) < old_layers:
                    out[key] = [layers - 1]
        for key in ("attn_layer_period", "expert_layer_period"):
            if isinstance(d.get(key), int):
                out[key], out[key.replace("period", "offset")] = 2, 1
    if d.get("head_dim") is not None and d.get("head_dim") == d.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]
    for key, value in list(out.items()):  # token ids must fit the small vocabulary
        if key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = VOCAB - 1 - (hash(key) % 8)
        elif key.endswith("token_id") and isinstance(value, list):
            out[key] = [v if v < VOCAB else VOCAB - 1 for v in value if isinstance(v, int)]
    for key, value in d.items():  # sizes that equalled a shrunk one (MLA's head_dim = qk_rope_head_dim) follow it
        if key in out and out[key] is value and isinstance(value, int) and not isinstance(value, bool) and value > 8:
            if any(w in key for w in ("dim", "size", "rank")) and key not in VOCAB_FIELDS:
                twins = [
                    k for k in SIZES if k in d and d[k] == value and out[k] != value and k not in LAYER_COUNT_FIELDS
                ]
                if twins:
                    out[key] = out[twins[0]]
    if isinstance(d.get("qk_head_dim"), int) and "qk_nope_head_dim" in out and "qk_rope_head_dim" in out:
        out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    if isinstance(d.get("mamba_d_head"), int):  # Mamba-2 heads must tile expand * hidden
        out["mamba_d_head"] = 16
        out["mamba_n_heads"] = (out.get("mamba_expand") or 2) * out.get("hidden_size", HIDDEN) // 16
    for key in ("mamba_d_state", "ssm_state_size", "state_size", "mamba_chunk_size", "chunk_size"):
        if isinstance(d.get(key), int) and d[key] > 16:
            out[key] = 16
    for key in LAYER_SCALE_FIELDS:  # a tiny init scale (1e-6) hides every branch from the probe: as if trained
        if isinstance(d.get(key), float) and 0 < d[key] < 0.1:
            out[key] = 0.5
    heads, old_dim, dim = d.get("num_heads"), d.get("embed_dim"), out.get("embed_dim")
    if isinstance(heads, list) and all(type(h) is int for h in heads) and isinstance(old_dim, int) and dim != old_dim:
        if all(h * dim % old_dim == 0 for h in heads):  # per-stage heads (Swin) follow the embedding, ratio kept
            out["num_heads"] = [h * dim // old_dim for h in heads]
    if isinstance(d.get("window_size"), int) and isinstance(d.get("depths"), list) and "patch_size" in out:
        stages = len(d["depths"])  # windowed stages halve the grid: the last stage's grid must hold a window (2)
        out["window_size"] = 2
        out["patch_size"] = max(1, out.get("image_size", 32) // (2 * 2 ** (stages - 1)))
    if "down_ops" in d and "patch_size" in d:  # LeViT: patch_size names its fixed stride-16 stem, not a choice
        out["patch_size"] = d["patch_size"]
    if old_layers and len(d.get("stage_names") or []) == old_layers + 1 and old_layers > layers:
        for key in ("stage_names", "out_features", "out_indices"):  # a backbone's stages follow the cut depth
            out.pop(key, None)
    heads = out.get("num_attention_heads")
    if isinstance(heads, int) and isinstance(out.get("hidden_size"), int) and "kv_lora_rank" not in d:
        if "head_dim" in d and d["head_dim"] is None:  # a default left unset that the model reads as is (Ministral)
            out["head_dim"] = out["hidden_size"] // heads
        if "num_key_value_heads" in d and d["num_key_value_heads"] is None:  # likewise (Nemotron): plain MHA
            out["num_key_value_heads"] = heads
    if isinstance(d.get("kv_lora_rank"), int) and isinstance(out.get("num_attention_heads"), int):
        out["num_key_value_heads"] = out["num_attention_heads"]  # MLA: keys and values are expanded to every head
    if "n_routed_experts" in d and d["n_routed_experts"] is None and d.get("num_experts_per_tok", 0) is None:
        out["n_routed_experts"], out["num_experts_per_tok"] = 4, 2  # a routed MoE whose default leaves both unset
        if "n_shared_experts" in d and d["n_shared_experts"] is None:
            out["n_shared_experts"] = 1
    experts = next((out[k] for k in ("n_routed_experts", "num_experts") if isinstance(out.get(k), int)), 4)
    for key in ("n_group", "num_expert_group"):  # group-limited top-k routing: groups must tile the (fewer) experts
        if isinstance(d.get(key), int):
            out[key] = 2 if experts % 2 == 0 and d[key] > 1 else 1
            out["topk_group"] = 1
            for k in ("num_experts_per_tok", "num_experts_per_token"):
                if isinstance(out.get(k), int):
                    out[k] = min(out[k], 2, experts // out[key])
    if "num_experts_per_tok" in d and d["num_experts_per_tok"] is None and isinstance(d.get("n_routed_experts"), int):
        out["num_experts_per_tok"] = 2  # a routed MoE left unset (DeepSeek-V2's default) routes to no expert
    if isinstance(d.get("index_head_dim"), int) and isinstance(d.get("index_n_heads"), int):  # DSA's indexer
        out["index_n_heads"], out["index_head_dim"] = HEADS, 16  # its rope part is qk_rope_head_dim (8)
    if isinstance(d.get("linear_num_heads"), int) and isinstance(d.get("linear_head_dim"), int):  # linear attention
        out["linear_num_heads"], out["linear_head_dim"] = HEADS, 16
    if "num_attention_heads" in out and "num_key_value_heads" in out and out["num_key_value_heads"] is not None:
        if out["num_attention_heads"] % max(1, out["num_key_value_heads"]):
            out["num_key_value_heads"] = 1
    return out


def tiny_config(model_type: str) -> Any:
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    shrunk = _shrink(default.to_dict())
    shrunk.pop("transformers_version", None)
    return type(default).from_dict(shrunk)


def auto_class(mapping: str) -> Any:
    import transformers

    return getattr(transformers, MAPPINGS[mapping][1])


def model_types(mapping: str) -> list[str]:
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, MAPPINGS[mapping][0])
    return sorted(names)


def build(mapping: str, family: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    cfg = tiny_config(family)
    heads = auto_class(mapping)._model_mapping
    classes = heads[type(cfg)] if type(cfg) in heads else None
    if isinstance(classes, (tuple, list)) and not cfg.architectures:  # several heads (DeiT): the first, plain one
        cfg.architectures = [classes[0].__name__]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto_class(mapping).from_config(cfg).float().eval()
    as_if_trained(model, seed)
    return model, batch_for(mapping, model)


def as_if_trained(model: torch.nn.Module, seed: int = 0) -> list[str]:
    """Give linear layers that the family initialises to zero (NeoMME's output and down projections, so that each
    branch starts as the identity) small random weights, as training would: a zero projection hides its branch from
    every probe. The names of the layers filled."""
    g = torch.Generator().manual_seed(seed)
    filled = []
    with torch.no_grad():
        for name, m in model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(m, torch.nn.Linear) and isinstance(w, torch.Tensor) and w.numel() and not w.any():
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
                filled.append(name)
    return filled


def batch_for(mapping: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    if mapping == "image-classification":
        vision = getattr(cfg, "vision_config", None) or cfg
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=g)}
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text, "vocab_size", VOCAB) or VOCAB
    ids = torch.randint(3, min(vocab, VOCAB) - 8, (2, 8), generator=g)
    batch = {"input_ids": ids}
    if mapping == "seq2seq-lm":
        batch["decoder_input_ids"] = ids[:, :5]
    return batch


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from .verify import first_output

    with torch.no_grad():
        return first_output(model(**batch)).float()


# ---- one cell ----------------------------------------------------------------------------------------------------
def zero_pattern(bank: Any, target: str, seed: int = 2) -> None:
    """Zero every group of the first layer and about half of the others."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gates = bank.gammas[target]
        first = bank.group_sets[0].n_groups
        dead = torch.rand(gates.shape[1], generator=g) < 0.5
        dead[:first] = True
        gates[:, dead] = 0


def run_cell(mapping: str, family: str, target: str) -> Cell:
    """Gate one target of a freshly built tiny model, zero a pattern, export, compare, reload, compare."""
    import hf_dgate
    from hf_dgate.export import pruned_structure
    from hf_dgate.loading import save_pruned

    t0 = time.time()
    model, batch = build(mapping, family)
    ref = run(model, batch)

    def done(outcome: Outcome, detail: str = "", reload: str = "") -> Cell:
        return Cell(mapping, family, target, outcome.value, detail, reload, round(time.time() - t0, 2))

    try:
        # the batch goes along as a user's would: the numerical check of a guessed structure runs on it
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=target), example_inputs=batch)
    except ValueError as e:
        return _refused(e, done)
    except Exception as e:  # noqa: BLE001 - a crash is a result of the sweep
        return done(Outcome.CRASH, f"apply_dgate: {_short(e)}")
    try:
        init_diff = (run(model, batch) - ref).abs().max().item()
        if not init_diff <= 1e-5 * max(1.0, ref.abs().max().item()):  # float rounding of another kernel order only
            return done(Outcome.WRONG, f"outputs changed at init by {init_diff:.1e}")
        zero_pattern(hf_dgate.get_bank(model), target)
        gated = run(model, batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = hf_dgate.export_pruned(model, example_inputs=batch)
    except ValueError as e:
        return _refused(e, done)
    except Exception as e:  # noqa: BLE001
        return done(Outcome.CRASH, f"export: {_short(e)}")
    try:
        out = run(pruned, batch)
    except Exception as e:  # noqa: BLE001
        return done(Outcome.CRASH, f"exported model: {_short(e)}")
    diff = float((out - gated).abs().max()) if out.shape == gated.shape else float("inf")
    tol = 1e-4 + 1e-4 * float(gated.abs().max())
    if not diff <= tol:
        return done(Outcome.WRONG, f"export differs by {diff:.1e} though it reported exact")
    native = bool((pruned_structure(pruned) or {}).get("native", True))
    try:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            remote = save_pruned(pruned, d)
            load = type(pruned).from_pretrained if native else hf_dgate.AutoPrunedModel.from_pretrained
            again = load(d).float().eval()
            again_diff = float((run(again, batch) - out).abs().max())
    except Exception as e:  # noqa: BLE001
        return done(Outcome.CRASH, f"reload: {_short(e)}")
    reload = "from_pretrained" if native else "AutoPrunedModel" + (" + remote code" if remote else "")
    if not again_diff <= tol:
        return done(Outcome.WRONG, f"reloaded export differs by {again_diff:.1e}", reload)
    return done(Outcome.EXACT, f"max diff {diff:.0e}", reload)


def _refused(e: Exception, done: Any) -> Cell:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    reason = inherent_reason(msg)
    if reason is not None:
        return done(Outcome.INHERENT, reason.value)
    return done(Outcome.REFUSED, msg[:300])


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def run_family(mapping: str, family: str, targets: tuple[str, ...] = TARGETS) -> Family:
    try:
        model, batch = build(mapping, family)
        run(model, batch)
    except Exception as e:  # noqa: BLE001 - the sweep's own limit, listed separately
        return Family(mapping, family, False, _short(e))
    try:  # a tiny config that transformers cannot save even unpruned (a nested vocabulary left large) is ours
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(d)
    except Exception as e:  # noqa: BLE001
        return Family(mapping, family, False, f"the unpruned tiny model does not save: {_short(e)}")
    del model
    fam = Family(mapping, family, True)
    for target in targets:
        try:
            fam.cells.append(run_cell(mapping, family, target))
        except Exception as e:  # noqa: BLE001
            fam.cells.append(Cell(mapping, family, target, Outcome.CRASH.value, _short(e)))
    return fam


# ---- the sweep: workers in subprocesses, one family at a time with a deadline ----------------------------------
def _worker(jobs: list[tuple[str, str]]) -> None:
    """Run families in order and print one JSON line per family (after a "start" line)."""
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    for mapping, family in jobs:
        print(json.dumps({"start": [mapping, family]}), flush=True)
        try:
            fam = run_family(mapping, family)
        except Exception:  # noqa: BLE001
            fam = Family(mapping, family, False, "sweep error: " + traceback.format_exc(limit=1)[-200:])
        print(json.dumps({"family": asdict(fam)}), flush=True)


def sweep(jobs: list[tuple[str, str]], timeout: float = 240.0, log: Any = None) -> list[Family]:
    """Every job in one worker subprocess at a time; a family that runs past `timeout` seconds is recorded as a
    crash ("hangs") and the worker restarts after it."""
    results: list[Family] = []
    todo = list(jobs)
    while todo:
        cmd = [sys.executable, "-m", "hf_dgate.zoo", "--worker", json.dumps(todo)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        current, deadline = None, time.time() + timeout + 60
        buf = ""
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.time()))
            if not ready:  # past the deadline: the current family hangs
                proc.kill()
                proc.wait()
                job = tuple(current) if current else todo[0]
                results.append(Family(job[0], job[1], True, "", [
                    Cell(job[0], job[1], t, Outcome.CRASH.value, f"hangs (> {timeout:.0f} s)") for t in TARGETS]))
                todo.remove(job)
                break
            line = proc.stdout.readline()
            if not line:  # the worker died
                proc.wait()
                if current and tuple(current) in todo:
                    job = tuple(current)
                    results.append(Family(job[0], job[1], True, "", [
                        Cell(job[0], job[1], t, Outcome.CRASH.value, f"worker died (rc {proc.returncode})")
                        for t in TARGETS]))
                    todo.remove(job)
                break
            buf = line.strip()
            if not buf.startswith("{"):
                continue
            msg = json.loads(buf)
            if "start" in msg:
                current, deadline = msg["start"], time.time() + timeout
            elif "family" in msg:
                f = msg["family"]
                fam = Family(f["mapping"], f["family"], f["builds"], f["why"], [Cell(**c) for c in f["cells"]])
                results.append(fam)
                todo.remove((fam.mapping, fam.family))
                if log is not None:
                    log.write(describe_family(fam) + "\n")
                    log.flush()
                current, deadline = None, time.time() + timeout + 60
        if proc.poll() is None:
            proc.kill()
    return results


def describe_family(fam: Family) -> str:
    if not fam.builds:
        return f"{fam.mapping:20s} {fam.family:28s} does not build tiny: {fam.why[:120]}"
    cells = "; ".join(f"{c.target}={c.outcome}" + (f" ({c.detail[:90]})" if c.outcome != "exact" else "")
                      for c in fam.cells)
    return f"{fam.mapping:20s} {fam.family:28s} {cells}"


# ---- summaries and the coverage doc -----------------------------------------------------------------------------
def summary(families: list[Family]) -> dict[str, Any]:
    built = [f for f in families if f.builds]
    cells = [c for f in built for c in f.cells]
    count = {o.value: sum(c.outcome == o.value for c in cells) for o in Outcome}
    good = count[Outcome.EXACT.value] + count[Outcome.INHERENT.value]
    return {
        "families": len(families),
        "build": len(built),
        "cells": len(cells),
        **count,
        "good_fraction": round(good / len(cells), 4) if cells else None,
        "families_all_exact": sum(all(c.outcome == "exact" for c in f.cells) for f in built),
        "families_all_good": sum(all(c.outcome in ("exact", Outcome.INHERENT.value) for c in f.cells) for f in built),
    }


def causes(families: list[Family]) -> dict[str, list[str]]:
    """Non-exact cells grouped by their reason (inherent reasons by name, other messages by their first words)."""
    out: dict[str, list[str]] = {}
    for f in families:
        for c in f.cells:
            if c.outcome == "exact":
                continue
            key = c.detail if c.outcome == Outcome.INHERENT.value else _cause_key(c.detail)
            out.setdefault(f"{c.outcome}: {key}", []).append(f"{f.family}/{c.target}")
    return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def _cause_key(detail: str) -> str:
    import re

    text = re.sub(r"'[^']*'", "'…'", detail)
    text = re.sub(r"\b[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+\b", "…", text)  # class names
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return text[:110]


def compare(before: list[Family], after: list[Family]) -> str:
    """A markdown table of two sweeps side by side: per mapping the cells of each outcome, then the causes of the
    cells that are neither exact nor refused for an inherent reason."""
    rows = ["| mapping | buildable cells | exact | refused (inherent) | refused (to fix) | crash | silently wrong | "
            "exact or inherent |", "|---|---|---|---|---|---|---|---|"]
    for mapping in MAPPINGS:
        pair = [summary([f for f in fams if f.mapping == mapping]) for fams in (before, after)]
        if not pair[1]["cells"]:
            continue
        cols = [f"{a[k]} -> {b[k]}" for k in ("cells", "exact", "refused (inherent)", "refused (to fix)", "crash",
                                              "silently wrong") for a, b in [pair]]
        share = " -> ".join(f"{100 * (x['good_fraction'] or 0):.1f}%" for x in pair)
        rows.append(f"| {mapping} | " + " | ".join(cols) + f" | {share} |")
    rows += ["", "| cause (cells neither exact nor refused for an inherent reason) | before | after |", "|---|---|---|"]
    bc, ac = causes(before), causes(after)
    for key in sorted(set(bc) | set(ac), key=lambda k: -max(len(bc.get(k, [])), len(ac.get(k, [])))):
        if key.startswith(Outcome.INHERENT.value):
            continue
        rows.append(f"| {key.replace('|', '/')} | {len(bc.get(key, []))} | {len(ac.get(key, []))} |")
    return "\n".join(rows)


DOC_START, DOC_END = "<!-- zoo:start -->", "<!-- zoo:end -->"


def markdown(families: list[Family], line: str) -> str:
    """The zoo section of docs/coverage.md for one transformers line."""
    lines = [f"#### transformers {line}", ""]
    lines += ["| mapping | model types | build tiny | cells | exact | refused (inherent) | refused (to fix) | "
              "crash | silently wrong | exact or inherent |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mapping in MAPPINGS:
        fams = [f for f in families if f.mapping == mapping]
        if not fams:
            continue
        s = summary(fams)
        lines.append(
            f"| {mapping} | {s['families']} | {s['build']} | {s['cells']} | {s['exact']} | {s['refused (inherent)']} | "
            f"{s['refused (to fix)']} | {s['crash']} | {s['silently wrong']} | {100 * (s['good_fraction'] or 0):.1f}% |"
        )
    lines += ["", "| mapping | family | heads | neurons | layers |", "|---|---|---|---|---|"]
    for f in sorted(families, key=lambda f: (list(MAPPINGS).index(f.mapping), f.family)):
        if not f.builds:
            continue
        by = {c.target: c for c in f.cells}
        lines.append(f"| {f.mapping} | {f.family} | " + " | ".join(_cell_text(by.get(t)) for t in TARGETS) + " |")
    no_build = [f for f in families if not f.builds]
    if no_build:
        lines += ["", f"Do not build tiny from their default config ({len(no_build)}; the sweep's own limit): "
                  + ", ".join(f"{f.family} ({f.mapping})" for f in sorted(no_build, key=lambda f: f.family)) + "."]
    return "\n".join(lines)


def _cell_text(c: Cell | None) -> str:
    if c is None:
        return ""
    if c.outcome == "exact":
        return f"exact, {c.reload}"
    if c.outcome == Outcome.INHERENT.value:
        return f"refused: {c.detail}"
    return f"{c.outcome.upper()}: {c.detail[:100]}".replace("|", "/")


def write_docs(sections: dict[str, str], path: str) -> None:
    """Put each transformers line's section ("#### transformers <version>") between the zoo markers of `path`,
    keeping the sections of other lines that are already there."""
    text = open(path).read()
    if DOC_START not in text:
        text = f"{text.rstrip()}\n\n{DOC_START}\n{DOC_END}\n"
    head, rest = text.split(DOC_START, 1)
    body, tail = rest.split(DOC_END, 1)
    kept: dict[str, str] = {}
    for part in body.split("#### transformers ")[1:]:
        line = part.split("\n", 1)[0].strip()
        kept[line] = "#### transformers " + part.strip()
    kept.update(sections)
    merged = "\n\n".join(kept[k] for k in sorted(kept, reverse=True))
    with open(path, "w") as f:
        f.write(f"{head}{DOC_START}\n{merged}\n{DOC_END}{tail}")


def load(path: str) -> tuple[str, list[Family]]:
    """(transformers version, families) of a sweep saved with --json."""
    data = json.load(open(path))
    fams = [Family(f["mapping"], f["family"], f["builds"], f["why"], [Cell(**c) for c in f["cells"]])
            for f in data["families"]]
    return data["transformers"], fams


def merge(paths: list[str]) -> tuple[str, list[Family]]:
    """One sweep from several of the same transformers line; a later file's (mapping, family) replaces an earlier's.

    Lets a re-sweep of some mappings or families update a full sweep without rerunning the rest.
    """
    line, by_key = None, {}
    for path in paths:
        ver, fams = load(path)
        if line is not None and ver != line:
            raise SystemExit(f"{path} was swept with transformers {ver}, the others with {line}: merge one line each")
        line = ver
        by_key.update({(f.mapping, f.family): f for f in fams})
    order = {m: i for i, m in enumerate(MAPPINGS)}
    return line, sorted(by_key.values(), key=lambda f: (order.get(f.mapping, len(order)), f.family))


def _dump(path: str, line: str, families: list[Family]) -> None:
    s = {m: summary([f for f in families if f.mapping == m]) for m in MAPPINGS if any(f.mapping == m for f in families)}
    with open(path, "w") as f:
        json.dump({"transformers": line, "summary": s, "families": [asdict(f) for f in families]}, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mapping", action="append", choices=list(MAPPINGS), help="default: all four")
    p.add_argument("--family", action="append", help="only these model types")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per family before it counts as a hang")
    p.add_argument("--json", help="write every cell here (JSON)")
    p.add_argument("--log", help="append one line per family here as it finishes")
    p.add_argument("--write-docs", action="store_true", help="rewrite the zoo section of docs/coverage.md")
    p.add_argument("--from-json", action="append", help="write the docs from saved sweeps instead of running one")
    p.add_argument("--merge", nargs="+", metavar=("OUT", "IN"),
                   help="write OUT as the saved sweeps IN... merged (same transformers line; later files win)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print two saved sweeps side by side")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker([tuple(j) for j in json.loads(args.worker)])
        return
    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "coverage.md")
    if args.compare:
        print(compare(load(args.compare[0])[1], load(args.compare[1])[1]))
        return
    if args.merge:
        if len(args.merge) < 2:
            p.error("--merge needs OUT and at least one saved sweep")
        line, fams = merge(args.merge[1:])
        _dump(args.merge[0], line, fams)
        print(f"wrote {args.merge[0]}: {len(fams)} families, transformers {line}")
        return
    if args.from_json:
        by_line: dict[str, list[str]] = {}
        for path in args.from_json:
            by_line.setdefault(load(path)[0], []).append(path)
        write_docs({line: markdown(merge(paths)[1], line) for line, paths in by_line.items()}, doc)
        return
    jobs = [(m, f) for m in args.mapping or MAPPINGS for f in model_types(m) if not args.family or f in args.family]
    log = open(args.log, "a") if args.log else sys.stdout
    families = sweep(jobs, args.timeout, log)
    s = {m: summary([f for f in families if f.mapping == m]) for m in MAPPINGS if any(f.mapping == m for f in families)}
    print(json.dumps(s, indent=1))
    for cause, cells in causes(families).items():
        print(f"{len(cells):4d}  {cause}  [{', '.join(cells[:6])}{' ...' if len(cells) > 6 else ''}]")
    if args.json:
        import transformers

        _dump(args.json, transformers.__version__, families)
    if args.write_docs:
        import transformers

        line = transformers.__version__
        write_docs({line: markdown(families, line)}, doc)


if __name__ == "__main__":
    main()
