"""`hf-dgate export` and `hf-dgate report`: happy paths, and one-line errors that leave nothing half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import logits, make_inputs, make_model
from huggingface_hub import HfApi, RepoUrl

import hf_dgate
from hf_dgate.cli import main


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory):
    model = make_model("gpt2")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        bank.gammas["heads"][0, [0, 5, 6]] = 0.0
        bank.gammas["neurons"][0, :48] = 0.0  # every neuron of layer 0
    path = tmp_path_factory.mktemp("gated") / "model"
    hf_dgate.save_gated(model, path)
    return path, logits(model, make_inputs("gpt2"))


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_then_reload(gated_dir, tmp_path, capsys):
    src, ref = gated_dir
    rc, out, err = run(["export", src, "--out", tmp_path / "small", "--no-measure", "--seq-len", "8"], capsys)
    assert rc == 0, err
    assert "parameters" in out and "AutoPrunedModel" in out
    model = hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "small")
    torch.testing.assert_close(logits(model, make_inputs("gpt2")), ref, rtol=0, atol=1e-5)
    assert model.config.dgate_pruning["heads"] == [[1, 2, 3], [0, 3]]
    card = (tmp_path / "small" / "README.md").read_text()
    if not model.config.dgate_pruning.get("native"):  # the card's reason is the real one: 3 and 2 heads kept
        assert "layers keep different numbers of heads" in card

    rc, out, _ = run(["report", tmp_path / "small"], capsys)  # an export: its kept structure
    assert rc == 0 and "| 0 (0) | 3: [1, 2, 3] | 3 | 0 |" in out


def test_report_table_and_heatmap(gated_dir, tmp_path, capsys):
    src, _ = gated_dir
    rc, out, _ = run(["report", src, "--json"], capsys)
    assert rc == 0 and json.loads(out)["targets"]["heads"]["zero"] == 3
    pytest.importorskip("matplotlib")  # an optional dependency (hf-dgate[examples])
    rc, out, _ = run(["report", src, "--plot", tmp_path / "norms.png"], capsys)
    assert rc == 0
    assert "heads: 3/8 zero" in out and "neurons: 48/96 zero" in out
    assert (tmp_path / "norms.png").read_bytes()[:4] == b"\x89PNG"


def test_export_pushes_to_hub(gated_dir, tmp_path, capsys, monkeypatch):
    uploaded = []

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.append(sorted(os.listdir(folder_path)))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    src, _ = gated_dir
    rc, out, err = run(["export", src, "--out", tmp_path / "o", "--no-measure", "--push-to-hub", "me/x"], capsys)
    assert rc == 0, err
    assert "huggingface.co/me/x" in out and "README.md" in uploaded[0] and "model.safetensors" in uploaded[0]


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == lines[0]
    for n in needles:
        assert n in lines[0]


def test_directory_without_gates(tmp_path, capsys):
    plain = tmp_path / "plain"
    make_model("gpt2").save_pretrained(plain)
    rc, _, err = run(["export", plain, "--out", tmp_path / "o"], capsys)
    _assert_one_line_error(rc, err, "no dgate_config.json", "save_gated")
    assert sorted(os.listdir(tmp_path)) == ["plain"]  # no output, no temp dir
    rc, _, err = run(["report", tmp_path / "missing"], capsys)
    _assert_one_line_error(rc, err, "not a directory")


def test_bad_threshold(gated_dir, tmp_path, capsys):
    src, _ = gated_dir
    for bad in ("0", "-1e-3"):
        rc, _, err = run(["export", src, "--out", tmp_path / "o", f"--threshold={bad}"], capsys)
        _assert_one_line_error(rc, err, "--threshold", "> 0")
    assert not (tmp_path / "o").exists()


def test_config_that_does_not_match_the_weights(gated_dir, tmp_path, capsys):
    import shutil

    src, _ = gated_dir
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["n_inner"] = 64  # the weights have 48
    (broken / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run(["export", broken, "--out", tmp_path / "o"], capsys)
    _assert_one_line_error(rc, err, "does not match", "config.json")
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_existing_output_needs_overwrite(gated_dir, tmp_path, capsys):
    src, _ = gated_dir
    out = ["export", src, "--out", tmp_path / "o", "--no-measure", "--seq-len", "8"]
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):  # not a previous export: kept even with --overwrite
        rc, _, err = run(out + extra, capsys)
        _assert_one_line_error(rc, err, "--force", "not a previous hf_dgate export")
        assert os.listdir(tmp_path / "o") == ["keep.txt"]
    rc, _, err = run(out + ["--force"], capsys)
    assert rc == 0, err
    assert "keep.txt" not in os.listdir(tmp_path / "o") and sorted(os.listdir(tmp_path)) == ["o"]
    rc, _, err = run(out, capsys)  # now a previous export: replaced with --overwrite only
    _assert_one_line_error(rc, err, "--overwrite", "previous export")
    rc, _, err = run(out + ["--overwrite"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["o"] and "dgate_export.json" in os.listdir(tmp_path / "o")


def test_out_never_replaces_the_gated_dir_or_the_current_dir(gated_dir, tmp_path, capsys, monkeypatch):
    src, _ = gated_dir
    before = sorted(os.listdir(src))
    parent = os.path.dirname(src)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    for out, needle in [(src, "source"), (parent, "source"), (os.path.join(src, "sub"), "source"), (".", "current")]:
        rc, _, err = run(["export", src, "--out", out, "--no-measure", "--force", "--overwrite"], capsys)
        _assert_one_line_error(rc, err, needle)
    assert sorted(os.listdir(src)) == before and os.listdir(tmp_path) == ["notes.txt"]


def test_help_imports_neither_torch_nor_transformers():
    """`hf-dgate --help` and `hf-dgate VERB --help` parse before the stack is imported (seconds on a busy machine)."""
    import subprocess
    import sys

    code = (
        "import sys; from hf_dgate.cli import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['export', '--help'], ['report', '--help']):\n"
        "    assert main(argv) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout and "--threshold-mode" in out.stdout and "(default: 300)" in out.stdout


def test_every_option_has_help_and_its_default_and_the_target_list_is_current():
    import argparse

    from hf_dgate.cli import TARGETS_HELP, build_parser
    from hf_dgate.target_catalog import CATALOG
    from hf_dgate.targets import BUILTIN

    # the torch-free catalog is what --help lists, and every built-in target is the class its line names
    assert TARGETS_HELP.splitlines() == [f"{t.name}: {t.description}" for t in BUILTIN.values()]
    assert list(BUILTIN) == list(CATALOG)
    assert all(t.per_block == CATALOG[n].per_block and type(t).__name__ == CATALOG[n].cls.split(":")[1]
               for n, t in BUILTIN.items())  # fmt: skip
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(verbs) == {"demo", "export", "report", "compress"}
    for name, sub in verbs.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            flag = isinstance(action, argparse._StoreTrueAction)
            if action.option_strings and not action.required and not flag:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_threshold_mode_flag_overrides_the_saved_mode(gated_dir, capsys):
    src, _ = gated_dir
    rc, out, _ = run(["report", src, "--threshold-mode", "relative", "--threshold", "0.5"], capsys)
    assert rc == 0 and "x its layer's largest" in out
    rc, out, _ = run(["report", src, "--threshold", "0.5"], capsys)
    assert rc == 0 and "x its layer's largest" not in out
    rc, _, err = run(["report", src, "--threshold-mode", "relative", "--threshold", "2"], capsys)
    _assert_one_line_error(rc, err, "(0, 1)", "--threshold-mode relative")


def test_card_loader_reason_names_the_real_cause():
    from hf_dgate.hub import nonnative_reason

    assert "keep no attention heads" in nonnative_reason({"heads": [[], []], "neurons": [48, 48]})
    assert "different numbers of heads" in nonnative_reason({"heads": [[0, 1], [2]]})
    assert "different numbers of MLP neurons" in nonnative_reason({"heads": [[0], [1]], "neurons": [48, 12]})
    assert "hidden size / heads" in nonnative_reason({"heads": [[0, 1], [2, 3]], "neurons": [48, 48]})


def test_export_speedup_is_paired_with_spread_and_flags_noise(gated_dir, tmp_path, capsys):
    from hf_dgate.flops import SpeedUp

    src, _ = gated_dir
    rc, out, err = run(["export", src, "--out", tmp_path / "m", "--seq-len", "8", "--threads", "1"], capsys)
    assert rc == 0, err
    assert "paired runs, 1 torch thread" in out and "middle half" in out
    summary = json.loads((tmp_path / "m" / "dgate_export.json").read_text())
    low, high = summary["speedup_middle_half"]
    assert low <= summary["speedup"] <= high and summary["speedup_pairs"] >= 5
    assert summary["speedup_noise"] == (summary["speedup"] > summary["flops_ratio"])
    assert summary["speedup_text"] in (tmp_path / "m" / "README.md").read_text()
    # the case: 7.31x measured for a 1.70x FLOPs reduction is not a gain
    assert "timing noise" in SpeedUp(7.31, 6.0, 8.0, 9, 2, 1.0, 0.14, flops_ratio=1.70).describe()
    assert "noise" not in SpeedUp(1.5, 1.4, 1.6, 9, 2, 1.0, 0.66, flops_ratio=1.70).describe()


def test_a_missing_extra_is_named(gated_dir, tmp_path, capsys, monkeypatch):
    import sys

    from hf_dgate.extras import MissingExtraError, require

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'hf-dgate\[vision\]'"):
        require("torch_pruning", "target='filters'")
    rc, _, err = run(["report", gated_dir[0], "--plot", tmp_path / "n.png"], capsys)
    _assert_one_line_error(rc, err, "--plot needs matplotlib", "hf-dgate[plot]")
