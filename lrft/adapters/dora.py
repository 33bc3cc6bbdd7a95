"""DoRA (Liu et al., ICML 2024): weight-decomposed low-rank adaptation.

    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖,   ΔW = (alpha / r) · B A                    (paper, eq. 5)

The norm is taken per output unit: over the input dimension of each row of the (out, in) weight (the
paper's "column-wise" norm is over columns of its (in, out) convention). m, shape (out,), is trainable
and starts at ‖W‖ of each row; A and B are a LoRA (:class:`~lrft.adapters.lora.LoRALayer`, whose
initialisation makes ΔW = 0, so W' = W at the start). Trainable parameters: r·(in + out) + out.

The layer's output is

    y = s ⊙ (x Wᵀ + dropout(x) ΔWᵀ) + bias,   s = m / ‖W + ΔW‖   (one factor per output unit)

with the base bias added unscaled. x Wᵀ comes from the frozen layer's own kernel (its output minus its
bias), so the forward never multiplies by a dequantized weight. As in the paper (sec. 4.3), ‖W + ΔW‖ is
treated as a constant in the backward (detached): gradients flow to m directly and to A, B through the
numerator only, which the paper shows costs nothing in accuracy and saves the memory of backpropagating
through the norm. ``delta_weight()`` returns W' − W, so merging (W + ΔW') gives W' exactly.

The norm and quantized bases
----------------------------
‖W + ΔW‖ needs the dense W and ΔW. It changes only when A or B change, i.e. once per optimizer step, so
the layer caches it (an ``out``-vector) and recomputes it, from ``dequantized_weight`` in float32 one row
block at a time, only when A or B may have changed:

* their autograd version counters or storage moved (an optimizer's in-place update, ``load_state_dict``,
  ``copy_``, ``.to()``), or
* the DoRA :class:`Controller` invalidated it after an optimizer step: fused optimizers
  (``AdamW(fused=True)``) and writes through ``.data`` do not bump version counters, so the training
  loop's hook is what makes the cache safe there. Code that edits A or B through ``.data`` outside the
  training loop calls :meth:`DoRALayer.invalidate_weight_norm`.

So a quantized base is dequantized once per layer per optimizer step (not once per micro-batch, nor per
recomputation under gradient checkpointing), and evaluation dequantizes once in total. The alternative,
caching the dequantized W itself, would keep a 16-bit copy of every adapted weight and undo the memory
saving of quantization (about 9 GB in 16 bits for LLaMA-3-8B's q, k, v, up and down); recomputing the norm in every forward
would dequantize and form ΔW for every micro-batch. The cost of the cache is one float32 vector per layer
and a transient float32 copy of one layer's W while the norm is recomputed.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import Tensor, nn

from .frozen_linear import dequantized_weight
from .base import AdapterConfig
from .base import Controller as BaseController
from .lora import LoRALayer

# ‖W + ΔW‖ is formed this many weight elements at a time (64 MB in float32)
_CHUNK_ELEMENTS = 1 << 24


class DoRAConfig(AdapterConfig):
    type: Literal["dora"] = "dora"


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()


class DoRALayer(LoRALayer):
    needs_base_weight: ClassVar[bool] = True  # ΔW' = W' − W

    def __init__(self, base_layer, config: DoRAConfig, shared, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        self.magnitude = nn.Parameter(torch.empty(self.out_features, device=self.device, dtype=torch.float32))
        if self.device.type != "meta":
            with torch.no_grad():
                weight = dequantized_weight(self.base_layer, torch.float32)
                self.magnitude.copy_(torch.linalg.vector_norm(weight, dim=1))
        self._weight_norm_cache: Optional[tuple[tuple, Tensor]] = None

    # --- ‖W + ΔW‖, cached between changes of A and B ------------------------------------------------
    def _lora_state_key(self) -> tuple:
        A, B = self.lora_A, self.lora_B
        # inference-mode tensors cannot be saved for a later backward: never reuse one outside that mode
        return (A._version, B._version, A.data_ptr(), B.data_ptr(), A.device, torch.is_inference_mode_enabled())

    def invalidate_weight_norm(self) -> None:
        """Forget the cached ‖W + ΔW‖ (call after changing A or B in a way autograd does not see)."""
        self._weight_norm_cache = None

    def weight_norm(self) -> Tensor:
        """‖W + ΔW‖ of each output row, float32, shape (out,), detached (a constant for autograd)."""
        key = self._lora_state_key()
        if self._weight_norm_cache is None or self._weight_norm_cache[0] != key:
            self._weight_norm_cache = (key, self._compute_weight_norm())
        return self._weight_norm_cache[1]

    @torch.no_grad()
    def _compute_weight_norm(self) -> Tensor:
        weight = dequantized_weight(self.base_layer, torch.float32)
        A, B = self.lora_A.float(), self.lora_B.float()
        norms = torch.empty(self.out_features, device=weight.device, dtype=torch.float32)
        rows = max(1, _CHUNK_ELEMENTS // self.in_features)
        with _no_autocast(weight.device):
            for start in range(0, self.out_features, rows):
                block = torch.addmm(weight[start : start + rows], B[start : start + rows], A, alpha=self.scaling)
                norms[start : start + rows] = torch.linalg.vector_norm(block, dim=1)
        return norms

    # --- the layer --------------------------------------------------------------------------------
    def _correction(self, base_out: Tensor, lora_input: Tensor) -> Tensor:
        """What DoRA adds to the frozen layer's output: (s − 1) ⊙ x Wᵀ + s ⊙ lora_input ΔWᵀ."""
        lora_out = super().delta(lora_input)
        scale = self.magnitude / self.weight_norm()
        bias = getattr(self.base_layer, "bias", None)
        linear_out = base_out if bias is None else base_out - bias
        # written as a correction to base_out (not s ⊙ x Wᵀ + bias) so that a near-1 scale loses nothing
        # to the rounding of a 16-bit base output
        return (scale - 1) * linear_out + scale * lora_out

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        return base_out + self._correction(base_out, self.dropout(x)).to(base_out.dtype)

    def delta(self, x: Tensor) -> Tensor:
        """x · (W' − W)ᵀ (no dropout): what the layer adds to the base output, as ``delta_weight`` states."""
        return self._correction(self.base_layer(x), x)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        weight = dequantized_weight(self.base_layer, torch.float32)
        scale = (self.magnitude.float() / self.weight_norm()).unsqueeze(1)
        with _no_autocast(weight.device):
            adapted = torch.addmm(weight, self.lora_B.float(), self.lora_A.float(), alpha=self.scaling)
        return scale * adapted - weight

    def factors(self) -> None:
        """W' − W is not the low-rank product B·A (the rescaling touches all of W): no factored form."""
        return None

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        return config.r * (in_features + out_features) + out_features


class DoRAController(BaseController):
    """Invalidates every layer's cached ‖W + ΔW‖ after each optimizer step (see the module docstring)."""

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        for layer in self.layers.values():
            layer.invalidate_weight_norm()


Config = DoRAConfig
Layer = DoRALayer
Controller = DoRAController
