"""Adversarial pass on issue 19's fixes (foreign code, loads, atomic saves, half precision, re-gating, resume,
meaningless combinations, one-line errors) with inputs different from the issue's and the tests'.

    PYTHONPATH=. python benchmarks/adversarial_trust.py      # from the repository root; prints one line per case

Each case says `held` (refused in one line naming the problem, or survived with the result checked), or what went
wrong. Tiny random models, CPU, about a minute; monkeypatches the Hub client, so run it on its own.
"""

import json
import os
import pathlib
import sys
import tempfile
import warnings

sys.path.insert(0, "tests")
import test_trust_second_pass as t  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from conftest import make_inputs, make_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import hf_dgate  # noqa: E402
from hf_dgate.hub import export_to_dir, push_folder  # noqa: E402

warnings.simplefilter("ignore")
T.logging.set_verbosity_error()

results = []


def case(name):
    def deco(fn):
        d = pathlib.Path(tempfile.mkdtemp())
        try:
            verdict = fn(d)
        except Exception as e:
            verdict = f"UNEXPECTED {type(e).__name__}: {str(e)[:160]}"
        results.append((name, verdict))
        print(f"{verdict[:14]:14s} {name}: {verdict[14:][:200] if len(verdict) > 14 else ''}", flush=True)
        return fn

    return deco


def expect_error(fn, *words):
    try:
        fn()
    except BaseException as e:
        msg = str(e)
        ok = all(w in msg for w in words) and "\n" not in msg.strip()
        return ("held          " if ok else "unclear       ") + f"{type(e).__name__}: {msg[:150]}"
    return "NOT REFUSED   "


def gated(family="llama", targets=("heads", "neurons")):
    m = make_model(family)
    hf_dgate.apply_dgate(m, hf_dgate.DGateConfig(target=list(targets)))
    return m


# 1 foreign code
@case("auto_map nested in a sub-config dict and a prefix-lookalike module name")
def _(d):
    m = gated()
    m.config.auto_map = {"AutoModel": "modeling_dgate_pruned_evil.X", "AutoConfig": "modeling_dgate_pruned.Y--x"}
    m.config.extra_cfg = {"auto_map": {"AutoModel": "a/b--c.D"}, "custom_pipelines": {"p": 1}}
    t._kill(hf_dgate.get_bank(m), "heads", 0, [1])
    export_to_dir(m, d / "o", measure=False)
    text = (d / "o" / "config.json").read_text()
    bad = [w for w in ("evil", "a/b--c", "custom_pipelines", "--x") if w in text]
    return "held          " if not bad else f"FAILED        found {bad}"


@case("tokenizer_config.json with a foreign auto_map planted in an export, then push")
def _(d):
    m = gated()
    export_to_dir(m, d / "o", measure=False)
    (d / "o" / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x/y--tok.T", None]}}))
    import huggingface_hub

    huggingface_hub.HfApi.create_repo = lambda *a, **k: (_ for _ in ()).throw(AssertionError("hub contacted"))
    return expect_error(lambda: push_folder(d / "o", "me/ok"), "carries code")


@case("save_gated of a model whose config has auto_map and custom_pipelines nested")
def _(d):
    m = gated()
    m.config.auto_map = {"AutoModel": "x/y--m.M"}
    hf_dgate.save_gated(m, d / "g")
    text = "".join(p.read_text() for p in (d / "g").glob("*.json"))
    return "held          " if "x/y--m" not in text else "FAILED        auto_map kept"


# 2 loads
def saved(d, m=None):
    m = m or gated()
    hf_dgate.save_gated(m, d / "g")
    return m


def rewrite(d, fn):
    p = d / "g" / "model.safetensors"
    s = load_file(p)
    fn(s)
    save_file(s, p, metadata={"format": "pt"})


@case("a gate tensor deleted from a gated save")
def _(d):
    saved(d)
    rewrite(d, lambda s: s.pop(next(k for k in s if k.startswith("dgate.gammas"))))
    return expect_error(lambda: hf_dgate.load_gated(d / "g"), "gates")


@case("an extra dgate.* tensor in a gated save")
def _(d):
    saved(d)
    rewrite(d, lambda s: s.__setitem__("dgate.gammas.bogus", torch.ones(2, 3)))
    return expect_error(lambda: hf_dgate.load_gated(d / "g"), "bogus")


@case("a weight renamed in a gated save")
def _(d):
    saved(d)
    rewrite(d, lambda s: s.__setitem__("model.norm.weight_x", s.pop("model.norm.weight")))
    return expect_error(lambda: hf_dgate.load_gated(d / "g"), "model.norm.weight")


@case("GPT-2 save (tied lm_head) round trip, then its wte deleted")
def _(d):
    m = saved(d, gated("gpt2"))
    back = hf_dgate.load_gated(d / "g")
    x = make_inputs("gpt2")
    if not torch.equal(back(**x).logits, m(**x).logits):
        return "FAILED        round trip differs"
    rewrite(d, lambda s: s.pop("transformer.wte.weight"))
    return expect_error(lambda: hf_dgate.load_gated(d / "g"), "wte")


@case("PEFT save with one lora_B tensor deleted")
def _(d):
    m = t._lora_gated()
    hf_dgate.save_gated(m, d / "g")
    rewrite(d, lambda s: s.pop(next(k for k in s if "lora_B" in k)))
    return expect_error(lambda: hf_dgate.load_gated(d / "g"), "lora_B")


@case("PEFT save with two adapters, the second active")
def _(d):
    import peft

    m = make_model("llama")
    m = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    m.add_adapter("two", peft.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    m.set_adapter("two")
    hf_dgate.apply_dgate(m, hf_dgate.DGateConfig(target="heads"))
    hf_dgate.save_gated(m, d / "g")
    back = hf_dgate.load_gated(d / "g")
    x = make_inputs("llama")
    same = torch.equal(back(**x).logits, m(**x).logits) and back.active_adapter == "two"
    return "held          " if same else "FAILED        outputs or active adapter differ"


# 3 atomic save
@case("save_gated killed by KeyboardInterrupt while writing the weights")
def _(d):
    import transformers.modeling_utils as mu

    old = saved(d)
    orig = mu.PreTrainedModel.save_pretrained

    def boom(self, *a, **k):
        orig(self, *a, **k)
        raise KeyboardInterrupt

    mu.PreTrainedModel.save_pretrained = boom
    try:
        try:
            hf_dgate.save_gated(gated(), d / "g")
        except KeyboardInterrupt:
            pass
    finally:
        mu.PreTrainedModel.save_pretrained = orig
    x = make_inputs("llama")
    ok = torch.equal(hf_dgate.load_gated(d / "g")(**x).logits, old(**x).logits)
    left = [n for n in os.listdir(d) if n != "g"]
    return "held          " if ok and not left else f"FAILED        ok={ok} left={left}"


@case("save_gated into a path that is a file")
def _(d):
    (d / "f").write_text("x")
    return expect_error(lambda: hf_dgate.save_gated(gated(), d / "f"), "is a file")


@case("save_gated through a symlink to a previous save")
def _(d):
    saved(d)
    os.symlink(d / "g", d / "link")
    m = gated()
    hf_dgate.save_gated(m, d / "link")
    x = make_inputs("llama")
    ok = os.path.islink(d / "link") and torch.equal(hf_dgate.load_gated(d / "g")(**x).logits, m(**x).logits)
    return "held          " if ok else "FAILED        link replaced or contents wrong"


# 4 half precision
@case("bf16 ViT (pixel inputs) with exactly zero heads removed")
def _(d):
    m = make_model("vit")
    hf_dgate.apply_dgate(m, hf_dgate.DGateConfig(target="heads"))
    t._kill(hf_dgate.get_bank(m), "heads", 0, [1])
    m = m.to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    v = hf_dgate.export_pruned(m).dgate_verification
    same = all(torch.equal(v2, before[k]) and v2.dtype == before[k].dtype for k, v2 in m.state_dict().items())
    return "held          " if v.exact and v.compared_in == "float32" and same else f"FAILED        {v}"


@case("fp16 model with removed heads at norm 1e-3 of the largest (not zero)")
def _(d):
    m = gated()
    b = hf_dgate.get_bank(m)
    with torch.no_grad():
        b.gammas["heads"][:, 1] = 1e-3
    m = m.half()
    return expect_error(lambda: hf_dgate.export_pruned(m, threshold=0.05), "not zero")


# 5 re-gating
@case("GPT-NeoX (interleaved qkv) export with 3 and 2 heads, re-gated and re-exported")
def _(d):
    m = gated("gpt_neox", ("heads",))
    b = hf_dgate.get_bank(m)
    t._kill(b, "heads", 0, [0])
    t._kill(b, "heads", 1, [0, 1])
    export_to_dir(m, d / "a", measure=False)
    p = hf_dgate.AutoPrunedModel.from_pretrained(d / "a")
    hf_dgate.apply_dgate(p, hf_dgate.DGateConfig(target="heads"))
    b = hf_dgate.get_bank(p)
    counts = [gs.n_groups for gs in b.group_sets]
    t._kill(b, "heads", 0, [2])
    x = make_inputs("gpt_neox")
    ref = p(**x).logits
    s = export_to_dir(p, d / "b", measure=False)
    back = hf_dgate.AutoPrunedModel.from_pretrained(d / "b")
    ok = counts == [3, 2] and s["verification"]["exact"] and torch.allclose(back(**x).logits, ref, atol=1e-5)
    return "held          " if ok else f"FAILED        counts={counts}"


@case("Qwen3 (explicit head_dim) export re-gated")
def _(d):
    m = gated("qwen3", ("heads",))
    t._kill(hf_dgate.get_bank(m), "heads", 0, [1])
    export_to_dir(m, d / "a", measure=False)
    p = hf_dgate.AutoPrunedModel.from_pretrained(d / "a")
    hf_dgate.apply_dgate(p, hf_dgate.DGateConfig(target="heads"))
    counts = [gs.n_groups for gs in hf_dgate.get_bank(p).group_sets]
    return "held          " if counts == [1, 2] else f"FAILED        counts={counts}"


@case("re-gating heads of an export with a layer left without heads")
def _(d):
    m = gated("llama", ("heads",))
    t._kill(hf_dgate.get_bank(m), "heads", 0, [0, 1])
    export_to_dir(m, d / "a", measure=False)
    p = hf_dgate.AutoPrunedModel.from_pretrained(d / "a")
    return expect_error(lambda: hf_dgate.apply_dgate(p, hf_dgate.DGateConfig(target="heads")), "none left")


@case("BART (multi-stack) export re-gated on heads")
def _(d):
    from families import build

    m, kind, _ = build("bart")
    hf_dgate.apply_dgate(m, hf_dgate.DGateConfig(target="heads"))
    b = hf_dgate.get_bank(m)
    t._kill(b, "heads", 0, [1])
    export_to_dir(m, d / "a", measure=False)
    p = hf_dgate.AutoPrunedModel.from_pretrained(d / "a")
    hf_dgate.apply_dgate(p, hf_dgate.DGateConfig(target="heads"))
    counts = [gs.n_groups for gs in hf_dgate.get_bank(p).group_sets]
    return "held          " + str(counts) if min(counts) > 0 else f"FAILED        {counts}"


# 6 resume
@case("resume with changed module_names / target order / threshold")
def _(d):
    t._run(d)
    out = []
    cfg = hf_dgate.DGateConfig(target=["neurons", "heads"], lam=0.01)
    out.append(expect_error(lambda: t._run(d, steps=3, resume=True, config=cfg), "target"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t._run(
            d, steps=3, resume=True, config=hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.01, threshold=0.01)
        )
    out.append("held" if any("threshold=0.01" in str(x.message) for x in w) else "FAILED no warning")
    return ("held          " if all(o.startswith("held") for o in out) else "FAILED        ") + " / ".join(
        o[:60] for o in out
    )


@case("resume_from_checkpoint=<explicit incomplete checkpoint>")
def _(d):
    t._run(d)
    os.remove(d / "run" / "checkpoint-2" / "trainer_state.json")
    return expect_error(
        lambda: t._run(d, steps=3, resume=str(d / "run" / "checkpoint-2")), "Cannot resume", "trainer_state"
    )


# 7 combinations
@case("OneCycleLR created before dgate_optimizer")
def _(d):
    from hf_dgate.optim import dgate_optimizer

    m = gated()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10)
    return expect_error(lambda: dgate_optimizer(o, m), "scheduler")


@case("target='features' on an MLP whose first layer is a LayerNorm")
def _(d):
    net = torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))
    return expect_error(lambda: hf_dgate.apply_dgate(net, hf_dgate.DGateConfig(target="features")), "LayerNorm")


@case("merge_and_unload on a gated PEFT model with DoRA on q only")
def _(d):
    import peft

    m = make_model("llama")
    m = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    hf_dgate.apply_dgate(m, hf_dgate.DGateConfig(target="heads"))
    t._kill(hf_dgate.get_bank(m), "heads", 0, [1])
    x = make_inputs("llama")
    ref = m(**x).logits
    merged = m.merge_and_unload()
    ok = torch.allclose(merged(**x).logits, ref, atol=1e-5) and hf_dgate.export_pruned(merged).dgate_verification.exact
    return "held          " if ok else "FAILED        outputs changed"


# 8 errors
@case("nested JSON in dgate_manifest.json")
def _(d):
    saved(d)
    (d / "g" / "dgate_manifest.json").write_text("[" * 50000 + "]" * 50000)
    return expect_error(lambda: hf_dgate.load_gated(d / "g"), "dgate_manifest.json")


@case("push with HTTP 401 (bad token)")
def _(d):
    import huggingface_hub

    def denied(*a, **k):
        raise PermissionError("401 Unauthorized")

    huggingface_hub.HfApi.create_repo = denied
    return expect_error(
        lambda: export_to_dir(gated(), d / "o", measure=False, push_to_hub=True, hub_model_id="me/x"),
        "complete on disk",
    )


@case("Ctrl-C during the pruning step of hf-dgate export")
def _(d):
    import hf_dgate.hub as hub
    from hf_dgate.cli import main

    saved(d)
    orig = hub.export_checked

    def boom(*a, **k):
        raise KeyboardInterrupt

    hub.export_checked = boom
    try:
        rc = main(["export", str(d / "g"), "--out", str(d / "o"), "--no-measure"])
    finally:
        hub.export_checked = orig
    return "held          " if rc == 130 and not (d / "o").exists() else f"FAILED        rc={rc}"


held = sum(v.startswith("held") for _, v in results)
print(f"\n{len(results)} cases: {held} held, {len(results) - held} not")
for n, v in results:
    if not v.startswith("held"):
        print(" -", n, "=>", v[:220])
