"""What each Hugging Face family looks like inside one block, keyed by `model_type`.

One entry says where a block's attention and MLP projections are (names relative to the block), how a fused
query/key/value projection is laid out, whether a gate-and-up projection is fused, and whether the block is
pre-norm (a zero residual branch makes it the identity, so whole layers can go). Detection and export read the
same entry; families without one fall back to matching common module names (architectures.py), and
`DGateConfig.module_names` overrides both. Adding a family is one entry here plus one tiny config in
tests/families.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .compat import config_value

# Fused query/key/value layouts along the output axis (h: query heads, g: key/value heads, r = h / g):
#   blocked      [q_1..q_h | k_1..k_g | v_1..v_g]              GPT-2 c_attn, Phi-3 qkv_proj, ModernBERT Wqkv
#   interleaved  [q_1 k_1 v_1 | q_2 k_2 v_2 | ...] (r = 1)      GPT-NeoX, Falcon-7B style
#   grouped      [q x r, k, v] per key/value group              Falcon new_decoder_architecture
QKV_LAYOUTS = ("blocked", "interleaved", "grouped")


@dataclass(frozen=True)
class Attention:
    """An attention branch: separate q/k/v projections or one fused `qkv`, and the output projection `o`."""

    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    layout: str | Callable[[Any], str] = "blocked"
    # the forward reads head counts from `self.config` (Phi-3): a pruned layer gets its own config copy
    config_heads: bool = False
    # more projections with one block of outputs per query head (Step 3.7's per-head output gate `g_proj`)
    per_head: tuple[str, ...] = ()
    per_head_optional: bool = False  # the config may not build them (DeBERTa's pos_proj without relative attention)

    def parts(self, config: Any) -> dict[str, Any]:
        """The dict architectures.py works with: {'o', 'q', 'k', 'v'} or {'o', 'qkv', 'layout'} (+ extras)."""
        if self.qkv:
            layout = self.layout(config) if callable(self.layout) else self.layout
            parts = {"o": self.o, "qkv": self.qkv, "layout": layout}
        else:
            parts = {"o": self.o, "q": self.q, "k": self.k, "v": self.v}
        if self.per_head:
            parts["per_head"] = self.per_head
            if self.per_head_optional:
                parts["per_head_optional"] = True
        return {**parts, "config_heads": True} if self.config_heads else parts


@dataclass(frozen=True)
class Mlp:
    """A dense MLP: `up` projections (gate and up) producing the intermediate units, `down` consuming them.
    `fused_up` is one projection holding [gate | up] halves (Phi-3 gate_up_proj, ModernBERT Wi)."""

    down: str
    up: tuple[str, ...] = ()
    fused_up: str | None = None


@dataclass(frozen=True)
class Experts:
    """A sparse mixture-of-experts MLP whose routed experts are stored as 3D tensors (transformers 5, and some 4.x
    families as two modules' weights): `gate_up` (E, 2I, H) holding [gate | up] halves per expert, `down` (E, H, I)
    (or their transposes), and a router with one row per expert. A shared expert (Qwen2-MoE) is a dense MLP next
    to them; its units count as neurons."""

    block: str = "mlp"  # the MoE module; its output is the residual branch
    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    gate_up: str = "gate_up_proj"  # (dotted) parameter paths under `experts`
    down: str = "down_proj"
    shared: Mlp | None = None
    count_field: str = "num_experts"  # config fields holding the expert count and the units per expert
    units_field: str = "moe_intermediate_size"
    transposed: bool = False  # gate_up (E, H, 2I) and down (E, I, H), as GPT-OSS stores them
    interleaved: bool = False  # gate and up rows alternate (unit j is rows 2j, 2j + 1) instead of halves
    bias: str = ""  # an (E, 2I) bias beside gate_up (its rows go with the units)


@dataclass(frozen=True)
class Stack:
    """One list of blocks of a multi-stack model (encoder and decoder, text and vision towers)."""

    path: str  # the block list's qualified name, or its tail ("decoder.layers" matches "model.decoder.layers")
    name: str  # short name for DGateConfig.stacks and reports
    config: str | None = None  # sub-config describing the stack ("vision_config")
    prefix: str | None = None  # per-stack config fields "<prefix>_attention_heads", "<prefix>_layers"
    layers_field: str = "num_hidden_layers"  # the field that counts this stack's blocks
    refuse: tuple[tuple[str, str], ...] = ()  # targets this stack cannot have, with the reason

    def matches(self, path: str) -> bool:
        return path == self.path or path.endswith("." + self.path)


@dataclass(frozen=True)
class ArchSpec:
    attention: Attention | None = None
    mlp: Mlp | tuple[Mlp, ...] | None = None  # a tuple: alternatives, the first present in a block wins (T5)
    pre_norm: bool | Callable[[Any], bool] = True
    # cross-attention of decoder blocks in encoder-decoder models (heads in their own group sets)
    cross_attention: Attention | None = None
    # the block stacks of a multi-stack model; each stack's blocks follow the spec of its own config
    stacks: tuple[Stack, ...] = ()
    # routed experts in place of a dense MLP (target 'experts'; 'neurons' are the experts' units)
    experts: Experts | None = None
    # why a target cannot be gated in this family (the message the user gets), by target; a callable reason reads
    # the (stack) config and returns None where the target is fine
    refuse: tuple[tuple[str, str | Callable[[Any], str | None]], ...] = ()
    # residual branch outputs for target="layers" when the block has no attention/MLP pair (Mamba's mixer)
    branches: tuple[str, ...] = ()
    # key/value head count when the config does not call it num_key_value_heads (Falcon)
    kv_heads: Callable[[Any], int] | None = None
    # the first block is built unlike the others (ModernBERT's has no attention norm), so no other block can move
    # into its place: a dead first block stays, as the identity its zero branches make it
    keeps_first_layer: bool = False

    def is_pre_norm(self, config: Any) -> bool:
        return self.pre_norm(config) if callable(self.pre_norm) else self.pre_norm

    def refusal(self, target: str, config: Any = None) -> str | None:
        why = dict(self.refuse).get(target)
        return why(config) if callable(why) else why

    def mlps(self) -> tuple[Mlp, ...]:
        return self.mlp if isinstance(self.mlp, tuple) else (self.mlp,) if self.mlp is not None else ()


def _llama_like(per_head: tuple[str, ...] = (), **kw: Any) -> ArchSpec:
    return ArchSpec(
        Attention(
            o="self_attn.o_proj", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", per_head=per_head
        ),
        Mlp(down="mlp.down_proj", up=("mlp.gate_proj", "mlp.up_proj")),
        **kw,
    )


def _bert_like(prefix: str = "attention.self", q: str = "query", k: str = "key", v: str = "value") -> ArchSpec:
    return ArchSpec(
        Attention(o="attention.output.dense", q=f"{prefix}.{q}", k=f"{prefix}.{k}", v=f"{prefix}.{v}"),
        Mlp(down="output.dense", up=("intermediate.dense",)),
        pre_norm=False,
    )


ENC_DEC = (
    Stack("encoder.layers", "encoder", prefix="encoder", layers_field="encoder_layers"),
    Stack("decoder.layers", "decoder", prefix="decoder", layers_field="decoder_layers"),
)


def _bart_like(pre_norm: bool, **kw: Any) -> ArchSpec:
    return ArchSpec(
        Attention(o="self_attn.out_proj", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj"),
        Mlp(down="fc2", up=("fc1",)),
        pre_norm=pre_norm,
        cross_attention=Attention(
            o="encoder_attn.out_proj", q="encoder_attn.q_proj", k="encoder_attn.k_proj", v="encoder_attn.v_proj"
        ),
        stacks=ENC_DEC,
        **kw,
    )


def _t5_mlps() -> tuple[Mlp, ...]:
    """T5's feed-forward sits at layer.1 (encoder) or layer.2 (decoder), with one or two (gated) input layers."""
    return tuple(
        Mlp(down=f"layer.{i}.DenseReluDense.wo", up=tuple(f"layer.{i}.DenseReluDense.{u}" for u in ups))
        for i in (1, 2)
        for ups in (("wi",), ("wi_0", "wi_1"))
    )


def _moe(refuse: tuple[tuple[str, str], ...] = (), **kw: Any) -> ArchSpec:
    return ArchSpec(_llama_like().attention, None, experts=Experts(**kw), refuse=refuse)


QK_NORM_SPANS_HEADS = (
    "its query/key RMSNorm spans all heads, so removing one head changes how the others are normalised (no exact "
    "export); gate 'neurons' or 'layers'"
)


PHIMOE_TWO_EXPERTS = (
    "its sparsemixer router always picks two experts, so a layer left with one computes NaN; gate 'heads', "
    "'neurons' or 'layers'"
)


def _falcon_layout(config: Any) -> str:
    if getattr(config, "new_decoder_architecture", False):
        return "grouped"
    return "blocked" if getattr(config, "multi_query", False) else "interleaved"


def _falcon_kv_heads(config: Any) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(Attention(o="attn.c_proj", qkv="attn.c_attn"), Mlp(down="mlp.c_proj", up=("mlp.c_fc",))),
    "gptj": ArchSpec(
        Attention(o="attn.out_proj", q="attn.q_proj", k="attn.k_proj", v="attn.v_proj"),
        Mlp(down="mlp.fc_out", up=("mlp.fc_in",)),
    ),
    "gpt_neox": ArchSpec(
        Attention(o="attention.dense", qkv="attention.query_key_value", layout="interleaved"),
        Mlp(down="mlp.dense_4h_to_h", up=("mlp.dense_h_to_4h",)),
    ),
    "falcon": ArchSpec(
        Attention(o="self_attention.dense", qkv="self_attention.query_key_value", layout=_falcon_layout),
        Mlp(down="mlp.dense_4h_to_h", up=("mlp.dense_h_to_4h",)),
        kv_heads=_falcon_kv_heads,
    ),
    "opt": ArchSpec(
        Attention(o="self_attn.out_proj", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj"),
        Mlp(down="fc2", up=("fc1",)),
        pre_norm=lambda c: getattr(c, "do_layer_norm_before", True),
    ),
    "phi": ArchSpec(
        Attention(o="self_attn.dense", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj"),
        Mlp(down="mlp.fc2", up=("mlp.fc1",)),
    ),
    "phi3": ArchSpec(
        Attention(o="self_attn.o_proj", qkv="self_attn.qkv_proj", config_heads=True),
        Mlp(down="mlp.down_proj", fused_up="mlp.gate_up_proj"),
    ),
    "modernbert": ArchSpec(
        Attention(o="attn.Wo", qkv="attn.Wqkv"), Mlp(down="mlp.Wo", fused_up="mlp.Wi"), keeps_first_layer=True
    ),
    "bert": _bert_like(),
    "roberta": _bert_like(),
    "xlm-roberta": _bert_like(),
    "electra": _bert_like(),
    "deberta-v2": _bert_like(q="query_proj", k="key_proj", v="value_proj"),
    "deberta": ArchSpec(  # one fused in_proj, per head [q_h | k_h | v_h]; its q_bias and v_bias go per head too
        Attention(o="attention.output.dense", qkv="attention.self.in_proj", layout="interleaved",
                  per_head=("attention.self.pos_proj", "attention.self.pos_q_proj"), per_head_optional=True),
        Mlp(down="output.dense", up=("intermediate.dense",)),
        pre_norm=False,
    ),
    "distilbert": ArchSpec(
        Attention(o="attention.out_lin", q="attention.q_lin", k="attention.k_lin", v="attention.v_lin"),
        Mlp(down="ffn.lin2", up=("ffn.lin1",)),
        pre_norm=False,
    ),
    "vit": ArchSpec(
        Attention(
            o="attention.output.dense",
            q="attention.attention.query",
            k="attention.attention.key",
            v="attention.attention.value",
        ),
        Mlp(down="output.dense", up=("intermediate.dense",)),
    ),
    "bart": _bart_like(pre_norm=False),
    "whisper": _bart_like(pre_norm=True),
    "t5": ArchSpec(
        Attention(
            o="layer.0.SelfAttention.o",
            q="layer.0.SelfAttention.q",
            k="layer.0.SelfAttention.k",
            v="layer.0.SelfAttention.v",
        ),
        _t5_mlps(),
        stacks=(
            Stack("encoder.block", "encoder", layers_field="num_layers"),
            Stack("decoder.block", "decoder", layers_field="num_decoder_layers"),
        ),
        refuse=(
            (
                "heads",
                "the relative position bias of a stack's first layer is shared by all its layers, so one "
                "layer cannot lose heads alone; gate 'neurons'",
            ),
            (
                "layers",
                "the first layer of each stack owns the relative position bias every layer uses; gate 'neurons'",
            ),
        ),
    ),
    "llava": ArchSpec(  # a vision tower feeding a language model: each stack follows its own sub-config
        stacks=(
            *(
                Stack(
                    path,
                    "vision",
                    config="vision_config",
                    refuse=(
                        (
                            "layers",
                            "the language model reads the vision tower's hidden states by layer index "
                            "(vision_feature_layer), which dropping layers would shift; gate 'heads' or 'neurons' "
                            "there",
                        ),
                    ),
                )
                # transformers 4.x wraps the tower's transformer in a CLIPVisionModel (one level deeper)
                for path in ("vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers")
            ),
            Stack("language_model.layers", "text", config="text_config"),
        )
    ),
    "clip": ArchSpec(
        stacks=(
            Stack("text_model.encoder.layers", "text", config="text_config"),
            Stack("vision_model.encoder.layers", "vision", config="vision_config"),
        )
    ),
    "mamba": ArchSpec(
        branches=("mixer.out_proj",),
        refuse=(
            ("heads", "Mamba blocks have no attention heads"),
            ("neurons", "Mamba blocks have no MLP; gate whole 'layers'"),
        ),
    ),
    "mixtral": _moe(count_field="num_local_experts", units_field="intermediate_size"),
    "phimoe": _moe(
        router="mlp.router",
        count_field="num_local_experts",
        units_field="intermediate_size",
        refuse=(("experts", PHIMOE_TWO_EXPERTS),),
    ),
    "qwen3_moe": _moe(),
    "qwen2_moe": _moe(
        shared=Mlp(down="mlp.shared_expert.down_proj", up=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"))
    ),
}
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "smollm3"):
    SPECS[_t] = _llama_like()
SPECS["mt5"] = SPECS["t5"]  # the same blocks and the same shared relative position bias
SPECS["olmo2"] = _llama_like(refuse=(("heads", QK_NORM_SPANS_HEADS),))
SPECS["olmoe"] = _moe(units_field="intermediate_size", refuse=(("heads", QK_NORM_SPANS_HEADS),))
SPECS["clip_text_model"] = ArchSpec(
    Attention(o="self_attn.out_proj", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj"),
    Mlp(down="mlp.fc2", up=("mlp.fc1",)),
)
SPECS["clip_vision_model"] = SPECS["clip_text_model"]


def _gemma3n_heads(config: Any) -> str | None:
    shared = config_value(config, "num_kv_shared_layers") or 0
    if shared:
        return (
            f"its last {shared} layers reuse the keys and values of earlier layers (num_kv_shared_layers), so an "
            "earlier layer cannot lose heads alone; gate 'neurons'"
        )
    return None


def _gemma3n_neurons(config: Any) -> str | None:
    pattern = config_value(config, "activation_sparsity_pattern") or ()
    sparse = [i for i, p in enumerate(pattern) if p]
    if sparse:
        return (
            f"layers {sparse} keep only the activations above a cutoff computed from all of their units "
            "(activation_sparsity_pattern), so removing units moves the cutoff for the others (no exact export)"
        )
    return None


# Gemma 3n: per-layer MLP widths are native (`intermediate_size` is a list); AltUp and LAuReL run beside the
# attention and MLP branches, so zeroing those two does not make a block the identity
SPECS["gemma3n_text"] = _llama_like(
    refuse=(
        ("heads", _gemma3n_heads),
        ("neurons", _gemma3n_neurons),
        ("layers", "its blocks carry AltUp and LAuReL branches besides attention and MLP; gate 'neurons'"),
    )
)


# Step 3.7's text stack (model type "step3p5", inside Step3p7ForConditionalGeneration): Llama-like blocks with a
# per-head output gate; dense MLPs in the first layers, routed experts beside a shared expert in the others. It builds
# each attention from `per_layer_config`, so different head counts per layer export natively.
SPECS["step3p5"] = ArchSpec(
    _llama_like(per_head=("self_attn.g_proj",)).attention,
    Mlp(down="mlp.down_proj", up=("mlp.gate_proj", "mlp.up_proj")),
    experts=Experts(
        shared=Mlp(
            down="mlp.shared_experts.down_proj", up=("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
        ),
        count_field="n_routed_experts",
    ),
)


# A non-native export with a generated loader is saved under its own model type, "dgate_pruned_<model type>", so
# that a plain `from_pretrained` asks for `trust_remote_code=True` instead of failing on tensor sizes (loading.py);
# a model loaded that way still has its family's spec.
PRUNED_MODEL_TYPE_PREFIX = "dgate_pruned_"


def spec_for(config: Any) -> ArchSpec | None:
    """The registered spec of a (stack) config's `model_type`, or None (name-based detection then)."""
    model_type = getattr(config, "model_type", None) or ""
    return SPECS.get(model_type.removeprefix(PRUNED_MODEL_TYPE_PREFIX))
