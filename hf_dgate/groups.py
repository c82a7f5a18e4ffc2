"""One mechanism for every granularity: a group is a set of slices of parameter tensors along one axis.

A `GroupSet` describes the groups of one target in one place (the heads of layer 3, the filters of a conv):
- `sites`: activations whose feature axis is multiplied by the group scale s_g (forward hooks), so the model's
  own parameters, names and state-dict keys stay untouched;
- `primary`: the parameter slices that scaling those activations is equivalent to (w_g; folded on merge);
- `removable`: everything that only serves the group (q/k rows of a head, up rows of a neuron), for the
  parameter count in reports and for export.
Every slice carries an index vector along its axis: entry i is the (local) group of position i, -1 if none.
Fused QKV layouts, GQA and per-head interleaving are therefore just different index vectors.

`GateBank` is the single registered submodule (`model.dgate`) that owns the gates of all targets and computes
the per-group norms with one reduction per tensor (no Python loop over groups).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import gates as G
from .choices import AttentionKind, GroupKind, HeadSide, ThresholdMode, Where
from .config import DGateConfig
from .errors import NonFiniteError
from .hooks import (
    BankHook,
    GatedLinearForward,
    GatedParamForward,
    InputHook,
    OutputHook,
    SiteRef,
    broadcast,
    full_tensor,
)
from .methods import Method, get_method

UNGATED = -1
GREY_DECADES = 2  # a zero group within this many decades below its threshold is "grey": not settled at zero


@dataclass
class TensorSlice:
    """Positions of `module.<param>` along `axis` and the group each belongs to (axis None: whole tensor).
    Two axes (expert, unit) index groups inside a stacked tensor such as a mixture of experts' (E, H, I) down
    projection; `index` then has the shape of those two axes."""

    module: str
    param: str
    axis: int | tuple[int, int] | None
    index: torch.Tensor  # int64, (size along axis,), (1,) when axis is None, or 2D for two axes


@dataclass
class Site:
    """An activation scaled per group: the module's `input` (pre-hook) or `output`, along `axis`."""

    module: str
    where: Where  # input | output | param (the parameter `param` itself, scaled inside the forward)
    axis: int | tuple[int, int]  # feature axis of the activation (-1 for Linear, 1 for Conv2d); of `param`
    index: torch.Tensor  # int64, (features,); for "param" the shape of `param` along `axis`
    param: str | None = None

    def __post_init__(self) -> None:
        self.where = Where(self.where)


# ---- what a target records about one group set (typed; one class per kind of set) ------------------------------
@dataclass
class SetInfo:
    """Where a group set sits: its block stack (path and name, set when the stacks are walked), and why the
    installed transformers could not run it pruned (`refuse`: apply_dgate refuses, reloading goes on)."""

    stack: str | None = None
    stack_name: str | None = None
    refuse: str | None = None
    # found from common names or shapes (no registry row, no module_names): checked numerically before gating
    guessed: bool = False
    dense_blocks: tuple[int, ...] = ()  # blocks of the stack left dense (no such structure there, or it failed)

    def block_parts(self) -> tuple[str | None, ...]:
        """Module names relative to the set's block that locate the block (see `targets.base.block_name`)."""
        return ()


@dataclass
class HeadInfo(SetInfo):
    """One attention's heads: its projections (relative to the block, as in `registry.Attention.parts`), head
    counts, the side the gate scales and whether it is self- or cross-attention."""

    o: str = ""
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    layout: str | None = None
    per_head: tuple[str, ...] = ()
    per_kv_head: tuple[str, ...] = ()  # projections with one block of outputs per key/value head (found from shapes)
    sub_norms: tuple[str, ...] = ()  # RMSNorms over all heads' outputs before `o` (BitNet): rescaled on removal
    discovered: bool = False  # found from shapes: gated at o's input, removed from o and every per-head projection
    config_heads: bool = False
    n_heads: int = 0
    n_kv: int = 0
    head_dim: int = 0
    side: HeadSide = HeadSide.OUTPUT
    attention: AttentionKind = AttentionKind.SELF

    def block_parts(self) -> tuple[str | None, ...]:
        return (self.o, self.v, self.qkv)


@dataclass
class NeuronInfo(SetInfo):
    """A dense MLP's units (or a shared expert's): the projection consuming them and those producing them."""

    down: str = ""
    up: tuple[str, ...] = ()
    shared_expert: bool = False
    sub_norms: tuple[str, ...] = ()  # RMSNorms over all units before `down` (BitNet): rescaled on removal

    def block_parts(self) -> tuple[str | None, ...]:
        return (self.down,)


@dataclass
class ExpertUnitInfo(SetInfo):
    """Every routed expert's units in stacked (E, ...) tensors: unit j of expert e is group e * units + j."""

    experts: str = ""
    n_experts: int = 0
    units: int = 0
    gate_up: str = ""
    down: str = ""
    interleaved: bool = False  # gate and up rows alternate (GPT-OSS) instead of [gate | up] halves


@dataclass
class ExpertInfo(SetInfo):
    """Whole routed experts of one block, and the router whose per-expert rows go with them."""

    experts: str = ""
    router: str = ""
    n_experts: int = 0


@dataclass
class LayerInfo(SetInfo):
    block: str = ""


@dataclass
class ModuleInfo(SetInfo):
    """Groups of one module (filters, input features, a user rule's): `root` is where Torch-Pruning starts."""

    root: str | None = None
    kind: GroupKind | None = None


@dataclass
class GroupSet:
    target: str
    layer: int | str
    n_groups: int
    sites: list[Site]
    primary: list[TensorSlice]
    removable: list[TensorSlice]
    info: SetInfo = field(default_factory=SetInfo)

    @property
    def meta(self) -> MappingProxyType:
        """Read-only view of `info` as the dict earlier versions held (writes raise: set `info`'s fields)."""
        return MappingProxyType({f.name: getattr(self.info, f.name) for f in fields(self.info)})


def slice_index(size: int, group_size: int = 1, offset: int = 0) -> torch.Tensor:
    """Index vector of `size` positions in consecutive blocks of `group_size`, numbered from `offset`."""
    return torch.arange(size) // group_size + offset


def base_layer(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    """The layer that owns the weights: PEFT adapters (LoRA...) wrap it as `<name>.base_layer`."""
    inner = getattr(module, "base_layer", None)
    return (f"{name}.base_layer", inner) if isinstance(inner, nn.Module) else (name, module)


def out_axis(module: nn.Module) -> int:
    """Axis of `module.weight` that indexes output features (transformers' Conv1D stores weights transposed)."""
    return 1 if type(base_layer("", module)[1]).__name__ == "Conv1D" else 0


def in_axis(module: nn.Module) -> int:
    return 0 if type(base_layer("", module)[1]).__name__ == "Conv1D" else 1


def output_slices(name: str, module: nn.Module, index: torch.Tensor) -> list[TensorSlice]:
    """Weight rows (and bias) producing the selected output features of a Linear/Conv1D/Conv/Norm."""
    name, module = base_layer(name, module)
    slices = [TensorSlice(name, "weight", out_axis(module), index)]
    if getattr(module, "bias", None) is not None:
        slices.append(TensorSlice(name, "bias", 0, index))
    return slices


def input_slices(name: str, module: nn.Module, index: torch.Tensor) -> list[TensorSlice]:
    """Weight columns consuming the selected input features."""
    name, module = base_layer(name, module)
    return [TensorSlice(name, "weight", in_axis(module), index)]


def whole_weight_slices(name: str, module: nn.Module, group: int = 0) -> list[TensorSlice]:
    """The weight and bias of one layer, each whole tensor in group `group`."""
    name, module = base_layer(name, module)
    return [TensorSlice(name, pn, None, torch.tensor([group])) for pn, _ in module.named_parameters(recurse=False)]


def whole_module_slices(name: str, module: nn.Module, group: int = 0) -> list[TensorSlice]:
    """Every parameter of `module` and its children, each whole tensor in group `group`."""
    return [
        TensorSlice(f"{name}.{sub}" if sub else name, pn, None, torch.tensor([group]))
        for sub, m in module.named_modules()
        for pn, p in m.named_parameters(recurse=False)
    ]


class GateBank(nn.Module):
    """Owns the gates (one (D-1, G) parameter per target), the group norms, the hooks and folding; what the gates
    mean and what training minimises is the method's (`self.strategy`, see `hf_dgate.methods`)."""

    def __init__(self, model: nn.Module, group_sets: list[GroupSet], config: DGateConfig):
        super().__init__()
        self.config = config
        self.lam = config.lam  # mutable (warm-up, controllers); the config keeps the requested value
        self.depth = config.depth
        self.group_sets = group_sets
        self.targets: list[str] = list(dict.fromkeys(gs.target for gs in group_sets))
        self.offsets: list[int] = []
        sizes: dict[str, int] = {t: 0 for t in self.targets}
        for gs in group_sets:
            self.offsets.append(sizes[gs.target])
            sizes[gs.target] += gs.n_groups
        self.sizes = sizes
        self.method = config.method
        self.strategy: Method = get_method(config.method)
        # gate-free methods (direct, slimming) keep their gates at 1 and frozen; l0 keeps log_alpha in `gammas`
        self.gammas = nn.ParameterDict(
            {
                t: nn.Parameter(self._init_gates(n), requires_grad=self.strategy.trainable_gates)
                for t, n in sizes.items()
            }
        )
        self.forward_cache: dict[str, torch.Tensor] = {}  # per-forward samples of a stochastic method
        self.l0_target = config.l0_target_sparsity  # mutable (a ramp towards the target); the config keeps the value
        self._modules_by_name = dict(model.named_modules())
        self._adapters: dict[int, nn.Module] = {}
        self._adapters_of: int | None = None
        # CPU copies of the index buffers: they are not in the state dict, so a bank built on the meta device and
        # materialised with `to_empty()` gets them back from here (see `_apply`)
        self._index_cpu: dict[str, torch.Tensor] = {}
        self.strategy.setup(self)
        self._norm_terms: dict[str, list[tuple[nn.Module, str, int | None, str | None, str]]] = {
            t: [] for t in self.targets
        }
        self._sites: list[SiteRef] = []
        self._layer_segments = _layer_segments(group_sets, self.targets)
        for k, (gs, off) in enumerate(zip(group_sets, self.offsets)):
            for j, sl in enumerate(gs.primary):
                self._add_norm_term(gs.target, f"p{k}_{j}", sl, off)
            for j, site in enumerate(gs.sites):
                idx = site.index.clone()
                ungated = bool((idx < 0).any())
                idx = torch.where(idx < 0, torch.full_like(idx, sizes[gs.target]), idx + off)
                buf = f"s{k}_{j}"
                self._index_buffer(buf, idx)
                self._sites.append(SiteRef(gs.target, site.module, site.where, site.axis, site.param, buf, ungated))

    @property
    def direct(self) -> bool:
        """True for gate-free methods (direct, slimming): the gates stay at 1 and nothing is applied."""
        return not self.strategy.trainable_gates

    def per_set(
        self, values: dict[str, torch.Tensor] | torch.Tensor, target: str | None = None
    ) -> list[tuple[GroupSet, torch.Tensor]]:
        """Each group set with its part of per-group vectors, in bank order: `values` maps every target to a vector
        with one entry per group of that target (norms, zero masks), or is one target's vector and `target` names it
        (that target's sets only). The parts are views: writing into one writes into `values`."""
        out = []
        for gs, off in zip(self.group_sets, self.offsets):
            if target is not None and gs.target != target:
                continue
            vec = values if target is not None else values[gs.target]
            out.append((gs, vec[off : off + gs.n_groups]))
        return out

    def module(self, name: str) -> nn.Module:
        """The gated model's submodule `name` ("" for the model itself), as it was when the bank was built."""
        return self._modules_by_name[name]

    def _init_gates(self, n: int) -> torch.Tensor:
        return self.strategy.init_gates(self.config, n).float()

    def _index_buffer(self, name: str, index: torch.Tensor) -> None:
        """Register a (non-persistent) index buffer and keep a CPU copy for re-materialising it from meta."""
        if index.is_meta:
            raise ValueError(
                "apply_dgate found the model's structure on the meta device (torch.device('meta') as default "
                "device); call apply_dgate outside that context."
            )
        self._index_cpu[name] = index.detach().to("cpu", copy=True)
        self.register_buffer(name, index, persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> GateBank:
        """Move with the model but keep gates in fp32 when the model is cast to half precision.

        When the bank leaves the meta device (`model.to_empty(device=...)`), its tensors hold garbage: the index
        buffers are restored from their CPU copies and the gates re-initialised (1, or the L0 init), which is what
        a freshly gated model holds; load a gated state dict afterwards to restore trained gates.
        """
        was_meta = {n for n, b in self._buffers.items() if b is not None and b.is_meta}
        gates_meta = {t for t, p in self.gammas.items() if p.is_meta}
        extras_meta = any(p.is_meta for p in self.strategy.extra_parameters(self))
        super()._apply(fn, recurse)
        for name in was_meta:
            buf = self._buffers[name]
            if buf is not None and not buf.is_meta and name in self._index_cpu:
                self._buffers[name] = self._index_cpu[name].to(buf.device, copy=True)
        with torch.no_grad():
            for t in gates_meta:
                p = self.gammas[t]
                if not p.is_meta:
                    p.copy_(self._init_gates(self.sizes[t]).to(device=p.device, dtype=p.dtype))
        if extras_meta:
            self.strategy.reset(self)
        for p in [*self.gammas.values(), *self.strategy.extra_parameters(self)]:  # (objects _apply may have replaced)
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    def check_materialised(self, action: str) -> None:
        """Refuse to `action` (report, export, ...) while gates or gated weights are on the meta device: they hold
        no values, so every number read off them would be made up."""
        weights = (getattr(m, param) for terms in self._norm_terms.values() for m, param, *_ in terms)
        if any(p.is_meta for p in self.gammas.values()) or any(w.is_meta for w in weights):
            raise ValueError(
                f"Cannot {action}: the model is on the meta device, so its weights and gates hold no values. "
                "Materialise it first: model.to_empty(device='cpu'), then load its weights (model.load_state_dict)."
            )

    def forward(self, x: Any) -> Any:
        """Identity: containers that call every child (nn.Sequential) pass straight through the bank."""
        return x

    # ---- norms ----------------------------------------------------------------------------------------------
    def _add_norm_term(self, target: str, key: str, sl: TensorSlice, offset: int) -> None:
        module = self._modules_by_name[sl.module]
        idx = sl.index.reshape(-1) if isinstance(sl.axis, tuple) else sl.index
        if sl.axis is None:
            pos_buf = None
        elif bool((idx < 0).any()):
            pos_buf = f"{key}_pos"
            self._index_buffer(pos_buf, torch.nonzero(idx >= 0).flatten())
            idx = idx[idx >= 0]
        else:
            pos_buf = None
        gid_buf = f"{key}_gid"
        self._index_buffer(gid_buf, idx + offset)
        self._norm_terms[target].append((module, sl.param, sl.axis, pos_buf, gid_buf))

    def assert_finite(self, action: str, weights: bool = True) -> None:
        """Refuse to `action` (report, export, ...) when a gate, or with `weights` a gated group's weights, is NaN
        or infinite: every result built on it would be wrong. `weights=False` checks the (small) gates only."""
        self.check_materialised(action)
        bad = {}
        for t in self.targets:
            vals = self.effective_norms(t) if weights else self.gates(t)
            n = int((~torch.isfinite(vals)).reshape(-1, self.sizes[t]).any(0).sum())
            if n:
                bad[t] = n
        if bad:
            which = ", ".join(f"{n} of {self.sizes[t]} {t}" for t, n in bad.items())
            raise NonFiniteError(
                f"Cannot {action}: {which} have NaN or infinite gates or weights (training diverged). Reload a "
                "checkpoint from before the divergence and lower the learning rate or lam."
            )

    def gates(self, target: str) -> torch.Tensor:
        """The (D-1, G) gate tensor of `target`, whole even when FSDP2 holds it sharded outside forward."""
        return full_tensor(self.gammas[target])

    def _adapter(self, module: nn.Module) -> nn.Module | None:
        """The PEFT LoRA layer wrapping `module`, if any (an id-keyed map, rebuilt for a deep copy of the bank)."""
        if self._adapters_of != id(self):
            self._adapters = {
                id(m.base_layer): m
                for m in self._modules_by_name.values()
                if isinstance(getattr(m, "base_layer", None), nn.Module) and hasattr(m, "get_delta_weight")
            }
            self._adapters_of = id(self)
        return self._adapters.get(id(module))

    def _weight(self, module: nn.Module, param: str) -> torch.Tensor:
        """The effective tensor: a LoRA-wrapped weight counts with its active adapters' delta (W + BA), as the
        forward computes it (not when the adapters are disabled, nor twice for an adapter already merged into W).
        Only plain LoRA gets here: apply_dgate refuses adapters whose delta this would get wrong (DoRA, ...)."""
        w = getattr(module, param)
        adapter = self._adapter(module)
        if adapter is not None and param == "weight" and not getattr(adapter, "disable_adapters", False):
            merged = set(getattr(adapter, "merged_adapters", ()))
            for name in adapter.active_adapters:
                if name in adapter.lora_A and name not in merged:
                    w = w + adapter.get_delta_weight(name)
        return w

    def _reduced(self, module: nn.Module, param: str, axis: int | None, pos_buf: str | None) -> torch.Tensor:
        w = self._weight(module, param)
        if w.dtype not in (torch.float32, torch.float64):
            w = w.float()  # half-precision weights: accumulate norms in fp32
        if axis is None:
            return full_tensor(w.pow(2).sum()).reshape(1)
        axes = axis if isinstance(axis, tuple) else (axis,)
        dims = [d for d in range(w.dim()) if d not in axes]
        r = full_tensor(w.pow(2).sum(dim=dims) if dims else w.pow(2))  # FSDP2: reduce the shard, then gather (n,)
        r = r.reshape(-1)
        return r if pos_buf is None else r[getattr(self, pos_buf)]

    def group_sq_norms(self, target: str) -> torch.Tensor:
        """||w_g||^2 for every group of `target`: one reduction per tensor, scattered into a (G,) vector."""
        gam = self.gates(target)
        out = torch.zeros(self.sizes[target], device=gam.device, dtype=gam.dtype)
        for module, param, axis, pos_buf, gid_buf in self._norm_terms[target]:
            out = out.index_add(0, getattr(self, gid_buf), self._reduced(module, param, axis, pos_buf))
        return out

    def total_sq_norm(self, target: str) -> torch.Tensor:
        """sum_g ||w_g||^2 without the scatter (what the penalty needs)."""
        terms = [self._reduced(m, p, a, pb).sum() for m, p, a, pb, _ in self._norm_terms[target]]
        return torch.stack(terms).sum()

    def effective_norms(self, target: str) -> torch.Tensor:
        """||theta_g||_2 = |s_g| ||w_g||_2 with the deterministic gate (what sparsity and export read)."""
        return self.scale(target).abs() * G.safe_sqrt(self.group_sq_norms(target))

    def check_threshold(self, threshold: float | None = None) -> float:
        """`threshold`, or the config's when None; a ValueError that says what is allowed otherwise."""
        thr = self.config.threshold if threshold is None else threshold
        relative = self.config.threshold_mode == ThresholdMode.RELATIVE
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 < thr < (1 if relative else math.inf):
            allowed = "a float in (0, 1) (threshold_mode='relative')" if relative else "a float > 0 (e.g. 1e-3)"
            raise ValueError(f"threshold={thr!r} is invalid: pass {allowed}.")
        return float(thr)

    def group_thresholds(self, target: str, threshold: float | None = None) -> torch.Tensor:
        """Per group of `target`, the norm below which it counts as zero: `threshold` (default the config's), or
        with `threshold_mode='relative'` that fraction of the largest norm in the group's layer (groups alone in
        their layer are compared with each other instead)."""
        thr = self.check_threshold(threshold)
        norms = self.effective_norms(target)
        if self.config.threshold_mode == ThresholdMode.ABSOLUTE:
            return torch.full_like(norms, thr)
        seg = self._layer_segments[target].to(norms.device)
        ref = torch.zeros(int(seg.max()) + 1, device=norms.device, dtype=norms.dtype)
        ref = ref.scatter_reduce(0, seg, norms, "amax", include_self=False)
        return thr * ref[seg]

    def zero_groups(self, target: str, threshold: float | None = None) -> torch.Tensor:
        """Which groups of `target` count as zero: what the report, export and lam controller all read."""
        return self.effective_norms(target) < self.group_thresholds(target, threshold)

    def grey_groups(self, target: str, threshold: float | None = None) -> torch.Tensor:
        """Groups that count as zero but have not settled there: within GREY_DECADES below their threshold.
        Many of them mean training has not converged (export then verifies whether removing them matters)."""
        norms, thr = self.effective_norms(target), self.group_thresholds(target, threshold)
        return (norms < thr) & (norms >= thr / 10**GREY_DECADES)

    def scale(self, target: str) -> torch.Tensor:
        """The deterministic group scale s_g (L0: the test-time hard-concrete gate)."""
        return self.strategy.scale(self, target)

    def site_scale(self, target: str, buf: str, ungated: bool) -> torch.Tensor:
        """The forward scale at one site: the method's (L0 samples while training), one entry per position, 1 where
        a position belongs to no group (everywhere inside `switched_off()`)."""
        index = getattr(self, buf)
        if self.__dict__.get("_switched_off"):
            dtype = self.gammas[target].dtype if target in self.gammas else torch.float32
            return torch.ones(index.shape, device=index.device, dtype=dtype)
        s = self.strategy.forward_scale(self, target)
        if ungated:
            s = torch.cat([s, s.new_ones(1)])
        return s[index]

    @contextmanager
    def switched_off(self) -> Iterator[None]:
        """Every gate acts as 1 inside: the model computes what its weights alone compute (for a gated PEFT model with
        its adapters disabled, the model before gating: DGateTrainer(teacher="base") distils from it this way)."""
        before = self.__dict__.get("_switched_off", False)
        self.__dict__["_switched_off"] = True
        try:
            yield
        finally:
            self.__dict__["_switched_off"] = before

    # ---- penalties --------------------------------------------------------------------------------------------
    def penalty(self, lam: float | None = None) -> torch.Tensor:
        """What training adds to the loss, as the method defines it (D-Gating: the surrogate R)."""
        return self.strategy.penalty(self, self.lam if lam is None else lam)

    def induced_penalty(self, lam: float | None = None) -> torch.Tensor:
        lam = self.lam if lam is None else lam
        return sum(G.induced_penalty(self.effective_norms(t), lam, self.depth) for t in self.targets)

    def misalignment(self, lam: float | None = None) -> torch.Tensor:
        """R - induced penalty for D-Gating; 0 for the baselines, which have no surrogate."""
        return self.strategy.misalignment(self, self.lam if lam is None else lam)

    def l0_expected_sparsity(self) -> torch.Tensor:
        """method='l0': the fraction of all gated groups expected to be zero, 1 - mean_g P(gate_g != 0) (what the
        target-sparsity Lagrangian constrains; the deterministic gates' sparsity is what `sparsity_report` reads)."""
        expected = getattr(self.strategy, "expected_sparsity", None)
        if expected is None:
            raise ValueError(f"l0_expected_sparsity needs method='l0'; this model is gated with {self.method!r}.")
        return expected(self)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Install the gates: inside the forward of plain Linear/Conv1D modules, as hooks everywhere else."""
        if not self.strategy.trainable_gates:
            return  # gates stay at 1: nothing to apply
        self.strategy.attach(self)
        by_module: dict[str, list[SiteRef]] = {}
        for site in self._sites:
            by_module.setdefault(site.module, []).append(site)
        for name, sites in by_module.items():
            module = self._modules_by_name[name]
            if any(site.where == Where.PARAM for site in sites):
                if "forward" in module.__dict__ or len({site.where for site in sites}) > 1:
                    raise ValueError(f"Cannot gate the parameters of '{name}': its forward is already replaced.")
                module.forward = GatedParamForward(self, module, sites)
                continue
            if self.config.weight_side and GatedLinearForward.suits(module, sites):
                module.forward = GatedLinearForward(self, module, sites)
                continue
            for site in sites:
                if site.where == Where.OUTPUT:
                    module.register_forward_hook(OutputHook(self, site))
                else:
                    module.register_forward_pre_hook(InputHook(self, site))

    def detach(self) -> None:
        """Remove everything `attach` installed (found by identity, so it also works on a deep copy)."""
        for module in self._modules_by_name.values():
            for where, key in BankHook.installed(module, self):
                del where[key]

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply every primary slice by its group scale, after which the hooks can go."""
        for gs, off in zip(self.group_sets, self.offsets):  # (the bank's own offsets: indices into the gates)
            s_ext = torch.cat([self.scale(gs.target), self.gammas[gs.target].new_ones(1)])
            for sl in gs.primary:
                w = getattr(self._modules_by_name[sl.module], sl.param)
                idx = torch.where(sl.index < 0, self.sizes[gs.target], sl.index + off)
                factor = s_ext[idx.to(s_ext.device)].to(device=w.device, dtype=w.dtype)
                if sl.axis is not None:
                    factor = broadcast(factor, sl.axis, w.dim())
                w.mul_(factor)
                adapter = self._adapter(self._modules_by_name[sl.module])
                if adapter is not None and sl.param == "weight":
                    self._fold_adapter(adapter, sl, s_ext[idx.to(s_ext.device)])

    @staticmethod
    def _fold_adapter(adapter: nn.Module, sl: TensorSlice, factor: torch.Tensor) -> None:
        """Scale LoRA's B rows (output features) or A columns (input features) like the base weight."""
        outputs = sl.axis is None or sl.axis == out_axis(adapter)
        for name in adapter.lora_A:
            if outputs:
                b = adapter.lora_B[name].weight
                b.mul_(factor.to(b.dtype).reshape(-1, 1) if sl.axis is not None else factor.to(b.dtype))
            else:
                a = adapter.lora_A[name].weight
                a.mul_(factor.to(a.dtype).reshape(1, -1))


def _layer_segments(group_sets: list[GroupSet], targets: list[str]) -> dict[str, torch.Tensor]:
    """Per target, a segment id per group: its group set, or one shared id for all single-group sets."""
    segs: dict[str, list[torch.Tensor]] = {t: [] for t in targets}
    for gs in group_sets:
        own = segs[gs.target]
        own.append(torch.full((gs.n_groups,), 0 if gs.n_groups == 1 else len(own) + 1))
    return {t: torch.cat(v) for t, v in segs.items()}
