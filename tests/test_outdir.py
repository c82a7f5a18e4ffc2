"""Export targets: nothing the user did not ask to replace is deleted, a killed export leaves nothing behind for
good, and nothing uploaded names a local folder (issue 10, requirements 2, 4 and 13)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from huggingface_hub import HfApi, ModelCard

import hf_dgate
from hf_dgate.errors import ExportError
from hf_dgate.hub import check_no_local_paths, export_to_dir, hub_model_name, push_folder
from hf_dgate.outdir import OutputDir, _host, clean_stale, is_checkpoint_dir, is_previous_export

CFG = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)


def _gate(model):
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.01))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["neurons"][0, :40] = 0.0
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A model saved to a local folder: loading it makes `config._name_or_path` that folder's absolute path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / "base"
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, **CFG)).save_pretrained(path)
    return path


def _local_model(base_dir):
    return _gate(T.LlamaForCausalLM.from_pretrained(base_dir).eval())


def _tree(path) -> dict[str, str]:
    """Relative file name -> sha256 of every file below `path` (what must stay byte-identical)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the target rules ------------------------------------------------------------------------------------------
def test_rules_for_existing_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (tmp_path / "link").symlink_to(src)
    (tmp_path / "empty").mkdir()
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "notes.txt").write_text("x")
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "dgate_export.json").write_text("{}")
    (tmp_path / "clone").mkdir()
    (tmp_path / "clone" / "dgate_export.json").write_text("{}")
    (tmp_path / "clone" / ".git").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trainer_state.json").write_text("{}")

    def refused(target, needle, **kw):
        with pytest.raises(ExportError, match=needle):
            OutputDir.plan(target, sources=[src], protected=[run], **kw)

    for target in [src, tmp_path / "link", tmp_path, src / "pruned"]:  # is / contains / inside the source
        refused(target, "source", overwrite=True, force=True)
    refused(".", "source|current directory", force=True)
    monkeypatch.chdir(tmp_path / "empty")
    refused(tmp_path / "empty", "current directory", force=True)
    monkeypatch.setenv("HOME", str(tmp_path / "proj"))
    refused(tmp_path / "proj", "home folder", force=True)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    refused(run, "training output or checkpoint", force=True)
    refused(run / "checkpoint-10", "training checkpoint", overwrite=True)  # forced, only a protected one is kept
    refused(run / "checkpoint-10" / "pruned", "inside the checkpoint")
    refused(tmp_path / "state", "checkpoint", overwrite=True)
    refused(tmp_path / "proj", "not a previous hf_dgate export", overwrite=True)
    refused(tmp_path / "clone", "not a previous hf_dgate export", overwrite=True)  # an export holds no folders
    refused(tmp_path / "prev", "previous export; pass overwrite=True")
    (tmp_path / "afile").write_text("x")
    refused(tmp_path / "afile", "is a file", overwrite=True)

    assert OutputDir.plan(run / "pruned", sources=[src], protected=[run]).path == str(run / "pruned")
    assert OutputDir.plan(tmp_path / "new" / "deep", sources=[src]).path == str(tmp_path / "new" / "deep")
    OutputDir.plan(tmp_path / "prev", overwrite=True)
    OutputDir.plan(tmp_path / "proj", force=True)
    assert is_previous_export(tmp_path / "prev") and not is_previous_export(tmp_path / "clone")
    assert is_checkpoint_dir(run) and is_checkpoint_dir(tmp_path / "state") and not is_checkpoint_dir(src)
    assert (src / "config.json").read_text() == "{}" and sorted(os.listdir(run)) == ["checkpoint-10"]


def test_export_refuses_its_source_folder_and_keeps_a_non_export(base_dir, tmp_path, monkeypatch):
    before = _tree(base_dir)
    model = _local_model(base_dir)
    for target in [base_dir, base_dir / "pruned", base_dir.parent]:
        with pytest.raises(ExportError, match="source folder"):
            export_to_dir(model, target, measure=False, seq_len=8, overwrite=True, force=True)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "data.csv").write_text("1,2\n")
    with pytest.raises(ExportError, match="force=True"):  # the default (overwrite=False) keeps it
        export_to_dir(model, tmp_path / "proj", measure=False, seq_len=8)
    monkeypatch.chdir(tmp_path / "proj")
    with pytest.raises(ExportError, match="current directory"):
        export_to_dir(model, ".", measure=False, seq_len=8, force=True)
    assert _tree(base_dir) == before and os.listdir(tmp_path / "proj") == ["data.csv"]
    assert sorted(os.listdir(tmp_path)) == ["proj"]


# ---- permissions, stale leftovers ------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_gets_the_umask_permissions(base_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        export_to_dir(_local_model(base_dir), tmp_path / "out", measure=False, seq_len=8)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
    modes = {f: os.stat(tmp_path / "out" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "out")}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_stale_leftovers_of_a_dead_export_are_cleaned(tmp_path):
    pid, host = _dead_pid(), _host()
    stale_tmp = tmp_path / f".hf-dgate-export-{pid}@{host}-abc_1234"
    stale_tmp.mkdir()
    (stale_tmp / "model.safetensors").write_text("half")
    swapped = tmp_path / f".hf-dgate-old-{pid}@{host}-0123abcd-out"  # killed between the two renames of a swap
    swapped.mkdir()
    (swapped / "dgate_export.json").write_text('{"previous": true}')
    done = tmp_path / f".hf-dgate-old-{pid}@{host}-89abcdef-done"  # killed after the swap, before the delete
    (tmp_path / "done").mkdir()
    done.mkdir()
    alive = tmp_path / f".hf-dgate-export-{os.getpid()}@{host}-live0000"  # a running export: not touched
    alive.mkdir()
    other_host = tmp_path / f".hf-dgate-export-{pid}@elsewhere-abcd1234"  # another machine's, on a shared disk
    other_host.mkdir()
    OutputDir.plan(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "done", alive.name, other_host.name])
    assert json.loads((tmp_path / "out" / "dgate_export.json").read_text()) == {"previous": True}
    assert clean_stale(tmp_path / "missing") == []


# ---- fault injection: an exception and a SIGKILL while writing --------------------------------------------------
def test_an_exception_while_writing_keeps_the_previous_export(base_dir, tmp_path, monkeypatch):
    model = _local_model(base_dir)
    export_to_dir(model, tmp_path / "out", measure=False, seq_len=8)
    previous, source = _tree(tmp_path / "out"), _tree(base_dir)

    def disk_full(self, path, *a, **kw):
        open(os.path.join(path, "model.safetensors"), "w").write("half")
        raise OSError("No space left on device")

    monkeypatch.setattr(T.PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_to_dir(model, tmp_path / "out", measure=False, seq_len=8, overwrite=True)
    assert _tree(tmp_path / "out") == previous and _tree(base_dir) == source
    assert sorted(os.listdir(tmp_path)) == ["out"]


CHILD = """
import sys, time
import torch, transformers as T, hf_dgate
from hf_dgate.hub import export_to_dir
model = T.LlamaForCausalLM.from_pretrained(sys.argv[1]).eval()
hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.01))
save = T.PreTrainedModel.save_pretrained
def slow_save(self, path, *a, **kw):
    save(self, path, *a, **kw)
    print("WRITING", flush=True)
    time.sleep(120)  # killed here, half-way through the export
T.PreTrainedModel.save_pretrained = slow_save
export_to_dir(model, sys.argv[2], measure=False, seq_len=8, overwrite=True)
"""


def test_a_sigkill_while_writing_loses_nothing_and_the_next_export_cleans_up(base_dir, tmp_path):
    model = _local_model(base_dir)
    export_to_dir(model, tmp_path / "out", measure=False, seq_len=8)
    previous, source = _tree(tmp_path / "out"), _tree(base_dir)
    script = tmp_path.parent / f"{tmp_path.name}-child.py"
    script.write_text(textwrap.dedent(CHILD))
    child = subprocess.Popen(
        [sys.executable, str(script), str(base_dir), str(tmp_path / "out")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "WRITING"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    left = [n for n in os.listdir(tmp_path) if n != "out"]
    assert left and all(n.startswith(f".hf-dgate-export-{child.pid}@") for n in left)  # killed mid-write
    assert _tree(tmp_path / "out") == previous and _tree(base_dir) == source
    export_to_dir(model, tmp_path / "out", measure=False, seq_len=8, overwrite=True)  # the next run
    assert sorted(os.listdir(tmp_path)) == ["out"] and _tree(base_dir) == source


# ---- Hub and card: no local path, the repo id checked first ----------------------------------------------------
def test_nothing_written_names_a_local_folder(base_dir, tmp_path):
    model = _local_model(base_dir)
    assert os.path.isabs(model.config._name_or_path)
    summary = export_to_dir(model, tmp_path / "out", measure=False, seq_len=8)
    assert summary["base_model"] is None
    for name in os.listdir(tmp_path / "out"):
        data = (tmp_path / "out" / name).read_bytes()
        for local in (str(base_dir), str(tmp_path), os.getcwd(), os.path.expanduser("~")):
            assert local.encode() not in data, (name, local)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None and "Base model: a local model" in card.text
    check_no_local_paths(tmp_path / "out")  # what push_folder verifies before it uploads

    model.config._name_or_path = "meta-llama/Llama-3.2-1B"  # loaded from the Hub: its id is kept
    summary = export_to_dir(model, tmp_path / "hub", measure=False, seq_len=8)
    assert summary["base_model"] == "meta-llama/Llama-3.2-1B"
    assert ModelCard.load(tmp_path / "hub" / "README.md").data.base_model == "meta-llama/Llama-3.2-1B"
    with pytest.raises(ExportError, match="local path"):
        export_to_dir(model, tmp_path / "o", measure=False, seq_len=8, base_model=str(base_dir))


def test_hub_model_name():
    assert hub_model_name("gpt2") == "gpt2" and hub_model_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    for local in ["/abs/model", "./model", "~/model", "a/b/c", "", None, os.getcwd()]:
        assert hub_model_name(local) is None


def test_the_repo_id_is_checked_before_any_file_is_written(base_dir, tmp_path, monkeypatch):
    def no_network(*a, **kw):
        raise AssertionError("the Hub was called")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    model = _local_model(base_dir)
    for bad in ["me/../x", "a/b/c", "me/name with spaces", "/abs/path"]:
        with pytest.raises(ExportError, match="not a valid Hub repo id"):
            export_to_dir(model, tmp_path / "out", push_to_hub=True, hub_model_id=bad, measure=False, seq_len=8)
    assert os.listdir(tmp_path) == []
    (tmp_path / "leaky").mkdir()
    (tmp_path / "leaky" / "config.json").write_text(json.dumps({"path": str(tmp_path / "leaky" / "x")}))
    with pytest.raises(ExportError, match="local path"):
        push_folder(tmp_path / "leaky", "me/ok")


def test_trainer_export_never_touches_output_dir_or_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, **CFG))
    args = T.TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no")
    tr = hf_dgate.DGateTrainer(model, args, dgate_config=hf_dgate.DGateConfig(target="neurons"))
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "model.safetensors").write_text("weights")
    for out in [tmp_path / "run", tmp_path / "run" / "checkpoint-5", tmp_path]:
        with pytest.raises(ExportError, match="is or contains"):
            tr.export_pruned(str(out), measure=False, seq_len=8, overwrite=True, force=True)
    tr.export_pruned(measure=False, seq_len=8)  # <output_dir>/pruned
    with pytest.raises(ExportError, match="overwrite=True"):
        tr.export_pruned(measure=False, seq_len=8)
    tr.export_pruned(measure=False, seq_len=8, overwrite=True)
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-5", "pruned"]
    assert (tmp_path / "run" / "checkpoint-5" / "model.safetensors").read_text() == "weights"
