"""Bad inputs and non-finite numbers: every config field is type-checked, NaN/inf stops the work where it appears,
tied weights are refused as features, and every CLI failure is one line that says what to do."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TrainerCallback, TrainingArguments

import hf_dgate
from hf_dgate import DGateConfig, GroupRule
from hf_dgate.cli import main
from hf_dgate.config import BUILTIN_TARGETS, HEAD_SIDES, METHODS, THRESHOLD_MODES
from hf_dgate.errors import NonFiniteError
from hf_dgate.trainer import SPARSITY_NAME, DGateTrainer


# ---- DGateConfig ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"module_names": "x"}, "module_names"),
        ({"module_names": {"layer": "model.layers"}}, "module_names"),
        ({"module_names": {"down": 3}}, "module_names['down']"),
        ({"module_names": {"up": []}}, "module_names['up']"),
        ({"module_names": {"qkv": "attn.c_attn", "qkv_layout": "fused"}}, "module_names['qkv_layout']"),
        ({"target": None}, "target"),
        ({"target": 3}, "target"),
        ({"target": ["heads", 1]}, "target"),
        ({"lam": 10**400}, "lam"),
        ({"lam": float("inf")}, "lam"),
        ({"lam": "nan"}, "lam"),
        ({"lam": True}, "lam"),
        ({"threshold": "1e-3x"}, "threshold"),
        ({"threshold": None}, "threshold"),
        ({"weight_side": "false"}, "weight_side"),
        ({"weight_side": 1}, "weight_side"),
        ({"depth": "3"}, "depth"),
        ({"depth": 3.0}, "depth"),
        ({"head_side": None}, "head_side"),
        ({"method": ["dgate"]}, "method"),
        ({"threshold_mode": 0}, "threshold_mode"),
        ({"target_modules": 5}, "target_modules"),
        ({"example_input_shape": [1, True, 4]}, "example_input_shape"),
        ({"groups": "features"}, "groups"),
        ({"groups": [3]}, "groups[]"),
        ({"groups": [{"name": "f"}]}, "groups[]"),
        ({"groups": [{"name": "f", "modules": "x", "colour": 1}]}, "groups[]"),
        ({"groups": [{"name": "f", "modules": "x", "size": True}]}, "groups[].size"),
        ({"groups": [{"name": "f", "modules": "("}]}, "groups[].modules"),
    ],
)
def test_every_field_is_type_checked(kwargs, field):
    with pytest.raises(ValueError) as err:
        DGateConfig(**kwargs)
    assert f"DGateConfig.{field}" in str(err.value)


def test_group_rule_size_must_be_a_real_int():
    with pytest.raises(ValueError, match=r"groups\[\]\.size"):
        GroupRule("f", "x", "in", size=True)
    assert GroupRule("f", "x", "in", size=2).size == 2


def test_numeric_strings_are_numbers():
    cfg = DGateConfig(lam="1e-3", threshold=" 2E-4 ")
    assert cfg.lam == 1e-3 and cfg.threshold == 2e-4 and isinstance(cfg.lam, float)
    assert DGateConfig(lam=1).lam == 1.0 and DGateConfig(target=("heads", "layers")).target == ["heads", "layers"]


def test_yaml_numbers_scalars_and_bad_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("target: neurons\nlam: 1e-3\nthreshold: 5e-4\nweight_side: false\n")  # YAML 1.1: '1e-3' is str
    cfg = DGateConfig.from_yaml(path)
    assert (cfg.lam, cfg.threshold, cfg.weight_side) == (1e-3, 5e-4, False)
    for text in ("0.5\n", "- heads\n", "just a string\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match="c.yaml.*not a mapping"):
            DGateConfig.from_yaml(path)
    path.write_text("lam: .inf\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*DGateConfig\.lam"):
        DGateConfig.from_yaml(path)
    path.write_text("target: [heads\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        DGateConfig.from_yaml(path)
    (tmp_path / "dgate_config.json").write_text('{"target": "heads", "lam": NaN}')
    with pytest.raises(ValueError, match=r"dgate_config\.json.*DGateConfig\.lam"):
        DGateConfig.from_pretrained(tmp_path)
    (tmp_path / "dgate_config.json").write_text('{"target": "heads",')
    with pytest.raises(ValueError, match=r"dgate_config\.json.*not valid JSON"):
        DGateConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must be a mapping"):
        DGateConfig.from_dict(["heads"])


FIELDS = [f.name for f in dataclasses.fields(DGateConfig)]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 6),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["1e-3", " 2 ", "nan", "-inf", "true", "heads", "relative", "value", "l0"]),
    st.lists(st.sampled_from(["heads", "neurons", "x", 1, None]), max_size=3),
    st.dictionaries(
        st.sampled_from(["layers", "up", "down", "bogus", "name"]), st.one_of(st.text(max_size=3), st.integers())
    ),
)
RULE = st.fixed_dictionaries(
    {"name": st.sampled_from(["feats", "rows", "heads", "bad name"]), "modules": st.sampled_from(["fc", "^0$", "("])},
    optional={"kind": st.sampled_from(["out", "in", "module", "rows"]), "size": st.sampled_from([1, 3, 0, True])},
)
GOOD = {
    "target": st.one_of(
        st.sampled_from(BUILTIN_TARGETS), st.lists(st.sampled_from(BUILTIN_TARGETS), max_size=3, unique=True)
    ),
    "depth": st.one_of(st.integers(1, 6), st.sampled_from([3.0, True, "3"])),
    "lam": st.one_of(st.floats(0, 10), st.sampled_from(["1e-3", "0.5", 2, 10**400, float("inf"), True, "nan"])),
    "threshold": st.one_of(st.floats(0, 2), st.sampled_from(["1e-3", 10**400, float("nan"), True])),
    "threshold_mode": st.sampled_from(THRESHOLD_MODES),
    "target_modules": st.sampled_from([None, r"layers\.0", "h\\.1"]),
    "head_side": st.sampled_from(HEAD_SIDES),
    "method": st.sampled_from(METHODS),
    "l0_droprate_init": st.one_of(st.floats(0, 1), st.sampled_from([0.5, "0.2", True, 1.5])),
    "l0_train_size": st.one_of(st.none(), st.integers(-1, 70000), st.sampled_from([1.5, "100", True])),
    "l0_target_sparsity": st.one_of(st.none(), st.floats(0, 1), st.sampled_from(["0.5", True, 1.0])),
    "example_input_shape": st.one_of(st.none(), st.lists(st.integers(0, 4), min_size=1, max_size=4)),
    "weight_side": st.booleans(),
    "stacks": st.one_of(st.none(), st.lists(st.sampled_from(["decoder", "encoder", "model.layers"]), min_size=1)),
    "groups": st.lists(RULE, max_size=2),
    "module_names": st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["layers", "value", "out", "up", "down", "qkv_layout"]),
            st.one_of(st.sampled_from(["attn.v", "mlp.fc", "blocked"]), st.lists(st.just("mlp.up"), max_size=2)),
            max_size=3,
        ),
    ),
}


def _mostly_good(field: str) -> st.SearchStrategy:
    """Three draws in four from the field's plausible values, else junk (so valid configs come up often)."""
    return st.integers(0, 3).flatmap(lambda i: JUNK if i == 0 else GOOD[field])


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={f: _mostly_good(f) for f in FIELDS}))
def test_random_inputs_build_a_valid_config_or_name_the_field(kwargs):
    try:
        cfg = DGateConfig(**kwargs)
    except ValueError as e:
        assert any(f"DGateConfig.{f}" in str(e) for f in kwargs), (kwargs, str(e))
        return
    assert cfg.targets and all(t in BUILTIN_TARGETS for t in cfg.targets) or cfg.groups
    assert type(cfg.depth) is int and cfg.depth >= 2 and type(cfg.weight_side) is bool
    assert type(cfg.lam) is float and math.isfinite(cfg.lam) and cfg.lam >= 0
    assert type(cfg.threshold) is float and math.isfinite(cfg.threshold) and cfg.threshold > 0
    assert all(type(g.size) is int and g.size >= 1 for g in cfg.groups)
    assert not any(_has_bool(v) for f, v in kwargs.items() if f != "weight_side")  # True is not a number
    text = json.dumps(cfg.to_dict(), allow_nan=False)  # standard JSON, and it reads back as the same config
    assert DGateConfig.from_dict(json.loads(text)) == cfg


def _has_bool(value) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, dict):
        return any(_has_bool(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(_has_bool(v) for v in value)


# ---- tied features ---------------------------------------------------------------------------------------------
def test_features_refuse_a_first_linear_tied_to_the_embedding():
    model = make_model("gpt2")  # GPT-2 has Conv1D layers only: its first nn.Linear is the tied lm_head
    with pytest.raises(ValueError, match=r"'lm_head'.*'transformer\.wte'.*GroupRule"):
        hf_dgate.apply_dgate(model, DGateConfig(target="features"))
    assert not hf_dgate.is_gated(model)

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(ValueError, match="'a'.*'b'"):
        hf_dgate.apply_dgate(Shared(), DGateConfig(target="features"))
    plain = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    hf_dgate.apply_dgate(plain, DGateConfig(target="features"))
    assert hf_dgate.get_bank(plain).sizes == {"features": 6}


# ---- non-finite gates and losses ------------------------------------------------------------------------------
def _gated(target="heads"):
    model = make_model("gpt2")
    hf_dgate.apply_dgate(model, DGateConfig(target=target, lam=1e-2))
    return model, hf_dgate.get_bank(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_penalty_and_report_refuse_non_finite_gates(bad):
    model, bank = _gated()
    assert torch.isfinite(hf_dgate.penalty(model))
    with torch.no_grad():
        bank.gammas["heads"][0, 1] = bad
    with pytest.raises(NonFiniteError, match="penalty: 1 of 8 heads"):
        hf_dgate.penalty(model)
    with pytest.raises(NonFiniteError, match="report sparsity: 1 of 8 heads"):
        hf_dgate.sparsity_report(model)


def test_report_refuses_non_finite_weights():
    model, bank = _gated()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:, 2 * 32 + 9] = float("nan")  # a value column of head 1
    with pytest.raises(NonFiniteError, match="1 of 8 heads"):
        hf_dgate.sparsity_report(model)


class _Break(TrainerCallback):
    """Makes something non-finite at the end of optimizer step `step`."""

    def __init__(self, step, fn):
        self.step, self.fn = step, fn

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.fn()
        return control


def _trainer(tmp_path, model, breaker):
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (16, 12), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
    )
    return DGateTrainer(model, args, train_dataset=data, callbacks=[breaker])


def test_trainer_stops_at_the_step_whose_loss_is_nan(tmp_path):
    model = make_model("gpt2")
    hf_dgate.apply_dgate(model, DGateConfig(target="heads", lam=1e-2))
    trainer = _trainer(tmp_path, model, _Break(2, lambda: model.transformer.wte.weight[3].fill_(float("nan"))))
    with pytest.raises(NonFiniteError, match=r"optimizer step 3: the data loss is nan.*not applied"):
        trainer.train()
    bank = hf_dgate.get_bank(model)
    assert trainer.state.global_step == 2
    assert bool(torch.isfinite(bank.gates("heads")).all())  # the NaN update never reached the gates
    assert bool(torch.isfinite(model.transformer.h[0].attn.c_attn.weight).all())
    assert not os.path.exists(tmp_path / SPARSITY_NAME)


def test_trainer_stops_when_a_gate_turns_nan_and_writes_no_report(tmp_path):
    model = make_model("gpt2")
    hf_dgate.apply_dgate(model, DGateConfig(target="heads", lam=1e-2))
    bank = hf_dgate.get_bank(model)
    trainer = _trainer(tmp_path, model, _Break(2, lambda: bank.gammas["heads"][0, 5].fill_(float("inf"))))
    with pytest.raises(NonFiniteError, match="at global step 2: 1 of 8 heads"):  # the step-2 log refuses it
        trainer.train()
    with pytest.raises(NonFiniteError, match="write the sparsity report at global step 2"):
        trainer.write_sparsity_report(str(tmp_path))
    assert not os.path.exists(tmp_path / SPARSITY_NAME)


# ---- CLI ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated_dirs(tmp_path_factory):
    model, bank = _gated()
    root = tmp_path_factory.mktemp("inputs")
    hf_dgate.save_gated(model, root / "ok")
    with torch.no_grad():
        bank.gammas["heads"][0, 2] = float("nan")
    hf_dgate.save_gated(model, root / "nan")
    return root


def _one_line(err, *needles):
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["export", "{ok}", "--out", "{tmp}/o", "--seq-len", "0"], "--seq-len: '0' is invalid"),
        (["export", "{ok}", "--out", "{tmp}/o", "--seq-len", "ten"], "--seq-len: 'ten' is not an integer"),
        (["export", "{ok}", "--out", "{tmp}/o", "--threshold", "nan"], "--threshold: 'nan' is invalid"),
        (["report", "{ok}", "--threshold", "-1"], "--threshold: '-1' is invalid"),
        (["demo", "--lam", "1e400"], "--lam: '1e400' is invalid"),
        (["demo", "--steps", "0"], "--steps: '0' is invalid"),
    ],
)
def test_bad_numeric_flags_are_one_line(argv, needle, gated_dirs, tmp_path, capsys):
    argv = [a.format(ok=gated_dirs / "ok", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, needle)
    assert not os.path.exists(tmp_path / "o")


def test_corrupt_weights_and_nan_gates_are_one_line(gated_dirs, tmp_path, capsys):
    bad = tmp_path / "truncated"
    bad.mkdir()
    for name in os.listdir(gated_dirs / "ok"):
        data = (gated_dirs / "ok" / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    assert main(["report", str(bad)]) == 2
    _one_line(capsys.readouterr().err, "corrupt or truncated", "re-save")
    assert main(["report", str(gated_dirs / "nan")]) == 2
    _one_line(capsys.readouterr().err, "1 of 8 heads have NaN")


def test_export_summary_with_nan_is_one_line(tmp_path, capsys):
    from hf_dgate.hub import SUMMARY_NAME

    (tmp_path / SUMMARY_NAME).write_text('{"threshold": NaN, "params_before": 1}')
    assert main(["report", str(tmp_path)]) == 2
    _one_line(capsys.readouterr().err, "not valid JSON")
    (tmp_path / SUMMARY_NAME).write_text('{"threshold": 0.001}')
    assert main(["report", str(tmp_path)]) == 2
    _one_line(capsys.readouterr().err, "incomplete", "params_before")


def test_plot_writes_into_a_directory_or_refuses(gated_dirs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["report", str(gated_dirs / "ok"), "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"heat-map written to {tmp_path / 'norms.png'}" in out
    assert (tmp_path / "norms.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(gated_dirs / "ok"), "--plot", str(tmp_path / "heat")]) == 2
    _one_line(capsys.readouterr().err, "no image suffix")
    assert main(["report", str(gated_dirs / "ok"), "--plot", str(tmp_path / "no" / "x.png")]) == 2
    _one_line(capsys.readouterr().err, "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["norms.png"]
