"""Trust, second pass (issue 19): no foreign code in what hf_dgate writes, loads that restore every tensor or
refuse, atomic gated saves, exactness certified from what was removed, re-gating pruned models, resuming with a
changed setup, combinations that cannot mean anything, and one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_inputs, make_model

import hf_dgate
from hf_dgate.errors import ExportError
from hf_dgate.hub import export_to_dir, push_folder
from hf_dgate.loading import REMOTE_CODE_FILE

FOREIGN = {"AutoModelForCausalLM": "someone/repo--modeling_x.X", "AutoConfig": "someone/repo--configuration_x.C"}


_LAST: list[str] = []


def _one_error_line(capsys, again: bool = False) -> str:
    """The CLI's error line, checked to be the only one and the last thing printed (progress bars aside)."""
    if again:
        return _LAST[0]
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and err[-1] == errors[0], err
    _LAST[:] = errors
    return errors[0]


def _kill(bank, target, layer, groups):
    for gs, off in zip(bank.group_sets, bank.offsets):
        if gs.target == target and gs.layer == layer:
            with torch.no_grad():
                bank.gammas[target][:, [off + g for g in groups]] = 0.0


# ---- 1. foreign code ------------------------------------------------------------------------------------------
def _foreign_llama():
    model = make_model("llama")
    model.config.auto_map = dict(FOREIGN)
    model.config.custom_pipelines = {"x": {"impl": "someone/repo--pipe.P"}}
    model._auto_class = "AutoModelForCausalLM"  # what a trust_remote_code load sets: save_pretrained copies code
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    return model


def _code_refs(folder):
    text = "".join(open(os.path.join(folder, n)).read() for n in os.listdir(folder) if n.endswith((".json", ".md")))
    return [n for n in os.listdir(folder) if n.endswith(".py")], "someone/repo" in text, "custom_pipelines" in text


@pytest.mark.parametrize("uniform", [True, False])
def test_an_export_carries_no_code_reference_but_its_own(tmp_path, uniform):
    model = _foreign_llama()
    bank = hf_dgate.get_bank(model)
    _kill(bank, "heads", 0, [1])  # kv group 1 of layer 0 (2 kv groups of 2 heads)
    if uniform:
        _kill(bank, "heads", 1, [1])
    summary = export_to_dir(model, tmp_path / "out", measure=False)
    assert summary["native"] is uniform
    py, foreign, pipes = _code_refs(tmp_path / "out")
    assert not foreign and not pipes
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    if uniform:
        assert py == [] and "auto_map" not in cfg
    else:
        assert py == [REMOTE_CODE_FILE]
        assert all(v.startswith("modeling_dgate_pruned.") for v in cfg["auto_map"].values())
    assert model.config.auto_map == FOREIGN  # the caller's model is left as it was


def test_a_gated_save_carries_no_code_reference(tmp_path):
    model = _foreign_llama()
    hf_dgate.save_gated(model, tmp_path / "g")
    py, foreign, pipes = _code_refs(tmp_path / "g")
    assert py == [] and not foreign and not pipes


def test_an_upload_with_foreign_code_is_refused_before_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    export_to_dir(model, tmp_path / "out", measure=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: pytest.fail("the Hub was contacted"))
    for plant in ("auto_map", "py"):
        if plant == "auto_map":
            cfg = json.loads((tmp_path / "out" / "config.json").read_text())
            (tmp_path / "out" / "config.json").write_text(json.dumps({**cfg, "auto_map": FOREIGN}))
        else:
            (tmp_path / "out" / "modeling_x.py").write_text("import os\n")
        with pytest.raises(ExportError, match="carries code the export did not write"):
            push_folder(tmp_path / "out", "me/ok")


# ---- 2. loads that drop weights -------------------------------------------------------------------------------
def _gated_llama(target=("heads", "neurons")):
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=list(target)))
    _kill(hf_dgate.get_bank(model), "heads", 0, [1])
    return model


def _edit_weights(folder, drop=(), add=None):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    state = {k: v for k, v in load_file(path).items() if k not in drop}
    state.update(add or {})
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("fault", ["missing", "unexpected", "reshaped"])
def test_a_load_that_would_leave_a_tensor_random_is_refused_by_name(tmp_path, fault, capsys):
    from hf_dgate.cli import main

    model = _gated_llama()
    hf_dgate.save_gated(model, tmp_path / "g")
    key = "model.layers.1.mlp.up_proj.weight"
    if fault == "missing":
        _edit_weights(tmp_path / "g", drop=[key])
    elif fault == "unexpected":
        _edit_weights(tmp_path / "g", add={"model.layers.1.mlp.extra.weight": torch.zeros(3)})
    else:
        _edit_weights(tmp_path / "g", add={key: torch.zeros(5, 32)})
    name = key if fault != "unexpected" else "model.layers.1.mlp.extra.weight"
    with pytest.raises((ValueError, RuntimeError), match="Cannot load|size mismatch") as e:
        hf_dgate.load_gated(tmp_path / "g")
    assert name in str(e.value)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "g"), "--out", str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys) and name in _one_error_line(capsys, again=True) and not (tmp_path / "out").exists()


def _lora_gated():
    import peft

    model = make_model("llama")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    with torch.no_grad():
        for g in hf_dgate.get_bank(model).gammas.values():
            g.uniform_(0.5, 1.5)
    return model


def test_a_peft_model_round_trips_through_save_gated(tmp_path):
    model, inputs = _lora_gated(), make_inputs("llama")
    hf_dgate.save_gated(model, tmp_path / "g")
    back = hf_dgate.load_gated(tmp_path / "g")
    assert type(back).__name__ == type(model).__name__
    mine, theirs = model.state_dict(), back.state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(model(**inputs).logits, back(**inputs).logits)
    hf_dgate.export_pruned(back)  # and the reloaded PEFT model exports exactly


# ---- 3. atomic gated saves ------------------------------------------------------------------------------------
def test_a_gated_save_that_fails_midway_keeps_the_previous_save(tmp_path, monkeypatch):
    inputs = make_inputs("llama")
    old, new = _gated_llama(), make_model("llama", seed=5)
    hf_dgate.apply_dgate(new, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    hf_dgate.save_gated(old, tmp_path / "g")
    (tmp_path / "g" / "tokenizer.json").write_text("{}")  # the user's own files stay
    (tmp_path / "g" / "runs").mkdir()
    (tmp_path / "g" / "runs" / "log.txt").write_text("x")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_dgate.DGateConfig, "save_pretrained", full_disk)  # after the weights were written
    with pytest.raises(OSError, match="No space"):
        hf_dgate.save_gated(new, tmp_path / "g")
    assert sorted(os.listdir(tmp_path)) == ["g"]  # no temporary folder left
    assert torch.equal(hf_dgate.load_gated(tmp_path / "g")(**inputs).logits, old(**inputs).logits)
    monkeypatch.undo()
    hf_dgate.save_gated(new, tmp_path / "g")
    assert torch.equal(hf_dgate.load_gated(tmp_path / "g")(**inputs).logits, new(**inputs).logits)
    assert (tmp_path / "g" / "tokenizer.json").read_text() == "{}" and (tmp_path / "g" / "runs" / "log.txt").exists()


# ---- 4. exactness in half precision ---------------------------------------------------------------------------
def _half_llama(dtype, grey: bool):
    """Removed neurons that are not zero (norm 5e-4, large inputs) change the logits by less than the bf16
    tolerance (atol + rtol * max|logits|), yet change predictions; or removed groups that are exactly zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=1000)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], depth=3))
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        for g in bank.gammas.values():
            g.uniform_(0.6, 1.4)
        bank.gammas["heads"][0, [0, 3]] = 0.0
        if grey:
            for layer in model.model.layers:
                w = layer.mlp.down_proj.weight
                w[:, :30] *= 5e-4 / w[:, :30].norm(dim=0, keepdim=True)
                layer.mlp.up_proj.weight[:30] *= 100.0
        else:
            bank.gammas["neurons"][1, :30] = 0.0
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_exactness_is_certified_from_what_was_removed(tmp_path, dtype):
    from hf_dgate.verify import ExportInexactWarning

    model = _half_llama(dtype, grey=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match="60 neurons") as e:
        hf_dgate.export_pruned(model)
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    if dtype == torch.bfloat16:  # the case the old rule passed: within bf16's tolerance, predictions changed
        assert "within it" in str(e.value) and "argmax changed" in str(e.value)
    with pytest.warns(ExportInexactWarning):
        summary = export_to_dir(model, tmp_path / "out", measure=False, allow_inexact=True)
    v = summary["verification"]
    assert not v["exact"] and not v["certified"] and v["compared_in"] == "float32" and v["changed_argmax"] > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "NOT exact" in card and "same outputs" not in card and "argmax changed at" in card

    exact = _half_llama(dtype, grey=False)
    v = hf_dgate.export_pruned(exact).dgate_verification
    assert v.exact and v.certified and v.compared_in == "float32" and next(exact.parameters()).dtype == dtype


# ---- 5. gating an already pruned model ------------------------------------------------------------------------
def _exported(tmp_path, family, kills):
    model = make_model(family)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    for layer, groups in kills.items():
        _kill(hf_dgate.get_bank(model), "heads", layer, groups)
    export_to_dir(model, tmp_path / "first", measure=False)
    return tmp_path / "first"


def _pruned(tmp_path, case):
    """A pruned model and the original head numbers each layer keeps."""
    import transformers as T

    from hf_dgate.compat import HAS_HF_PRUNE_HEADS

    family, how = case.split("-")
    if how == "export":  # GPT-2 / BERT keep 3 and 2 heads (non-uniform); Llama keeps one kv group of two in layer 0
        kills = {0: [0]} if family == "llama" else {0: [0], 1: [0, 1]}
        model = hf_dgate.AutoPrunedModel.from_pretrained(_exported(tmp_path, family, kills))
        return model, ([[2, 3], [0, 1, 2, 3]] if family == "llama" else [[1, 2, 3], [2, 3]])
    if how == "plain":  # 4.x: transformers' own prune_heads recorded in config.pruned_heads, uniform
        return T.AutoModelForCausalLM.from_pretrained(_exported(tmp_path, family, {0: [0], 1: [3]})), [
            [1, 2, 3], [0, 1, 2]]  # fmt: skip
    model = make_model(family)
    if HAS_HF_PRUNE_HEADS:
        model.prune_heads({0: [1], 1: [0, 2]})  # transformers' own (4.x)
    else:
        hf_dgate.prune_heads(model, {0: [1], 1: [0, 2]})
    return model, [[0, 2, 3], [1, 3]]


CASES = ["gpt2-export", "bert-export", "llama-export", "gpt2-prune", "bert-prune", "gpt2-plain"]


@pytest.mark.parametrize("case", CASES)
def test_a_pruned_model_is_gated_with_its_real_heads(tmp_path, case):
    from hf_dgate.compat import HAS_HF_PRUNE_HEADS

    if case.endswith("plain") and not HAS_HF_PRUNE_HEADS:
        pytest.skip("transformers 5 has no prune_heads: such an export is not native")
    model, kept = _pruned(tmp_path, case)
    family = case.split("-")[0]
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))
    bank = hf_dgate.get_bank(model)
    n_rep = 2 if family == "llama" else 1
    assert [gs.n_groups for gs in bank.group_sets] == [len(k) // n_rep for k in kept]
    assert hf_dgate.sparsity_report(model).targets["heads"].groups == sum(len(k) // n_rep for k in kept)
    _kill(bank, "heads", 1, [1])  # the second remaining group of layer 1
    inputs = make_inputs(family)
    ref = model(**inputs).logits
    summary = export_to_dir(model, tmp_path / "second", measure=False)
    assert summary["verification"]["exact"] and summary["params_after"] < summary["params_before"]
    expect = [kept[0], [h for j, h in enumerate(kept[1]) if j // n_rep != 1]]
    assert summary["structure"]["heads"] == expect
    back = hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "second")
    torch.testing.assert_close(back(**inputs).logits, ref, rtol=1e-5, atol=1e-5)


def test_a_pruning_record_that_disagrees_with_the_weights_is_refused_when_gating(tmp_path):
    model = hf_dgate.AutoPrunedModel.from_pretrained(_exported(tmp_path, "gpt2", {0: [0], 1: [0, 1]}))
    model.config.dgate_pruning["heads"][1] = [0, 1, 2]  # the weights hold 2 heads there
    with pytest.raises(ValueError, match="says 'transformer.h.1' keeps 3 heads|layer 1 keeps 3 heads"):
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads"))


# ---- 6. resuming with a changed setup -------------------------------------------------------------------------
def _run(tmp_path, steps=2, resume=None, config=None, **trainer_kw):
    """A tiny GPT-2 trained `steps` optimizer steps with a checkpoint after each; the trainer is returned."""
    from test_trainer import targs, tiny_gpt2, token_data

    args = targs(tmp_path / "run", max_steps=steps, save_strategy="steps", save_steps=1, per_device_train_batch_size=2,
                 optim="adamw_torch", learning_rate=1e-3)  # fmt: skip
    cfg = config or hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.01)
    trainer = hf_dgate.DGateTrainer(tiny_gpt2(), args, dgate_config=cfg, train_dataset=token_data(8), **trainer_kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize(
    "change",
    [{"config": {"head_side": "output"}}, {"trainer": {"gated_lr": 0.05}}, {"trainer": {"gated_weights": True}}],
)
def test_a_resume_whose_setup_shapes_the_state_differently_is_refused_by_field(tmp_path, change):
    _run(tmp_path)
    cfg = hf_dgate.DGateConfig(**{"target": ["heads", "neurons"], "lam": 0.01, **change.get("config", {})})
    field = next(iter({**change.get("config", {}), **change.get("trainer", {})}))
    with pytest.raises(ValueError, match=f"Cannot resume from .*checkpoint-2.*{field}="):
        _run(tmp_path, steps=3, resume=True, config=cfg, **change.get("trainer", {}))


def test_a_resume_with_a_new_lam_or_target_uses_it_and_says_so(tmp_path):
    _run(tmp_path)
    cfg = hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.02)
    with pytest.warns(UserWarning, match=r"lam=0\.02 \(checkpoint: 0\.01\)"):
        trainer = _run(tmp_path, steps=3, resume=True, config=cfg)
    assert trainer.lam_controller.lam == 0.02 and trainer.dgate_bank.lam == 0.02
    saved = json.loads((tmp_path / "run" / "checkpoint-3" / "dgate_config.json").read_text())
    assert saved["lam"] == 0.02  # what the resumed steps used
    with pytest.warns(UserWarning, match=r"target_sparsity=0\.5 \(checkpoint: None\)"):
        _run(tmp_path, steps=4, resume=True, config=cfg, target_sparsity=0.5)


def test_incomplete_checkpoints_are_skipped_and_a_lost_controller_state_is_said(tmp_path):
    _run(tmp_path, steps=3)
    os.remove(tmp_path / "run" / "checkpoint-3" / "trainer_state.json")  # killed while saving
    os.remove(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    with pytest.raises(ValueError, match="Cannot resume from .*checkpoint-3.*no trainer_state.json"):
        _run(tmp_path, steps=4, resume=str(tmp_path / "run" / "checkpoint-3"))  # named explicitly
    with pytest.warns(UserWarning, match="Skipping the checkpoint .*checkpoint-3.*no trainer_state.json") as rec:
        trainer = _run(tmp_path, steps=4, resume=True)
    assert any("checkpoint-2" in str(w.message) and "missing" in str(w.message) for w in rec)
    assert trainer.state.global_step == 4
    os.remove(tmp_path / "run" / "checkpoint-4" / "dgate_trainer_state.json")
    with pytest.warns(UserWarning, match="no dgate_trainer_state.json, so the lam controller's state is lost"):
        _run(tmp_path, steps=5, resume=str(tmp_path / "run" / "checkpoint-4"))


# ---- 7. combinations that cannot mean anything ----------------------------------------------------------------
def test_a_scheduler_created_before_dgate_optimizer_is_refused():
    from hf_dgate.optim import dgate_optimizer, l0_optimizer

    for method, helper in (("dgate", dgate_optimizer), ("l0", l0_optimizer)):
        model = make_model("llama")
        hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", method=method))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        groups = [dict(g) for g in opt.param_groups]
        with pytest.raises(ValueError, match="before creating the learning-rate scheduler"):
            helper(opt, model)
        assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in groups]  # untouched


def test_l0_target_sparsity_and_a_trainer_target_together_are_refused(tmp_path):
    from test_trainer import targs, tiny_gpt2

    cfg = hf_dgate.DGateConfig(target="heads", method="l0", l0_target_sparsity=0.5)
    with pytest.raises(ValueError, match="l0_target_sparsity.*target_sparsity.*not both"):
        hf_dgate.DGateTrainer(tiny_gpt2(), targs(tmp_path), dgate_config=cfg, target_sparsity=0.5)


def test_peft_merge_and_unload_on_a_gated_model_keeps_its_gates():
    model, inputs = _lora_gated(), make_inputs("llama")
    bank = hf_dgate.get_bank(model)
    _kill(bank, "heads", 0, [1])
    ref = model(**inputs).logits
    merged = model.merge_and_unload()
    assert not hasattr(merged, "peft_config") and hf_dgate.is_gated(merged)
    torch.testing.assert_close(merged(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
    assert hf_dgate.export_pruned(merged).dgate_verification.exact
    with pytest.raises(ValueError, match="takes no arguments"):
        _lora_gated().merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_features_on_a_model_whose_first_linear_is_not_its_input_is_refused(family):
    with pytest.raises(ValueError, match="holds weights that come before it"):
        hf_dgate.apply_dgate(make_model(family), hf_dgate.DGateConfig(target="features"))
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="'0' \\(Conv2d\\) holds weights"):
        hf_dgate.apply_dgate(conv, hf_dgate.DGateConfig(target="features"))


# ---- 8. one line that says what to do -------------------------------------------------------------------------
def _non_uniform_llama(tmp_path):
    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"]))
    bank = hf_dgate.get_bank(model)
    _kill(bank, "heads", 0, [1])
    _kill(bank, "neurons", 1, [3, 7])
    export_to_dir(model, tmp_path / "out", measure=False)
    return tmp_path / "out"


def _edit_record(folder, **changes):
    """Change the pruning record in config.json and in dgate_export.json (what `hf-dgate report` reads)."""
    for name, key in (("config.json", "dgate_pruning"), ("dgate_export.json", "structure")):
        data = json.loads((folder / name).read_text())
        if "record" in changes:
            data[key] = changes["record"]
        else:
            data[key].update(changes)
        (folder / name).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"kv_heads": [1, 3]}, "layer 1 keeps 4 heads over 3 key/value heads"),
        ({"neurons": [-1, 46]}, r"\['neurons'\]\[0\] is -1 where a count"),
        ({"neurons": [48.0, 46]}, r"\['neurons'\]\[0\] is 48.0 where a count"),
        ({"neurons": [48]}, "lists heads for 2 layers but 'neurons' for 1"),
        ({"heads": [[0, 1], [0, 1, 2, 3], [0]]}, "lists heads for 3 layers but 'kv_heads' for 2"),
        ({"heads": [[0, 1], [0, 1, 2, 3, 4]]}, "layer 1 keeps 5 heads over 2 key/value heads"),
    ],
)
def test_a_record_that_disagrees_with_its_weights_is_one_line(tmp_path, change, match, capsys):
    from hf_dgate.cli import main

    out = _non_uniform_llama(tmp_path)
    _edit_record(out, **change)
    with pytest.raises(ValueError, match=match):
        hf_dgate.AutoPrunedModel.from_pretrained(out)
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "dgate_export.json" in _one_error_line(capsys)


@pytest.mark.parametrize("record", [None, "rebuild"])
def test_the_generated_loader_refuses_a_missing_record_in_one_line(tmp_path, record):
    import transformers as T

    out = _non_uniform_llama(tmp_path)
    if record is None:
        _edit_record(out, record=None)
    else:
        _edit_record(out, rebuild=None)
    with pytest.raises(ValueError, match="config.dgate_pruning .*re-export the model"):
        T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_deeply_nested_json_names_the_file(tmp_path, capsys):
    from hf_dgate.cli import main

    hf_dgate.save_gated(_gated_llama(), tmp_path / "g")
    (tmp_path / "g" / "dgate_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="dgate_config.json' is not valid JSON"):
        hf_dgate.load_gated(tmp_path / "g")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "g")]) == 2
    assert "dgate_config.json" in _one_error_line(capsys)
    fresh = hf_dgate.DGateConfig(target=["heads", "neurons"]).to_dict()
    (tmp_path / "g" / "dgate_config.json").write_text(json.dumps(fresh))
    (tmp_path / "g" / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    assert main(["export", str(tmp_path / "g"), "--out", str(tmp_path / "o")]) == 2
    assert "nested too deeply" in _one_error_line(capsys) and not (tmp_path / "o").exists()


def test_ctrl_c_during_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import hf_dgate.hub as hub
    from hf_dgate.cli import main

    hf_dgate.save_gated(_gated_llama(), tmp_path / "g")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "build_model_card", interrupted)  # while the export's files are being written
    capsys.readouterr()
    assert main(["export", str(tmp_path / "g"), "--out", str(tmp_path / "o"), "--no-measure"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "hf-dgate export: interrupted; nothing was written or changed."
    assert "Traceback" not in "".join(err)
    assert sorted(os.listdir(tmp_path)) == ["g"]


def test_an_unreachable_hub_says_the_export_is_on_disk(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from hf_dgate.cli import main

    hf_dgate.save_gated(_gated_llama(), tmp_path / "g")

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    capsys.readouterr()
    argv = ["export", str(tmp_path / "g"), "--out", str(tmp_path / "o"), "--no-measure", "--push-to-hub", "me/small"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "complete on disk at" in line and str(tmp_path / "o") in line and "ConnectionError" in line
    assert hf_dgate.AutoPrunedModel.from_pretrained(tmp_path / "o") is not None


# ---- 9. the totals of docs/reliability.md ---------------------------------------------------------------------
def test_the_totals_count_the_tables():
    """The counts in docs/reliability.md are the rows of its tables ([n] at the end of a first cell: n inputs)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()

    def count(section: str) -> tuple[int, int]:
        start = text.index(section)
        body = text[start : text.find("\n## ", start + 1)]
        rows = [r for r in body.splitlines() if r.startswith("| ") and not r.startswith(("| input |", "| fault |"))]
        inputs = [re.search(r"\[(\d+)\]\s*$", r.split(" | ")[0]) for r in rows]
        return len(rows), sum(int(m.group(1)) if m else 1 for m in inputs)

    (bad_rows, bad), (fault_rows, faults) = count("## Bad inputs tried"), count("## Faults injected")
    want = [
        f"{bad_rows} rows covering {bad} hand-written inputs",
        f"{fault_rows} rows covering {faults} faults",
        f"the suite tries {bad} hand-written hostile inputs, 300 random configs and {faults} faults: "
        f"{bad + 300 + faults} in all",
    ]
    missing = [w for w in want if w not in " ".join(text.split())]
    assert not missing, f"docs/reliability.md: a row was added; update its totals to read {missing}"


def test_an_image_text_model_exports_with_a_probe_it_accepts(tmp_path):
    """Step 3.7 reads pixels only at its image tokens: the probe is text only, and the export is verified exact."""
    import transformers as T
    from families import build

    if not hasattr(T, "Step3p7ForConditionalGeneration"):
        pytest.skip("Step 3.7 needs transformers 5")
    model, _, kw = build("step3p7[text]")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", **kw))
    _kill(hf_dgate.get_bank(model), "heads", 0, [1])
    summary = export_to_dir(model, tmp_path / "o", measure=False)
    assert summary["verification"]["exact"] and summary["flops_input"].startswith("input_ids")


@pytest.mark.parametrize("edit", ["drop", "add"])
def test_gate_tensors_changed_after_saving_are_named_as_such(tmp_path, edit):
    hf_dgate.save_gated(_gated_llama(), tmp_path / "g")
    if edit == "drop":
        _edit_weights(tmp_path / "g", drop=["dgate.gammas.heads"])
    else:
        _edit_weights(tmp_path / "g", add={"dgate.gammas.bogus": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="the files were changed after saving"):
        hf_dgate.load_gated(tmp_path / "g")
