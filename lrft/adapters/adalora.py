"""AdaLoRA (Zhang et al., 2023): ΔW = (alpha / r) · P Λ Q with importance-based rank pruning.

P (out×r) and Q (r×in) are trainable and Gaussian-initialised (std 0.02, as the authors' code); Λ is a
trainable diagonal of r entries (``lora_lambda``) initialised to 0, so training starts from the base
model exactly. ``scaling`` = alpha / r with r the initial rank, fixed for the whole run (pruning does not
rescale; the authors' code divides by the initial rank too); alpha defaults to 2r like every lrft adapter.

The orthogonality regulariser ``R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F`` (eq. 4) keeps P and Q near
orthonormal so that Λ behaves like singular values; each layer adds ``orth_reg · R`` to the loss
(default 0.001 for this summed squared form; :mod:`lrft.adapters.budget` says why not the published 0.1).
The budget schedule, the sensitivity × uncertainty importance with the triplet score
``s(λ_i) + mean_j s(P[j, i]) + mean_j s(Q[i, j])`` and the masking run in the training loop through
:class:`lrft.adapters.budget.BudgetController`; see that module for the schedule and the defaults
(``target_r``, ``init_r``, ``tinit``, ``tfinal``, ``delta_t``, ``beta1``, ``beta2``). The per-layer rank
mask is a persistent buffer, so the saved adapter holds the final ranks.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from .base import AdapterConfig, orthogonality_residuals
from .budget import BudgetConfig, BudgetController, RankPrunedLayer, gaussian_

INIT_STD = 0.02


class AdaLoRAConfig(BudgetConfig):
    type: Literal["adalora"] = "adalora"


class AdaLoRALayer(RankPrunedLayer):

    def __init__(self, base_layer, config: AdaLoRAConfig, shared, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        r = config.r
        kwargs = dict(device=self.device, dtype=torch.float32)
        self.lora_P = nn.Parameter(gaussian_(torch.empty(self.out_features, r, **kwargs), INIT_STD))
        self.lora_lambda = nn.Parameter(torch.zeros(r, **kwargs))
        self.lora_Q = nn.Parameter(gaussian_(torch.empty(r, self.in_features, **kwargs), INIT_STD))
        self.init_rank_mask(r)

    def delta(self, x: Tensor) -> Tensor:
        x = self.param_dtype_input(x)
        hidden = nn.functional.linear(x, self.lora_Q) * self.lora_lambda
        return nn.functional.linear(hidden, self.lora_P) * self.scaling

    def delta_weight(self) -> Tensor:
        return (self.lora_P.float() * self.lora_lambda.float()) @ self.lora_Q.float() * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        return config.r * (out_features + in_features + 1)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_P.float() * self.lora_lambda.float() * self.scaling, self.lora_Q.float()

    def importance_factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_P, self.lora_Q

    def orthogonality_factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_P, self.lora_Q

    def extra_loss(self) -> Optional[Tensor]:
        if self.config.orth_reg == 0:
            return None
        # the regulariser is a sum of squares of Gram residuals: keep it out of reduced-precision autocast
        with torch.autocast(self.lora_P.device.type, enabled=False):
            on_Q, on_P = orthogonality_residuals(self.lora_P.float(), self.lora_Q.float())
        return self.config.orth_reg * (on_P + on_Q)


class AdaLoRAController(BudgetController):
    """Importance EMAs and rank masking for AdaLoRA layers (all in :class:`BudgetController`)."""


Config = AdaLoRAConfig
Layer = AdaLoRALayer
Controller = AdaLoRAController
