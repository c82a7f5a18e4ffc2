from __future__ import annotations

import json

import pytest

from hf_dgate import DGateConfig, GroupRule


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"target": "channels"}, "target"),
        ({"target": ["heads", "heads"]}, "target"),
        ({"target": []}, "target"),
        ({"depth": 1}, "depth"),
        ({"depth": 2.5}, "depth"),
        ({"depth": True}, "depth"),
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": "big"}, "lam"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold_mode": "percent"}, "threshold_mode"),
        ({"threshold_mode": "relative", "threshold": 1.0}, "threshold"),
        ({"threshold": -1e-3}, "threshold"),
        ({"head_side": "query"}, "head_side"),
        ({"method": "prune"}, "method"),
        ({"target_modules": "("}, "target_modules"),
        ({"target": "heads", "groups": [{"name": "heads", "modules": "x"}]}, "groups"),
        ({"groups": [{"name": "f", "modules": "x", "kind": "diagonal"}]}, "kind"),
        ({"groups": [{"name": "f", "modules": "x", "size": 0}]}, "size"),
        ({"groups": [{"name": "not valid", "modules": "x"}]}, "name"),
        ({"method": "l0", "l0_droprate_init": 0.0}, "l0_droprate_init"),
        ({"method": "l0", "l0_droprate_init": 1.0}, "l0_droprate_init"),
        ({"method": "l0", "l0_droprate_init": "half"}, "l0_droprate_init"),
        ({"method": "l0", "l0_train_size": 0}, "l0_train_size"),
        ({"method": "l0", "l0_train_size": 1.5}, "l0_train_size"),
        ({"method": "l0", "l0_target_sparsity": 1.0}, "l0_target_sparsity"),
        ({"method": "l0", "l0_target_sparsity": 0.0}, "l0_target_sparsity"),
        ({"method": "l0", "l0_target_sparsity": 0.5, "l0_train_size": 100}, "l0_train_size"),
        ({"method": "dgate", "l0_target_sparsity": 0.5}, "l0_target_sparsity"),
        ({"method": "direct", "l0_train_size": 100}, "l0_train_size"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(kwargs, field):
    with pytest.raises(ValueError) as err:
        DGateConfig(**kwargs)
    msg = str(err.value)
    assert field in msg
    if field not in ("target_modules",):
        assert "expected" in msg


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="Unknown DGateConfig field"):
        DGateConfig.from_dict({"lamda": 1.0})


def test_round_trips(tmp_path):
    cfg = DGateConfig(
        target=["heads", "layers"],
        depth=4,
        lam=0.25,
        threshold=1e-4,
        head_side="output",
        groups=[GroupRule("features", r"^0$", "in", 5)],
        target_modules=r"layers\.0",
    )
    assert DGateConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save_pretrained(tmp_path)
    assert DGateConfig.from_pretrained(tmp_path) == cfg
    (tmp_path / "c.yaml").write_text("dgate:\n  target: [neurons]\n  depth: 2\n  lam: 0.5\n")
    assert DGateConfig.from_yaml(tmp_path / "c.yaml") == DGateConfig(target=["neurons"], depth=2, lam=0.5)
    with pytest.raises(FileNotFoundError, match="dgate_config.json"):
        DGateConfig.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    "l0", [{"l0_droprate_init": 0.5, "l0_train_size": 60000}, {"l0_droprate_init": 0.2, "l0_target_sparsity": 0.75}]
)
def test_l0_fields_round_trip(tmp_path, l0):
    cfg = DGateConfig(target="features", method="l0", lam=3.0, **l0)
    assert DGateConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save_pretrained(tmp_path)
    assert DGateConfig.from_pretrained(tmp_path) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("l0_")}  # saved before the fields existed
    assert DGateConfig.from_dict(old).l0_droprate_init == 0.1 and DGateConfig.from_dict(old).l0_target_sparsity is None
