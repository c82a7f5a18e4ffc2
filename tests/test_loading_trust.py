"""Trust in what loads: generated code runs nothing from a config, loading reads only what the saver wrote and
refuses gates it would misread, resumed trainer state is validated, and a meta-built model gets real gates."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers as T
from conftest import make_inputs, make_model
from safetensors.torch import save_file

import hf_dgate
from hf_dgate.controller import LamController
from hf_dgate.hub import export_to_dir
from hf_dgate.loading import REMOTE_CODE_FILE, remote_code_source, transformers_model_class
from hf_dgate.saving import MANIFEST_NAME, load_gates
from hf_dgate.trainer import TRAINER_STATE_NAME, DGateTrainer

HOSTILE = 'x"); import os; os.system("touch PWNED"); ("'


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _kill(bank, target, layer, groups=None):
    for gs, off in zip(bank.group_sets, bank.offsets):
        if gs.target == target and gs.layer == layer:
            idx = list(range(gs.n_groups) if groups is None else groups)
            with torch.no_grad():
                bank.gammas[target][:, [off + g for g in idx]] = 0.0


# ---- requirement 3: generated code ----------------------------------------------------------------------------
@torch.no_grad()
def test_hostile_config_fields_never_reach_the_generated_loader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where `touch PWNED` would land
    make_model("llama").save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "evil.py").write_text("import pathlib\npathlib.Path('PWNED_EVIL').touch()\nclass Cfg: pass\n")
    _edit_json(
        tmp_path / "src" / "config.json",
        model_type=HOSTILE,
        architectures=[f"LlamaForCausalLM{HOSTILE}"],
        auto_map={"AutoConfig": "evil.Cfg", "AutoTokenizer": "someone/repo--evil.Tok"},
        dgate_pruning={"remote": {"attrs": {"": {"forward": HOSTILE}}}},
    )
    model = T.LlamaForCausalLM.from_pretrained(tmp_path / "src").eval()  # an explicit class accepts the config
    assert model.config.model_type == HOSTILE
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    bank = hf_dgate.get_bank(model)
    _kill(bank, "heads", 0)  # a layer without heads and unequal neuron counts: only the generated loader loads it
    _kill(bank, "neurons", 1, [4, 9])
    inputs = make_inputs("llama", batch=1)
    ref = model(**inputs).logits
    summary = export_to_dir(model, tmp_path / "out", measure=False, seq_len=8)
    assert not summary["native"] and summary["remote_code"] == "AutoModelForCausalLM"
    out = tmp_path / "out"
    source = (out / REMOTE_CODE_FILE).read_text()
    cls = "DGatePrunedLlamaForCausalLM"
    # exactly the shipped pruned_modules.py plus a class whose names are fixed literals: nothing from the config
    assert source == remote_code_source("LlamaForCausalLM", cls, "llama", "LlamaConfig")
    assert open(hf_dgate.pruned_modules.__file__).read() in source
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {  # no foreign entries
        "AutoConfig": f"modeling_dgate_pruned.{cls}Config",
        "AutoModelForCausalLM": f"modeling_dgate_pruned.{cls}",
    }
    assert config["model_type"] == "dgate_pruned_llama" and config["architectures"] == ["LlamaForCausalLM"]
    loaded = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == cls
    torch.testing.assert_close(loaded(**inputs).logits, ref, rtol=0, atol=1e-5)
    assert not any(p.name.startswith("PWNED") for p in tmp_path.rglob("*"))


@torch.no_grad()
def test_generated_loader_refuses_a_tampered_pruning_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads"]))
    _kill(hf_dgate.get_bank(model), "heads", 0)
    export_to_dir(model, tmp_path / "out", measure=False, seq_len=8)
    cfg_path = tmp_path / "out" / "config.json"
    clean = json.loads(cfg_path.read_text())
    layer = "model.layers.1.self_attn"
    bad_specs = [
        {"attrs": {layer: {"head_dim": HOSTILE}}},  # a string where a size belongs
        {"attrs": {layer: {"__class__": 1}}},  # a private attribute
        {"no_input": ["model.layers[0]; import os"]},  # not a module name
    ]
    for bad in bad_specs:
        pruning = json.loads(json.dumps(clean["dgate_pruning"]))
        pruning["rebuild"].update(bad)
        _edit_json(cfg_path, dgate_pruning=pruning)
        with pytest.raises(ValueError, match="config.dgate_pruning holds"):
            T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
        with pytest.raises(ValueError, match="config.dgate_pruning holds"):  # the same shrink, the same check
            hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "out")
    assert not any(p.name.startswith("PWNED") for p in tmp_path.rglob("*"))


def test_model_class_names_from_a_config_must_be_transformers_models():
    for arch in (["LlamaForCausalLM"], ("BertModel",)):
        assert transformers_model_class(T.PretrainedConfig(architectures=list(arch))) is getattr(T, arch[0])
    for arch in (["os"], ["AutoConfig"], ["LlamaConfig"], ["__class__"], [HOSTILE], "LlamaForCausalLM", [1], None):
        assert transformers_model_class(T.PretrainedConfig(architectures=arch)) is None


# ---- requirement 7: loading reads what the saver wrote, refuses gates it would misread -------------------------
def _saved(tmp_path, **config):
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(**{"target": ["heads", "neurons"], **config}))
    with torch.no_grad():
        for g in hf_dgate.get_bank(model).gammas.values():
            g.uniform_(0.5, 1.5)
    path = tmp_path / "gated"
    hf_dgate.save_gated(model, path)
    return model, path


@torch.no_grad()
def test_a_stray_safetensors_file_changes_nothing(tmp_path):
    model, path = _saved(tmp_path)
    inputs = make_inputs("llama")
    ref = model(**inputs).logits
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["weights"] == ["model.safetensors"] and manifest["method"] == "dgate" and manifest["depth"] == 3
    assert manifest["gates"] == {"heads": [2, 4], "neurons": [2, 96]}
    save_file({"dgate.gammas.heads": torch.zeros(2, 4)}, str(path / "zz_backup.safetensors"))
    torch.testing.assert_close(hf_dgate.load_gated(path)(**inputs).logits, ref, rtol=0, atol=0)
    os.remove(path / MANIFEST_NAME)  # a folder saved before manifests: model.safetensors only, never a glob
    assert set(load_gates(path)) == {"gammas.heads", "gammas.neurons"}
    torch.testing.assert_close(hf_dgate.load_gated(path)(**inputs).logits, ref, rtol=0, atol=0)


@torch.no_grad()
def test_sharded_saves_load_from_their_index_and_stale_files_are_refused(tmp_path):
    model, path = _saved(tmp_path)
    inputs = make_inputs("llama")
    stale = (path / "model.safetensors").read_bytes()
    hf_dgate.save_gated(model, path, max_shard_size="20KB")  # the earlier model.safetensors is not carried over
    files = json.loads((path / MANIFEST_NAME).read_text())["weights"]
    assert len(files) > 1 and "model.safetensors" not in files and not (path / "model.safetensors").exists()
    torch.testing.assert_close(hf_dgate.load_gated(path)(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    (path / "model.safetensors").write_bytes(stale)  # a stale file copied back in by hand
    with pytest.raises(ValueError, match="model.safetensors that the last save did not write"):
        hf_dgate.load_gated(path)
    os.remove(path / "model.safetensors")
    torch.testing.assert_close(hf_dgate.load_gated(path)(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.parametrize(
    "change,match",
    [
        ({"method": "direct"}, "method"),
        ({"method": "l0"}, "method|shape"),
        ({"depth": 4}, "depth"),
        ({"target": ["heads"]}, "target"),
        ({"target": ["heads", "layers"]}, "target"),
    ],
)
def test_a_config_that_would_misread_the_saved_gates_is_refused(tmp_path, change, match, manifest):
    _, path = _saved(tmp_path)
    if not manifest:
        os.remove(path / MANIFEST_NAME)
    _edit_json(path / "dgate_config.json", **change)
    with pytest.raises(ValueError, match=match):
        hf_dgate.load_gated(path)


def test_a_changed_lam_or_threshold_still_loads(tmp_path):
    model, path = _saved(tmp_path)
    _edit_json(path / "dgate_config.json", lam=0.5, threshold=1e-4)
    back = hf_dgate.load_gated(path)
    assert hf_dgate.get_bank(back).lam == 0.5
    torch.testing.assert_close(back.dgate.gammas["heads"], model.dgate.gammas["heads"], rtol=0, atol=0)


def test_a_manifest_naming_files_outside_the_folder_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    _edit_json(path / MANIFEST_NAME, weights=["../elsewhere.safetensors"])
    with pytest.raises(ValueError, match="field 'weights'"):
        hf_dgate.load_gated(path)


# ---- requirement 7: resumed trainer state ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "state,match",
    [
        ({"lam_controller": {"lam": -0.5}, "lam": 0.1}, "lam=-0.5"),
        ({"lam_controller": {"lam": math.nan}, "lam": 0.1}, "lam=nan"),
        ({"lam_controller": {"lam": 0.1, "interval": 0}, "lam": 0.1}, "interval=0"),
        ({"lam_controller": {"lam": 0.1, "gain": math.inf}, "lam": 0.1}, "gain=inf"),
        ({"lam_controller": {"lam": 0.1, "speed": 2}, "lam": 0.1}, "unknown lam controller field"),
        ({"lam_controller": {"lam": 0.1}, "lam": math.nan}, "field 'lam'=nan"),
        ({"lam": 0.1}, "no 'lam_controller'"),
    ],
)
def test_resume_refuses_an_invalid_trainer_state(tmp_path, state, match):
    model = make_model("llama")
    args = T.TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no", max_steps=1)
    trainer = DGateTrainer(model, args, dgate_config=hf_dgate.DGateConfig(target="heads", lam=0.1))
    ckpt = tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / TRAINER_STATE_NAME).write_text(json.dumps(state))  # Python's json writes NaN/Infinity literals
    with pytest.raises(ValueError, match=match) as err:
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert TRAINER_STATE_NAME in str(err.value)
    assert trainer.lam_controller.lam == 0.1 and trainer.lam_controller.interval == 10  # left unchanged


def test_resume_refuses_a_checkpoint_gated_differently(tmp_path):
    _, path = _saved(tmp_path, depth=4)
    args = T.TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no", max_steps=1)
    trainer = DGateTrainer(make_model("llama"), args, dgate_config=hf_dgate.DGateConfig(target=["heads", "neurons"]))
    with pytest.raises(ValueError, match="depth=4"):
        trainer.train(resume_from_checkpoint=str(path))


def test_controller_state_round_trips_and_is_validated():
    ctl = LamController(lam=0.2, warmup_steps=3, target_sparsity=0.5)
    ctl.lam, ctl.last_sparsity = 0.7, 0.25
    other = LamController(lam=0.2)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other == ctl
    for bad in ({"lam": True}, {"warmup_steps": 1.5}, {"min_lam": 2.0, "max_lam": 1.0}, {"last_sparsity": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            other.load_state_dict(bad)
    assert other == ctl


# ---- requirement 9: the meta device ---------------------------------------------------------------------------
LLAMA = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=100,
)


@pytest.mark.parametrize("gate_inside_meta_context", [False, True])
@torch.no_grad()
def test_a_model_gated_on_meta_gets_real_gates_when_materialised(gate_inside_meta_context):
    torch.manual_seed(0)
    real = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).eval()
    config = hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.1)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)).eval()
        if gate_inside_meta_context:
            hf_dgate.apply_dgate(model, config)
    if not gate_inside_meta_context:
        hf_dgate.apply_dgate(model, config)
    bank = hf_dgate.get_bank(model)
    assert bank.gammas["heads"].is_meta
    for what in (hf_dgate.sparsity_report, hf_dgate.export_pruned):
        with pytest.raises(ValueError, match="meta device.*to_empty"):
            what(model)
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(real.state_dict(), strict=False)
    assert sorted(missing) == ["dgate.gammas.heads", "dgate.gammas.neurons"] and not unexpected
    for name, buf in real.named_buffers():  # the model's own non-persistent buffers (rotary frequencies)
        model.get_buffer(name).copy_(buf)
    assert torch.equal(bank.gammas["heads"], torch.ones(2, 4)) and torch.equal(
        bank.gammas["neurons"], torch.ones(2, 128)
    )
    for name, index in bank._index_cpu.items():
        assert torch.equal(getattr(bank, name), index)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids).logits, real(ids).logits, rtol=0, atol=0)
    # the penalty and report read the loaded weights: the same as gating the real model directly
    hf_dgate.apply_dgate(real, config)
    torch.testing.assert_close(hf_dgate.penalty(model), hf_dgate.penalty(real))
    assert hf_dgate.sparsity_report(model).targets["heads"].zero == 0


def test_l0_gates_are_reinitialised_from_meta():
    with torch.device("meta"):
        model = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA))
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", method="l0"))
    model.to_empty(device="cpu")
    fresh = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA))
    hf_dgate.apply_dgate(fresh, hf_dgate.DGateConfig(target="heads", method="l0"))
    assert torch.equal(model.dgate.gammas["heads"], fresh.dgate.gammas["heads"])
