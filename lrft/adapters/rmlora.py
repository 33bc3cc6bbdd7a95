"""RM-LoRA: Regularized and Masked LoRA (Mao et al., TMLR; the RM-LoRA paper, sec. 4 and Algorithm 1).

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
not carry over to the other. The paper gives no coefficient; ``orth_reg = 0.1`` is the authors' value
(their README: "reg_orth_coef: the weight of orthogonal regularization (0, 0.1)", and every RM-LoRA run
script uses 0.1; it was tuned with the frobenius form). The regulariser is computed in float32 with
autocast off (A Aᵀ − I in bfloat16 would lose the residual it is meant to shrink).

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
  neither updated nor applied. The controller snapshots the parameters (and the masked slices of every
  optimizer-state tensor shaped like the parameter) in ``before_optimizer_step`` and writes the masked
  slices back in ``after_optimizer_step``. AdamW keeps one ``step`` counter per tensor, but under exact
  masking a direction's moments have only seen the k steps it was selected in, so bias-correcting them
  with the tensor's step t > k would inflate its updates (by about sqrt((1−β2^t)/(1−β2^k)), ≈1.4× early
  in training at r̂ = r/2). The controller therefore counts updates per direction (saved in its state
  dict) and, for Adam/AdamW, recomputes the selected slices' update with their own count k:
  ``p ← p·(1 − lr·wd) − lr/(1−β1^k) · m / (sqrt(v)/sqrt(1−β2^k) + eps)`` from the pre-step value and the
  moments AdamW just updated (the moment updates themselves do not depend on the step). Each direction
  thus follows exactly the AdamW trajectory it would have with its own optimizer stepping only when it
  is selected. For other optimizers the masked slices are still restored, and the selected ones keep
  the optimizer's own update.
* ``grad_only``: the masked gradients are zeroed and AdamW runs as usual, so momentum and weight decay
  still move masked entries, as in the authors' public code (``param.grad *= mask`` before
  ``optimizer.step()``).

Cost (sec. 4.3 suggests skipping the masked gradients): during a training step the layer computes
``x·A_selᵀ·B_selᵀ + x·A_restᵀ·B_restᵀ`` with A_rest, B_rest detached (same value as the LoRA forward, up
to summation order). Backward then forms weight gradients only for the r̂ selected directions; the
gradient with respect to x still flows through all r directions, since the layers below need it.
Masked rows of ``grad`` are exactly zero (``index_select`` backward), and the controller zeroes them
again before the optimizer step because the regulariser's gradient reaches every direction (Algorithm 1
masks the gradient of the whole loss).

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
from torch import Tensor, nn

from .base import AdapterConfig, Controller
from .lora import LoRALayer

# What the authors' RM-LoRA runs use (the paper itself gives no values; see the module docstring).
AUTHORS_ORTH_REG = 0.1


class RMLoRAConfig(AdapterConfig):
    type: Literal["rmlora"] = "rmlora"
    orth_reg: float = Field(
        AUTHORS_ORTH_REG, ge=0.0, description="weight of the orthogonality regulariser (eq. 10); 0 turns it off (GM-LoRA)"
    )
    orth_reg_norm: Literal["squared", "frobenius"] = Field(
        "squared",
        description="squared: eq. 10 summed over layers; frobenius: the authors' code, unsquared norms averaged over factors",
    )
    mask_rank: Optional[int] = Field(
        None,
        ge=1,
        description="directions updated per step (Algorithm 1's r̂); absent: r // 2; null or r: no masking (R-LoRA)",
    )
    mask_mode: Literal["exact", "grad_only"] = Field(
        "exact", description="exact: masked entries and their AdamW state are frozen; grad_only: only gradients are zeroed"
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


def orthogonality_residual(gram: Tensor, squared: bool) -> Tensor:
    """``‖G − I‖²_F`` (squared) or ``‖G − I‖_F`` for an r×r Gram matrix G."""
    residual = gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    squared_norm = (residual * residual).sum()
    return squared_norm if squared else squared_norm.sqrt()


class RMLoRALayer(LoRALayer):
    """A LoRA layer that, while a step's directions are selected, builds weight gradients for them only."""

    config_class = RMLoRAConfig

    def __init__(self, base_layer, config: RMLoRAConfig, shared, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        # set by the controller for the duration of one optimizer step; never saved
        self.selected: Optional[Tensor] = None
        self.masked: Optional[Tensor] = None

    def select_directions(self, selected: Optional[Tensor]) -> None:
        """Restrict this step's weight gradients to the directions ``selected`` (sorted indices), or lift it."""
        if selected is None:
            self.selected = self.masked = None
            return
        is_masked = torch.ones(self.config.r, dtype=torch.bool)
        is_masked[selected] = False
        device = self.lora_A.device
        self.selected = selected.to(device)
        self.masked = is_masked.nonzero().flatten().to(device)

    def delta(self, x: Tensor) -> Tensor:
        if self.selected is None or not (self.training and torch.is_grad_enabled()):
            return super().delta(x)
        x = self.param_dtype_input(x)
        linear = nn.functional.linear
        trained = linear(linear(x, self.lora_A.index_select(0, self.selected)), self.lora_B.index_select(1, self.selected))
        # detached factors: autograd still propagates to x through these directions, but forms no
        # weight gradient for them
        frozen_A = self.lora_A.detach().index_select(0, self.masked)
        frozen_B = self.lora_B.detach().index_select(1, self.masked)
        return (trained + linear(linear(x, frozen_A), frozen_B)) * self.scaling

    def orthogonality_terms(self, squared: bool = True) -> tuple[Tensor, Tensor]:
        """(‖AAᵀ − I‖, ‖BᵀB − I‖) in float32, squared or not; unweighted."""
        device_type = self.lora_A.device.type
        with torch.autocast(device_type=device_type, enabled=False) if device_type != "meta" else nullcontext():
            A = self.lora_A.float()
            B = self.lora_B.float()
            return orthogonality_residual(A @ A.T, squared), orthogonality_residual(B.T @ B, squared)

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
    def _masked_factors(self):
        """(name, parameter, dimension of the directions) for every layer with a selection this step."""
        for name, layer in self.layers.items():
            if layer.masked is not None:
                yield name, layer, layer.lora_A, 0
                yield name, layer, layer.lora_B, 1

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.config.masking:
            return
        optimizer = _unwrap(optimizer)
        self._snapshots = {}
        for _, layer, param, dim in self._masked_factors():
            if param.grad is not None:
                param.grad.index_fill_(dim, layer.masked, 0.0)
            if self.config.mask_mode != "exact":
                continue
            state = optimizer.state.get(param, {})
            self._snapshots[id(param)] = {
                "param": param.detach().clone(),
                "state": {
                    key: value.index_select(dim, layer.masked)
                    for key, value in state.items()
                    if torch.is_tensor(value) and value.shape == param.shape
                },
                "step": _step_value(state),
                "had_grad": param.grad is not None,
            }

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.config.masking:
            return
        if self.config.mask_mode == "exact":
            optimizer = _unwrap(optimizer)
            groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
            updated_layers = set()
            for name, layer, param, dim in self._masked_factors():
                snapshot = self._snapshots.get(id(param))
                if snapshot is None:
                    continue
                if self._restore_and_correct(name, layer, param, dim, snapshot, optimizer, groups.get(id(param))):
                    updated_layers.add(name)
            for name in updated_layers:
                self.direction_updates[name][self.selected[name]] += 1
        self._snapshots = {}
        for layer in self.layers.values():
            layer.select_directions(None)

    @torch.no_grad()
    def _restore_and_correct(self, name, layer, param, dim, snapshot, optimizer, group) -> bool:
        """Put back the masked slices of ``param`` and of its optimizer state; give the selected slices
        their per-direction bias correction. Returns whether the optimizer stepped this parameter."""
        state = optimizer.state.get(param, {})
        before = snapshot["param"]
        param.index_copy_(dim, layer.masked, before.index_select(dim, layer.masked))
        for key, value in state.items():
            if not (torch.is_tensor(value) and value.shape == param.shape):
                continue
            if key in snapshot["state"]:
                value.index_copy_(dim, layer.masked, snapshot["state"][key])
            else:  # created by this step: the masked entries had the optimizer's initial (zero) state
                value.index_fill_(dim, layer.masked, 0.0)
        step_after = _step_value(state)
        stepped = snapshot["had_grad"] and (step_after is None or step_after != snapshot["step"])
        is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if stepped and is_adam and group is not None and "exp_avg" in state:
            decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            self._adam_update_with_direction_counts(name, layer, param, dim, before, state, group, decoupled)
        return stepped

    def _adam_update_with_direction_counts(self, name, layer, param, dim, before, state, group, decoupled) -> None:
        """Redo the selected slices' Adam(W) update from their pre-step value with bias corrections from
        each direction's own update count (see the module docstring)."""
        selected = layer.selected
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        counts = (self.direction_updates[name][self.selected[name]] + 1).to(torch.float64)
        shape = (-1, 1) if dim == 0 else (1, -1)
        bias_correction1 = (1 - beta1**counts).to(param.device, param.dtype).view(shape)
        bias_correction2_sqrt = (1 - beta2**counts).sqrt().to(param.device, param.dtype).view(shape)
        exp_avg = state["exp_avg"].index_select(dim, selected)
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        denom = (second.index_select(dim, selected).sqrt() / bias_correction2_sqrt).add_(eps)
        value = before.index_select(dim, selected)
        if weight_decay != 0 and decoupled:
            value.mul_(1 - lr * weight_decay)
        value.sub_(exp_avg / denom * (lr / bias_correction1))
        param.index_copy_(dim, selected, value)

    # --- resume and reporting --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Directions are a function of (seed, step, layer name); only the update counts are state.
        return {"direction_updates": {name: counts.tolist() for name, counts in self.direction_updates.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = state.get("direction_updates", {})
        if set(counts) != set(self.layers):
            raise ValueError("RM-LoRA controller state belongs to a different set of adapted layers")
        self.direction_updates = {name: torch.tensor(counts[name], dtype=torch.int64) for name in self.layers}

    def summary(self) -> dict[str, Any]:
        """Mean orthogonality residuals ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F over the layers at the end of training."""
        if not self.layers:
            return {}
        with torch.no_grad():
            terms = torch.tensor([[float(t) for t in layer.orthogonality_terms(squared=False)] for layer in self.layers.values()])
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


def _step_value(state: dict) -> Optional[float]:
    step = state.get("step")
    return None if step is None else float(step)


Config = RMLoRAConfig
Layer = RMLoRALayer
Controller = RMLoRAController
