"""`DGateConfig`: what to gate and how. Plain data, validated on creation, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "dgate_config.json"
BUILTIN_TARGETS = ("heads", "neurons", "layers", "filters", "features")
TRANSFORMER_TARGETS = ("heads", "neurons", "layers")
HEAD_SIDES = ("auto", "value", "output")
METHODS = ("dgate", "direct", "l0", "slimming")
THRESHOLD_MODES = ("absolute", "relative")
GROUP_KINDS = ("out", "in", "module")


@dataclass
class GroupRule:
    """A user-defined group type on any `nn.Module` (vision, tabular, custom layers)."""

    name: str = field(metadata={"help": "Name of the group type, used in reports and logs (e.g. 'features')."})
    modules: str = field(
        metadata={"help": "Regex matched (re.search) against qualified module names; every match is gated."}
    )
    kind: str = field(
        default="out",
        metadata={
            "help": "'out': output rows/channels of each module; 'in': input columns/features; "
            "'module': the whole module is one group (its output is scaled)."
        },
    )
    size: int = field(default=1, metadata={"help": "Consecutive rows/columns per group (a block of k rows)."})

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and self.name.isidentifier(), "groups[].name", self.name, "a Python identifier"
        )
        _check(isinstance(self.modules, str) and self.modules != "", "groups[].modules", self.modules, "a regex")
        _check(self.kind in GROUP_KINDS, "groups[].kind", self.kind, f"one of {GROUP_KINDS}")
        _check(isinstance(self.size, int) and self.size >= 1, "groups[].size", self.size, "an int >= 1")


@dataclass
class DGateConfig:
    """Configuration of D-Gating (Kolb et al., NeurIPS 2025) for a model.

    Each gated group theta_g is written as w_g * gamma_1 * ... * gamma_{D-1}; training with the smooth penalty
    (lam / D) * sum_g (||w_g||^2 + sum_d gamma_d^2) solves the L_{2,2/D}-regularised problem.
    """

    target: str | list[str] = field(
        default="heads",
        metadata={
            "help": "What a group is: 'heads' (attention heads; key/value groups under GQA), 'neurons' (MLP "
            "intermediate units), 'layers' (whole residual blocks), 'filters' (Conv2d output channels; the "
            "BatchNorm channel when one follows; channels tied through skip connections form one group), "
            "'features' (input columns of the first Linear), or a list of these. Empty when only `groups` are used."
        },
    )
    depth: int = field(
        default=3, metadata={"help": "D >= 2: D-1 scalar gates per group. 2 = group lasso; 3 recommended."}
    )
    lam: float = field(default=1e-4, metadata={"help": "Regularisation strength lambda >= 0 (multiplies the penalty)."})
    threshold: float = field(
        default=1e-3, metadata={"help": "A group counts as zero when its effective norm ||theta_g||_2 is below this."}
    )
    threshold_mode: str = field(
        default="absolute",
        metadata={
            "help": "'absolute': zero when ||theta_g|| < threshold. 'relative': zero when ||theta_g|| < threshold "
            "times the largest norm in its layer (groups alone in their layer, such as whole layers, compare "
            "with each other). Use 'relative' for filters before BatchNorm: the next BN makes a layer's output "
            "invariant to a common scale, so a whole layer can shrink below any absolute threshold and still matter."
        },
    )
    target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Optional regex; only modules whose qualified name matches (re.search) get gates, e.g. "
            r"'layers\.([0-5])\.' to gate the first six layers."
        },
    )
    head_side: str = field(
        default="auto",
        metadata={
            "help": "Where a head gate acts. 'value' (as in the paper): scales the value projection's output per "
            "head, penalising the value rows. 'output': scales the input of the output projection, penalising its "
            "columns. With GQA both gate whole key/value groups (all query heads sharing one key/value head). "
            "'auto' picks 'value' when a value projection is found, else 'output'."
        },
    )
    method: str = field(
        default="dgate",
        metadata={
            "help": "'dgate': gates + smooth surrogate penalty. 'direct': the paper's baseline, the non-smooth "
            "lam * sum ||theta_g||^(2/D) on the same groups optimised by (sub)gradient steps, no gates. 'l0': "
            "hard-concrete gates (Louizos et al. 2018) with the expected-L0 penalty. 'slimming': L1 on the "
            "BatchNorm scales of target='filters' (network slimming)."
        },
    )
    example_input_shape: list[int] | None = field(
        default=None,
        metadata={
            "help": "Shape of one example input, e.g. [1, 3, 32, 32]; needed by target='filters' to trace which "
            "channels are coupled (Torch-Pruning's dependency graph)."
        },
    )
    weight_side: bool = field(
        default=True,
        metadata={
            "help": "Apply gates to plain Linear/Conv1D layers inside their forward (scaling the weight in one "
            "autograd function: no extra activation memory). False: forward hooks on activations everywhere."
        },
    )
    groups: list[GroupRule] = field(
        default_factory=list,
        metadata={"help": "User-defined group types on any nn.Module (see GroupRule)."},
    )
    module_names: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Explicit module names when auto-detection fails: 'layers' (path of the block list), and "
            "names relative to a block: 'value' or 'qkv' (fused, with 'qkv_layout': 'blocked'|'interleaved'), "
            "'out', 'up' (a list), 'down'."
        },
    )

    def __post_init__(self) -> None:
        targets = [self.target] if isinstance(self.target, str) else list(self.target)
        for t in targets:
            _check(t in BUILTIN_TARGETS, "target", self.target, f"one of {BUILTIN_TARGETS} or a list of them")
        _check(len(set(targets)) == len(targets), "target", self.target, "a list without repeats")
        self.groups = [g if isinstance(g, GroupRule) else GroupRule(**g) for g in self.groups]
        _check(targets or self.groups, "target", self.target, "at least one target or one entry in `groups`")
        _check(
            isinstance(self.depth, int) and not isinstance(self.depth, bool) and self.depth >= 2,
            "depth",
            self.depth,
            "an int >= 2",
        )
        _check(_is_number(self.lam) and self.lam >= 0, "lam", self.lam, "a float >= 0")
        _check(_is_number(self.threshold) and self.threshold > 0, "threshold", self.threshold, "a float > 0")
        _check(
            self.threshold_mode in THRESHOLD_MODES, "threshold_mode", self.threshold_mode, f"one of {THRESHOLD_MODES}"
        )
        if self.threshold_mode == "relative":
            _check(self.threshold < 1, "threshold", self.threshold, "a float in (0, 1) with threshold_mode='relative'")
        _check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        _check(self.head_side in HEAD_SIDES, "head_side", self.head_side, f"one of {HEAD_SIDES}")
        if self.target_modules is not None:
            import re

            try:
                re.compile(self.target_modules)
            except (re.error, TypeError) as e:
                raise ValueError(f"target_modules={self.target_modules!r} is not a valid regex ({e}).") from None
        names = [g.name for g in self.groups]
        _check(
            len(set(names)) == len(names) and not set(names) & set(targets),
            "groups",
            names,
            "unique names that differ from the selected targets",
        )
        if self.example_input_shape is not None:
            shape = self.example_input_shape
            ok = isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) and d > 0 for d in shape)
            _check(ok, "example_input_shape", shape, "a list of positive ints such as [1, 3, 32, 32]")
            self.example_input_shape = list(shape)
        self.lam = float(self.lam)
        self.threshold = float(self.threshold)

    @property
    def targets(self) -> list[str]:
        """Built-in targets as a list."""
        return [self.target] if isinstance(self.target, str) else list(self.target)

    # ---- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DGateConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown DGateConfig field(s) {unknown}; allowed fields are {sorted(known)}.")
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DGateConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory!r}: was the model saved from a gated model?")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DGateConfig:
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if "dgate" in data and isinstance(data["dgate"], dict):  # allow a section of a larger config file
            data = data["dgate"]
        return cls.from_dict(data)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _check(ok: Any, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"DGateConfig.{name}={value!r} is invalid: expected {allowed}.")
