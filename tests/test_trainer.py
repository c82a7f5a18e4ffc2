"""DGateTrainer: penalty once per optimizer step, no double weight decay, logging, checkpoints, lam schedules."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import hf_dgate
from hf_dgate.controller import LamController
from hf_dgate.trainer import SPARSITY_NAME, DGateTrainer

VOCAB, BLOCK = 32, 16


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_head: int = 4, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def token_data(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x} for x in torch.randint(0, VOCAB, (n, BLOCK), generator=g)]


def targs(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        dataloader_drop_last=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def one_sgd_step(
    tmp_path, bs: int, ga: int, lam: float, accepts: bool | None, optim: str = "sgd"
) -> dict[str, torch.Tensor]:
    model = tiny_gpt2()
    args = targs(
        tmp_path / f"o{bs}_{ga}_{lam}_{optim}",
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=1,
        optim=optim,
        learning_rate=0.1,
        weight_decay=0.1,
    )
    cfg = hf_dgate.DGateConfig(target="heads", depth=3, lam=lam)
    tr = DGateTrainer(model, args, dgate_config=cfg, train_dataset=token_data(4 * 4))
    if accepts is not None:  # False: the per-micro-batch mean path that the Trainer divides by the step count
        tr.model_accepts_loss_kwargs = accepts
    tr.train()
    return params(model)


@pytest.mark.parametrize("accepts_loss_kwargs", [None, False])
def test_accumulation_gives_the_large_batch_update(tmp_path, accepts_loss_kwargs):
    """4 micro-batches of 4 == 1 batch of 16 after one SGD step: the penalty counts once, not 4 or 1/4 times."""
    acc = one_sgd_step(tmp_path, 4, 4, 1.0, accepts_loss_kwargs)
    big = one_sgd_step(tmp_path, 16, 1, 1.0, accepts_loss_kwargs)
    no_pen = one_sgd_step(tmp_path, 16, 1, 0.0, accepts_loss_kwargs)
    assert max_diff(acc, big) < 1e-5
    assert max_diff(no_pen, big) > 1e-3  # the penalty moves the parameters: counting it wrongly would show


def test_gates_and_gated_weights_get_no_optimizer_weight_decay(tmp_path):
    model = tiny_gpt2()
    tr = DGateTrainer(
        model, targs(tmp_path, max_steps=1, weight_decay=0.1), dgate_config=hf_dgate.DGateConfig(lam=1e-3)
    )
    decay = set(tr.get_decay_parameter_names(model))
    assert "dgate.gammas.heads" not in decay
    assert "transformer.h.0.attn.c_attn.weight" not in decay  # holds the value rows (primary weights)
    assert "transformer.h.0.mlp.c_fc.weight" in decay  # ungated weights keep the optimizer's decay
    opt = tr.create_optimizer()
    gate = model.dgate.gammas["heads"]
    group = next(g for g in opt.param_groups if any(p is gate for p in g["params"]))
    assert group["weight_decay"] == 0.0


def test_logs_checkpoint_resume_and_save_model(tmp_path):
    """Resuming at step 3 gives the same losses, lam and gates as the uninterrupted run; checkpoints hold gates."""

    def trainer(out, seed=0):
        args = targs(
            out,
            per_device_train_batch_size=4,
            max_steps=6,
            learning_rate=1e-2,
            save_strategy="steps",
            save_steps=3,
            eval_strategy="steps",
            eval_steps=3,
            seed=seed,
        )
        data = token_data(40)
        return DGateTrainer(
            tiny_gpt2(),
            args,
            dgate_config=hf_dgate.DGateConfig(target="heads", depth=3, lam=0.05),
            lam_warmup_steps=2,
            target_sparsity=0.5,  # never reached in 6 steps: the controller raises lam every 2 steps
            controller_interval=2,
            train_dataset=data,
            eval_dataset=data[:8],
        )

    full = trainer(tmp_path / "full")
    full.train()
    hist = full.state.log_history
    train_logs = [h for h in hist if "loss" in h]
    eval_logs = [h for h in hist if "eval_loss" in h]
    for key in ("dgate/penalty", "dgate/misalignment", "dgate/head_sparsity", "dgate/params_kept", "dgate/lam"):
        assert key in train_logs[0]
    assert "eval_dgate/head_sparsity" in eval_logs[0]
    lams = [h["dgate/lam"] for h in train_logs]
    assert lams[-1] > lams[0]  # warm-up, then the controller
    with open(tmp_path / "full" / SPARSITY_NAME) as f:
        assert json.load(f)["targets"]["heads"]["per_layer"]["0"] == [4, 4]

    ckpt = tmp_path / "full" / "checkpoint-3"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert "dgate.gammas.heads" in f.keys()
    assert (ckpt / "dgate_config.json").is_file()

    resumed = trainer(tmp_path / "full")  # fresh model and trainer, same output dir
    resumed.train(resume_from_checkpoint=str(ckpt))
    later = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert [h["step"] for h in later] == [4, 5, 6]
    for a, b in zip(train_logs[3:], later):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["dgate/lam"] == pytest.approx(b["dgate/lam"], rel=1e-9)
    torch.testing.assert_close(resumed.model.dgate.gammas["heads"], full.model.dgate.gammas["heads"])

    out = tmp_path / "saved"
    full.save_model(str(out))
    back = hf_dgate.load_gated(str(out))
    torch.testing.assert_close(back.dgate.gammas["heads"], full.model.dgate.gammas["heads"].cpu())
    x = token_data(2)[0]["input_ids"][None]
    full.model.eval()
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, full.model(x).logits)


def test_trainer_export_pruned_writes_a_smaller_reloadable_model(tmp_path):
    model = tiny_gpt2()
    tr = DGateTrainer(
        model,
        targs(tmp_path, max_steps=1),
        dgate_config=hf_dgate.DGateConfig(target="heads"),
        train_dataset=token_data(4),
    )
    with torch.no_grad():
        tr.dgate_bank.gammas["heads"][:, [0, 5]] = 0.0
    summary = tr.export_pruned(measure=False)
    out = tmp_path / "pruned"
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    small = hf_dgate.AutoPrunedModel.from_pretrained(str(out))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) - 1000
    x = token_data(1)[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert summary


def test_lam_warmup_is_linear():
    ctl = LamController(lam=0.4, warmup_steps=4)
    assert [ctl.lam_at(s) for s in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert LamController(lam=0.4).lam_at(0) == 0.4


def test_controller_rule_moves_lam_toward_target():
    ctl = LamController(lam=1e-2, target_sparsity=0.5, interval=5)
    assert not ctl.update(3, 0.0)  # not an update step
    assert ctl.update(5, 0.0) and ctl.lam > 1e-2  # too dense: stronger
    lam = ctl.lam
    assert ctl.update(10, 0.9) and ctl.lam < lam  # too sparse: weaker
    lam = ctl.lam
    assert not ctl.update(15, 0.505) and ctl.lam == lam  # within tolerance: hold
    with pytest.raises(ValueError):
        LamController(lam=0.0, target_sparsity=0.5)


def test_controller_waits_for_falling_groups_and_ramps_the_target():
    """Zero groups do not come back: lam is not raised while groups are still falling or norms still move, and a
    ramped target is tracked from 0."""
    ctl = LamController(lam=0.1, target_sparsity=0.5, interval=1)
    assert not ctl.update(1, 0.1, settled=False)  # norms still moving
    assert not ctl.update(2, 0.2, committed=0.3)  # committed sparsity still rising
    assert ctl.update(3, 0.2, committed=0.3) and ctl.lam > 0.1  # settled, not rising, too dense: raise
    lam = ctl.lam
    assert not ctl.update(4, 0.1, committed=0.6) and ctl.lam == lam  # enough groups on their way down: hold
    assert ctl.update(5, 0.7, committed=0.7) and ctl.lam < lam  # too many zeros: lower at once
    ramp = LamController(lam=0.1, target_sparsity=0.5, target_ramp_steps=100, warmup_steps=10)
    assert [ramp.target_at(s) for s in (0, 10, 60, 110, 500)] == pytest.approx([0, 0, 0.25, 0.5, 0.5])
    assert ramp.update(60, 0.4) and ramp.lam < 0.1  # 0.4 is above the ramped 0.25
    with pytest.raises(ValueError, match="target_ramp_steps"):
        LamController(lam=0.1, target_ramp_steps=-1)


def test_measure_counts_falling_groups_and_settling():
    from hf_dgate.controller import measure

    thr = torch.full((6,), 1e-3)
    prev = torch.tensor([1.0, 0.9, 0.8, 0.04, 0.03, 1e-4])
    now = torch.tensor([1.0, 0.9, 0.8, 0.01, 0.03, 1e-5])  # one falling, one small but steady, one zero
    assert measure(now, thr) == (pytest.approx(1 / 6), False)  # no previous norms: zeros only, not settled
    committed, settled = measure(now, thr, prev)
    assert committed == pytest.approx(2 / 6) and settled
    moving = torch.tensor([2.0, 1.8, 1.6, 0.01, 0.06, 1e-5])
    assert measure(moving, thr, prev)[1] is False


def test_already_gated_model_with_other_config_is_rejected(tmp_path):
    model = hf_dgate.apply_dgate(tiny_gpt2(), hf_dgate.DGateConfig(depth=3))
    with pytest.raises(ValueError, match="already gated"):
        DGateTrainer(model, targs(tmp_path, max_steps=1), dgate_config=hf_dgate.DGateConfig(depth=4))
    assert DGateTrainer(model, targs(tmp_path, max_steps=1)).dgate_bank is model.dgate


def test_direct_method_trains_without_gates(tmp_path):
    model = tiny_gpt2()
    cfg = hf_dgate.DGateConfig(target="heads", depth=2, lam=0.1, method="direct")
    tr = DGateTrainer(
        model,
        targs(tmp_path, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2),
        dgate_config=cfg,
        train_dataset=token_data(8),
    )
    tr.train()
    assert torch.equal(model.dgate.gammas["heads"], torch.ones_like(model.dgate.gammas["heads"]))
    assert tr.state.log_history[0]["dgate/penalty"] > 0
    assert os.path.isfile(tmp_path / SPARSITY_NAME)


def _ddp_worker(out_dir: str, optim: str = "sgd") -> None:
    """One process of a 2-process CPU DDP run: micro-batch 4, accumulation 2 (16 samples per optimizer step)."""
    model = tiny_gpt2()
    args = targs(
        out_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        optim=optim,
        learning_rate=0.1,
        weight_decay=0.1,
    )
    tr = DGateTrainer(model, args, dgate_config=hf_dgate.DGateConfig(lam=1.0), train_dataset=token_data(16))
    assert tr.args.world_size == 2
    tr.train()
    if tr.is_world_process_zero():
        torch.save(params(model), os.path.join(out_dir, "ddp_params.pt"))


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])  # adamw: with the gates' momentum-SGD group (default)
def test_two_processes_with_accumulation_give_the_large_batch_update(tmp_path, optim):
    """DDP averages gradients over processes: the penalty, identical on both, must still count exactly once."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        f"from test_trainer import _ddp_worker\n_ddp_worker({str(tmp_path)!r}, {optim!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    for _attempt in range(2):  # a free port can be taken between choosing it and binding it: one retry then
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(port), str(script)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp_params.pt")
    big = one_sgd_step(tmp_path, 16, 1, 1.0, None, optim)
    gates = [n for n in big if n.startswith("dgate.")]
    assert gates and max_diff({n: ddp[n] for n in gates}, big) < 1e-6  # the gates' SGD step (the recipe under AdamW)
    # Adam's first step is ~lr * sign(grad): coordinates whose gradient is near its eps amplify the different
    # summation order of DDP, so the ungated weights agree to 1e-3 of lr there
    assert max_diff(ddp, big) < (1e-5 if optim == "sgd" else 1e-4)


class _Regression(torch.nn.Module):
    """y = x @ beta with graded |beta_j|: features drop out one by one as lam grows (a smooth sparsity path)."""

    def __init__(self, p: int = 40, h: int = 16):
        super().__init__()
        self.fc1 = torch.nn.Linear(p, h)
        self.fc2 = torch.nn.Linear(h, 1)

    def forward(self, x, labels=None):
        out = self.fc2(torch.relu(self.fc1(x))).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


@pytest.fixture
def one_thread():
    """Tiny models run faster (and steadier on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_target_sparsity_controller_ends_near_the_target(tmp_path, one_thread):
    torch.manual_seed(0)
    p = 40
    x = torch.randn(2048, p)
    y = x @ torch.linspace(1.0, 0.05, p) + 0.1 * torch.randn(2048)
    model = _Regression(p)
    # graded importance, the Trainer's defaults (AdamW + the recipe, linear decay); lam starts 7x below the one that
    # ends at the target
    cfg = hf_dgate.DGateConfig(target=[], groups=[{"name": "features", "modules": r"^fc1$", "kind": "in"}], lam=0.3)
    args = targs(tmp_path, per_device_train_batch_size=64, max_steps=800, learning_rate=1e-2, logging_steps=100)
    tr = DGateTrainer(
        model,
        args,
        dgate_config=cfg,
        target_sparsity=0.5,
        controller_interval=20,
        train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)],
    )
    tr.train()
    final = hf_dgate.sparsity_report(model).sparsity("features")
    assert abs(final - 0.5) <= 0.05, final
    assert tr.state.log_history[-2]["dgate/features_sparsity"] == final


def test_export_under_fsdp_says_how_instead_of_hanging(tmp_path):
    """Under FSDP each rank holds a shard: exporting from the main process alone would wait forever on a gather."""
    tr = DGateTrainer(tiny_gpt2(), targs(tmp_path, max_steps=1), dgate_config=hf_dgate.DGateConfig())
    tr.is_fsdp_enabled = True  # what the Trainer sets when accelerate's FSDP plugin is active (GPUs only)
    with pytest.raises(ValueError, match="hf-dgate export"):
        tr.export_pruned()
    assert not (tmp_path / "pruned").exists()


def test_grey_groups_are_logged_and_warned_about(tmp_path):
    """Groups under the threshold but not settled at zero ("grey") are counted in the log and, when they are many,
    the end of training says that training has not converged."""
    model = tiny_gpt2()
    hf_dgate.apply_dgate(model, hf_dgate.DGateConfig(target="neurons", lam=0.0))
    bank = hf_dgate.get_bank(model)
    with torch.no_grad():
        bank.gammas["neurons"][:, :8] = 0.0  # settled zeros
        bank.gammas["neurons"][:, 8:40] = 0.02  # norms ~1e-4: below the 1e-3 threshold, not zero
    trainer = DGateTrainer(model, targs(tmp_path, max_steps=1, learning_rate=1e-6), train_dataset=token_data(4))
    with pytest.warns(UserWarning, match="has not converged: .* grey"):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "dgate/neurons_grey" in h]
    assert logged and logged[-1]["dgate/neurons_grey"] > 20
    assert hf_dgate.sparsity_report(model).targets["neurons"].grey > 20


def test_a_missed_target_sparsity_is_said_at_the_end(tmp_path):
    tr = DGateTrainer(
        tiny_gpt2(),
        targs(tmp_path, max_steps=2),
        dgate_config=hf_dgate.DGateConfig(target="heads", lam=1e-3),
        target_sparsity=0.9,
        controller_interval=1,
        train_dataset=token_data(8),
    )
    with pytest.warns(UserWarning, match=r"target_sparsity=0.9 was not reached: heads ended at 0\.000"):
        tr.train()
