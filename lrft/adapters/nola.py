"""NoLA (Koohpayegani et al., ICLR 2024): LoRA's two factors re-parameterised as linear combinations of
frozen random matrices; only the mixing coefficients are trained.

    ΔW = scaling · A B,   A = Σ_{i=1..k} α_i A_i,   B = Σ_{j=1..k} β_j B_j          (paper, sec. 3)

For a layer whose weight is (out, in), A_i are (out × r) and B_j are (r × in): the paper's orientation,
ΔW = (out × r)(r × in), A facing the output and B the input. The 2k coefficients α, β are the layer's
only trainable tensors, so the parameter count is independent of the layer's shape and of r.

Choices, and why
----------------
* Defaults follow the authors' LLaMA-2 instruction-tuning scripts (``nola_num_basis 512``, ``lora_r 16``,
  ``lora_alpha 4``): ``num_basis`` k = 512 bases per side, r = 16, and alpha = 4 whatever r is
  (scaling 4 / r = 0.25 at r = 16).
* Bases: every entry U(-1, 1) / √k, as in the authors' code. With unit-scale coefficient steps (Adam)
  the combined matrix then moves by about one learning rate per entry per step whatever k is.
* Initialisation, as LoRA: α = 0, so ΔW starts at exactly zero, and β uniform in ±√(3 / in) from the
  global generator, which gives the combined B the variance of LoRA's Kaiming-uniform A (1 / (3·in)).
  α gets a gradient on the first step because B ≠ 0 (with both sides at zero neither would move).
* **This is not the authors' initialisation.** Their LLaMA code (``NOLALinear`` in
  github.com/UCDvision/NOLA, ``llama/peft/tuners/lora.py``) starts *both* coefficient vectors at zero and
  adds to each factor a frozen matrix of its own, drawn per layer: Kaiming-uniform (``a = √5``, the same
  1 / (3·in) variance) on the input factor, zeros on the output factor. So there B = K + Σ β_j B_j with K
  fixed and β = 0 at the start. lrft has no such offset: B = Σ β_j B_j, with β drawn at random instead.
  Why: the paper's equation (sec. 3) has no offset, and without it a layer is fully described by its 2k
  coefficients and the seed (no per-layer frozen r × in matrix to store, save or regenerate). Consequences: (1) the input factor lies in the k-dimensional span of the
  bases, where the authors' lies in that span shifted by K (K cannot be trained away, since for k < r·in
  it is almost surely outside the span), so the two parameterise different sets of updates; (2) lrft's β
  can shrink or rotate the whole input factor, where the authors' input factor stays K plus a learned
  correction; (3) the start is alike: ΔW = 0, α gets the first gradient, through a random input factor of
  the same scale, and β gets its first once α has moved. Results therefore need not match the paper's
  NoLA numbers exactly; tests pin lrft's own definition (tests/test_adapter_nola.py).
* The bases come from ``config.seed`` through :class:`SharedTensors`, in ``frozen_dtype``, and are
  never saved: every layer with the same output width uses one set of A_i, every layer with the same
  input width one set of B_j (the paper draws independent bases per layer; the coefficients are per
  layer either way, and sharing divides the memory of the bases by the number of layers). They are
  the bulk of NoLA's memory: k·r·w values for each distinct input or output width w, e.g. 0.5 GB in bfloat16 for
  LLaMA-2-7B's q, k, v, up, down at the defaults.

Compute
-------
Each call forms A (out × r) and B (r × in) from the coefficients (k·r·(in + out) multiply-adds) and
applies x → x·Bᵀ → ·Aᵀ; ΔW itself (out × in) is never formed, so a call costs what LoRA's does plus
the two combinations. The combination is a custom autograd function that upcasts the (bfloat16) bases a
chunk at a time into float32 and keeps only a reference to the shared bases for the backward, so no
float32 copy of the bases is ever held (autograd would otherwise save a k·out·r copy per layer).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLayer, SharedTensors

# float32 upcast of the bases is done this many elements at a time (64 MB)
_CHUNK_ELEMENTS = 1 << 24


class NoLAConfig(AdapterConfig):
    type: Literal["nola"] = "nola"
    num_basis: int = Field(
        512, gt=0, description="k: frozen random bases per side; each layer trains 2k coefficients"
    )

    def default_alpha(self) -> float:
        return 4.0


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()


def _chunk_rows(bases: Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, bases.shape[1]))


class _LinearCombination(torch.autograd.Function):
    """Σ_i c_i · bases[i] in float32 for (k, m) frozen ``bases`` of any dtype."""

    @staticmethod
    def forward(ctx, coefficients: Tensor, bases: Tensor) -> Tensor:
        ctx.save_for_backward(bases)  # a reference to the shared tensor, not a copy
        with _no_autocast(bases.device):
            coefficients = coefficients.float()
            if bases.dtype == torch.float32:
                return coefficients @ bases
            combined = torch.zeros(bases.shape[1], device=bases.device, dtype=torch.float32)
            step = _chunk_rows(bases)
            for start in range(0, bases.shape[0], step):
                combined += coefficients[start : start + step] @ bases[start : start + step].float()
            return combined

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_combined: Tensor):
        (bases,) = ctx.saved_tensors
        with _no_autocast(bases.device):
            grad_combined = grad_combined.float()
            if bases.dtype == torch.float32:
                return bases @ grad_combined, None
            step = _chunk_rows(bases)
            parts = [bases[start : start + step].float() @ grad_combined for start in range(0, bases.shape[0], step)]
            return torch.cat(parts), None


def _basis_sampler(num_basis: int):
    def sample(shape, generator):
        return (torch.rand(shape, generator=generator) * 2.0 - 1.0) / math.sqrt(num_basis)

    return sample


class NoLALayer(AdapterLayer):

    def __init__(self, base_layer, config: NoLAConfig, shared: SharedTensors, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        self.rank = config.r
        self.num_basis = config.num_basis
        self._shared = shared
        # α mixes the output-side bases A_i (out × r), β the input-side bases B_j (r × in)
        self.out_coefficients = nn.Parameter(
            torch.zeros(self.num_basis, device=self.device, dtype=torch.float32)
        )
        self.in_coefficients = nn.Parameter(torch.empty(self.num_basis, device=self.device, dtype=torch.float32))
        if self.device.type != "meta":
            bound = math.sqrt(3.0 / self.in_features)
            with torch.no_grad():
                self.in_coefficients.uniform_(-bound, bound)
        self.bases()  # generate the shared bases now, not in the first forward

    def bases(self) -> tuple[Tensor, Tensor]:
        """The shared (A_i) of shape (k, out, r) and (B_j) of shape (k, r, in), in ``frozen_dtype``."""
        k, r = self.num_basis, self.rank
        device = self.out_coefficients.device
        sampler = _basis_sampler(k)
        out_bases = self._shared.get(
            f"nola.out.{k}x{self.out_features}x{r}", (k, self.out_features, r), sampler, device, self.frozen_dtype
        )
        in_bases = self._shared.get(
            f"nola.in.{k}x{r}x{self.in_features}", (k, r, self.in_features), sampler, device, self.frozen_dtype
        )
        return out_bases, in_bases

    def combined_factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) = (Σ α_i A_i, Σ β_j B_j), float32, shapes (out, r) and (r, in); differentiable in α, β."""
        out_bases, in_bases = self.bases()
        k = self.num_basis
        A = _LinearCombination.apply(self.out_coefficients, out_bases.reshape(k, -1))
        B = _LinearCombination.apply(self.in_coefficients, in_bases.reshape(k, -1))
        return A.reshape(self.out_features, self.rank), B.reshape(self.rank, self.in_features)

    def delta(self, x: Tensor) -> Tensor:
        x = self.param_dtype_input(x)
        A, B = self.combined_factors()
        return nn.functional.linear(nn.functional.linear(x, B), A * self.scaling)

    def delta_weight(self) -> Tensor:
        left, right = self.factors()
        return left @ right

    def factors(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            A, B = self.combined_factors()
        return A * self.scaling, B

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        return 2 * config.num_basis

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_basis={self.num_basis}"


Config = NoLAConfig
Layer = NoLALayer
