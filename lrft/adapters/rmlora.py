"""RM-LoRA: Regularized and Masked LoRA (Mao et al.; the RM-LoRA paper, sec. 4 and Algorithm 1).

ΔW = (alpha / r) · B A exactly as LoRA (this layer *is* :class:`~lrft.adapters.lora.LoRALayer`, same
tensors, init, ``delta_weight`` and parameter count ``r (in + out)``). Training adds two things:

**R-LoRA, the orthogonality regulariser** (sec. 4.2, eq. 10), per adapted layer

    Reg(A, B) = ‖A Aᵀ − I_r‖²_F + ‖Bᵀ B − I_r‖²_F

summed over the adapted layers and added to the loss times ``orth_reg`` (``orth_reg_norm: squared``,
the default: eq. 10 as printed). ``orth_reg_norm: frobenius`` is what the authors' public code
(``compute_svd_orth_regu`` in github.com/yz-mao/RM-LoRA) computes instead: the *unsquared* norms,
averaged over all 2L factor matrices of the model,

    (1 / 2L) Σ_layers ( ‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F ).

It is weaker by a large factor (no square, divided by 2L), so an ``orth_reg`` tuned for one form does
not carry over to the other. The paper gives no coefficient. The authors' value is 0.1 (their README:
"reg_orth_coef: the weight of orthogonal regularization (0, 0.1)", and every RM-LoRA run script uses
0.1), tuned with the frobenius form; with the squared form it swamps the task (docs/adapters.md, "Measured
facts behind the defaults"). lrft's default is therefore ``orth_reg = 0.001`` with the squared form,
where the two losses start comparable; use ``orth_reg: 0.1, orth_reg_norm: frobenius`` for the authors'
setting. The regulariser is computed in float32 with autocast off (A Aᵀ − I in bfloat16 would lose the
residual it is meant to shrink), by :func:`lrft.adapters.base.orthogonality_residuals`, which inspect-rank
reports too.

**GM-LoRA, gradient masking** (sec. 4.3, Algorithm 1): every optimizer step, each adapted layer draws
r̂ = ``mask_rank`` distinct directions out of the r; only those rows of A and the same columns of B are
updated in that step. The paper gives no r̂; the authors' run scripts use r̂ = r/2 (``--lora_r 4
--random_rank 2``, ``--lora_r 8 --random_rank 4``), which is the default here (``r // 2``, at least 1)
when ``mask_rank`` is absent from the recipe. A and B share one draw, as Algorithm 1 (lines 6-12) and the
authors' ``lora_type v1``.

So one type covers the paper's three variants:

* ``type: rmlora`` (defaults): RM-LoRA, both techniques;
* ``type: rmlora, orth_reg: 0``: GM-LoRA (masking only);
* ``type: rmlora, mask_rank: null`` (or ``mask_rank: <r>``): R-LoRA (regulariser only, nothing masked);
* both off: plain LoRA.

``mask_mode`` says what "not updated" means for AdamW:

* ``exact`` (default): the masked entries do not move at all in that step: no gradient, no momentum,
  no weight decay, and their AdamW moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are
  neither updated nor applied. The controller copies A, B and every optimizer-state tensor shaped like
  them in ``before_optimizer_step``; ``after_optimizer_step`` puts the copies back and writes only the
  selected slices' new values (masked entries stay bit-identical; the copies are a transient 3× the
  adapter's size). Bias correction: AdamW keeps one ``step`` counter per tensor, but under exact
  masking a direction's moments have only seen the k steps it was selected in, and correcting them
  with the tensor's step t > k would inflate its updates, mostly through the second moment's
  correction (about sqrt((1−β2^t)/(1−β2^k)): 1.4× at t = 200, k = 100, β2 = 0.999). So the controller
  counts updates per direction (part of its state dict) and, for Adam/AdamW, recomputes the selected
  slices from their pre-step value and the moments AdamW just updated (those do not depend on the
  step) with their own count k:
  ``p ← p·(1 − lr·wd) − lr/(1−β1^k) · m / (sqrt(v)/sqrt(1−β2^k) + eps)``.
  Each direction thus follows the AdamW trajectory it would have under its own optimizer that steps
  only when it is selected. For other optimizers the masked entries are still restored and the
  selected ones keep the optimizer's own update.
* ``grad_only``: the masked gradients are zeroed and AdamW runs as usual, so momentum and weight decay
  still move masked entries, as in the authors' public code (``param.grad *= mask`` before
  ``optimizer.step()``).

Cost (sec. 4.3 suggests not computing the masked gradients): during a training step the layer runs
:class:`SelectedDirectionsLoRA`, whose forward is the LoRA forward and whose backward forms weight
gradients for the r̂ selected directions only (masked rows / columns of ``grad`` are exact zeros); the
gradient with respect to x still uses all r directions, since the layers below need it. The controller
zeroes the masked gradients again before the optimizer step because the regulariser's gradient
reaches every direction (Algorithm 1 masks the gradient of the whole loss). What this saves against
LoRA, and what the ``exact`` hooks cost, is measured by ``benchmarks/rmlora_step.py`` (docs/adapters.md).

Directions come from a ``torch.Generator`` seeded from (``adapter.seed``, step, layer name), so a run
draws the same directions on every process and after a resume; the state dict holds only the
per-direction update counts.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Any, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..errors import UserError
from .base import AdapterConfig, Controller, orthogonality_residuals
from .lora import LoRALayer

# The paper gives no value; 0.001 keeps the squared regulariser comparable with the LM loss at the start
# (the authors' 0.1 belongs to their unsquared form; see the module docstring).
DEFAULT_ORTH_REG = 0.001


class RMLoRAConfig(AdapterConfig):
    type: Literal["rmlora"] = "rmlora"
    orth_reg: float = Field(
        DEFAULT_ORTH_REG,
        ge=0.0,
        description="weight of the orthogonality regulariser (eq. 10); 0 turns it off (GM-LoRA)",
    )
    orth_reg_norm: Literal["squared", "frobenius"] = Field(
        "squared",
        description="squared: eq. 10 summed over layers; frobenius: the authors' code, "
        "unsquared norms averaged over all factors",
    )
    mask_rank: Optional[int] = Field(
        None,
        ge=1,
        description="directions updated per step (Algorithm 1's r̂); absent: r // 2; null or r: no masking (R-LoRA)",
    )
    mask_mode: Literal["exact", "grad_only"] = Field(
        "exact",
        description="exact: masked entries and their AdamW state are frozen; grad_only: only gradients are zeroed",
    )

    @model_validator(mode="after")
    def _resolve_mask_rank(self) -> "RMLoRAConfig":
        if "mask_rank" not in self.model_fields_set:
            self.mask_rank = max(1, self.r // 2)
        elif self.mask_rank is not None and self.mask_rank > self.r:
            raise ValueError(
                f"mask_rank={self.mask_rank} is larger than r={self.r}; set adapter.mask_rank to 1..{self.r} "
                f"(or null to update every direction)"
            )
        return self

    @property
    def masking(self) -> bool:
        return self.mask_rank is not None and self.mask_rank < self.r


class SelectedDirectionsLoRA(torch.autograd.Function):
    """``scaling · x Aᵀ Bᵀ`` (the value of the LoRA forward) whose backward forms weight gradients only for
    the ``selected`` directions: rows of A and columns of B outside it get exact zeros.

    Compared with autograd through the LoRA forward, the backward skips (r − r̂)/r of the two
    weight-gradient matmuls, and of the ``grad_out · B`` matmul too when x needs no gradient; the
    input gradient still uses every direction. The scaling is applied to the r-wide intermediate
    rather than to output-sized tensors (so the value differs from LoRA's by rounding only). x is 2-D
    (tokens, in).
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, selected: Tensor, scaling: float) -> Tensor:
        scaled_hidden = (x @ A.T) * scaling
        ctx.save_for_backward(x, A, B, scaled_hidden, selected)
        ctx.scaling = scaling
        return scaled_hidden @ B.T

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, A, B, scaled_hidden, selected = ctx.saved_tensors
        scaling = ctx.scaling
        needs_x, needs_A, needs_B = ctx.needs_input_grad[:3]
        grad_x = grad_A = grad_B = None
        # The r̂-wide products are written as (r̂ × tokens) results and transposed back: BLAS kernels
        # are several times slower on a (tokens × 8) output than on an (8 × tokens) one.
        if needs_x:
            grad_hidden = (grad_out @ B) * scaling
            grad_x = grad_hidden @ A
            grad_hidden_selected_t = grad_hidden.index_select(1, selected).T
        elif needs_A:
            grad_hidden_selected_t = (B.index_select(1, selected).T @ grad_out.T) * scaling
        if needs_A:
            grad_A = torch.zeros_like(A).index_copy_(0, selected, grad_hidden_selected_t @ x)
        if needs_B:
            grad_B_selected_t = scaled_hidden.index_select(1, selected).T @ grad_out
            grad_B = torch.zeros_like(B).index_copy_(1, selected, grad_B_selected_t.T)
        return grad_x, grad_A, grad_B, None, None


class RMLoRALayer(LoRALayer):
    """A LoRA layer that, while a step's directions are selected, builds weight gradients for them only."""


    def __init__(self, base_layer, config: RMLoRAConfig, shared, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        # set by the controller for the duration of one optimizer step; never saved
        self.selected: Optional[Tensor] = None

    def select_directions(self, selected: Optional[Tensor]) -> None:
        """Restrict this step's weight gradients to the directions ``selected`` (sorted indices), or lift it."""
        self.selected = None if selected is None else selected.to(self.lora_A.device)

    def delta(self, x: Tensor) -> Tensor:
        if self.selected is None or not (self.training and torch.is_grad_enabled()):
            return super().delta(x)
        # what F.linear would compute in (under autocast too), chosen here because the backward below does
        # its own matmuls
        dtype = self.compute_dtype(x)
        flat = x.reshape(-1, self.in_features).to(dtype)
        out = SelectedDirectionsLoRA.apply(
            flat, self.lora_A.to(dtype), self.lora_B.to(dtype), self.selected, self.scaling
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def orthogonality_terms(self, squared: bool = True) -> tuple[Tensor, Tensor]:
        """(‖AAᵀ − I‖, ‖BᵀB − I‖) in float32, squared or not; unweighted."""
        device_type = self.lora_A.device.type
        with torch.autocast(device_type=device_type, enabled=False) if device_type != "meta" else nullcontext():
            return orthogonality_residuals(self.lora_B.float(), self.lora_A.float(), squared)

    def extra_loss(self) -> Optional[Tensor]:
        # The regulariser is added by the Controller: its frobenius form is a mean over every factor of
        # the model, which one layer cannot compute alone.
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_rank={self.config.mask_rank}, orth_reg={self.config.orth_reg:g}"


class RMLoRAController(Controller):
    """Draws each step's directions, adds the regulariser, and enforces the mask around ``optimizer.step()``."""

    layers: dict[str, RMLoRALayer]
    config: RMLoRAConfig

    def __init__(self, layers: dict[str, RMLoRALayer], config: RMLoRAConfig, total_steps: int):
        super().__init__(layers, config, total_steps)
        self.selected: dict[str, Tensor] = {}
        # exact mode: how many optimizer updates each direction has had (its own Adam step count)
        self.direction_updates: dict[str, Tensor] = {
            name: torch.zeros(config.r, dtype=torch.int64) for name in layers
        }
        self._snapshots: dict[int, dict[str, Any]] = {}

    # --- direction draws -------------------------------------------------------------------------
    def directions(self, step: int, name: str) -> Tensor:
        """The sorted ``mask_rank`` directions layer ``name`` updates at optimizer step ``step``."""
        digest = hashlib.sha256(f"rmlora:{self.config.seed}:{step}:{name}".encode()).digest()
        generator = torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return torch.randperm(self.config.r, generator=generator)[: self.config.mask_rank].sort().values

    def start_step(self, step: int) -> None:
        if not self.config.masking:
            return
        self.selected = {name: self.directions(step, name) for name in self.layers}
        for name, layer in self.layers.items():
            layer.select_directions(self.selected[name])

    # --- regulariser -----------------------------------------------------------------------------
    def extra_loss(self) -> Optional[Tensor]:
        if self.config.orth_reg == 0 or not self.layers:
            return None
        squared = self.config.orth_reg_norm == "squared"
        terms = [t for layer in self.layers.values() for t in layer.orthogonality_terms(squared)]
        total = torch.stack(terms).sum()
        if not squared:
            total = total / len(terms)
        return self.config.orth_reg * total

    # --- masking around optimizer.step() ---------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.config.masking:
            return
        optimizer = _unwrap(optimizer)
        self._snapshots = {}
        for layer in self.layers.values():
            if layer.selected is None:
                continue
            for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
                if param.grad is not None:
                    _keep_only_selected(param.grad, dim, layer.selected, before=None)
                if self.config.mask_mode != "exact":
                    continue
                state = optimizer.state.get(param, {})
                # whole tensors: copying them back and re-writing the r̂ selected slices is cheaper
                # than scattering the r − r̂ masked columns of B (a strided copy)
                self._snapshots[id(param)] = {
                    "param": param.detach().clone(),
                    "state": {key: value.clone() for key, value in state.items() if _is_slot(value, param)},
                    "step": _step_value(state),
                    "had_grad": param.grad is not None,
                }

    @torch.no_grad()
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.config.masking:
            return
        if self.config.mask_mode == "exact":
            optimizer = _unwrap(optimizer)
            groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
            is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
            for name, layer in self.layers.items():
                if layer.selected is None:
                    continue
                stepped_any = False
                bias_corrections = None
                for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
                    snapshot = self._snapshots.get(id(param))
                    if snapshot is None:
                        continue
                    state = optimizer.state.get(param, {})
                    # the optimizer skips tensors without a gradient, and a scaler may skip a step
                    step_after = _step_value(state)
                    stepped = snapshot["had_grad"] and (step_after is None or step_after != snapshot["step"])
                    group = groups.get(id(param))
                    if stepped and is_adam and group is not None and "exp_avg" in state:
                        if bias_corrections is None:
                            bias_corrections = self._direction_bias_corrections(name, group, param)
                        decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
                        updated = _adam_update(
                            layer.selected, dim, snapshot["param"], state, group, decoupled, bias_corrections
                        )
                    else:
                        updated = None  # the optimizer's own update
                    _keep_only_selected(param, dim, layer.selected, snapshot["param"], updated)
                    for key, value in state.items():
                        if _is_slot(value, param):
                            # a slot created by this step held the optimizer's initial zeros before it
                            previous = snapshot["state"].get(key)
                            _keep_only_selected(value, dim, layer.selected, previous)
                    stepped_any |= stepped
                if stepped_any:
                    self.direction_updates[name][self.selected[name]] += 1
        self._snapshots = {}
        for layer in self.layers.values():
            layer.select_directions(None)

    def _direction_bias_corrections(self, name: str, group: dict, like: Tensor) -> tuple[Tensor, Tensor]:
        """Adam's (1 − β1^k, sqrt(1 − β2^k)) for each selected direction, k its own update count
        including this step."""
        beta1, beta2 = (float(b) for b in group["betas"])
        counts = (self.direction_updates[name][self.selected[name]] + 1).tolist()
        values = [[1 - beta1**k for k in counts], [(1 - beta2**k) ** 0.5 for k in counts]]
        bias_correction1, bias_correction2_sqrt = torch.tensor(values, dtype=like.dtype).to(like.device)
        return bias_correction1, bias_correction2_sqrt

    # --- resume and reporting --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Directions are a function of (seed, step, layer name); only the update counts are state.
        return {"direction_updates": {name: counts.tolist() for name, counts in self.direction_updates.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = state.get("direction_updates", {})
        if set(counts) != set(self.layers) or any(len(c) != self.config.r for c in counts.values()):
            raise UserError(
                "the checkpoint's RM-LoRA state does not match the adapted layers or adapter.r; "
                "resume with the recipe that wrote the checkpoint"
            )
        self.direction_updates = {name: torch.tensor(counts[name], dtype=torch.int64) for name in self.layers}

    def summary(self) -> dict[str, Any]:
        """Mean ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F over the layers, at the end of training."""
        if not self.layers:
            return {}
        with torch.no_grad():
            terms = torch.tensor(
                [[float(t) for t in layer.orthogonality_terms(squared=False)] for layer in self.layers.values()]
            )
        return {
            "mask_rank": self.config.mask_rank if self.config.masking else None,
            "mask_mode": self.config.mask_mode,
            "orthogonality_residual_A": float(terms[:, 0].mean()),
            "orthogonality_residual_B": float(terms[:, 1].mean()),
        }


def _unwrap(optimizer):
    """The torch optimizer behind a wrapper such as accelerate's AcceleratedOptimizer."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _adam_update(selected, dim, before, state, group, decoupled, bias_corrections) -> Tensor:
    """The selected slices after one Adam(W) update from their pre-step value ``before``, with
    per-direction bias corrections, from the moments ``optimizer.step()`` just updated (their update
    does not depend on the step count)."""
    lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    shape = (-1, 1) if dim == 0 else (1, -1)
    bias_correction1, bias_correction2_sqrt = (b.view(shape) for b in bias_corrections)
    second_moment = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    denom = (second_moment.index_select(dim, selected).sqrt() / bias_correction2_sqrt).add_(eps)
    value = before.index_select(dim, selected)
    if weight_decay != 0 and decoupled:
        value.mul_(1 - lr * weight_decay)
    return value.sub_(state["exp_avg"].index_select(dim, selected) / denom * (lr / bias_correction1))


def _keep_only_selected(
    tensor: Tensor, dim: int, selected: Tensor, before: Optional[Tensor], updated: Optional[Tensor] = None
) -> None:
    """``tensor`` ← ``before`` (zeros when None), except the ``selected`` slices along ``dim``, which get
    ``updated`` (default: their current value)."""
    if updated is None:
        updated = tensor.index_select(dim, selected)
    if before is None:
        tensor.zero_()
    else:
        tensor.copy_(before)
    tensor.index_copy_(dim, selected, updated)


def _is_slot(value: Any, param: Tensor) -> bool:
    """An optimizer-state tensor with one entry per parameter entry (Adam's moments, SGD's momentum)."""
    return torch.is_tensor(value) and value.shape == param.shape


def _step_value(state: dict) -> Optional[float]:
    step = state.get("step")
    return None if step is None else float(step)


Config = RMLoRAConfig
Layer = RMLoRALayer
Controller = RMLoRAController
