"""Compressing to a budget: group prices, the parameter budget, the finish that makes zeros exact, with_dgate."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_dgate
from hf_dgate.budget import ParamBudget, budget_cut, cost_weights, group_costs, params_after
from hf_dgate.optim import BLOCK_TARGET_LR
from hf_dgate.trainer import DGateTrainer, with_dgate

V, T = 32, 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=T,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def copy_data(n: int = 128, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """A task that needs attention (the second half copies the first)."""
    x = torch.randint(0, V, (n, T // 2), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in torch.cat([x, x], 1)]


def targs(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_steps=40,
    )
    base.update(kw)
    return TrainingArguments(**base)


def gated(target=("heads", "neurons"), lam=1e-3):
    model = tiny_llama()
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=list(target), lam=lam))
    return model


def test_group_costs_are_what_the_export_count_loses():
    """A group's price is exactly what the report's (and so the export's) count loses when it alone is removed."""
    model = gated(("heads", "neurons", "layers"))
    bank = hf_dgate.get_bank(model)
    costs = group_costs(bank)
    total, kept_all = params_after(bank, {t: torch.zeros(n, dtype=torch.bool) for t, n in bank.sizes.items()})
    assert kept_all == total
    for t, n in bank.sizes.items():
        for g in {0, n // 2, n - 1}:
            dead = {u: torch.zeros(m, dtype=torch.bool) for u, m in bank.sizes.items()}
            dead[t][g] = True
            assert total - params_after(bank, dead)[1] == int(costs[t][g]), (t, g)
    # a kv group of this Llama: k, v rows (2 x 8 x 32) + its 2 query heads' q rows and o columns (4 x 8 x 32)
    assert int(costs["heads"][0]) == 6 * 8 * 32
    assert int(costs["neurons"][0]) == 3 * 32  # gate and up rows, down column
    flops = group_costs(bank, "flops")
    assert float(flops["neurons"][0]) == 2 * 3 * 32
    assert float(flops["heads"][0]) > 2 * float(costs["heads"][0])  # attention scores on top
    w = cost_weights(costs)
    allc = torch.cat(list(w.values()))
    assert allc.mean().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), True, "half"])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="target_params"):
        ParamBudget(bad)


def test_budget_fraction_and_count_and_an_unreachable_budget(tmp_path):
    assert ParamBudget(0.5).resolve(1000) == 500
    assert ParamBudget(300).resolve(1000) == 300
    with pytest.raises(ValueError, match="above the model"):
        ParamBudget(2000).resolve(1000)
    model = gated()
    with pytest.raises(ValueError, match="still leaves"):  # embeddings and lm_head stay: 0.05 cannot be met
        DGateTrainer(model, targs(tmp_path), target_params=0.05, train_dataset=copy_data(16))
    with pytest.raises(ValueError, match="not both"):
        DGateTrainer(gated(), targs(tmp_path), target_params=0.5, target_sparsity=0.5, train_dataset=copy_data(16))
    with pytest.raises(ValueError, match="finish_steps"):
        DGateTrainer(gated(), targs(tmp_path), finish_steps=-1, train_dataset=copy_data(16))


def test_budget_cut_meets_the_budget_exactly_by_the_reports_count():
    model = gated()
    bank = hf_dgate.get_bank(model)
    total, _ = params_after(bank, {t: torch.zeros(n, dtype=torch.bool) for t, n in bank.sizes.items()})
    for frac in (0.9, 0.7, 0.5):
        budget = int(frac * total)
        dead, kept = budget_cut(bank, budget)
        assert kept == params_after(bank, dead)[1] <= budget
        # minimal: undoing the last group cut would exceed the budget by less than the dearest group
        assert budget - kept < max(float(c.max()) for c in group_costs(bank).values())


@pytest.mark.parametrize("target_params", [0.6, 12000])
def test_a_budgeted_run_exports_that_many_parameters_exactly(tmp_path, target_params):
    """The default path of compressing to a budget: the export keeps the budget (within 2% of the total, counted by
    the export itself), removes only exact zeros (no allow_inexact) and its card says the finish ran."""
    model = gated()
    tr = DGateTrainer(model, targs(tmp_path / "run"), target_params=target_params, train_dataset=copy_data(),
                      eval_dataset=copy_data(32, seed=2))  # fmt: skip
    tr.train()
    rec = tr.dgate_finish
    assert rec is not None and rec.steps == 28 and rec.start_step == 12  # "auto" (gradual): cut in the first 30%
    assert rec.gradual_from == 10 and sum(rec.gradual_cut.values()) > 0  # cut a few at a time before the finish
    assert rec.loss_before is not None and rec.loss_after is not None
    bank = tr.dgate_bank
    for t in bank.targets:  # every group the export removes is exactly zero
        zero = bank.zero_groups(t)
        assert bool((bank.scale(t)[zero] == 0).all())
        assert int(bank.grey_groups(t).sum()) == 0
    summary = tr.export_pruned(str(tmp_path / "pruned"))
    total = summary["params_before"]
    assert summary["params_after"] == rec.params_kept
    assert abs(summary["params_after"] - tr.dgate_budget) <= 0.02 * total
    assert summary["params_after"] <= tr.dgate_budget
    assert summary["verification"]["exact"] and summary["max_abs_diff"] < 1e-5
    card = open(os.path.join(summary["path"], "README.md")).read()
    assert "## Compression run" in card and "set to exactly zero" in card and "budget" in card
    with open(os.path.join(tmp_path / "run", "dgate_sparsity.json")) as f:
        saved = json.load(f)
    assert saved["finish"]["zeroed"] == rec.zeroed and saved["params_budget"] == tr.dgate_budget


def test_gradual_budget_falls_on_a_cubic_from_the_whole_model_to_the_budget():
    from hf_dgate.budget import gradual_budget

    got = [gradual_budget(1000, 400, p / 10) for p in range(11)]
    assert got[0] == 1000 and got[-1] == 400 and gradual_budget(1000, 400, 2.0) == 400
    assert all(a >= b for a, b in zip(got, got[1:]))
    assert got[0] - got[1] > got[-2] - got[-1]  # fastest first, slowest near the budget


def test_the_gradual_schedule_cuts_a_few_groups_at_a_time_and_holds_them(tmp_path):
    """The default budget_schedule: lam stays as given, the kept parameters fall step by step toward the budget
    before the finish (groups cut once are exactly zero at every later step), then the finish only recovers."""
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            bank = tr.dgate_bank
            seen.append((state.global_step, {t: (bank.scale(t) == 0).clone() for t in bank.targets}))

    tr = DGateTrainer(gated(), targs(tmp_path, max_steps=60), target_params=0.6, controller_interval=5,
                      train_dataset=copy_data(), callbacks=[Watch()])  # fmt: skip
    tr.train()
    rec, bank = tr.dgate_finish, tr.dgate_bank
    assert tr.lam_controller.lam == bank.config.lam  # not steered
    assert rec.start_step == 18 and rec.gradual_from == 5 and "a few at a time" in rec.describe()
    kept = [params_after(bank, z)[1] for _, z in seen]  # seen[i]: after step i + 1, before this step's cut
    assert len(set(kept[:18])) >= 4  # several cuts (after steps 5, 10, 15), not one
    assert all(a >= b for a, b in zip(kept, kept[1:]))  # nothing comes back
    for (_, z0), (_, z1) in zip(seen, seen[1:]):
        assert all(bool((z1[t] | ~z0[t]).all()) for t in z0)  # a zero group stays exactly zero
    assert kept[0] > kept[17] >= tr.dgate_budget >= kept[18] and rec.params_kept <= tr.dgate_budget
    with pytest.raises(ValueError, match="budget_schedule"):
        DGateTrainer(gated(), targs(tmp_path), target_params=0.6, budget_schedule="fast", train_dataset=copy_data(8))


def test_the_saliency_ranking_averages_the_gates_own_gradients_and_cuts_the_cheapest_loss(tmp_path):
    """budget_ranking="saliency" (default): before every optimizer step of the cut, (gamma_1 dL/dgamma_1)^2 =
    (s_g dL/ds_g)^2 joins an exponential average (bias-corrected), and the cut removes the groups with the smallest
    average per unit of cost, compared across targets without the per-target median."""
    from hf_dgate.budget import SALIENCY_DECAY

    want: dict = {}

    class Watch(TrainerCallback):  # runs before the trainer's own callback (added last)
        def on_pre_optimizer_step(self, args, state, control, **kw):
            if tr._dgate_zero_masks is not None:
                return
            for t, gam in tr.dgate_bank.gammas.items():
                x = (gam[0] * gam.grad[0]).detach().pow(2)
                want[t] = SALIENCY_DECAY * want.get(t, torch.zeros_like(x)) + (1 - SALIENCY_DECAY) * x

    tr = DGateTrainer(gated(), targs(tmp_path, max_steps=20), target_params=0.6, controller_interval=5,
                      train_dataset=copy_data(), callbacks=[Watch()])  # fmt: skip
    tr.train()
    assert tr._dgate_saliency_steps == 6  # the cut phase: steps 1-6, the finish from step 6 on
    for t in want:
        assert torch.allclose(tr._dgate_saliency[t], want[t], rtol=1e-5, atol=1e-12)
    assert tr.dgate_finish.ranking == "saliency" and "estimated loss change" in tr.dgate_finish.describe()

    # the cut follows the saliency per cost, not the norms: plant scores that reverse the norm order of the neurons
    tr2 = DGateTrainer(gated(), targs(tmp_path), target_params=0.9, train_dataset=copy_data(8))
    bank = tr2.dgate_bank
    norms = bank.effective_norms("neurons").detach()
    tr2._dgate_saliency = {"heads": torch.full((bank.sizes["heads"],), 1e9), "neurons": 1.0 / norms}
    tr2._dgate_saliency_steps = 50
    masks, kept = tr2._dgate_budget_cut(tr2.dgate_budget)
    assert kept <= tr2.dgate_budget and int(masks["heads"].sum()) == 0
    n = int(masks["neurons"].sum())
    assert n > 0 and set(masks["neurons"].nonzero().flatten().tolist()) == set(norms.argsort()[-n:].tolist())
    norm_masks, _ = budget_cut(bank, tr2.dgate_budget)
    assert not torch.equal(norm_masks["neurons"], masks["neurons"])


def test_the_norm_ranking_is_kept_as_an_option_and_named_in_the_record(tmp_path):
    tr = DGateTrainer(gated(), targs(tmp_path, max_steps=20), target_params=0.6, controller_interval=5,
                      budget_ranking="norm", train_dataset=copy_data())  # fmt: skip
    tr.train()
    rec = tr.dgate_finish
    assert tr._dgate_saliency is None and rec.ranking == "norm" and "D-Gating's norms" in rec.describe()
    assert rec.params_kept <= tr.dgate_budget
    with pytest.raises(ValueError, match="budget_ranking='taylor' is invalid"):
        DGateTrainer(gated(), targs(tmp_path), target_params=0.6, budget_ranking="taylor", train_dataset=copy_data(8))


def test_a_run_resumed_during_the_gradual_cut_holds_what_the_checkpoint_held(tmp_path):
    kw = dict(max_steps=40, save_strategy="steps", save_steps=10)

    def run():
        return DGateTrainer(gated(), targs(tmp_path, **kw), target_params=0.6, controller_interval=5,
                            train_dataset=copy_data())  # fmt: skip

    run().train()
    ckpt = hf_dgate.load_gated(str(tmp_path / "checkpoint-10"))
    held = {t: (hf_dgate.get_bank(ckpt).scale(t) == 0) for t in hf_dgate.get_bank(ckpt).targets}
    assert any(bool(m.any()) for m in held.values())  # the cut had begun at the checkpoint (finish at step 12)
    tr = run()
    tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    rec = tr.dgate_finish
    assert rec.start_step == 12 and rec.gradual_from == 5
    for t, m in held.items():
        assert bool((tr.dgate_bank.scale(t)[m] == 0).all())
    assert rec.params_kept <= tr.dgate_budget


def test_the_steered_schedule_keeps_the_late_finish(tmp_path):
    tr = DGateTrainer(gated(), targs(tmp_path), target_params=0.6, budget_schedule="steered",
                      train_dataset=copy_data())  # fmt: skip
    tr.train()
    rec = tr.dgate_finish
    assert rec.steps == 4 and rec.start_step == 36 and rec.gradual_from is None  # the last tenth of 40 steps
    assert rec.params_kept <= tr.dgate_budget


def test_finish_without_a_budget_holds_zeros_exactly_and_lets_the_rest_train(tmp_path):
    model = gated(("neurons",), lam=0.3)
    # gates on momentum SGD: in 20 steps AdamW moves a gate only ~20 learning rates from 1 (no neuron would be zero)
    tr = DGateTrainer(
        model, targs(tmp_path, max_steps=30), finish_steps=10, gated_lr=BLOCK_TARGET_LR, train_dataset=copy_data()
    )
    tr.train()
    rec = tr.dgate_finish
    assert rec.start_step == 20 and rec.steps == 10 and rec.cut_by_budget == {"neurons": 0}
    bank = tr.dgate_bank
    z = bank.zero_groups("neurons")
    assert rec.zeroed["neurons"] > 0
    assert int(z.sum()) == rec.zeroed["neurons"] + rec.late_zeros.get("neurons", 0)
    assert bool((bank.scale("neurons")[z] == 0).all()) and int(bank.grey_groups("neurons").sum()) == 0
    logs = [h for h in tr.state.log_history if "dgate/finishing" in h]
    assert logs[-1]["dgate/finishing"] == 1.0 and logs[-1]["dgate/penalty"] == 0.0


def test_l0_gets_the_same_finish_and_an_exact_export(tmp_path):
    """L0's log_alpha held far negative: its test-time gate and every training sample are exactly 0, so the groups
    its finish removes stay removed while the rest trains, and the export needs no allow_inexact."""
    model = tiny_llama()
    cfg = hf_dgate.DGateConfig(target=["neurons"], method="l0", l0_target_sparsity=0.5, l0_droprate_init=0.5)
    hf_dgate.apply_dgate(model, cfg)
    tr = DGateTrainer(model, targs(tmp_path, max_steps=50), finish_steps=10, train_dataset=copy_data())
    tr.train()
    bank, rec = tr.dgate_bank, tr.dgate_finish
    assert rec.start_step == 40 and rec.zeroed["neurons"] > 0
    z = bank.zero_groups("neurons")
    assert bool((bank.scale("neurons")[z] == 0).all()) and int(bank.grey_groups("neurons").sum()) == 0
    bank.train()
    assert bool((bank.strategy.forward_scale(bank, "neurons")[bank.scale("neurons") == 0] == 0).all())
    bank.eval()
    assert tr.export_pruned(str(tmp_path / "p"))["verification"]["exact"]


def test_finish_resumes_from_a_checkpoint_holding_the_same_zeros(tmp_path):
    kw = dict(max_steps=30, save_strategy="steps", save_steps=25)

    def run():
        model = gated(("neurons",), lam=0.3)  # gates on SGD, so the finish has zeros to hold (above)
        return DGateTrainer(
            model, targs(tmp_path, **kw), finish_steps=10, gated_lr=BLOCK_TARGET_LR, train_dataset=copy_data()
        )

    tr = run()
    tr.train()
    tr2 = run()
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-25"))
    assert tr2.dgate_finish.start_step == 20 and tr2.dgate_finish.zeroed == tr.dgate_finish.zeroed
    z = tr2.dgate_bank.scale("neurons") == 0
    assert bool(z.any()) and torch.equal(z, tr.dgate_bank.scale("neurons") == 0)


def test_with_dgate_makes_one_class_per_trainer_class():
    assert with_dgate(Trainer) is DGateTrainer
    from transformers import Seq2SeqTrainer

    cls = with_dgate(Seq2SeqTrainer)
    assert cls is with_dgate(Seq2SeqTrainer) and issubclass(cls, Seq2SeqTrainer)
    assert cls.__name__ == "DGateSeq2SeqTrainer"
    assert with_dgate(cls) is cls
    with pytest.raises(TypeError, match="Trainer subclass"):
        with_dgate(dict)


def test_an_overshot_budget_is_said_at_the_end(tmp_path):
    """Zero groups do not come back: a lam so large that the penalty removes far more than the budget before the
    controller can react ends in a warning that says by how much and why, and the export is still exact."""
    tr = DGateTrainer(gated(("neurons",), lam=0.3), targs(tmp_path, max_steps=30), target_params=0.9,
                      train_dataset=copy_data())  # fmt: skip
    with pytest.warns(UserWarning, match=r"target_params missed: .* the penalty removed more.* needed a dear group"):
        tr.train()
    assert tr.dgate_finish.params_kept < tr.dgate_budget - 0.02 * tr.dgate_finish.params_total
    assert tr.export_pruned(str(tmp_path / "p"))["verification"]["exact"]


def _word_tokenizer():
    """A word-level tokenizer built in memory (no Hub): w0 .. w29, <pad>, <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V - 2)} | {"<pad>": V - 2, "<eos>": V - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def test_trl_sft_trainer_gets_the_budget_the_finish_and_an_exact_export(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    halves = [torch.randint(0, V - 2, (7,), generator=g).tolist() for _ in range(64)]
    ds = Dataset.from_dict({"text": [" ".join(f"w{i}" for i in h + h) for h in halves]})
    sft = with_dgate(trl.SFTTrainer)
    # bf16=False: SFTConfig defaults to bf16, and under transformers 4.57 that autocast state outlives the trainer
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=3e-3, report_to=[],
        use_cpu=True, logging_steps=5, save_strategy="no", disable_tqdm=True, max_length=T, bf16=False,
    )  # fmt: skip
    tr = sft(tiny_llama(), args=args, train_dataset=ds, processing_class=_word_tokenizer(),
             dgate_config=hf_dgate.DGateConfig(target="neurons", lam=0.3), target_params=0.7)  # fmt: skip
    assert isinstance(tr, trl.SFTTrainer)
    tr.train()
    assert any("dgate/penalty" in h for h in tr.state.log_history)
    rec = tr.dgate_finish
    assert rec.steps == 14 and rec.zeroed["neurons"] > 0 and rec.loss_before is not None  # 70% of 20 steps
    summary = tr.export_pruned(str(tmp_path / "pruned"))
    assert summary["verification"]["exact"] and abs(summary["params_after"] - tr.dgate_budget) <= 0.02 * 20640


def test_peft_lora_with_a_budget_trains_gates_and_adapters_and_exports_exactly(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.3))
    frozen = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    tr = DGateTrainer(model, targs(tmp_path, max_steps=30), target_params=0.7, train_dataset=copy_data())
    tr.train()
    assert torch.equal(base.model.layers[0].mlp.down_proj.weight, frozen)  # the base stays frozen
    assert tr.dgate_finish.steps == 21 and sum(tr.dgate_finish.zeroed.values()) > 0  # 70% of 30 steps
    summary = tr.export_pruned(str(tmp_path / "pruned"))  # adapters merged, then pruned
    assert summary["verification"]["exact"]
    assert abs(summary["params_after"] - tr.dgate_budget) <= 0.02 * summary["params_before"]


def test_teacher_distillation_adds_the_kl_once_and_leaves_the_teacher_alone(tmp_path):
    import copy

    student = tiny_llama()
    teacher = copy.deepcopy(student)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with pytest.raises(ValueError, match="separate, ungated"):
        DGateTrainer(student, targs(tmp_path), teacher=student, train_dataset=copy_data(16))
    with pytest.raises(ValueError, match="distill_temperature"):
        DGateTrainer(tiny_llama(), targs(tmp_path), teacher=teacher, distill_temperature=0, train_dataset=copy_data(16))
    cfg = hf_dgate.DGateConfig(target="neurons", lam=0.0)
    tr = DGateTrainer(student, targs(tmp_path, max_steps=3, logging_steps=1), teacher=teacher, distill_hidden=1.0,
                      dgate_config=cfg, train_dataset=copy_data(48))  # fmt: skip
    # the teacher is a copy of the student: at step 0 the KL is zero, the term adds nothing
    batch = {"input_ids": torch.stack([d["input_ids"] for d in copy_data(4)])}
    batch["labels"] = batch["input_ids"]
    student.train()
    total = tr.compute_loss(student, batch)
    plain = student(**batch).loss
    assert float(total) == pytest.approx(float(plain), abs=1e-5) and tr._dgate_last_kl == pytest.approx(0.0, abs=1e-6)
    tr.train()
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())  # never updated
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    logs = [h for h in tr.state.log_history if "dgate/distill_kl" in h]
    assert logs and logs[-1]["dgate/distill_kl"] > 0  # the student moved away from the teacher
    # the KL term by hand, on a student that differs from the teacher
    with torch.no_grad():
        s, t = student(**batch).logits, teacher(**batch).logits
    ls, lt = torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1)
    expect = 4 * (lt.exp() * (lt - ls)).sum(-1).mean()
    tr.dgate_distill_hidden = 0.0
    student.eval()
    with torch.no_grad():
        got = tr._dgate_distill_loss(batch, student(**batch))
    assert float(got) == pytest.approx(float(expect), rel=1e-4)


def test_a_peft_model_is_its_own_teacher_with_adapters_and_gates_off(tmp_path):
    """teacher="base": the shared forward computes exactly the model before gating and adapters (no copy of its
    weights), after training has moved the gates and adapters; the student's own forward is untouched by it."""
    import copy

    peft = pytest.importorskip("peft")
    base = tiny_llama()
    pristine = copy.deepcopy(base).eval()
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target=["heads", "neurons"], lam=0.3))
    with pytest.raises(ValueError, match="not a PEFT model"):
        DGateTrainer(tiny_llama(), targs(tmp_path), teacher="base", train_dataset=copy_data(16))
    with pytest.raises(ValueError, match="teacher='copy' is invalid"):
        DGateTrainer(model, targs(tmp_path), teacher="copy", train_dataset=copy_data(16))
    down = base.model.layers[0].mlp.down_proj.weight
    down.requires_grad_(True)
    with pytest.raises(ValueError, match="base weight.*train.*down_proj"):
        DGateTrainer(model, targs(tmp_path), teacher="base", train_dataset=copy_data(16))
    down.requires_grad_(False)
    tr = DGateTrainer(model, targs(tmp_path, max_steps=6, logging_steps=1, learning_rate=3e-2), teacher="base",
                      gated_lr=0.2, train_dataset=copy_data(48))  # fmt: skip
    tr.train()
    bank = tr.dgate_bank
    assert any(not torch.equal(bank.scale(t), torch.ones_like(bank.scale(t))) for t in bank.targets)  # gates moved
    batch = {"input_ids": torch.stack([d["input_ids"] for d in copy_data(4)])}
    with torch.no_grad():
        student = model(**batch).logits
        model.train()
        shared = tr._dgate_base_forward(batch).logits
        assert model.training  # its mode is restored
        again = model(**batch).logits  # dropout is 0 in the tiny config: train and eval forwards agree
        expect = pristine(**batch).logits
    assert torch.allclose(shared, expect, atol=1e-5) and not torch.allclose(student, expect, atol=1e-3)
    assert torch.equal(again, student)  # adapters and gates are back on
    logs = [h for h in tr.state.log_history if "dgate/distill_kl" in h]
    assert logs and logs[-1]["dgate/distill_kl"] > 0


def test_compress_cli_gates_trains_finishes_and_exports_to_the_budget(tmp_path, capsys):
    """`hf-dgate compress` on a saved tiny Llama + tokenizer and a text file: the export keeps the budget, is exact,
    and the summary table is printed."""
    from hf_dgate.cli import main

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    _word_tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(200):
        h = torch.randint(0, V - 2, (7,), generator=g).tolist()
        lines.append(" ".join(f"w{i}" for i in h + h))
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(lines))
    out = tmp_path / "small"
    rc = main([
        "compress", str(model_dir), "--budget", "0.7", "--data", str(data), "--steps", "20", "--out", str(out),
        "--seq-len", "16", "--lr", "3e-3", "--lam", "0.3", "--threads", "1", "--json",
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "validation loss" in text and "export exact" in text and "yes" in text
    summary = json.loads(text[text.rindex("\n{\n") :])
    assert summary["exact"] and abs(summary["params_after"] - summary["budget"]) <= 0.02 * summary["params_before"]
    assert "## Compression run" in (out / "README.md").read_text()
    # a bad --out is refused before any work, in one line
    rc = main(["compress", str(model_dir), "--budget", "0.5", "--data", str(data), "--steps", "4", "--out", str(out)])
    assert rc == 2


def test_the_finish_paragraph_counts_in_words():
    from hf_dgate.finish import FinishRecord

    rec = FinishRecord(start_step=3, steps=2, zeroed={"heads": 1, "neurons": 12, "layers": 0})
    assert "1 head, 12 neurons were set to exactly zero" in rec.describe()
