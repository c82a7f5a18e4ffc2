"""`DGateTrainer`: a `transformers.Trainer` that trains with the D-Gating penalty, logs sparsity and saves the gates.

Penalty exactly once per optimizer step. The Trainer turns the loss of each micro-batch into gradients as
`backward(loss / k)` (k = micro-batches in this optimizer step) unless the loss is already normalised over the whole
accumulated batch (`num_items_in_batch`, then the Trainer does not divide). DDP then *averages* gradients over
processes. The penalty R depends only on parameters, which are identical on every process and do not change inside
an accumulation window, so each micro-batch adds R / k to what reaches `backward`:
- loss not yet scaled for accumulation: add R (the Trainer divides by k);
- loss already scaled (model takes `num_items_in_batch`, or `compute_loss_func`): add R / k.
Summed over the k micro-batches that is R once, and averaging identical R over processes keeps it R. The
token-count rescaling the Trainer applies for `average_tokens_across_devices` happens inside `super().compute_loss`,
before the penalty is added, so it does not touch it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from . import optim
from .budget import (
    SALIENCY_DECAY,
    BudgetRanking,
    BudgetSchedule,
    CostUnit,
    ParamBudget,
    budget_cut,
    committed,
    cost_weights,
    gradual_budget,
    group_costs,
    params_after,
)
from .config import DGateConfig
from .controller import LamController
from .errors import NonFiniteError
from .extras import require
from .finish import FinishRecord, exact_zero_masks, zero_exactly
from .groups import GateBank
from .patch import apply_dgate, get_bank
from .report import SparsityReport, sparsity_report
from .resume import SETUP_KEY, check_resume, checkpoint_complete, last_complete_checkpoint, trainer_setup
from .saving import (
    gate_record,
    read_manifest,
    record_conflict,
    weight_files_state,
    write_manifest,
    written_weight_files,
)

TRAINER_STATE_NAME = "dgate_trainer_state.json"
GREY_WARN_FRACTION = 0.25  # warn at the end of training when more than this share of the zero groups is grey
SPARSITY_NAME = "dgate_sparsity.json"


BASE_TEACHER = "base"  # teacher="base": a gated PEFT model's own frozen weights, adapters and gates off


def _base_teacher_problem(model: nn.Module, bank: GateBank) -> str | None:
    """Why `model` cannot be its own teacher (None when it can): it must be a PEFT model, and nothing but its
    adapters and its gates may train, or the "model before gating" would move with the student."""
    if not callable(getattr(model, "disable_adapter", None)):
        return (
            f"{type(model).__name__} is not a PEFT model: only a model whose base weights stay frozen (peft."
            "get_peft_model) can be its own teacher. Pass a copy of the model before gating instead."
        )
    adapters = getattr(model, "active_adapters", None) or []
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    own = {id(p) for p in bank.parameters()}
    moving = [
        n for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in own and not any(f".{a}." in n for a in adapters)
    ]  # fmt: skip
    if moving:
        return (
            f"{len(moving)} base weight(s) of the model train (e.g. {moving[0]}), so its base is no fixed teacher. "
            "Freeze them, or pass a copy of the model before gating instead."
        )
    return None


def sparsity_metric_name(target: str) -> str:
    """Log key of a target's sparsity, as the target names it (heads -> head_sparsity; a custom group type `g` ->
    g_sparsity)."""
    from .targets import BUILTIN

    return BUILTIN[target].metric_name() if target in BUILTIN else f"{target}_sparsity"


GRADUAL_RAMP_FRACTION = 0.3  # budget_schedule="gradual": the share of the run that cuts; the rest recovers (measured in
# docs/compress.md: cutting over the first 30% beat 50% and 17% of a 300-step run at 75 and 50% of the blocks kept)


class DGateMixin:
    """Adds the D-Gating penalty, a parameter budget, the finish, logging and checkpoints to a `Trainer` class.

    Use it through `with_dgate(TrainerClass)` (Trainer, Seq2SeqTrainer, TRL's SFTTrainer, ...); `DGateTrainer` is
    `with_dgate(Trainer)`. Args beyond the trainer's own:
        dgate_config: how to gate `model` if it is not gated yet (default `DGateConfig()`); if it is already
            gated the existing gates are used and a different config is an error.
        lam_warmup_steps: lam ramps linearly from lam/lam_warmup_steps to lam over this many optimizer steps.
        target_sparsity: if set, lam is steered (see `LamController`) toward this sparsity of `sparsity_target`.
        target_ramp_steps: optimizer steps over which the steered sparsity ramps from 0 to `target_sparsity` (after
            the lam warm-up); None: half of the remaining training steps. Zero groups do not come back, so a target
            approached slowly is overshot far less.
        sparsity_target: the gated target the controller steers (default: the first gated target).
        controller_interval, controller_gain: optimizer steps between controller updates, and its gain.
        gated_lr: the gates (and, for vision/tabular targets, their gated weights) take momentum-SGD steps in a
            parameter group of their own inside the Trainer's optimizer (`hf_dgate.optim.dgate_optimizer`), because
            Adam-family optimizers alone do not reach exact zeros on module targets (docs/optimizers.md). "auto"
            (default): module targets (features, filters, GroupRules) get that group, gates and gated weights at
            0.05; transformer block targets (heads, neurons, layers, experts) keep the Trainer's optimizer, under
            which NanoGPT's zeros are exact and a lam sweep moves sparsity gradually (with their gates on SGD at
            0.2, its heads go from 0% to 100% between lam 0.003 and 0.02), except with `target_params`, where the
            budget sets the sparsity and their gates take the group at 0.2 (the setting docs/compress.md measured).
            A gate on Adam moves about lr per step from 1, so a short run at a small learning rate may zero
            nothing: pass 0.2 there. Nothing changes when the Trainer's optimizer is plain SGD, which already is the
            paper's update. A float: every target's gates take that rate (SGD units). None: the Trainer's optimizer
            updates gates and weights like everything else. With method='l0' the same switch gives log_alpha its
            own group (`hf_dgate.optim.l0_optimizer`, rate 0.1 under "auto").
        gated_weights: with `gated_lr`, whether the gated weights move with the gates: None (default) per target
            (module targets yes, transformer block targets no), True all, False none.
        target_params: a parameter budget for the export: a fraction in (0, 1) of the model's parameters or a count
            (an int). Each group's penalty is weighted by its cost (`group_cost`), lam is steered toward the budget
            (in parameters, counted as the export counts them), and the finish cuts to it exactly (`hf_dgate.budget`).
        group_cost: "params" (default: the budget's own currency) or "flops" (per token; heads also pay for their
            attention scores at 1024 tokens). Used with `target_params`.
        budget_schedule: how `target_params` is reached (`hf_dgate.budget.BudgetSchedule`). "gradual" (default):
            lam stays as given and, every `controller_interval` steps until the finish, the weakest groups (by
            `budget_ranking`) are set to exactly zero and held, the parameters kept falling on a cubic curve to the
            budget; the finish (the last 70% of the run under "auto") then only recovers. "steered": lam is steered
            toward the budget and the finish (a tenth of the run under "auto") cuts what the penalty has not removed.
        budget_ranking: which groups the gradual schedule cuts first (`hf_dgate.budget.BudgetRanking`).
            "saliency" (default): the smallest running average of (s_g dL/ds_g)^2 (the Fisher estimate of the loss
            change of removing the group, from the gates' own gradients) per unit of `group_cost`; "norm": the
            smallest D-Gating norm relative to its target's median. The finish record and the card say which ran.
        finish_steps: the last optimizer steps of training in which removed groups are held at exactly zero and the
            penalty is off, so the rest recovers and the export is exact. At its start every group under the
            threshold (and, with a budget, the weakest until the budget is met) is zeroed, and the loss before and
            after is measured on a few evaluation batches. "auto" (default): with `target_params` the last 70% of
            the run (budget_schedule="gradual") or a tenth ("steered"), off otherwise; an int: that many steps (0:
            off; with a budget the cut then happens at the end). The record is `trainer.dgate_finish`, saved with
            checkpoints and written into the export card.
        teacher: a model with the same vocabulary (e.g. a copy of the model before gating) to distil from: the
            loss gains `distill_weight * T^2 * KL(teacher || student)` at temperature `distill_temperature`, plus
            `distill_hidden` times the relative MSE of the last hidden states when their shapes agree. The teacher
            runs under no_grad in eval mode (its memory: its weights and one forward's activations, no gradients or
            optimizer state). "base": a gated PEFT model (LoRA ...) whose base weights are frozen is its own
            teacher, run with its adapters disabled and every gate switched off, which is exactly the model before
            gating and adapters, with no second copy of its weights. Counted like the penalty (once per optimizer
            step); the logged `loss` stays the data loss, and `dgate/distill_kl` is logged.

    The logged `loss` is the data loss alone (comparable with `eval_loss`); the penalty is logged as
    `dgate/penalty`. Gates and gated primary weights get no optimizer weight decay: the penalty already is an L2
    decay on them (for fused tensors such as GPT-2's `c_attn` the whole tensor is excluded, query/key rows included).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *,
        dgate_config: DGateConfig | None = None,
        lam_warmup_steps: int = 0,
        target_sparsity: float | None = None,
        target_ramp_steps: int | None = None,
        sparsity_target: str | None = None,
        controller_interval: int = 10,
        controller_gain: float = 1.0,
        gated_lr: float | str | None = "auto",
        gated_weights: bool | None = None,
        target_params: float | int | None = None,
        group_cost: str = "params",
        budget_schedule: str = "gradual",
        budget_ranking: str = "saliency",
        finish_steps: int | str = "auto",
        teacher: nn.Module | str | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 2.0,
        distill_hidden: float = 0.0,
        **trainer_kwargs: Any,
    ) -> None:
        require("accelerate", "hf_dgate.DGateTrainer (transformers' Trainer runs on accelerate)")
        self._dgate_setup_args = {  # what steers the lam controller: recorded with every checkpoint (resume.py)
            "lam_warmup_steps": lam_warmup_steps, "target_sparsity": target_sparsity,
            "target_ramp_steps": target_ramp_steps, "sparsity_target": sparsity_target,
            "controller_interval": controller_interval, "controller_gain": controller_gain,
            "target_params": target_params, "group_cost": group_cost, "finish_steps": finish_steps,
            "budget_schedule": budget_schedule, "budget_ranking": budget_ranking,
        }  # fmt: skip
        if model is None or isinstance(model, str):
            raise ValueError(
                f"{type(self).__name__} needs the model object (not a name or model_init): load it, then pass it."
            )
        for name, value in (("distill_weight", distill_weight), ("distill_temperature", distill_temperature),
                            ("distill_hidden", distill_hidden)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: pass a finite float >= 0.")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature={distill_temperature!r} is invalid: pass a float > 0 (e.g. 2.0).")
        if isinstance(teacher, str) and teacher != BASE_TEACHER:
            raise ValueError(
                f"teacher={teacher!r} is invalid: pass a model, {BASE_TEACHER!r} (a PEFT model's own base) or None."
            )
        if isinstance(teacher, nn.Module) and (teacher is model or get_bank(teacher, required=False) is not None):
            raise ValueError("teacher= must be a separate, ungated model (e.g. a copy of the model before gating).")
        self.dgate_distill_weight, self.dgate_distill_temperature = float(distill_weight), float(distill_temperature)
        self.dgate_distill_hidden = float(distill_hidden)
        self._dgate_last_kl: float | None = None
        bank = get_bank(model, required=False)
        if bank is None:
            apply_dgate(model, dgate_config if dgate_config is not None else DGateConfig())
        elif dgate_config is not None and dgate_config.to_dict() != bank.config.to_dict():
            raise ValueError(
                "The model is already gated with a different DGateConfig; pass dgate_config=None to keep its gates, "
                "or call hf_dgate.remove_dgate(model) first."
            )
        self.dgate_bank: GateBank = get_bank(model)
        if self.dgate_bank.config.l0_target_sparsity is not None and target_sparsity is not None:
            raise ValueError(
                "Pass DGateConfig(l0_target_sparsity=...) or DGateTrainer(target_sparsity=...), not both: the first "
                "steers the L0 gates through their Lagrange multipliers, the second would steer a lam they do not use."
            )
        targets = self.dgate_bank.targets
        if sparsity_target is None:
            sparsity_target = targets[0]
        if sparsity_target not in targets:
            raise ValueError(f"sparsity_target={sparsity_target!r} is not gated; gated targets are {targets}.")
        self.sparsity_target = sparsity_target
        if (
            gated_lr is not None
            and gated_lr != "auto"
            and (isinstance(gated_lr, bool) or not isinstance(gated_lr, (int, float)) or gated_lr <= 0)
        ):
            raise ValueError(
                f"gated_lr={gated_lr!r} is invalid: pass 'auto', a float > 0 (SGD units, e.g. 0.05) or None (off)."
            )
        if gated_weights not in (None, True, False):
            raise ValueError(f"gated_weights={gated_weights!r} is invalid: pass None (per target), True or False.")
        self.dgate_gated_lr = gated_lr
        self.dgate_gated_weights = gated_weights
        self.lam_controller = LamController(
            lam=self.dgate_bank.config.lam,
            warmup_steps=lam_warmup_steps,
            target_sparsity=target_sparsity,
            target_ramp_steps=target_ramp_steps or 0,
            interval=controller_interval,
            gain=controller_gain,
        )
        self._dgate_auto_ramp = target_ramp_steps is None
        self._dgate_pen_in_loss: torch.Tensor | None = None
        self._dgate_init_budget(target_params, group_cost, finish_steps, target_sparsity, budget_schedule)
        try:
            self.dgate_budget_ranking = BudgetRanking(budget_ranking)
        except ValueError:
            raise ValueError(f"budget_ranking={budget_ranking!r} is invalid: pass 'saliency' or 'norm'.") from None
        self._dgate_saliency: dict[str, torch.Tensor] | None = None  # running mean of (s_g dL/ds_g)^2 per target
        self._dgate_saliency_steps = 0
        super().__init__(model=model, args=args, **trainer_kwargs)
        self.dgate_teacher: nn.Module | None = None
        self.dgate_teacher_is_base = teacher == BASE_TEACHER
        if self.dgate_teacher_is_base:
            problem = _base_teacher_problem(self.model, self.dgate_bank)
            if problem:
                raise ValueError(f"teacher={BASE_TEACHER!r}: {problem}")
        elif teacher is not None:
            teacher.requires_grad_(False)
            self.dgate_teacher = teacher.to(self.args.device).eval()
        self.add_callback(_DGateCallback(self))

    def _dgate_init_budget(
        self, target_params: Any, group_cost: str, finish_steps: Any, target_sparsity: float | None, schedule: Any
    ) -> None:
        """Validate the budget and finish arguments and price every group (before the Trainer wraps the model)."""
        bank = self.dgate_bank
        if finish_steps != "auto" and (isinstance(finish_steps, bool) or not isinstance(finish_steps, int)):
            raise ValueError(f"finish_steps={finish_steps!r} is invalid: pass 'auto' or an int >= 0.")
        if finish_steps != "auto" and finish_steps < 0:
            raise ValueError(f"finish_steps={finish_steps!r} is invalid: pass 'auto' or an int >= 0.")
        try:
            unit = CostUnit(group_cost)
        except ValueError:
            raise ValueError(f"group_cost={group_cost!r} is invalid: pass 'params' or 'flops'.") from None
        try:
            self.dgate_budget_schedule = BudgetSchedule(schedule)
        except ValueError:
            raise ValueError(f"budget_schedule={schedule!r} is invalid: pass 'gradual' or 'steered'.") from None
        gradual = self.dgate_budget_schedule is BudgetSchedule.GRADUAL
        self.dgate_budget: int | None = None
        self.dgate_cost_weights: dict[str, torch.Tensor] | None = None
        if target_params is not None:
            if target_sparsity is not None:
                raise ValueError("Pass target_params or target_sparsity, not both: each steers lam.")
            if not bank.strategy.prices_groups:
                raise ValueError(
                    f"target_params steers D-Gating's penalty; this model is gated with method={bank.method!r} "
                    "(for L0 use DGateConfig(l0_target_sparsity=...))."
                )
            if bank.lam <= 0 and not gradual:
                raise ValueError(
                    "target_params with budget_schedule='steered' needs a starting lam > 0 (the controller scales lam "
                    "geometrically)."
                )
            total, floor = params_after(bank, {t: torch.ones(n, dtype=torch.bool) for t, n in bank.sizes.items()})
            self.dgate_budget = ParamBudget(target_params).resolve(total)
            if self.dgate_budget < floor:
                raise ValueError(
                    f"target_params={target_params!r} asks for {self.dgate_budget:,} parameters, but removing every "
                    f"gated group still leaves {floor:,} of {total:,} (embeddings, norms, ungated parts): gate more "
                    "targets or ask for more."
                )
            self.dgate_cost_weights = cost_weights(group_costs(bank, unit))
            self.dgate_params_total = total
            if not gradual:  # the controller steers the removed fraction of the parameters toward the budget's
                self.lam_controller.target_sparsity = 1.0 - self.dgate_budget / total
                self.lam_controller.__post_init__()
        if not bank.strategy.holds_zeros and finish_steps not in ("auto", 0):
            raise ValueError(f"finish_steps holds gates at zero; method={bank.method!r} has no such gates: pass 0.")
        self.dgate_group_cost = unit
        self.dgate_finish_steps = finish_steps
        self.dgate_finish: FinishRecord | None = None
        self._dgate_zero_masks: dict[str, torch.Tensor] | None = None
        self._dgate_ramp_masks: dict[str, torch.Tensor] | None = None  # held at zero by the gradual schedule
        self._dgate_ramp_start: int | None = None
        self._dgate_last_norms: dict[str, torch.Tensor] | None = None

    def _dgate_penalty(self, lam: float | None = None) -> torch.Tensor:
        """The penalty training adds: cost-weighted with a budget, the bank's own otherwise; 0 while finishing."""
        bank = self.dgate_bank
        lam = bank.lam if lam is None else lam
        if self._dgate_zero_masks is not None:
            return bank.penalty(0.0)
        if self.dgate_cost_weights is not None:
            return bank.strategy.priced_penalty(bank, lam, self.dgate_cost_weights)
        return bank.penalty(lam)

    # ---- the loss -------------------------------------------------------------------------------------------
    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """The same decision `Trainer.training_step` makes on whether it divides the loss by the micro-batch count."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.2x decides it once; older: below
        if scaled is not None:
            return bool(scaled)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's loss plus this micro-batch's share of the penalty (training only; evaluation is unchanged).

        A NaN/inf loss or penalty stops training here, before backward, with a NonFiniteError naming the step: one
        NaN gradient would make every gate NaN while the Trainer's `logging_nan_inf_filter` hides it from the log.
        """
        teaches = self.dgate_teacher is not None or self.dgate_teacher_is_base
        distill = teaches and model.training and torch.is_grad_enabled()
        if distill and self.dgate_distill_hidden > 0:
            inputs = {**inputs, "output_hidden_states": True}
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs or distill, num_items_in_batch=num_items_in_batch
        )
        if not (model.training and torch.is_grad_enabled()):
            return out
        loss, outputs = out if (return_outputs or distill) else (out, None)
        bank = self.dgate_bank
        bank.lam = self.lam_controller.lam_at(self.state.global_step)
        k = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        scaled = self._loss_scaled_for_ga(num_items_in_batch)
        pen = self._dgate_penalty()
        if distill:  # the teacher's term counts like the penalty: once per optimizer step
            pen = pen + self._dgate_distill_loss(inputs, outputs).to(pen.device)
        added = pen / k if scaled else pen
        self._dgate_pen_in_loss = pen.detach() / k  # what this micro-batch's returned loss holds after scaling
        total = loss + added.to(device=loss.device, dtype=loss.dtype)
        if not bool(torch.isfinite(total.detach()).all()):  # one scalar check per micro-batch
            self._stop_non_finite(loss.detach().float().mean(), pen.detach().float())
        return (total, outputs) if return_outputs else total

    def _dgate_base_forward(self, inputs: dict[str, Any]) -> Any:
        """teacher="base": the model's own frozen weights, adapters disabled and gates switched off, in eval mode."""
        net = self.model
        was_training = net.training
        with net.disable_adapter(), self.dgate_bank.switched_off():
            net.eval()
            try:
                return net(**inputs)
            finally:
                net.train(was_training)

    def _dgate_distill_loss(self, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        """distill_weight * T^2 * KL(teacher || student) of the temperature-softened next-token distributions, mean
        over tokens (those with attention_mask 1), plus distill_hidden * the relative MSE of the last hidden states
        where their shapes agree. The teacher runs under no_grad in eval mode."""
        teacher, temp = self.dgate_teacher, self.dgate_distill_temperature
        t_in = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        with torch.no_grad():
            t_out = self._dgate_base_forward(t_in) if self.dgate_teacher_is_base else teacher(**t_in)
        s_logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        t_logits = t_out["logits"] if isinstance(t_out, dict) else t_out.logits
        if s_logits.shape[-1] != t_logits.shape[-1]:
            raise ValueError(
                f"teacher= predicts {t_logits.shape[-1]} classes/tokens, the model {s_logits.shape[-1]}: the teacher "
                "must share the student's vocabulary."
            )
        s = torch.log_softmax(s_logits.float() / temp, dim=-1)
        t = torch.log_softmax(t_logits.float().to(s.device) / temp, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1)
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == kl.shape:
            kl = (kl * mask).sum() / mask.sum().clamp_min(1)
        else:
            kl = kl.mean()
        loss = self.dgate_distill_weight * temp**2 * kl
        self._dgate_last_kl = float(kl.detach())
        if self.dgate_distill_hidden > 0:
            hs = getattr(outputs, "hidden_states", None)
            ht = getattr(t_out, "hidden_states", None)
            if hs is not None and ht is not None and hs[-1].shape == ht[-1].shape:
                h_t = ht[-1].float().to(hs[-1].device)
                mse = (hs[-1].float() - h_t).pow(2).mean() / h_t.pow(2).mean().clamp_min(1e-12)
                loss = loss + self.dgate_distill_hidden * mse
        return loss

    def _stop_non_finite(self, loss: torch.Tensor, pen: torch.Tensor) -> None:
        """Raise NonFiniteError naming the optimizer step and what is NaN/inf (data loss, gates, penalty)."""
        step = self.state.global_step + 1
        if not bool(torch.isfinite(pen)):
            self.dgate_bank.assert_finite(f"train optimizer step {step}")  # names the target with bad gates/weights
        what = "data loss" if not bool(torch.isfinite(loss)) else "total loss"
        raise NonFiniteError(
            f"Training stopped at optimizer step {step}: the {what} is {float(loss + pen)} (data loss {float(loss)}, "
            f"D-Gating penalty {float(pen)}), so this update was not applied. Check the batch (a batch whose labels "
            "are all ignored gives a NaN loss), lower the learning rate, or resume from the last checkpoint."
        )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Trains on total loss, returns the data loss only, so the logged `loss` stays comparable to `eval_loss`."""
        self._dgate_pen_in_loss = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._dgate_pen_in_loss is not None:
            loss = loss - self._dgate_pen_in_loss.to(device=loss.device, dtype=loss.dtype)
        return loss

    # ---- optimizer ------------------------------------------------------------------------------------------
    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimizer; with `gated_lr`, gates (and gated weights, per `gated_weights`) move to their own
        momentum-SGD group; under "auto" without a budget those of module targets only. A user-supplied optimizer
        is left alone, and so is plain SGD under `gated_lr="auto"`.
        The scheduler is built afterwards, so it scales that group too."""
        built = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        lr, policy = self.dgate_gated_lr, self.dgate_bank.strategy.optimizer
        if lr is None or policy is None:  # gate-free methods keep the optimizer they were given
            return optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it later; some integrations earlier
        if lr == "auto" and type(inner) is torch.optim.SGD:
            return optimizer
        # "auto" without a budget gives the SGD group to module targets only: transformer block targets' gates stay
        # on the Trainer's optimizer, where NanoGPT's lam sweep is gradual (on SGD at 0.2 it is a cliff). With
        # target_params the budget, not lam, sets the sparsity, and the budget runs were measured with the SGD group
        # (docs/optimizers.md, docs/compress.md)
        modules_only = lr == "auto" and policy.takes_weights and self.dgate_budget is None
        if modules_only and not optim.has_module_targets(self.model):
            return optimizer
        helper = policy.helper
        if not built:
            if not any(g.get(policy.group_key) for g in inner.param_groups):
                warnings.warn(
                    f"DGateTrainer got its optimizer ({type(inner).__name__}) from you, so the gates do not get their "
                    "own parameter group: under Adam-family optimizers groups then shrink without reaching exact "
                    f"zero. Build it with hf_dgate.optim.{helper}(optimizer, model), or pass gated_lr=None to "
                    "silence this.",
                    stacklevel=2,
                )
            return optimizer
        # the method's own helper (l0: log_alpha at its own, larger rate in the optimizer's units, Adam: 0.1)
        kwargs: dict[str, Any] = {"include_weights": self.dgate_gated_weights} if policy.takes_weights else {}
        if modules_only:
            kwargs["block_gates"] = False
        rate = policy.auto_lr if lr == "auto" else lr
        if rate is not None:  # (None: the helper's own default)
            kwargs["lr"] = rate
        getattr(optim, helper)(inner, self.model, **kwargs)
        return optimizer

    def _dgate_legacy_auto_rate(self) -> float | None:
        """The gated_lr giving this run the layout gated_lr="auto" gave before block targets' gates stayed on the
        Trainer's optimizer (resume.AUTO_LAYOUT); None where both "auto"s lay it out alike."""
        policy, optim_name = self.dgate_bank.strategy.optimizer, getattr(self.args, "optim", None)
        if policy is None or not policy.takes_weights or self.dgate_budget is not None:
            return None
        if str(getattr(optim_name, "value", optim_name)) == "sgd" or not any(
            optim.is_block_target(gs.target) for gs in self.dgate_bank.group_sets
        ):
            return None
        return optim.MODULE_TARGET_LR if optim.has_module_targets(self.model) else optim.BLOCK_TARGET_LR

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Trainer's decay list minus the gates and every tensor holding gated primary weights."""
        names = super().get_decay_parameter_names(model)
        bank = get_bank(model)
        skip = {id(p) for p in bank.parameters()}
        for gs in bank.group_sets:
            for sl in gs.primary:
                skip.add(id(getattr(bank.module(sl.module), sl.param)))
        by_id = {n: id(p) for n, p in model.named_parameters()}
        return [n for n in names if by_id.get(n) not in skip]

    # ---- logging --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def dgate_metrics(self) -> dict[str, float]:
        """Penalty, misalignment, lam, sparsity of each gated target and the parameters left after export."""
        bank = self.dgate_bank
        rep = self._checked_report("log D-Gating metrics")
        metrics = {
            "dgate/penalty": float(self._dgate_penalty()),
            "dgate/misalignment": float(bank.misalignment()),
            "dgate/lam": float(bank.lam),
        }
        if not all(math.isfinite(v) for v in metrics.values()):
            raise NonFiniteError(
                f"Training stopped at step {self.state.global_step}: the logged D-Gating metrics {metrics} are not "
                "finite although every gate and weight is; lower lam or resume from the last checkpoint."
            )
        for t, ts in rep.targets.items():
            metrics[f"dgate/{sparsity_metric_name(t)}"] = ts.sparsity
            metrics[f"dgate/{t}_grey"] = float(ts.grey)
        metrics["dgate/params_kept"] = float(rep.params_kept)
        metrics["dgate/params_kept_fraction"] = rep.params_kept_fraction
        if self.dgate_budget is not None:
            metrics["dgate/params_budget"] = float(self.dgate_budget)
        metrics["dgate/finishing"] = float(self._dgate_zero_masks is not None)
        if self._dgate_last_kl is not None:
            metrics["dgate/distill_kl"] = self._dgate_last_kl
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the D-Gating metrics to training logs (`dgate/...`) and evaluation logs (`<prefix>_dgate/...`)."""
        if not any(k.startswith("dgate/") or "_dgate/" in k for k in logs):
            prefix = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime")), None)
            if "loss" in logs or "train_loss" in logs:
                logs.update(self.dgate_metrics())
            elif prefix is not None:
                logs.update({f"{prefix}_{k}": v for k, v in self.dgate_metrics().items()})
        super().log(logs, start_time)

    # ---- training, saving, resuming -------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train`; restores the lam controller from the checkpoint, writes the sparsity table at the end."""
        ckpt = resume_from_checkpoint
        if ckpt is True or (isinstance(ckpt, str) and ckpt == ""):  # the newest checkpoint whose save finished
            ckpt = last_complete_checkpoint(self.args.output_dir)
            if ckpt is None:
                raise ValueError(
                    f"resume_from_checkpoint=True found no complete checkpoint in {self.args.output_dir!r}; pass a "
                    "checkpoint folder, or start without resuming."
                )
            resume_from_checkpoint = ckpt
        if isinstance(ckpt, str):
            self._restore_dgate_state(ckpt)  # (a checkpoint's own files are checked first: their errors name fields)
            why = checkpoint_complete(ckpt) if os.path.isdir(ckpt) else None
            if why is not None:
                raise ValueError(
                    f"Cannot resume from {ckpt!r}: {why}. Pass an earlier checkpoint, or resume_from_checkpoint=True "
                    "(which skips incomplete checkpoints)."
                )
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self.dgate_bank.lam = self.lam_controller.lam_at(self.state.global_step)
        if self.dgate_finish is None and (self.dgate_budget is not None or self._dgate_finish_len() > 0):
            self.dgate_start_finish()  # a budget with finish_steps=0: cut at the end, without recovery
        if self.dgate_finish is not None:
            self._dgate_end_finish()
        report = self.write_sparsity_report(self.args.output_dir)  # every rank: FSDP norms are collectives
        if self.is_world_process_zero():
            print(report)
            if self.dgate_finish is not None:
                print("Finish: " + self.dgate_finish.describe())
            grey = {t: ts for t, ts in report.targets.items() if ts.grey > max(1, GREY_WARN_FRACTION * ts.zero)}
            if grey:
                which = ", ".join(f"{ts.grey} of {ts.zero} zero {t}" for t, ts in grey.items())
                warnings.warn(
                    f"D-Gating has not converged: {which} are grey (within two decades below the threshold, not "
                    "numerically zero). Train longer or raise lam; export_pruned verifies whether removing them "
                    "changes the outputs.",
                    stacklevel=2,
                )
            ctl, got = self.lam_controller, report.targets[self.sparsity_target].sparsity
            if self.dgate_budget is not None:
                self._dgate_warn_budget(report)
            elif ctl.target_sparsity is not None and abs(got - ctl.target_sparsity) > 5 * ctl.tolerance:
                warnings.warn(
                    f"target_sparsity={ctl.target_sparsity} was not reached: {self.sparsity_target} ended at "
                    f"{got:.3f} (lam {ctl.lam:.3g}). Zero groups do not come back and groups that play the same role "
                    "fall together, so some sparsities are out of reach of lam alone; train longer, start from a lam "
                    "nearer the one that gives the target, or set target_ramp_steps.",
                    stacklevel=2,
                )
        return result

    # ---- the budget and the finish -------------------------------------------------------------------------
    def _dgate_gradual(self) -> bool:
        return self.dgate_budget is not None and self.dgate_budget_schedule is BudgetSchedule.GRADUAL

    def _dgate_finish_len(self) -> int:
        """Optimizer steps of the finish: finish_steps, or under "auto" with a budget all but the first
        GRADUAL_RAMP_FRACTION of the run (gradual) or a tenth of it (steered)."""
        n = self.dgate_finish_steps
        if n == "auto":
            if self.dgate_budget is None or not self.state.max_steps:
                return 0
            if self._dgate_gradual():
                return max(1, self.state.max_steps - max(1, int(GRADUAL_RAMP_FRACTION * self.state.max_steps)))
            return max(1, self.state.max_steps // 10)
        return int(n)

    def _dgate_first_cut_step(self) -> int:
        """The step of the gradual schedule's first cut (the first controller interval after the lam warm-up); the
        same when a run resumes mid-ramp, so the record says when cutting began."""
        iv, start = self.lam_controller.interval, self.lam_controller.warmup_steps
        return max(iv, -(-start // iv) * iv)

    @torch.no_grad()
    def _dgate_gradual_cut(self, step: int) -> None:
        """The gradual schedule's cut after `step` optimizer steps: the weakest groups (with those already held) down
        to the scheduled count, set to exactly zero and held from now on."""
        bank = self.dgate_bank
        start = self.lam_controller.warmup_steps
        end = max(start + 1, self.state.max_steps - self._dgate_finish_len())
        if step < start:
            return
        if self._dgate_ramp_start is None:
            self._dgate_ramp_start = self._dgate_first_cut_step()
        goal = gradual_budget(self.dgate_params_total, self.dgate_budget, (step - start) / (end - start))
        masks, _ = self._dgate_budget_cut(goal)
        if self._dgate_ramp_masks is not None:  # a group once cut stays cut
            masks = {t: m | self._dgate_ramp_masks[t] for t, m in masks.items()}
        zero_exactly(bank, masks, self.optimizer)
        self._dgate_ramp_masks = masks

    def _dgate_ranking_used(self) -> str:
        """What the gradual cut ranked by (saliency falls back to norms when no gate had a gradient yet)."""
        if self.dgate_budget_ranking is BudgetRanking.SALIENCY and self._dgate_saliency is not None:
            return BudgetRanking.SALIENCY.value
        return BudgetRanking.NORM.value

    def _dgate_budget_cut(self, goal: int) -> tuple[dict[str, torch.Tensor], int]:
        """`budget_cut` to `goal` parameters, ranked the way `budget_ranking` says."""
        bank = self.dgate_bank
        if self._dgate_ranking_used() == BudgetRanking.NORM.value:
            return budget_cut(bank, goal)
        sal = self._dgate_saliency
        corr = 1.0 - SALIENCY_DECAY**self._dgate_saliency_steps  # (bias correction of an average started at 0)
        per_cost = {t: sal[t] / corr / self.dgate_cost_weights[t].clamp_min(1e-12) for t in bank.targets}
        return budget_cut(bank, goal, per_cost, relative=False)

    @torch.no_grad()
    def _dgate_accumulate_saliency(self) -> None:
        """Before every optimizer step of the gradual cut: fold (s_g dL/ds_g)^2 of this step's gradients (after the
        Trainer's clipping; the training loss, distillation and the small penalty included) into the running mean.
        s_g is the product of the gate rows, so gamma_1 * dL/dgamma_1 = s_g dL/ds_g."""
        bank = self.dgate_bank
        if self._dgate_saliency is None:
            self._dgate_saliency = {t: torch.zeros(n, dtype=torch.float32) for t, n in bank.sizes.items()}
        seen = False
        for t in bank.targets:
            gam = bank.gammas[t]
            if gam.grad is None:
                continue
            x = (gam[0].detach().float() * gam.grad[0].detach().float()).pow(2).cpu()
            s = self._dgate_saliency[t]
            s.mul_(SALIENCY_DECAY).add_(x, alpha=1.0 - SALIENCY_DECAY)
            seen = True
        if seen:
            self._dgate_saliency_steps += 1
        elif self._dgate_saliency_steps == 0:
            self._dgate_saliency = None

    def _dgate_observe_budget(self, step: int) -> None:
        """Every controller interval: the removed share of the parameters (zero groups, and zero or falling ones)
        steers lam toward the budget, with the same rule as `target_sparsity`."""
        bank = self.dgate_bank
        zero, comm, norms, settled = committed(bank, self._dgate_last_norms)
        self._dgate_last_norms = norms
        total, kept_zero = params_after(bank, zero)
        _, kept_comm = params_after(bank, comm)
        self.lam_controller.update(step, 1 - kept_zero / total, settled=settled, committed=1 - kept_comm / total)

    @torch.no_grad()
    def _dgate_probe_loss(self, batches: int = 4) -> float | None:
        """Mean data loss on the first `batches` evaluation batches (training batches without an eval set), in eval
        mode: what the finish reports before and after zeroing. None when the trainer has no dataset."""
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        loader = self.get_eval_dataloader(dataset)
        model, was_training = self.model, self.model.training
        model.eval()
        losses = []
        try:
            for i, inputs in enumerate(loader):
                if i >= batches:
                    break
                loss = self.compute_loss(model, self._prepare_inputs(inputs))
                losses.append(float(loss.detach().float().mean()))
        finally:
            model.train(was_training)
        return sum(losses) / len(losses) if losses else None

    def dgate_start_finish(self) -> FinishRecord:
        """Zero every group under the threshold (with a budget: and the weakest others until the export fits it)
        exactly, measure the loss before and after, and hold them at zero from now on with the penalty off."""
        bank = self.dgate_bank
        ramp = self._dgate_ramp_masks
        with torch.no_grad():
            if ramp is not None:
                zero_exactly(bank, ramp, self.optimizer)
            below = {t: bank.zero_groups(t).detach().cpu() for t in bank.targets}
            if self.dgate_budget is not None:
                gradual = self._dgate_gradual()
                masks, _ = self._dgate_budget_cut(self.dgate_budget) if gradual else budget_cut(bank, self.dgate_budget)
            else:
                masks = below
            if ramp is not None:
                masks = {t: m | ramp[t] for t, m in masks.items()}
        before = self._dgate_probe_loss()
        zero_exactly(bank, masks, self.optimizer)
        after = self._dgate_probe_loss()
        self._dgate_zero_masks = masks
        self.dgate_finish = FinishRecord(
            start_step=self.state.global_step,
            steps=max(0, self.state.max_steps - self.state.global_step),
            zeroed={t: int(m.sum()) for t, m in masks.items()},
            cut_by_budget={t: int((masks[t] & ~below[t]).sum()) for t in masks},
            loss_before=before,
            loss_after=after,
            budget=self.dgate_budget,
            gradual_from=self._dgate_ramp_start if ramp is not None else None,
            gradual_cut={t: int(m.sum()) for t, m in ramp.items()} if ramp is not None else {},
            ranking=self._dgate_ranking_used() if self._dgate_gradual() else None,
        )
        self._dgate_ramp_masks = None
        return self.dgate_finish

    def _dgate_hold(self) -> None:
        """After every optimizer step of the finish: the zeroed groups back to exactly zero."""
        if self._dgate_zero_masks is not None:
            zero_exactly(self.dgate_bank, self._dgate_zero_masks, self.optimizer)

    def _dgate_end_finish(self) -> None:
        """End of training: kept groups that fell under the threshold while the rest trained are zeroed too (and
        counted), so that the export removes only exact zeros; the parameters kept go into the record."""
        bank, rec = self.dgate_bank, self.dgate_finish
        with torch.no_grad():
            late = {t: bank.zero_groups(t).detach().cpu() & ~(bank.scale(t).detach() == 0).cpu() for t in bank.targets}
            if any(bool(m.any()) for m in late.values()):
                zero_exactly(bank, late, self.optimizer)
                rec.late_zeros = {t: int(m.sum()) for t, m in late.items()}
            total, kept = params_after(bank, exact_zero_masks(bank))
        rec.params_kept, rec.params_total = kept, total

    def _dgate_warn_budget(self, report: SparsityReport) -> None:
        """The budget is met when the export keeps it to within 2% of the model's parameters; else say by how much
        it missed and why."""
        budget, kept, total = self.dgate_budget, report.params_kept, report.params_total
        miss = kept - budget
        if abs(miss) <= 0.02 * total:
            return
        why = (
            "the penalty removed more than the budget asks before the finish (zero groups do not come back): start "
            "from a smaller lam or give the ramp more steps"
            + ("; or the gradual cut's last step needed a dear group (a head costs as much as many neurons), which "
               "held groups cannot make up for" if self._dgate_gradual() else "")
            if miss < 0
            else "removing every gated group is not enough, or the finish was not reached"
        )
        warnings.warn(
            f"target_params missed: the export keeps {kept:,} parameters, budget {budget:,} "
            f"({100 * miss / total:+.1f}% of {total:,}); {why}.",
            stacklevel=3,
        )

    def write_sparsity_report(self, output_dir: str) -> SparsityReport:
        """The per-layer table of active groups, saved as `dgate_sparsity.json` in `output_dir`.

        Call it on every process (FSDP gathers the group norms); only the main process writes. Refuses (and
        writes nothing) when a gate or gated weight is NaN/inf.
        """
        report = self._checked_report("write the sparsity report")
        if not self.is_world_process_zero():
            return report
        os.makedirs(output_dir, exist_ok=True)
        data = report.to_dict()
        data["global_step"] = self.state.global_step
        data["lam"] = self.dgate_bank.lam
        data["params_budget"] = self.dgate_budget
        data["finish"] = None if self.dgate_finish is None else self.dgate_finish.to_dict()
        with open(os.path.join(output_dir, SPARSITY_NAME), "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
        return report

    def _checked_report(self, action: str) -> SparsityReport:
        """`sparsity_report`, refusing NaN/inf gates or weights with a message that names the global step."""
        self.dgate_bank.assert_finite(f"{action} at global step {self.state.global_step}")
        return sparsity_report(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model with its gates (`dgate.*` tensors), `dgate_config.json`, the manifest naming the weight files
        this save wrote (what `load_gated` reads) and the lam controller's state."""
        target = self.args.output_dir if output_dir is None else output_dir
        before = weight_files_state(target)
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = target
        if self.args.should_save:
            self.dgate_bank.config.save_pretrained(output_dir)
            write_manifest(self.dgate_bank, output_dir, written_weight_files(output_dir, before))
            state = {"lam_controller": self.lam_controller.state_dict(), "lam": self.dgate_bank.lam}
            state[SETUP_KEY] = trainer_setup(self)
            if self.dgate_finish is not None:
                state["finish"] = self.dgate_finish.to_dict()
            with open(os.path.join(output_dir, TRAINER_STATE_NAME), "w") as f:
                json.dump(state, f, indent=2, allow_nan=False)

    def _restore_dgate_state(self, checkpoint: str) -> None:
        """Resume: check the checkpoint's gates were made like this model's, and restore the lam controller from
        `dgate_trainer_state.json`, validated like a fresh one (a bad file is a ValueError naming file and field)."""
        manifest = read_manifest(checkpoint)
        conflict = None if manifest is None else record_conflict(manifest, gate_record(self.dgate_bank))
        if conflict is not None:
            key, was, now = conflict
            raise ValueError(
                f"Cannot resume from {checkpoint!r}: its gates were trained with {key}={was!r}, this model is gated "
                f"with {key}={now!r}. Gate the model with the checkpoint's dgate_config.json."
            )
        path = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if not os.path.isfile(path):
            if manifest is not None and self.is_world_process_zero():
                warnings.warn(
                    f"{checkpoint!r} holds gates but no {TRAINER_STATE_NAME}, so the lam controller's state is lost: "
                    f"lam restarts at {self.lam_controller.lam:g} and the controller from its first step.",
                    stacklevel=3,
                )
            return
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise ValueError(f"{path!r} is not valid JSON ({e}); fix it or delete it to resume without it.") from None
        if not isinstance(state, dict) or not isinstance(state.get("lam_controller"), dict):
            raise ValueError(f"{path!r} has no 'lam_controller' object; fix the file, or delete it to resume without.")
        lam = state.get("lam", 0.0)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"{path!r}: field 'lam'={lam!r} is invalid (expected a finite float >= 0); fix the file.")
        try:
            LamController(lam=0.0).load_state_dict(state["lam_controller"])  # validated even when not restored
        except ValueError as e:
            raise ValueError(f"{path!r}: field 'lam_controller': {e} Fix the file or delete it.") from None
        now = trainer_setup(self)
        if check_resume(checkpoint, state, now, self._dgate_legacy_auto_rate()):  # refuses a changed setup
            self.lam_controller.load_state_dict(state["lam_controller"])
        if state.get("finish") is not None:  # the finish had begun: hold what the checkpoint holds at zero
            try:
                self.dgate_finish = FinishRecord.from_dict(state["finish"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path!r}: field 'finish': {e} Fix the file or delete it.") from None
            self._dgate_restore_masks = True

    def export_pruned(
        self,
        output_dir: str | None = None,
        push_to_hub: bool = False,
        hub_model_id: str | None = None,
        threshold: float | None = None,
        *,
        allow_inexact: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Write the physically pruned model (weights, config, model card) and optionally push it to the Hub.

        Defaults to `<output_dir>/pruned`; see `hf_dgate.export_to_dir` for the keyword arguments. The export is
        checked against the gated model (`hf_dgate.verify`): removed groups that were not zero raise ExportError
        unless `allow_inexact=True`, and the summary's `verification` says what was measured.
        """
        from .hub import export_to_dir
        from .outdir import checkpoint_dirs

        if getattr(self, "is_fsdp_enabled", False):  # the weights are shards: one process cannot prune them alone
            raise ValueError(
                "export_pruned needs the whole model, and under FSDP every process holds a shard. Save a full "
                "state dict (fsdp_config={'state_dict_type': 'FULL_STATE_DICT'}; trainer.save_model(DIR)), then "
                "export in one process: `hf-dgate export DIR --out OUT`."
            )
        output_dir = os.path.join(self.args.output_dir, "pruned") if output_dir is None else output_dir
        if not self.args.should_save:
            return {}
        # the run's output folder and its checkpoints are never replaced (`<output_dir>/pruned` inside it is fine)
        keep = [self.args.output_dir, *checkpoint_dirs(self.args.output_dir), *kwargs.pop("protected_dirs", ())]
        if self.dgate_finish is not None and "compression" not in kwargs:
            kwargs["compression"] = self.dgate_finish.to_dict() | {"text": self.dgate_finish.describe()}
        return export_to_dir(
            self.model, output_dir, push_to_hub=push_to_hub, hub_model_id=hub_model_id, threshold=threshold,
            protected_dirs=keep, allow_inexact=allow_inexact, **kwargs,
        )  # fmt: skip


_CLASSES: dict[type, type] = {}


def with_dgate(trainer_cls: type) -> type:
    """`trainer_cls` with D-Gating: the penalty, the budget (`target_params`), the finish, logging and checkpoints.

        SFTTrainer = hf_dgate.with_dgate(trl.SFTTrainer)
        trainer = SFTTrainer(model, args, train_dataset=ds, dgate_config=DGateConfig(...), target_params=0.5)

    Works for `transformers.Trainer` and its subclasses that keep its `compute_loss`/`training_step` contract
    (Seq2SeqTrainer, TRL's SFTTrainer). The same class object is returned for the same `trainer_cls`.
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_dgate needs a transformers.Trainer subclass, not {trainer_cls!r}.")
    if issubclass(trainer_cls, DGateMixin):
        return trainer_cls
    if trainer_cls not in _CLASSES:
        name = f"DGate{trainer_cls.__name__}"
        _CLASSES[trainer_cls] = type(name, (DGateMixin, trainer_cls), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[trainer_cls]


class DGateTrainer(DGateMixin, Trainer):
    """`transformers.Trainer` with D-Gating (`with_dgate(Trainer)`): see `DGateMixin` for the arguments."""


_CLASSES[Trainer] = DGateTrainer


class _DGateCallback(TrainerCallback):
    """Moves the lam controller after every optimizer step (same decision on every process: parameters agree)."""

    def __init__(self, trainer: DGateMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        tr = self.trainer
        n = tr._dgate_finish_len()
        if n and state.max_steps and n >= state.max_steps:
            raise ValueError(f"finish_steps={n} leaves no training before the finish (max_steps={state.max_steps}).")
        if tr._dgate_auto_ramp and state.max_steps > 0:  # the same value again when a run resumes
            end = state.max_steps - n  # the penalty phase ends where the finish begins
            tr.lam_controller.target_ramp_steps = max(0, end - tr.lam_controller.warmup_steps) // 2
        if getattr(tr, "_dgate_restore_masks", False):
            tr._dgate_zero_masks = exact_zero_masks(tr.dgate_bank)
            tr._dgate_restore_masks = False
        elif tr._dgate_gradual() and tr._dgate_zero_masks is None and state.global_step > 0:
            masks = exact_zero_masks(tr.dgate_bank)  # resumed during the gradual cut: hold what the checkpoint holds
            if any(bool(m.any()) for m in masks.values()):
                tr._dgate_ramp_masks = masks
                tr._dgate_ramp_start = tr._dgate_first_cut_step()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        tr = self.trainer
        if (
            tr._dgate_gradual()
            and tr.dgate_budget_ranking is BudgetRanking.SALIENCY
            and tr._dgate_zero_masks is None  # (the finish ranks nothing: its cut is done)
        ):
            tr._dgate_accumulate_saliency()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        ctl = tr.lam_controller
        if tr._dgate_zero_masks is not None:
            tr._dgate_hold()
            return control
        n = tr._dgate_finish_len()
        if n and state.global_step >= state.max_steps - n:
            tr.dgate_start_finish()
            return control
        if tr._dgate_gradual():
            if state.global_step % ctl.interval == 0:
                tr._dgate_gradual_cut(state.global_step)
            elif tr._dgate_ramp_masks is not None:
                zero_exactly(tr.dgate_bank, tr._dgate_ramp_masks, tr.optimizer)
        elif tr.dgate_budget is not None:
            if state.global_step % ctl.interval == 0:
                tr._dgate_observe_budget(state.global_step)
        elif ctl.target_sparsity is not None and state.global_step % ctl.interval == 0:
            bank = tr.dgate_bank
            with torch.no_grad():
                ctl.observe(
                    state.global_step,
                    bank.effective_norms(tr.sparsity_target),
                    bank.group_thresholds(tr.sparsity_target),
                )
        return control  # bank.lam keeps the value this step used (what gets logged); compute_loss sets the next
