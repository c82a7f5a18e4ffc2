"""Structure from shapes, checked numerically: what a block's attention, MLP and residual branches are when neither
the registry nor common module names say it.

Proposals come from module shapes and the config's sizes (hidden size, head counts): the attention output
projection takes `heads x head_dim` inputs and writes the hidden size, its sibling projections have one block of
outputs per head; the MLP's down projection writes the hidden size from `intermediate` inputs that sibling up
projections produce (or twice as many: a fused gate/up); a residual branch is the last layer of a block's child
that writes the hidden size. A hooked forward pass tells which layers run, and in which order.

A proposal is never trusted: `verify` runs the model on a probe with a random half of each group set's groups
gated, and checks that (1) a zero gate on the activation equals zeroing every slice the export would remove and
(2) a gate of 0.5 equals scaling the slices the gate folds into. A proposal that fails is refused with the reason
(for hybrid stacks: that block stays dense and the others are gated).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .groups import GroupSet, LayerInfo, in_axis, out_axis

logger = logging.getLogger(__name__)


def hidden_size(hf_config: Any, block: nn.Module | None = None) -> int | None:
    """The residual stream's width: the config's (under any common name), else the input width most of the
    block's layers share."""
    for key in ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "width"):
        val = getattr(hf_config, key, None)
        if isinstance(val, int) and val > 0:
            return val
    if block is not None:
        widths = [_shape(m)[0] for m in _linears(block).values()]
        return max(set(widths), key=widths.count) if widths else None
    return None


def _linears(block: nn.Module) -> dict[str, nn.Module]:
    """Leaves with a 2-D weight (Linear, Conv1D and look-alikes), by relative name."""
    out: dict[str, nn.Module] = {}
    for n, m in block.named_modules():
        w = getattr(m, "weight", None)
        if n and isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, nn.Embedding):
            if not any(True for _ in m.children()) or isinstance(getattr(m, "base_layer", None), nn.Module):
                out[n] = m
    return out


def _shape(m: nn.Module) -> tuple[int, int]:
    """(inputs, outputs)."""
    return m.weight.shape[in_axis(m)], m.weight.shape[out_axis(m)]


def _parent(rel: str) -> str:
    return rel.rpartition(".")[0]


def _under(rel: str, parent: str) -> bool:
    return not parent or rel.startswith(parent + ".")


def propose_attention(block: nn.Module, hf_config: Any, n_heads: int, n_kv: int) -> dict[str, Any] | None:
    """{'o', 'per_head', 'per_kv_head', 'head_dim'} from shapes: the output projection writes the hidden size from
    a multiple of the head count; its siblings with one block of outputs per head are sliced by head."""
    hidden = hidden_size(hf_config, block)
    leaves = _linears(block)
    if hidden is None or not n_heads:
        return None
    cands = []
    for order, (rel, m) in enumerate(leaves.items()):
        fan_in, fan_out = _shape(m)
        if fan_out != hidden or fan_in % n_heads or not _parent(rel):
            continue
        scope = _parent(rel)
        if not [r for r in leaves if r != rel and _under(r, scope)] and _parent(scope):
            scope = _parent(scope)  # the output layer alone in a wrapper (CvT's attention.output.dense)
        siblings = [r for r in leaves if r != rel and _under(r, scope)]
        if not siblings:
            continue
        attn_like = any(k in type(block.get_submodule(scope)).__name__.lower() for k in ("attn", "attention"))
        if not attn_like and fan_in != hidden and fan_in in _mlp_widths(hf_config):
            continue  # the MLP's down projection (XLNet's ff.layer_2): its units are no heads
        # an attention-named module first, then heads x head_dim == hidden (an MLP's down reads more), then the
        # layer registered last (the output projection usually is)
        cands.append((not attn_like, fan_in != hidden, -order, rel, siblings))
    latent = latent_head_widths(hf_config, n_heads)
    for *_, o_rel, siblings in sorted(cands):
        hd = _shape(leaves[o_rel])[0] // n_heads
        per_head, per_kv = [], []
        if latent is not None:  # the per-head up-projections only (beside the output projection: not a sparse
            # attention's indexer inside it, GLM-MoE-DSA's); the latents' own layers are shared by all heads
            per_head = [r for r in siblings if _shape(leaves[r])[1] in latent and _parent(r) == _parent(o_rel)]
            if len(per_head) == 2:
                return {"o": o_rel, "per_head": tuple(per_head), "per_kv_head": (), "head_dim": hd,
                        "n_heads": n_heads, "n_kv": n_heads, "discovered": True}
            continue
        for rel in siblings:
            fan_in, fan_out = _shape(leaves[rel])
            if fan_out % n_heads == 0 and fan_out // n_heads >= 1:
                per_head.append(rel)
            elif fan_out % n_kv == 0:
                per_kv.append(rel)
        if per_head or per_kv:
            return {"o": o_rel, "per_head": tuple(per_head), "per_kv_head": tuple(per_kv), "head_dim": hd,
                    "n_heads": n_heads, "n_kv": n_kv, "discovered": True}
    return None


MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def latent_head_widths(hf_config: Any, n_heads: int) -> set[int] | None:
    """Multi-head latent attention (DeepSeek-V2/V3's MLA; the config has the four MLA fields): the output widths of
    its two per-head up-projections, the queries (q_b_proj, or q_proj without a query latent: nope + rope per
    head; with a per-head output gate beside them, nope + rope + value) and the keys' and values' (kv_b_proj:
    nope + value per head, each head's block contiguous). The latents (q_a_proj, kv_a_proj_with_mqa with the
    rotary key shared by all heads) and their norms precede the split into heads and are kept whole. None for any
    other attention."""
    vals = [getattr(hf_config, f, None) for f in MLA_FIELDS]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        return None
    _, nope, rope, v = vals  # (AXK2's q_gate_proj: [query | output gate] per head, the gate scaling its output)
    return {n_heads * (nope + rope), n_heads * (nope + v), n_heads * (nope + rope + v)}


def _mlp_widths(hf_config: Any) -> set[int]:
    """The config's MLP widths under their common names."""
    names = ("intermediate_size", "d_inner", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "ffn_size")
    return {v for v in (getattr(hf_config, k, None) for k in names) if isinstance(v, int) and not isinstance(v, bool)}


def propose_mlp(block: nn.Module, hf_config: Any, exclude: str | None = None) -> tuple[str, list[str]] | None:
    """(down, ups) from shapes: down writes the hidden size from I inputs; its siblings reading the hidden size write
    I outputs (up, gate) or 2I (a fused gate/up, as halves). Layers under `exclude` (the attention) are skipped."""
    hidden = hidden_size(hf_config, block)
    if hidden is None:
        return None
    leaves = {r: m for r, m in _linears(block).items() if not (exclude and (r == exclude or _under(r, exclude)))}
    want = getattr(hf_config, "intermediate_size", None)
    downs = []
    for rel, m in leaves.items():
        fan_in, fan_out = _shape(m)
        if fan_out == hidden and fan_in != hidden:
            downs.append((fan_in != want, -fan_in, rel))
    for _, _, down in sorted(downs):
        units = _shape(leaves[down])[0]
        parent = _parent(down)
        ups = [
            r for r, m in leaves.items()
            if r != down and _under(r, parent) and _shape(m)[0] == hidden and _shape(m)[1] in (units, 2 * units)
        ]
        fused = [r for r in ups if _shape(leaves[r])[1] == 2 * units]
        if fused:  # one fused [gate | up]: a layer of I outputs beside it is another's bottleneck (an adapter's)
            ups = fused
        if ups:
            return down, ups
    return None


def beside_ups(block: nn.Module, hf_config: Any, down: str, ups: list[str]) -> list[str]:
    """Layers whose outputs are added to an up projection's (a per-layer adapter beside a shared MLP's gate_up_proj,
    Zamba2): under the MLP, as wide as an up projection but reading something else than the hidden size. Proposed
    only: the numerical check decides."""
    hidden = hidden_size(hf_config, block)
    widths = {_shape(m)[1] for r, m in _linears(block).items() if r in ups}
    parent = _parent(down)
    return [
        r for r, m in _linears(block).items()
        if r != down and r not in ups and parent and _under(r, parent) and _shape(m)[1] in widths
        and _shape(m)[0] != hidden
    ]


def propose_experts(block: nn.Module, hf_config: Any) -> Any:
    """Routed experts stored as stacked tensors, from shapes (a `registry.Experts`, or None): an (E, H, I) tensor
    writing the hidden size H from I units per expert and an (E, 2I, H) tensor producing [gate | up] rows (or their
    transposes (E, I, H) and (E, H, 2I), as GPT-OSS stores them), in one module or in two sibling modules' weights
    (GraniteMoE and JetMoE in transformers 4.x); an (E, 2I) bias beside the second goes with its rows; the router is
    a layer nearby with one output per expert. Only the layout is proposed: that rows j and I + j of the second
    tensor feed unit j alone is what the numerical check decides (the alternating layout is tried next)."""
    from .registry import Experts

    hidden = hidden_size(hf_config, block)
    if hidden is None:
        return None
    leaves = _linears(block)
    stacked = {n: p for n, p in block.named_parameters() if p.dim() == 3}
    for transposed in (False, True):
        for down, p in stacked.items():
            n_exp, a, b = p.shape
            out, units = (b, a) if transposed else (a, b)
            want = (n_exp, hidden, 2 * units) if transposed else (n_exp, 2 * units, hidden)
            ups = [n for n, q in stacked.items() if n != down and tuple(q.shape) == want]
            if out != hidden or not ups:
                continue
            rel = _common_parent(down, ups[0])
            if not rel:
                continue
            owner = block.get_submodule(_parent(ups[0]))
            bias = next((n for n, q in owner.named_parameters(recurse=False)
                         if tuple(q.shape) == (n_exp, 2 * units)), "")
            parent = _parent(rel)
            routers = [r for r, lin in leaves.items() if _under(r, parent) and _shape(lin) == (hidden, n_exp)]
            routers.sort(key=lambda r: not _under(r, rel))  # the experts' own module's first
            up_rel = ups[0][len(rel) + 1:]
            return Experts(block=parent or rel, experts=rel, router=routers[0] if routers else "", gate_up=up_rel,
                           down=down[len(rel) + 1:], count_field="", units_field="", transposed=transposed,
                           bias=f"{_parent(up_rel) + '.' if _parent(up_rel) else ''}{bias}" if bias else "")
    return None


def _common_parent(a: str, b: str) -> str:
    """The deepest module holding both parameters (dotted names), '' for the block itself."""
    pa, pb = a.split(".")[:-1], b.split(".")[:-1]
    common = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def recurrent_mixer(block: nn.Module, hf_config: Any) -> tuple[str, str] | None:
    """(relative name, what shows it) of a sequence mixer in `block` that carries a recurrent state over its channels
    instead of attention heads (RWKV's time mixing, a Mamba mixer): a module whose output projection writes the
    hidden size from C channels and that either keeps parameters of its own with one row per channel (RWKV's
    `time_decay`, Mamba's `A_log` and `D`: the state's decay per channel) or convolves those channels along the
    sequence (Mamba's depthwise `conv1d`). None when no module of the block looks so."""
    hidden = hidden_size(hf_config, block)
    leaves = _linears(block)
    for rel, m in block.named_modules():
        if not rel:
            continue
        outs = [r for r, lin in leaves.items() if _under(r, rel) and _shape(lin)[1] == hidden]
        if not outs:
            continue
        width = _shape(leaves[outs[-1]])[0]
        own = [n for n, p in m.named_parameters(recurse=False) if p.dim() and p.shape[0] == width and p.dim() <= 2]
        convs = [
            n for n, c in m.named_modules() if isinstance(c, nn.Conv1d) and c.kernel_size[0] > 1
            and c.groups == c.in_channels == c.out_channels and c.in_channels >= width
        ]
        if own:
            return rel, f"its own per-channel state parameters {', '.join(repr(n) for n in own)}"
        if convs:
            return rel, f"a convolution of its channels along the sequence ('{rel}.{convs[0]}')"
    return None


def residual_branches(block: nn.Module, hf_config: Any) -> list[tuple[str, list[str]]]:
    """Each direct child of the block that writes the hidden size (attention, cross-attention, MLP, mixture of
    experts, a recurrent mixer), with the weights whose scale is the branch's scale: its last layer writing the
    hidden size (every copy of it in a list of experts) and stacked expert tensors (E, hidden, units)."""
    hidden = hidden_size(hf_config, block)
    leaves = _linears(block)
    out = []
    children = []
    for child, module in block.named_children():  # a list of sub-layers (T5's `layer`): each is a branch
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            children += [(f"{child}.{n}", m) for n, m in module.named_children()]
        else:
            children.append((child, module))
    for child, module in children:
        last = [r for r, m in leaves.items() if (r == child or _under(r, child)) and _shape(m)[1] == hidden]
        stacked = [
            f"{child}.{n}" for n, p in module.named_parameters() if p.dim() == 3 and p.shape[1] == hidden
        ]
        if not last and not stacked:
            continue
        picked = []
        if last:
            pattern = re.sub(r"\.\d+\.", ".#.", last[-1])  # one per expert when experts are a list of modules
            picked = [r for r in last if re.sub(r"\.\d+\.", ".#.", r) == pattern]
        out.append((child, picked + stacked))
    return out


def branch_candidates(block: nn.Module, child: str, hidden: int) -> list[list[tuple[str, str]]]:
    """The parameter groups of a residual branch (a direct child of `block`) that may carry its scale, as
    (relative module, parameter) pairs: the layers writing the hidden size, one group per name pattern (every copy
    in a list of experts together), and each stacked expert tensor with a hidden-size axis in either layout
    ((E, H, I) or (E, I, H)) with its own per-expert bias. Which of them are the branch's last layers is what
    `fit_branch_scale` decides numerically."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for rel, m in _linears(block).items():
        if (rel == child or _under(rel, child)) and _shape(m)[1] == hidden:
            key = re.sub(r"\.\d+(?=\.|$)", ".#", rel)
            groups.setdefault(key, []).extend((rel, pn) for pn, _ in m.named_parameters(recurse=False))
    for rel, m in block.get_submodule(child).named_modules():
        own = dict(m.named_parameters(recurse=False))
        for pn, p in own.items():
            if p.dim() == 3 and hidden in (p.shape[1], p.shape[2]):
                full = f"{child}.{rel}" if rel else child
                biases = [q for q, b in own.items() if q != pn and q.startswith(pn) and b.dim() == 2
                          and b.shape[-1] == hidden]
                groups[f"{full}.{pn}"] = [(full, q) for q in (pn, *biases)]
    return list(groups.values())


def fit_branch_scale(
    model: nn.Module, block_name: str, child: str, candidates: list[list[tuple[str, str]]], inputs: Any,
    max_tries: int = 64,
) -> list[tuple[str, str]] | None:
    """The smallest union of `candidates` whose parameters, scaled by 0.5, halve the branch's output on the probe
    (its last layers: the scale of anything feeding a nonlinearity, such as an output gate, does not pass through),
    or None. One forward pass of the model per try, the branch's output read by a hook."""
    from itertools import combinations

    module = model.get_submodule(f"{block_name}.{child}")
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        if not seen:
            seen.append(_first(out))

    def branch_out(scaled: list[tuple[str, str]]) -> torch.Tensor | None:
        seen.clear()
        with _undone() as (handles, saved), torch.no_grad():
            for rel, pn in scaled:
                p = getattr(model.get_submodule(f"{block_name}.{rel}"), pn)
                saved.append((p, p.detach().clone()))
                p.mul_(0.5)
            handles.append(module.register_forward_hook(hook))
            _forward(model, inputs)
        return seen[0].float() if seen and isinstance(seen[0], torch.Tensor) else None

    ref = branch_out([])
    if ref is None or not float(ref.abs().max()) > 0:
        return None
    tol = 1e-5 * float(ref.abs().max())
    tries = 0
    for k in range(1, len(candidates) + 1):
        for combo in combinations(candidates, k):
            tries += 1
            if tries > max_tries:
                return None
            scaled = [pair for group in combo for pair in group]
            out = branch_out(scaled)
            if out is not None and _close(out, 0.5 * ref, tol):
                return scaled
    return None


# ---- the numerical check --------------------------------------------------------------------------------------
class _Scale:
    """A forward (pre-)hook multiplying the feature axis of an activation by a fixed factor vector."""

    def __init__(self, factor: torch.Tensor, axis: int, output: bool):
        self.factor, self.axis, self.output = factor, axis, output

    def _apply(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.shape[self.axis] == self.factor.numel():
            shape = [1] * x.dim()
            shape[self.axis] = -1
            return x * self.factor.to(x.dtype).reshape(shape)
        return x

    def __call__(self, module: nn.Module, args: Any, out: Any = None) -> Any:
        if self.output:
            return (self._apply(out[0]), *out[1:]) if isinstance(out, tuple) else self._apply(out)
        return (self._apply(args[0]), *args[1:]) if args else args


def _factors(index: torch.Tensor, dead: torch.Tensor, value: float) -> torch.Tensor:
    f = torch.ones(index.shape, dtype=torch.float32)
    hit = (index >= 0) & dead[index.clamp(min=0)]
    f[hit] = value
    return f


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    from .verify import first_output

    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return first_output(out).float()


def _scale_param(p: torch.Tensor, axis: Any, f: torch.Tensor) -> None:
    """Multiply `p` by factors `f` laid along `axis` (one axis, or two ascending axes such as (expert, unit))."""
    axes = axis if isinstance(axis, tuple) else (axis,)
    if tuple(p.shape[a] for a in axes) != tuple(f.shape) or list(axes) != sorted(axes):
        raise ValueError(f"a tensor of shape {tuple(p.shape)} has no {tuple(f.shape)} slice along {axis}")
    shape = [1] * p.dim()
    for a, n in zip(axes, f.shape):
        shape[a] = n
    p.mul_(f.to(p.device, p.dtype).reshape(shape))


def _run_gated(model: nn.Module, sets: list[tuple[GroupSet, torch.Tensor]], inputs: Any, value: float) -> torch.Tensor:
    with _undone() as (handles, saved):
        for gs, dead in sets:
            for site in gs.sites:
                m = model.get_submodule(site.module)
                if site.where == "param":  # a gate on the parameter itself (stacked experts): scale it
                    p = getattr(m, site.param)
                    saved.append((p, p.detach().clone()))
                    with torch.no_grad():
                        _scale_param(p, site.axis, _factors(site.index, dead, value))
                    continue
                hook = _Scale(_factors(site.index, dead, value), site.axis, site.where == "output")
                reg = m.register_forward_hook if site.where == "output" else m.register_forward_pre_hook
                handles.append(reg(hook))
        return _forward(model, inputs)


@contextmanager
def _undone() -> Iterator[tuple[list, list]]:
    """(hook handles, (parameter, saved copy) pairs) for a check to fill: all removed and restored on exit, also on
    an error, so a check never leaves the user's model changed."""
    handles: list = []
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        yield handles, saved
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)


def _run_sliced(model: nn.Module, sets: list[tuple[GroupSet, torch.Tensor]], inputs: Any, value: float,
                which: str) -> torch.Tensor:
    saved = []
    try:
        with torch.no_grad():
            for gs, dead in sets:
                for sl in getattr(gs, which):
                    p = getattr(model.get_submodule(sl.module), sl.param)
                    saved.append((p, p.detach().clone()))
                    if sl.axis is None:
                        if bool(dead[int(sl.index.reshape(-1)[0])]):
                            p.mul_(value)
                        continue
                    _scale_param(p, sl.axis, _factors(sl.index, dead, value))
        return _forward(model, inputs)
    finally:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= tol


def _dead(gs: GroupSet, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(17 + k)
    if gs.n_groups == 1:
        return torch.tensor([True])
    dead = torch.rand(gs.n_groups, generator=g) < 0.5
    dead[0], dead[-1] = True, False
    return dead


def check(model: nn.Module, sets: list[GroupSet], inputs: Any) -> str | None:
    """None when zeroing and halving the gates of `sets` acts like the slices they stand for, else why not."""
    try:
        return _check(model, sets, inputs)
    except NoProbe:
        raise
    except (RuntimeError, IndexError, ValueError) as e:
        return f"the proposed slices do not fit the layers ({str(e).splitlines()[0][:100]})"


class NoProbe(ValueError):
    """The probe batch does not run through the model (it needs other inputs): nothing can be checked."""


class OffPath(ValueError):
    """Gating a stack changes nothing in the probe's outputs: the probe does not reach it (a tower it does not feed)."""


OFF_PATH = "gating its groups changes nothing in the outputs (the probe does not reach these layers)"


def _check(model: nn.Module, sets: list[GroupSet], inputs: Any) -> str | None:
    plan = [(gs, _dead(gs, k)) for k, gs in enumerate(sets)]
    try:
        ref = _forward(model, inputs)
    except Exception as e:  # noqa: BLE001 - a probe the model does not take: say so, check nothing
        raise NoProbe(
            f"the structure was found from names and shapes and must be checked on a batch, but the model does not run "
            f"on the probe ({str(e).splitlines()[0][:80]}); pass example_inputs=<a batch> to apply_dgate"
        ) from None
    zero = _run_gated(model, plan, inputs, 0.0)
    scale = float(ref.abs().max())
    effect = float((zero - ref).abs().max()) if zero.shape == ref.shape else float("inf")
    if not effect > 1e-6 * scale:
        return OFF_PATH
    # a wrong proposal is off by about as much as the gate's own effect; float rounding by far less
    tol = max(1e-2 * effect, 1e-6 * scale)
    if isinstance(sets[0].info, LayerInfo):  # whole blocks: the block must be residual
        if not _blocks_are_residual(model, plan, inputs):
            return ("the block's output is not its input plus its branches (it normalises after the residual add, or "
                    "has a branch beside them), so a zero gate does not remove the layer")
    elif not _close(zero, _run_sliced(model, plan, inputs, 0.0, "removable"), tol):
        return ("a zero gate does not equal removing its slices (something else reads them, e.g. a norm over all "
                "heads or a branch beside it)")
    if not _close(_run_gated(model, plan, inputs, 0.5), _run_sliced(model, plan, inputs, 0.5, "primary"), tol):
        return "scaling the gated activation does not equal scaling its weights (a norm or nonlinearity between them)"
    return None


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) and x else x


def _blocks_are_residual(model: nn.Module, plan: list[tuple[GroupSet, torch.Tensor]], inputs: Any) -> bool:
    """With the gates of each gated block at zero, the block returns its input (x + g * f(x) with g = 0, whatever
    scales or permutes f after the gate, as ConvNeXt's layer scale): then dropping it computes the same. A block
    that normalises after the residual add (post-norm) or has a branch beside the gated ones fails; the norms'
    weights are moved off their initial values for the check, so that a freshly built post-norm block (whose norm
    of an already normalised input is the identity) fails as a trained one does."""
    calls: dict[str, list[tuple[Any, Any]]] = {}

    def block_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            calls.setdefault(name, []).append((x, _first(out)))
        return hook

    with _undone() as (handles, saved):
        with torch.no_grad():  # norms away from the identity: a post-norm block at init (LN(LN(y)) = LN(y)) fails
            g = torch.Generator().manual_seed(5)
            for m in model.modules():
                if "norm" in type(m).__name__.lower():
                    for p in m.parameters(recurse=False):
                        saved.append((p, p.detach().clone()))
                        p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
        for gs, _ in plan:
            block = gs.info.block
            handles.append(model.get_submodule(block).register_forward_hook(block_hook(block), with_kwargs=True))
        _run_gated(model, plan, inputs, 0.0)
    if not calls:
        return False
    for seq in calls.values():
        for x, y in seq:
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape != y.shape:
                return False
            if not _close(y.float(), x.float(), 1e-5 * float(y.abs().max()) + 1e-6):
                return False
    return True


def verify(model: nn.Module, sets: list[GroupSet], inputs: Any) -> dict[int, str]:
    """Check discovered group sets: {index in `sets`: why it fails} (empty: all pass). One joint check first;
    on failure each set alone."""
    if not sets:
        return {}
    was = model.training
    model.eval()
    try:
        if check(model, sets, inputs) is None:
            return {}
        failed = {}
        for i, gs in enumerate(sets):
            why = check(model, [gs], inputs)
            if why is not None:
                failed[i] = why
        if not failed:  # each passes alone but not together: trust none
            failed = dict.fromkeys(range(len(sets)), "the groups pass one layer at a time but not together")
        return failed
    finally:
        model.train(was)
