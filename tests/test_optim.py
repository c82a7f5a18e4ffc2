"""hf_dgate.optim: gates and gated weights get a momentum-SGD step inside any optimizer (issue 13)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import hf_dgate
from hf_dgate.models import LeNet300100
from hf_dgate.optim import dgate_optimizer, gated_parameters


def _gated_lenet(lam=0.1, in_features=20):
    torch.manual_seed(0)
    model = LeNet300100(in_features=in_features, num_classes=3, hidden=(16, 8))
    return hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="features", lam=lam, depth=3))


def _train(model, opt, steps=300, batch=32):
    """Mini-batches of a problem where only the first five of 20 features carry signal."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (512,), generator=g)
    x = torch.randn(512, 20, generator=g)
    x[:, :5] += y.unsqueeze(1).float()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        idx = torch.randint(0, 512, (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx]) + hf_dgate.penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return hf_dgate.effective_norms(model, "features").detach()


def test_groups_cover_every_parameter_once():
    model = _gated_lenet()
    gated = gated_parameters(model)
    bank = hf_dgate.get_bank(model)
    assert {id(p) for p in gated} == {id(bank.gammas["features"]), id(model.fc1.weight)}
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    assert dgate_optimizer(opt, model, lr=0.05) is opt
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    (mine,) = [g for g in opt.param_groups if g.get("dgate")]
    assert [id(p) for p in mine["params"]] == [id(p) for p in gated]
    assert mine["lr"] == 0.05 and mine["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="twice"):
        dgate_optimizer(opt, model, lr=0.05)


def test_adam_reaches_exact_zeros_only_with_the_recipe():
    plain = _gated_lenet()
    norms_plain = _train(plain, torch.optim.Adam(plain.parameters(), lr=3e-3))
    model = _gated_lenet()
    norms = _train(model, dgate_optimizer(torch.optim.Adam(model.parameters(), lr=3e-3), model, lr=0.1))
    thr = hf_dgate.get_bank(model).config.threshold
    assert (norms_plain[5:] > thr).all()  # plain Adam: no useless feature reaches the threshold
    assert (norms[5:] < thr).all() and (norms[5:] < 1e-6).all()  # the recipe: every useless feature exactly off
    assert (norms[:5] > 0.05).all()  # and the useful ones stay


def test_state_dict_round_trip_and_scheduler():
    model = _gated_lenet()
    opt = dgate_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, lr=0.05)
    _train(model, opt, steps=3)
    (mine,) = [g for g in opt.param_groups if g.get("dgate")]
    assert mine["initial_lr"] == 0.05 and mine["lr"] == 0.0  # the scheduler drives the gated group too (1 - 3/3)
    state = opt.state_dict()
    other = _gated_lenet()
    opt2 = dgate_optimizer(torch.optim.Adam(other.parameters(), lr=1e-3), other, lr=0.05)
    opt2.load_state_dict(state)
    assert len(opt2.dgate_momentum_buffers) == 2  # the gates and fc1.weight
    buf = opt2.dgate_momentum_buffers[other.fc1.weight]
    torch.testing.assert_close(buf, opt.dgate_momentum_buffers[model.fc1.weight])
    fresh = _gated_lenet()
    adam = torch.optim.Adam(fresh.parameters())
    _train(fresh, adam, steps=1)
    with pytest.raises(ValueError, match="before the optimizer's first step"):
        dgate_optimizer(adam, fresh, lr=0.05)


def test_refuses_an_ungated_model():
    model = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8))
    with pytest.raises(ValueError, match="not gated.*apply_dgate"):
        dgate_optimizer(torch.optim.Adam(model.parameters()), model, lr=0.05)


def test_gates_only_variant_moves_only_the_gates():
    model = _gated_lenet()
    opt = dgate_optimizer(torch.optim.Adam(model.parameters(), lr=3e-3), model, lr=0.05, include_weights=False)
    (mine,) = [g for g in opt.param_groups if g.get("dgate")]
    assert [id(p) for p in mine["params"]] == [id(hf_dgate.get_bank(model).gammas["features"])]  # weights stay Adam's
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_trainer_uses_the_recipe_by_default(tmp_path):
    """DGateTrainer's default AdamW gets the recipe's group for module targets only (transformer block targets'
    gates stay on AdamW: on SGD they make NanoGPT's lam sweep a cliff); gated_lr=None turns it off; SGD keeps its
    own update under 'auto'; an explicit rate is used as given, for block targets too, and so is 'auto' with a
    budget (target_params sets the sparsity there, and was measured with the group)."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from hf_dgate.optim import BLOCK_TARGET_LR, MODULE_TARGET_LR
    from hf_dgate.trainer import DGateTrainer

    def dgate_groups(trainer):
        return [g for g in trainer.create_optimizer().param_groups if g.get("dgate")]

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3)
    model = _gated_lenet()
    (mine,) = dgate_groups(DGateTrainer(model, args))  # features: gates + gated weights at the SGD rate
    assert mine["lr"] == MODULE_TARGET_LR
    assert [id(p) for p in mine["params"]] == [id(p) for p in gated_parameters(model)]

    def gpt2(**config):
        gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
        return gpt, hf_dgate.DGateConfig(target="heads", **config)

    gpt, cfg = gpt2()
    trainer = DGateTrainer(gpt, args, dgate_config=cfg)
    assert not dgate_groups(trainer)  # heads alone: gates and weights all stay on AdamW (no weight decay on them)
    heads = id(hf_dgate.get_bank(gpt).gammas["heads"])
    assert any(heads in {id(p) for p in g["params"]} and g["weight_decay"] == 0 for g in trainer.optimizer.param_groups)
    for kwargs in ({"gated_lr": BLOCK_TARGET_LR}, {"target_params": 0.9}):  # a rate, or a budget under "auto"
        gpt, cfg = gpt2()
        (mine,) = dgate_groups(DGateTrainer(gpt, args, dgate_config=cfg, **kwargs))
        bank = hf_dgate.get_bank(gpt)  # heads with a rate: the gates only (c_attn keeps AdamW)
        assert mine["lr"] == BLOCK_TARGET_LR and [id(p) for p in mine["params"]] == [id(bank.gammas["heads"])]
    gpt, cfg = gpt2(groups=[hf_dgate.GroupRule("cols", r"^lm_head$", kind="in", size=4)])
    (mine,) = dgate_groups(DGateTrainer(gpt, args, dgate_config=cfg))  # heads + a module target: the module's only
    bank = hf_dgate.get_bank(gpt)
    assert mine["lr"] == MODULE_TARGET_LR
    assert [id(p) for p in mine["params"]] == [id(p) for p in (gpt.lm_head.weight, bank.gammas["cols"])]
    (mine,) = dgate_groups(DGateTrainer(_gated_lenet(), args, gated_lr=0.1, gated_weights=False))
    assert mine["lr"] == 0.1 and len(mine["params"]) == 1
    assert not dgate_groups(DGateTrainer(_gated_lenet(), args, gated_lr=None))
    sgd = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", optim="sgd")
    assert not dgate_groups(DGateTrainer(_gated_lenet(), sgd))
    for bad in (-1.0, "fast", True):
        with pytest.raises(ValueError, match="gated_lr"):
            DGateTrainer(_gated_lenet(), args, gated_lr=bad)


def test_bad_arguments_are_refused_before_anything_moves():
    model = _gated_lenet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    groups = [list(g["params"]) for g in opt.param_groups]
    for kwargs, match in (
        ({"lr": "0.1"}, "lr="),
        ({"lr": -1.0}, "lr="),
        ({"momentum": 1.0}, "momentum="),
        ({"momentum": True}, "momentum="),
        ({"include_weights": "yes"}, "include_weights="),
        ({"block_gates": None}, "block_gates="),
    ):
        with pytest.raises(ValueError, match=match):
            dgate_optimizer(opt, model, **kwargs)
    assert [list(g["params"]) for g in opt.param_groups] == groups  # the optimizer is left as it was


def test_trainer_warns_when_given_an_adam_without_the_recipe(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from hf_dgate.trainer import DGateTrainer

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    model = _gated_lenet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="dgate_optimizer"):
        DGateTrainer(model, args, optimizers=(opt, None)).create_optimizer()
    model = _gated_lenet()
    opt = dgate_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DGateTrainer(model, args, optimizers=(opt, None)).create_optimizer() is opt
        # heads alone: "auto" would not give them the group either, so a plain Adam is what the default does
        gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8))
        gpt = hf_dgate.apply_dgate(gpt, hf_dgate.DGateConfig(target="heads"))
        opt = torch.optim.Adam(gpt.parameters(), lr=1e-3)
        assert DGateTrainer(gpt, args, optimizers=(opt, None)).create_optimizer() is opt


def test_trainer_gives_l0_gates_their_own_rate(tmp_path):
    from transformers import TrainingArguments

    from hf_dgate.optim import L0_LR
    from hf_dgate.trainer import DGateTrainer

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3)
    torch.manual_seed(0)
    model = LeNet300100(in_features=20, num_classes=3, hidden=(16, 8))
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="features", method="l0", lam=0.1))
    opt = DGateTrainer(model, args).create_optimizer()
    (mine,) = [g for g in opt.param_groups if g.get("dgate_l0")]
    assert mine["lr"] == L0_LR and mine["weight_decay"] == 0.0
    assert {id(p) for p in mine["params"]} == {id(p) for p in hf_dgate.get_bank(model).parameters() if p.requires_grad}


def test_a_checkpoint_of_the_earlier_auto_resumes_with_its_rate_and_is_refused_under_auto(tmp_path):
    """Before block targets' gates stayed on the Trainer's optimizer, gated_lr='auto' put them in the SGD group at
    0.2: such a checkpoint (no 'auto_layout' in its setup) is refused under today's 'auto' with the rate that
    restores its layout, and resumes with that rate."""
    import json
    import os

    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from hf_dgate.optim import BLOCK_TARGET_LR
    from hf_dgate.trainer import DGateTrainer

    data = [{"input_ids": torch.randint(0, 20, (8,)), "labels": torch.randint(0, 20, (8,))} for _ in range(32)]

    def trainer(gated_lr):
        torch.manual_seed(0)
        gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8))
        args = TrainingArguments(str(tmp_path), max_steps=4, save_strategy="steps", save_steps=2, report_to=[],
                                 use_cpu=True, disable_tqdm=True, per_device_train_batch_size=8)  # fmt: skip
        cfg = hf_dgate.DGateConfig(target="heads")
        return DGateTrainer(gpt, args, dgate_config=cfg, gated_lr=gated_lr, train_dataset=data)

    trainer(BLOCK_TARGET_LR).train()  # the old "auto" layout, then recorded as the old "auto" did
    path = os.path.join(tmp_path, "checkpoint-2", "dgate_trainer_state.json")
    with open(path) as f:
        state = json.load(f)
    assert state["setup"]["optimizer"].pop("auto_layout") == 2
    state["setup"]["optimizer"]["gated_lr"] = "auto"
    with open(path, "w") as f:
        json.dump(state, f)
    ckpt = os.path.join(tmp_path, "checkpoint-2")
    with pytest.raises(ValueError, match=f"earlier hf_dgate.*gated_lr={BLOCK_TARGET_LR}"):
        trainer("auto").train(resume_from_checkpoint=ckpt)
    resumed = trainer(BLOCK_TARGET_LR)
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.state.global_step == 4
