"""The typed pruning record: exports written by earlier versions (record versions 1 and 2: fixtures made with the
code of commit 4e1bde0, with the generated loader's `remote` shapes, and with that of b961e22 and remote_code=False,
lists only; see fixtures/records/make_fixtures.py) reload through the one rebuild path (`pruned_modules.shrink`, fed
by legacy_records.py's translation), and the record reads and writes their layout key for key."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import hf_dgate
from hf_dgate import pruned_modules
from hf_dgate.errors import ExportError
from hf_dgate.hub import structure_table
from hf_dgate.record import RECORD_KEY, PruningRecord, RecordError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "records")


_shrink = pruned_modules.shrink


def _raw(name: str) -> dict:
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)[RECORD_KEY]


SAVED = [
    ("record_v1_llama", 1),
    ("record_v2_bart", 2),
    ("record_v1_llama_lists", 1),
    ("record_v2_bart_lists", 2),
    ("record_v1_bert_hf_heads_lists", 1),  # heads removed by transformers 4.x's own prune_heads
    ("record_v3_llama", 3),
    ("record_v3_bart", 3),
    ("record_v3_bert_hf_heads", 3),
]


@pytest.mark.parametrize("name,version", SAVED)
def test_earlier_exports_reload_with_their_outputs(name, version, monkeypatch):
    """Each saved export, on either transformers line (the BERT ones were written under 4.57, where transformers
    removed the heads itself; 5.x has no prune_heads, and its reload removes them from the lists)."""
    path = os.path.join(FIXTURES, name)
    record = PruningRecord.from_dict(_raw(name))
    assert record.version == version and record.native is False
    assert (record.rebuild is None) == (version < 3)
    assert (record.remote is None) == (version == 3 or name.endswith("_lists"))
    assert record.to_dict() == _raw(name)  # the layout round-trips key for key
    with open(os.path.join(path, "expected.json")) as f:
        expected = json.load(f)
    applied = []  # the one rebuild: every reload goes through pruned_modules.shrink
    monkeypatch.setattr("hf_dgate.loading.shrink", lambda model, spec: applied.append(spec) or _shrink(model, spec))
    model = hf_dgate.AutoPrunedModel.from_pretrained(path).float().eval()
    assert len(applied) == 1 and applied[0].shapes
    inputs = {k: torch.tensor(v) for k, v in expected["inputs"].items()}
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), atol=1e-4, rtol=1e-4)


def test_record_versions_are_read_into_one_typed_shape():
    v1, v2 = PruningRecord.from_dict(_raw("record_v1_llama")), PruningRecord.from_dict(_raw("record_v2_bart"))
    assert list(v1.stacks) == [None] and v1.single.kv_heads == [1, 2] and v1.single.neurons == [8, 5]
    assert set(v2.stacks) == {"model.encoder.layers", "model.decoder.layers"}
    assert v2.stacks["model.encoder.layers"].heads == [[1]] and v2.stacks["model.decoder.layers"].cross_kv_heads == [1]
    assert "| 0 (0) | 1: [1] | 1 | 8 |" in structure_table(_raw("record_v2_bart"))  # the card's and CLI's table
    assert "| 0 (0) | 2: [0, 1] | 1 | 8 |" in structure_table(v1)
    extra = {**_raw("record_v1_llama"), "from_a_newer_minor": [1]}  # unknown keys survive a rewrite
    assert PruningRecord.from_dict(extra).to_dict() == extra


def test_a_record_of_an_unknown_version_is_refused(tmp_path):
    with pytest.raises(RecordError, match=r"version 4.*reads \(1, 2, 3\).*upgrade hf_dgate"):
        PruningRecord.from_dict({**_raw("record_v1_llama"), "version": 4})
    with pytest.raises(RecordError, match="not a list"):
        PruningRecord.from_dict({**_raw("record_v1_llama"), "kv_heads": 2})
    copy = tmp_path / "export"
    shutil.copytree(os.path.join(FIXTURES, "record_v1_llama"), copy)
    config = json.loads((copy / "config.json").read_text())
    config[RECORD_KEY]["version"] = 4
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="version 4"):
        hf_dgate.AutoPrunedModel.from_pretrained(str(copy))


def test_the_generated_loader_refuses_a_record_version_it_does_not_know(tmp_path):
    import transformers as T
    from conftest import make_model

    from hf_dgate.loading import save_pruned

    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", lam=0.1))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, 0] = 0.0  # one layer loses a key/value head: non-native
    out = tmp_path / "out"
    assert save_pruned(hf_dgate.export_pruned(model), out) == "AutoModelForCausalLM"
    T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # loads as written
    config = json.loads((out / "config.json").read_text())
    config[RECORD_KEY]["version"] = 4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a pruning record this loader reads"):
        T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_the_generated_loader_reads_the_record_through_the_record_class(tmp_path):
    """The generated file carries record.py: a record hf_dgate refuses (a negative count) is refused there too,
    although its `rebuild` spec is intact."""
    import transformers as T
    from conftest import make_model

    from hf_dgate.loading import REMOTE_CODE_FILE, save_pruned

    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="heads", lam=0.1))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, 0] = 0.0
    out = tmp_path / "out"
    assert save_pruned(hf_dgate.export_pruned(model), out) == "AutoModelForCausalLM"
    assert "class PruningRecord" in (out / REMOTE_CODE_FILE).read_text()
    config = json.loads((out / "config.json").read_text())
    config[RECORD_KEY]["kv_heads"][0] = -1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not a pruning record this loader reads \(.*'kv_heads'\]\[0\] is -1"):
        T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


@pytest.mark.parametrize("fault", ["missing", "unexpected"])
def test_a_load_that_would_leave_tensors_random_is_refused(tmp_path, fault):
    """AutoPrunedModel checks transformers' loading report itself: a tensor missing from the files (it would be
    random) or one the model does not read (its class reads other names) is refused by name, on either path."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "export"
    shutil.copytree(os.path.join(FIXTURES, "record_v1_llama"), path)
    tensors = load_file(path / "model.safetensors")
    name = sorted(k for k in tensors if k.endswith("mlp.down_proj.weight"))[0]
    if fault == "missing":
        del tensors[name]
    else:
        tensors["model.not_a_module.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="completely") as err:
        hf_dgate.AutoPrunedModel.from_pretrained(path)
    assert (name if fault == "missing" else "model.not_a_module.weight") in str(err.value)


def _non_native_llama(remote_code: bool, tmp_path, tied: bool = False):
    import transformers as T
    from conftest import make_inputs, make_model

    from hf_dgate.loading import save_pruned

    model = make_model("llama")
    if tied:  # no lm_head in the files: the bare LlamaModel reads all of them
        model.config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = T.LlamaForCausalLM(model.config).eval()
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.1))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["heads"][:, 0] = 0.0  # layer 0 loses a key/value head group
        hf_dgate.get_bank(model).gammas["neurons"][:, [1, 4]] = 0.0
    pruned = hf_dgate.export_pruned(model)
    out = tmp_path / f"out{int(remote_code)}"
    save_pruned(pruned, out, remote_code=remote_code)
    return pruned, out, make_inputs("llama", batch=1)


@pytest.mark.parametrize("remote_code", [True, False])
def test_a_version_3_record_rebuilds_from_its_own_spec(tmp_path, monkeypatch, remote_code):
    """Every export writes the rebuild spec (also without the generated loader): AutoPrunedModel applies it as it
    is, with the code the generated loader carries, and never translates the lists."""
    import hf_dgate.legacy_records as legacy
    from hf_dgate.loading import REMOTE_CODE_FILE

    pruned, out, inputs = _non_native_llama(remote_code, tmp_path)
    raw = json.loads((out / "config.json").read_text())[RECORD_KEY]
    record = PruningRecord.from_dict(raw)
    assert record.version == 3 and record.native is False and not record.multi_stack and "remote" not in raw
    k_proj = pruned.model.layers[0].self_attn.k_proj.weight
    assert record.rebuild.shapes["model.layers.0.self_attn.k_proj.weight"] == list(k_proj.shape) == [8, 32]
    assert record.to_dict() == raw
    assert (out / REMOTE_CODE_FILE).exists() == remote_code
    if remote_code:  # the generated file holds the one rebuild verbatim
        assert open(pruned_modules.__file__).read() in (out / REMOTE_CODE_FILE).read_text()

    def no_translation(*a, **k):
        raise AssertionError("a version 3 record was translated from its lists")

    monkeypatch.setattr(legacy, "rebuild_from_lists", no_translation)
    again = hf_dgate.AutoPrunedModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, pruned(**inputs).logits, rtol=0, atol=1e-6)


def test_another_model_class_rebuilds_through_the_translated_lists(tmp_path):
    """The spec names the exported class's modules; `model_class=` with other names (the bare LlamaModel under a
    LlamaForCausalLM export) gets the spec translated from the per-layer lists, and the same outputs."""
    import transformers as T

    pruned, out, inputs = _non_native_llama(False, tmp_path, tied=True)
    base = hf_dgate.AutoPrunedModel.from_pretrained(out, model_class=T.LlamaModel).eval()
    assert type(base) is T.LlamaModel
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, pruned.model(**inputs).last_hidden_state)


def test_per_layer_lists_of_different_lengths_are_refused():
    with pytest.raises(RecordError, match="lists heads for 2 layers but 'neurons' for 1"):
        PruningRecord.from_dict({**_raw("record_v1_llama_lists"), "neurons": [8]})
    with pytest.raises(RecordError, match="'rebuild'] is not a rebuild spec"):
        PruningRecord.from_dict({**_raw("record_v1_llama"), "version": 3, "rebuild": {"shapes": []}})


def test_a_native_export_records_an_empty_rebuild_spec():
    """The spec is written for native exports too, and there it must be empty: the saved config builds every shape
    (and every int attribute) by itself, which is what `native` claims."""
    from conftest import make_model

    model = make_model("llama")
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="layers"))
    with torch.no_grad():
        hf_dgate.get_bank(model).gammas["layers"][:, 0] = 0.0
    record = hf_dgate.export.pruning_record(hf_dgate.export_pruned(model))
    assert record.version == 3 and record.native is True and record.single.layers == [1]
    empty = {"shapes": {}, "attrs": {}, "no_head": {}, "no_input": []}
    assert record.rebuild.to_dict() == {**empty, "model_class": "LlamaForCausalLM"}
