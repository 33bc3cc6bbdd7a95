"""Rank-budget pruning shared by the SVD-form adapters (AdaLoRA, LoRA²).

Both adapters write ΔW with a trainable diagonal ``lora_lambda`` (one entry per rank index i) between a
"left" factor whose column i and a "right" factor whose row i belong to that index. AdaLoRA (Zhang et al.,
2023, sec. 3) prunes the entries of Λ whose importance is lowest until a model-wide budget of active
ranks is met; LoRA² (sec. 3.2) reuses the procedure with a reduced importance score. This module holds
what they share:

* :class:`BudgetConfig`, the options (``target_r``, ``init_r``, ``tinit``, ``tfinal``, ``delta_t``,
  ``beta1``, ``beta2``, ``orth_reg``);
* :class:`BudgetSchedule`, the cubic budget schedule and which steps mask;
* :class:`ImportanceEMA`, the smoothed sensitivity × uncertainty score of one tensor;
* :func:`rank_scores`, the per-rank-index ("triplet") score;
* :func:`allocate`, the global top-``budget`` selection;
* :class:`BudgetController`, which runs all of it inside the training loop;

A layer taking part subclasses :class:`RankPrunedLayer`: it has ``lora_lambda`` (shape (r,)), a persistent
bool buffer ``rank_mask`` (r,) and ``importance_factors()`` returning (left, right) with left of shape
(·, r) and right of shape (r, ·): the tensors whose sensitivity enters the score of each rank index.

Importance (AdaLoRA eq. 8-11). For every entry θ of a scored tensor, after the step's backward:
``I = |θ · ∂L/∂θ|``; ``Ī ← β1 Ī + (1 − β1) I``; ``Ū ← β2 Ū + (1 − β2) |I − Ī|`` (with the new Ī);
score ``s = Ī · Ū``. Both EMAs start at 0. The score of rank index i is
``s(λ_i) + mean_j s(left[j, i]) + mean_j s(right[i, j])``.

Budget schedule (AdaLoRA eq. 12), with T = total optimizer steps, steps counted from 0,
``b0 = init_r · n_layers``, ``bT = target_r · n_layers`` and ``t_f = T − tfinal`` (the final phase's
first step, clamped to at most T − 1 so that the last step always holds the target budget):

* ``t < tinit``: budget b0, no masking (warm-up: importance is accumulated, nothing is pruned);
* ``tinit ≤ t < t_f``: budget ``floor(bT + (b0 − bT) · (1 − (t − tinit) / (t_f − tinit))³)``, applied
  every ``delta_t`` steps counted from ``tinit`` (so at t = tinit, tinit + Δt, ...);
* ``t = t_f``: the mask is computed once more at budget bT with the latest scores and then frozen;
* ``t > t_f``: the frozen mask is re-applied after every optimizer step (the optimizer's momentum
  would otherwise revive pruned entries); importance is no longer updated.

Masking sets the pruned entries of Λ to exactly 0 after the optimizer step; between masking steps of the
decreasing phase they may grow back from their gradient, as in the paper (pruned triplets can be
reactivated; P and Q are kept). The forward never multiplies by the mask, so what is applied is exactly
Λ, and ``delta_weight()`` reflects the pruning. ``rank_mask`` records the latest mask and, at the end of
training, each layer's final rank (saved with the adapter; the controller's ``summary()`` reports it).

The selection picks exactly ``budget`` indices model-wide (a stable descending sort of all scores, ties
broken by layer order then index), so the final ranks sum to ``target_r · n_layers`` exactly.

Defaults, our choices where the papers tune per task: ``target_r`` = round(2r / 3) (AdaLoRA starts from
1.5× the target budget); ``init_r`` = r (every index starts active); ``tinit`` = 10 % and ``tfinal`` = 30 %
of the run's steps (the GLUE runs of AdaLoRA warm up for a small share of training and hold the final
budget for a large one; scaling with the run keeps short LLM runs valid); ``delta_t`` = 10 steps;
``beta1`` = ``beta2`` = 0.85 (AdaLoRA); ``orth_reg`` = 0.001, added to the loss as
``orth_reg · Σ_layers R(layer)`` (the papers' sum of squared norms over layers, not a mean). AdaLoRA's
γ = 0.1 belongs to its code's form (unsquared norms averaged over the matrices, as PEFT also computes);
with the summed squared form 0.1 swamps the task (docs/adapters.md, "Measured facts behind the
defaults"); at 0.001 the two start comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..errors import UserError
from .base import AdapterConfig, AdapterLayer, Controller


class BudgetConfig(AdapterConfig):
    """Options of the budget-pruned SVD-form adapters; subclasses add ``type``."""

    target_r: Optional[int] = Field(
        None, gt=0, description="average rank per layer at the end (total budget = target_r × layers); default round(2r/3)"
    )
    init_r: Optional[int] = Field(None, gt=0, description="average rank per layer until tinit; default r")
    tinit: Optional[int] = Field(None, ge=0, description="warm-up steps before pruning; default 10% of the run")
    tfinal: Optional[int] = Field(
        None, ge=0, description="final steps with the budget fixed at target_r; default 30% of the run"
    )
    delta_t: int = Field(10, gt=0, description="steps between two maskings while the budget decreases")
    beta1: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the sensitivity |θ·∇θ|")
    beta2: float = Field(0.85, gt=0.0, lt=1.0, description="EMA factor of the uncertainty |I − Ī|")
    orth_reg: float = Field(0.001, ge=0.0, description="weight of the orthogonality regulariser (summed squared form)")

    @property
    def target_rank(self) -> int:
        return self.target_r if self.target_r is not None else max(1, round(2 * self.r / 3))

    @property
    def initial_rank(self) -> int:
        return self.init_r if self.init_r is not None else self.r

    @model_validator(mode="after")
    def _ranks_ordered(self):
        if self.initial_rank > self.r:
            raise ValueError(f"init_r={self.initial_rank} exceeds r={self.r}; set init_r <= r")
        if self.target_rank > self.initial_rank:
            raise ValueError(
                f"target_r={self.target_rank} exceeds the initial rank {self.initial_rank}; set target_r <= init_r (or r)"
            )
        return self


# --- schedule ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetSchedule:
    """The total number of active rank indices at each optimizer step, and what to do after it."""

    init_budget: int
    target_budget: int
    tinit: int
    final_start: int  # first step of the final phase (T − tfinal, at most T − 1)
    delta_t: int

    @classmethod
    def from_config(cls, config: BudgetConfig, n_layers: int, total_steps: int) -> "BudgetSchedule":
        if total_steps < 1:
            raise UserError(f"{config.type} needs at least one training step to prune ranks; raise training.max_steps")
        tinit = config.tinit if config.tinit is not None else int(0.1 * total_steps)
        tfinal = config.tfinal if config.tfinal is not None else int(0.3 * total_steps)
        final_start = min(total_steps - tfinal, total_steps - 1)
        if tinit > final_start:
            raise UserError(
                f"adapter.tinit={tinit} is past the final phase, which starts at step {final_start} of {total_steps} "
                f"(adapter.tfinal={tfinal}); lower adapter.tinit or adapter.tfinal"
            )
        return cls(
            init_budget=config.initial_rank * n_layers,
            target_budget=config.target_rank * n_layers,
            tinit=tinit,
            final_start=final_start,
            delta_t=config.delta_t,
        )

    def budget(self, step: int) -> int:
        if step < self.tinit:
            return self.init_budget
        if step >= self.final_start:
            return self.target_budget
        remaining = 1.0 - (step - self.tinit) / (self.final_start - self.tinit)
        return int(math.floor(self.target_budget + (self.init_budget - self.target_budget) * remaining**3))

    def action(self, step: int) -> str:
        """After the optimizer step ``step``: "none", "mask" (to ``budget(step)``), "freeze" (final mask)
        or "hold" (re-apply the frozen mask)."""
        if step < self.tinit:
            return "none"
        if step < self.final_start:
            return "mask" if (step - self.tinit) % self.delta_t == 0 else "none"
        return "freeze" if step == self.final_start else "hold"

    def updates_importance(self, step: int) -> bool:
        return step <= self.final_start


# --- importance ----------------------------------------------------------------------------------


class ImportanceEMA:
    """Smoothed sensitivity Ī and uncertainty Ū of one tensor; ``score = Ī · Ū``."""

    def __init__(self, beta1: float, beta2: float):
        self.beta1 = beta1
        self.beta2 = beta2
        self.sensitivity: Optional[Tensor] = None
        self.uncertainty: Optional[Tensor] = None

    @torch.no_grad()
    def update(self, param: Tensor, grad: Tensor) -> None:
        sensitivity = (param.float() * grad.float()).abs()
        if self.sensitivity is None:
            self.sensitivity = torch.zeros_like(sensitivity)
            self.uncertainty = torch.zeros_like(sensitivity)
        self.sensitivity.mul_(self.beta1).add_(sensitivity, alpha=1 - self.beta1)
        self.uncertainty.mul_(self.beta2).add_((sensitivity - self.sensitivity).abs(), alpha=1 - self.beta2)

    def score(self) -> Optional[Tensor]:
        if self.sensitivity is None:
            return None
        return self.sensitivity * self.uncertainty

    def state_dict(self) -> dict[str, Tensor]:
        if self.sensitivity is None:
            return {}
        return {"sensitivity": self.sensitivity.clone(), "uncertainty": self.uncertainty.clone()}

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device) -> None:
        if state:
            self.sensitivity = state["sensitivity"].to(device=device, dtype=torch.float32).clone()
            self.uncertainty = state["uncertainty"].to(device=device, dtype=torch.float32).clone()


def rank_scores(lambda_score: Tensor, left_score: Tensor, right_score: Tensor) -> Tensor:
    """Score of each rank index i: s(λ_i) + mean over column i of left + mean over row i of right."""
    return lambda_score + left_score.mean(dim=0) + right_score.mean(dim=1)


def allocate(scores: dict[str, Tensor], budget: int) -> dict[str, Tensor]:
    """Bool masks keeping exactly the ``budget`` highest scores over all layers."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().reshape(-1) for n in names])
    budget = max(0, min(budget, flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = True
    masks, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = keep[offset : offset + size]
        offset += size
    return masks


# --- layer side ----------------------------------------------------------------------------------


def gaussian_(tensor: Tensor, std: float) -> Tensor:
    """In-place N(0, std²) from the global generator (left untouched on the meta device)."""
    with torch.no_grad():
        if tensor.device.type != "meta":
            tensor.normal_(0.0, std)
    return tensor


class RankPrunedLayer(AdapterLayer):
    """An adapter layer with a prunable diagonal ``lora_lambda``; subclasses create it and call
    :meth:`init_rank_mask` in ``__init__`` and implement :meth:`importance_factors`."""

    lora_lambda: nn.Parameter
    rank_mask: Tensor

    def init_rank_mask(self, rank: int) -> None:
        """The persistent (saved) record of which rank indices are active: all of them at first."""
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool, device=self.device), persistent=True)

    def importance_factors(self) -> tuple[Tensor, Tensor]:
        """(left (·, r), right (r, ·)): the tensors whose column / row i enter the score of index i."""
        raise NotImplementedError

    def active_rank(self) -> int:
        return int(self.rank_mask.sum().item())

    def extra_repr(self) -> str:
        if self.rank_mask.device.type == "meta":
            return super().extra_repr()
        return super().extra_repr() + f", active_rank={self.active_rank()}"


@torch.no_grad()
def apply_rank_mask(layer: nn.Module, mask: Optional[Tensor] = None) -> None:
    """Store ``mask`` (if given) and zero the pruned entries of Λ."""
    if mask is not None:
        layer.rank_mask.copy_(mask.to(layer.rank_mask.device))
    layer.lora_lambda.masked_fill_(~layer.rank_mask, 0.0)


# --- controller ----------------------------------------------------------------------------------


class BudgetController(Controller):
    """Runs the importance EMAs and the masking inside the training loop (see the module docstring)."""

    layers: dict[str, RankPrunedLayer]

    def __init__(self, layers: dict[str, RankPrunedLayer], config: BudgetConfig, total_steps: int):
        super().__init__(layers, config, total_steps)
        self.schedule = BudgetSchedule.from_config(config, len(layers), total_steps)
        self.ema: dict[str, dict[str, ImportanceEMA]] = {
            name: {key: ImportanceEMA(config.beta1, config.beta2) for key in ("lambda", "left", "right")}
            for name in layers
        }

    def _scored_tensors(self, layer: RankPrunedLayer) -> dict[str, Tensor]:
        left, right = layer.importance_factors()
        return {"lambda": layer.lora_lambda, "left": left, "right": right}

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.schedule.updates_importance(step):
            return
        for name, layer in self.layers.items():
            for key, tensor in self._scored_tensors(layer).items():
                if tensor.grad is not None:
                    self.ema[name][key].update(tensor.detach(), tensor.grad)

    def scores(self) -> dict[str, Tensor]:
        """Current score of every rank index, per layer (zeros before any gradient was seen)."""
        result = {}
        for name, layer in self.layers.items():
            parts = {key: ema.score() for key, ema in self.ema[name].items()}
            if any(p is None for p in parts.values()):
                result[name] = torch.zeros(layer.lora_lambda.shape[0], device=layer.lora_lambda.device)
            else:
                result[name] = rank_scores(parts["lambda"], parts["left"], parts["right"])
        return result

    def mask_to_budget(self, budget: int) -> None:
        for name, mask in allocate(self.scores(), budget).items():
            apply_rank_mask(self.layers[name], mask)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        action = self.schedule.action(step)
        if action in ("mask", "freeze"):
            self.mask_to_budget(self.schedule.budget(step))
        elif action == "hold":
            for layer in self.layers.values():
                apply_rank_mask(layer)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: {key: ema.state_dict() for key, ema in emas.items()} for name, emas in self.ema.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, emas in self.ema.items():
            device = self.layers[name].lora_lambda.device
            for key, ema in emas.items():
                ema.load_state_dict(state.get(name, {}).get(key, {}), device)

    def summary(self) -> dict[str, Any]:
        return {"ranks": {name: layer.active_rank() for name, layer in self.layers.items()}}
