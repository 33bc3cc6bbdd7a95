"""LoRA (Hu et al., 2021): ΔW = (alpha / r) · B A, with A (r×in) and B (out×r) trainable.

A starts Kaiming-uniform and B at zero, so training starts from the base model exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLayer, kaiming_uniform_


class LoRAConfig(AdapterConfig):
    type: Literal["lora"] = "lora"


class LoRALayer(AdapterLayer):

    def __init__(self, base_layer, config: LoRAConfig, shared, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        r = config.r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=self.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=self.device, dtype=torch.float32))
        kaiming_uniform_(self.lora_A.data)

    def delta(self, x: Tensor) -> Tensor:
        x = self.param_dtype_input(x)
        # scaling applied to the (T, r) projection, not the (T, out) result: one r-wide pass instead of
        # an out-wide one, forward and backward (PEFT scales the wide result)
        return nn.functional.linear(nn.functional.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        return config.r * (in_features + out_features)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) with ΔW = B @ A; inspect-rank uses these for its factored (no full SVD) path."""
        return self.lora_B.float() * self.scaling, self.lora_A.float()

    def orthogonality_factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A


Config = LoRAConfig
Layer = LoRALayer
