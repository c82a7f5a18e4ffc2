"""`DGateConfig`: what to gate and how. Plain data, validated on creation, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .choices import GroupKind, HeadSide, ThresholdMode
from .target_catalog import CATALOG

CONFIG_NAME = "dgate_config.json"
BUILTIN_TARGETS = tuple(CATALOG)
TRANSFORMER_TARGETS = tuple(name for name, entry in CATALOG.items() if entry.per_block)
HEAD_SIDES = HeadSide.values()
METHODS = ("dgate", "direct", "l0", "slimming")  # the built-in ones; `hf_dgate.methods` holds the registry
THRESHOLD_MODES = ThresholdMode.values()
GROUP_KINDS = GroupKind.values()


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
        _check_regex("groups[].modules", self.modules)
        _check(_is_choice(self.kind, GROUP_KINDS), "groups[].kind", self.kind, f"one of {GROUP_KINDS}")
        _check(_is_int(self.size) and self.size >= 1, "groups[].size", self.size, "an int >= 1")
        self.size = int(self.size)


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
    l0_droprate_init: float = field(
        default=0.1,
        metadata={
            "help": "method='l0': the drop rate d every gate starts at, log_alpha = logit(1 - d) (0 < d < 1). The "
            "test-time gate then starts at (1 - d) * 1.2 - 0.1 and the expected L0 of a group, P(gate != 0), at "
            "sigmoid(logit(1 - d) + (2/3) log 11). Louizos et al. use 0.5 for input features and 0.2 elsewhere, "
            "CoFiPruning 0.5; the default 0.1 (a gate of 0.98) is the value hf_dgate used before it was a field."
        },
    )
    l0_train_size: int | None = field(
        default=None,
        metadata={
            "help": "method='l0': N, the number of training examples. The penalty becomes (lam / N) * sum_g "
            "P(gate_g != 0), so lam is a cost per group in units of the summed (not averaged) data loss, as in "
            "Louizos et al. None (default, the behaviour before): lam * sum_g P(gate_g != 0), no division."
        },
    )
    l0_target_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "method='l0': a target fraction t of zero groups (0 < t < 1). The penalty becomes CoFiPruning's "
            "Lagrangian l1 (s - t) + l2 (s - t)^2, s = 1 - mean_g P(gate_g != 0) the expected sparsity over all "
            "gated groups, with multipliers l1, l2 (`model.dgate.l0_multipliers`, saved with the gates) that the "
            "training optimizer moves by gradient ascent; lam and l0_train_size are not used. None: the lam penalty."
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
    stacks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Which block stacks of a multi-stack model to gate, by short name or path: e.g. ['decoder'] "
            "of an encoder-decoder, ['vision'] of CLIP. None gates every stack; the sparsity report lists the "
            "stacks left dense."
        },
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
        # Every field is checked for its type as well as its value: a wrong type (a string for a bool, a dict for
        # a list) would otherwise be read in some unintended way far from here. Numbers written as strings (YAML
        # 1.1 reads `1e-3` as a string) are converted; bools and ints must be the real thing.
        target = self.target
        _check(
            isinstance(target, str) or (isinstance(target, (list, tuple)) and all(isinstance(t, str) for t in target)),
            "target",
            target,
            f"one of {BUILTIN_TARGETS} or a list of them",
        )
        targets = [target] if isinstance(target, str) else list(target)
        for t in targets:
            _check(t in BUILTIN_TARGETS, "target", target, f"one of {BUILTIN_TARGETS} or a list of them")
        _check(len(set(targets)) == len(targets), "target", target, "a list without repeats")
        if isinstance(target, tuple):
            self.target = targets
        _check(isinstance(self.groups, (list, tuple)), "groups", self.groups, "a list of GroupRule (or dicts)")
        self.groups = [_group_rule(g) for g in self.groups]
        _check(targets or self.groups, "target", target, "at least one target or one entry in `groups`")
        _check(_is_int(self.depth) and self.depth >= 2, "depth", self.depth, "an int >= 2")
        self.depth = int(self.depth)
        self.lam = _float("lam", self.lam)
        _check(self.lam >= 0, "lam", self.lam, "a finite float >= 0")
        self.threshold = _float("threshold", self.threshold)
        _check(self.threshold > 0, "threshold", self.threshold, "a finite float > 0")
        _check(
            _is_choice(self.threshold_mode, THRESHOLD_MODES),
            "threshold_mode",
            self.threshold_mode,
            f"one of {THRESHOLD_MODES}",
        )
        if self.threshold_mode == ThresholdMode.RELATIVE:
            _check(self.threshold < 1, "threshold", self.threshold, "a float in (0, 1) with threshold_mode='relative'")
        from .methods import METHODS as registered  # (the methods' code needs torch; this module does not)

        _check(_is_choice(self.method, tuple(registered)), "method", self.method, f"one of {tuple(registered)}")
        self.l0_droprate_init = _float("l0_droprate_init", self.l0_droprate_init)
        _check(0 < self.l0_droprate_init < 1, "l0_droprate_init", self.l0_droprate_init, "a float in (0, 1)")
        if self.l0_train_size is not None:
            _check(
                _is_int(self.l0_train_size) and self.l0_train_size >= 1,
                "l0_train_size",
                self.l0_train_size,
                "an int >= 1 (the number of training examples) or None",
            )
            self.l0_train_size = int(self.l0_train_size)
        if self.l0_target_sparsity is not None:
            self.l0_target_sparsity = _float("l0_target_sparsity", self.l0_target_sparsity)
            _check(
                0 < self.l0_target_sparsity < 1,
                "l0_target_sparsity",
                self.l0_target_sparsity,
                "a float in (0, 1) (the fraction of groups to remove) or None",
            )
            _check(
                self.l0_train_size is None,
                "l0_train_size",
                self.l0_train_size,
                "None with l0_target_sparsity (the Lagrangian replaces the lam / N penalty)",
            )
        for owner in registered.values():  # options one method reads must stay None under the others
            for name in owner.options if owner is not registered[self.method] else ():
                value = getattr(self, name)
                _check(value is None, name, value, f"None unless method={owner.name!r} (method={self.method!r})")
        _check(_is_choice(self.head_side, HEAD_SIDES), "head_side", self.head_side, f"one of {HEAD_SIDES}")
        if self.target_modules is not None:
            _check(isinstance(self.target_modules, str), "target_modules", self.target_modules, "a regex or None")
            _check_regex("target_modules", self.target_modules)
        _check(isinstance(self.weight_side, bool), "weight_side", self.weight_side, "True or False")
        names = [g.name for g in self.groups]
        _check(
            len(set(names)) == len(names) and not set(names) & set(targets),
            "groups",
            names,
            "unique names that differ from the selected targets",
        )
        if self.example_input_shape is not None:
            shape = self.example_input_shape
            ok = isinstance(shape, (list, tuple)) and shape and all(_is_int(d) and d > 0 for d in shape)
            _check(ok, "example_input_shape", shape, "a list of positive ints such as [1, 3, 32, 32]")
            self.example_input_shape = [int(d) for d in shape]
        if self.module_names is not None:
            self.module_names = _module_names(self.module_names)
        if self.stacks is not None:
            stacks = self.stacks
            ok = isinstance(stacks, (list, tuple)) and stacks and all(isinstance(x, str) and x for x in stacks)
            _check(ok, "stacks", self.stacks, "a non-empty list of stack names or paths, e.g. ['decoder']")
            self.stacks = list(self.stacks)

    @property
    def targets(self) -> list[str]:
        """Built-in targets as a list."""
        return [self.target] if isinstance(self.target, str) else list(self.target)

    # ---- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DGateConfig:
        if not isinstance(data, dict):
            raise ValueError(
                f"A DGateConfig must be a mapping of field names to values, got {type(data).__name__} {data!r}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"Unknown DGateConfig field(s) {unknown}; allowed fields are {sorted(known)}.")
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DGateConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory!r}: was the model saved from a gated model?")
        try:
            with open(path) as f:
                data = json.load(f)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path!r} is not valid JSON ({e}); fix it or re-save the gated model.") from None
        return _from_file(cls, data, path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DGateConfig:
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(path)!r} is not valid YAML ({' '.join(str(e).split())}).") from None
        data = {} if data is None else data
        if isinstance(data, dict) and isinstance(data.get("dgate"), dict):  # a section of a larger config file
            data = data["dgate"]
        return _from_file(cls, data, path)


def _from_file(cls: type[DGateConfig], data: Any, path: str | os.PathLike) -> DGateConfig:
    """`from_dict`, with the file named in the error (a config file holding a list or a scalar is refused)."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{str(path)!r} holds a {type(data).__name__} ({data!r:.60}), not a mapping of DGateConfig fields; "
            "write it as `field: value` lines (optionally under a `dgate:` section)."
        )
    try:
        return cls.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from None


MODULE_NAME_KEYS = ("layers", "qkv", "qkv_layout", "value", "query", "key", "out", "up", "down")
QKV_LAYOUTS = ("blocked", "interleaved", "grouped")


def _module_names(names: Any) -> dict[str, Any]:
    """`module_names` checked: known keys; a module path per key, a list of paths for 'up', a layout name."""
    _check(isinstance(names, dict), "module_names", names, f"a dict with keys from {MODULE_NAME_KEYS}")
    unknown = [k for k in names if k not in MODULE_NAME_KEYS]
    _check(not unknown, "module_names", names, f"keys from {MODULE_NAME_KEYS} (unknown: {unknown})")
    out = dict(names)
    for key, value in names.items():
        if key == "qkv_layout":
            _check(_is_choice(value, QKV_LAYOUTS), f"module_names['{key}']", value, f"one of {QKV_LAYOUTS}")
        elif key == "up" and isinstance(value, (list, tuple)):
            _check(
                value and all(isinstance(v, str) and v for v in value),
                "module_names['up']",
                value,
                "a module name or a non-empty list of module names",
            )
            out[key] = list(value)
        else:
            _check(isinstance(value, str) and value, f"module_names['{key}']", value, "a module name (a string)")
    return out


def _group_rule(rule: Any) -> GroupRule:
    if isinstance(rule, GroupRule):
        return rule
    _check(isinstance(rule, dict), "groups[]", rule, "a GroupRule or a dict of its fields (name, modules, kind, size)")
    fields = {f.name for f in dataclasses.fields(GroupRule)}
    unknown = sorted(set(rule) - fields, key=str)
    missing = sorted({"name", "modules"} - set(rule))
    _check(not unknown and not missing, "groups[]", rule, f"the fields {sorted(fields)} (name and modules required)")
    return GroupRule(**rule)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_choice(x: Any, choices: tuple[str, ...]) -> bool:
    return isinstance(x, str) and x in choices


def _float(name: str, x: Any) -> float:
    """A finite float from a real number or a numeric string ('1e-3'); anything else is a ValueError naming `name`."""
    value = None
    if isinstance(x, str):
        try:
            value = float(x.strip())
        except ValueError:
            pass
    elif isinstance(x, numbers.Real) and not isinstance(x, bool):
        try:
            value = float(x)
        except OverflowError:  # an int such as 10**400
            pass
    _check(value is not None and math.isfinite(value), name, x, "a finite number")
    return value


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"DGateConfig.{name}={pattern!r} is not a valid regex ({e}).") from None


def _check(ok: Any, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"DGateConfig.{name}={value!r:.200} is invalid: expected {allowed}.")
