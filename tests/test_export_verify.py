"""Every export path checks the exported model against the gated one (hf_dgate.verify): removed groups that were
not zero raise ExportError unless allow_inexact=True, and then the summary and the card say so plainly."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import hf_dgate
from hf_dgate import DGateTrainer, export_pruned, export_to_dir
from hf_dgate.cli import main
from hf_dgate.errors import ExportError, NonFiniteError
from hf_dgate.hub import outputs_statement
from hf_dgate.models import LeNet300100, ResNet18
from hf_dgate.verify import ExportInexactWarning, ExportNotVerifiedWarning

GREY = 20  # neurons per layer with a norm just under the 1e-3 threshold


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def make_grey(model) -> None:
    """The observed bug: neurons whose down-projection norm (5e-4) is under the threshold, but whose inputs are
    large enough that they still change the logits, so removing them is not exact."""
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w[:, :GREY] *= 5e-4 / w[:, :GREY].norm(dim=0, keepdim=True)
            layer.mlp.up_proj.weight[:GREY] *= 100.0


def gated(grey: bool = True) -> LlamaForCausalLM:
    model = tiny_llama()
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], depth=3))
    if grey:
        make_grey(model)
    else:
        with torch.no_grad():
            hf_dgate.get_bank(model).gammas["heads"][0, [0, 3]] = 0.0
            hf_dgate.get_bank(model).gammas["neurons"][1, :GREY] = 0.0
    return model


def test_inexact_export_is_refused_with_count_range_and_ways_out():
    model = gated()
    with pytest.raises(ExportError) as e:
        export_pruned(model)
    msg = str(e.value)
    assert f"{2 * GREY} neurons (norms 5.0e-04 to 5.0e-04, {2 * GREY} near the threshold)" in msg
    for way in ("Train longer", "lower threshold (now 0.001)", "threshold_mode='relative'", "allow_inexact=True"):
        assert way in msg
    assert len(msg) <= 300  # the CLI prints it on one line
    with pytest.warns(ExportInexactWarning, match="NOT exact"):  # verified, so not "not verified"
        small = export_pruned(model, allow_inexact=True)
    v = small.dgate_verification
    assert v.verified and not v.exact and v.max_abs_diff > 10 * v.tolerance
    x = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        measured = float((small(x).logits - model(x).logits).abs().max())
    assert measured == pytest.approx(v.max_abs_diff, rel=1e-5)  # the same probe batch: the same number
    assert v.removed["neurons"] == {
        "removed": 2 * GREY, "not_zero": 2 * GREY, "grey": 2 * GREY, "norm_min": pytest.approx(5e-4),
        "norm_max": pytest.approx(5e-4),
    }  # fmt: skip


def test_exact_export_passes_and_the_card_says_so(tmp_path):
    model = gated(grey=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportNotVerifiedWarning)
        assert export_pruned(model).dgate_verification.exact
        summary = export_to_dir(model, tmp_path / "out", measure=False, seq_len=16)
    assert summary["exact"] and summary["max_abs_diff"] < 1e-5 and summary["verification"]["tolerance"] > 1e-4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "It computes the same outputs as the gated model: every removed group was zero" in card
    assert "NOT exact" not in card and "unchanged" not in card


def test_export_to_dir_refuses_inexact_then_states_the_difference(tmp_path):
    model = gated()
    with pytest.raises(ExportError, match=f"{2 * GREY} neurons"):
        export_to_dir(model, tmp_path / "out", measure=False, seq_len=16)
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.warns(ExportInexactWarning):
        summary = export_to_dir(model, tmp_path / "out", measure=False, seq_len=16, allow_inexact=True)
    v = summary["verification"]
    assert not summary["exact"] and v["verified"] and v["allowed_inexact"] and v["max_abs_diff"] > v["tolerance"]
    on_disk = json.loads((tmp_path / "out" / "dgate_export.json").read_text())
    assert on_disk["verification"]["exact"] is False and on_disk["max_abs_diff"] == summary["max_abs_diff"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**This export is NOT exact:**" in card and f"{v['max_abs_diff']:.2e}" in card
    assert f"{2 * GREY} neurons (norms 5.00e-04 to 5.00e-04)" in card
    assert "unchanged" not in card and "same outputs" not in card


def test_trainer_export_pruned_refuses_and_opts_in(tmp_path):
    args = TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1, save_strategy="no")
    x = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in x]
    cfg = hf_dgate.DGateConfig(target=["heads", "neurons"], depth=3)
    tr = DGateTrainer(tiny_llama(), args, dgate_config=cfg, train_dataset=data)
    make_grey(tr.model)
    with pytest.raises(ExportError, match="allow_inexact=True"):
        tr.export_pruned(measure=False, seq_len=16)
    with pytest.warns(ExportInexactWarning):
        summary = tr.export_pruned(measure=False, seq_len=16, allow_inexact=True)
    assert summary["verification"]["verified"] and not summary["exact"]
    assert "NOT exact" in (tmp_path / "run" / "pruned" / "README.md").read_text()


def test_cli_refuses_inexact_in_one_line_and_opts_in(tmp_path, capsys):
    src = tmp_path / "gated"
    hf_dgate.save_gated(gated(), src)
    out = tmp_path / "small"
    rc = main(["export", str(src), "--out", str(out), "--no-measure", "--seq-len", "8"])
    _, err = capsys.readouterr()
    errors = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert rc == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and not out.exists()
    assert f"{2 * GREY} neurons" in errors[0] and "--allow-inexact" in errors[0] and "lower --threshold" in errors[0]
    assert "--threshold-mode relative" in errors[0]  # remedies this command has flags for, not library arguments
    assert "allow_inexact=True" not in err and "threshold_mode=" not in err and "get_bank" not in err
    rc = main(["export", str(src), "--out", str(out), "--no-measure", "--seq-len", "8", "--allow-inexact"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "WARNING: the export is NOT exact" in stdout and "above the tolerance" in stdout
    assert json.loads((out / "dgate_export.json").read_text())["exact"] is False


def test_nan_gate_refused_before_export(tmp_path):
    model = gated(grey=False)
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][0, 1] = math.nan
    with pytest.raises(NonFiniteError, match="Cannot export: 1 of 4 heads"):
        export_pruned(model)
    with pytest.raises(NonFiniteError, match="Cannot export"):
        export_to_dir(model, tmp_path / "out", measure=False, seq_len=8)
    assert not (tmp_path / "out").exists()


def test_inplace_export_of_plain_torch_models():
    torch.manual_seed(0)
    lenet, x = LeNet300100(in_features=20, hidden=(16, 8)).eval(), torch.randn(3, 20)
    hf_dgate.apply_dgate(lenet, hf_dgate.DGateConfig(target="features"))
    with torch.no_grad():
        hf_dgate.get_bank(lenet).gammas["features"][:, 4:11] = 0.0
        ref = lenet(x)
    small = export_pruned(lenet, inplace=True)
    assert small is lenet and not hasattr(small, "dgate") and small.fc1.in_features == 13
    assert small.dgate_verification.exact and small.dgate_verification.probe == "input (2, 20)"
    with torch.no_grad():
        torch.testing.assert_close(small(x[:, small.dgate_kept_features]), ref)

    resnet, x = ResNet18(width=0.125).eval(), torch.randn(2, 3, 16, 16)
    hf_dgate.apply_dgate(resnet, hf_dgate.DGateConfig(target="filters", example_input_shape=[1, 3, 16, 16]))
    with torch.no_grad():
        hf_dgate.get_bank(resnet).gammas["filters"][:, :6] = 0.0
        ref = resnet(x)
    n_before = sum(p.numel() for p in resnet.parameters())
    small = export_pruned(resnet, inplace=True)
    assert small is resnet and small.dgate_verification.exact
    assert sum(p.numel() for p in small.parameters()) < n_before
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-5, atol=1e-5)


def test_unverifiable_export_says_so_and_never_claims_exactness():
    model = LeNet300100(in_features=20, hidden=(16, 8)).eval()
    rule = hf_dgate.GroupRule("rows", r"^fc2$", "out")  # no probe: no example_input_shape, no input features
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=[], groups=[rule]))
    with pytest.warns(ExportNotVerifiedWarning, match="not verified: no probe batch"):
        small = export_pruned(model)
    v = small.dgate_verification
    assert not v.verified and not v.exact and v.max_abs_diff is None
    text = outputs_statement({"verification": v.to_dict()})
    assert text.startswith("> **Not verified:**") and "It computes the same outputs" not in text
