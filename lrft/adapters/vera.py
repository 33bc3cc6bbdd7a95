"""VeRA (Kopiczko et al., ICLR 2024): one pair of frozen random matrices for the whole model, and two
trainable scaling vectors per layer.

    ΔW = Λ_b B Λ_d A                                                        (paper, eq. 2)

A (r × max_in) and B (max_out × r) are frozen, random and shared by every adapted layer, where max_in and
max_out are the largest input and output widths among the targets; a layer of shape (out, in) uses the
top-left slices A[:, :in] and B[:out, :]. Λ_d = diag(d), d ∈ R^r, and Λ_b = diag(b), b ∈ R^out, are the
layer's only trainable tensors: r + out parameters per layer.

Choices, and why
----------------
* Defaults as published (and as in PEFT's VeRA): r = 256, b = 0 (so ΔW starts at zero), d = ``d_initial``
  = 0.1 in every entry, A and B Kaiming-uniform (``kaiming_uniform_(a=√5)``: bound 1/√max_in for A and
  1/√r for B) from ``config.seed``.
* VeRA has no alpha: the scale of ΔW is learned by b and d, so scaling is 1 and setting ``alpha`` is
  rejected rather than silently multiplying ΔW.
* r is the rank of the shared bases, not of a layer's update, and may exceed a layer's smaller width
  (ΔW then simply has rank ≤ min(in, out)): the layer class sets ``r_must_fit = False``.
* The bases come from :class:`SharedTensors` in ``frozen_dtype``, one copy for the whole model, never
  saved (the seed regenerates them). Their size needs every target's shape, which one layer's constructor
  cannot see: ``inject_adapters`` (and merge / inspect-rank, which rebuild layers one at a time) record
  all targets' (in, out) in ``SharedTensors.target_shapes`` before building the layers, and a VeRA layer
  refuses a SharedTensors that does not list it (bases sized from one layer alone would silently differ
  from the trained ones).
* Compute: x → x·A_sliceᵀ ⊙ d → ·(b ⊙ B_slice)ᵀ, never forming ΔW (r·(in + out) per token against
  in·out). b scales the (out × r) matrix instead of the (T × out) output, so autograd keeps only the
  (T × r) projection for b's gradient, not a T × out activation. Without autocast the matmuls run in
  float32 on a float32 copy of the shared bases (made once per model, rounded through ``frozen_dtype``
  first so its values are exactly the stored ones); under autocast they run in the autocast dtype.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLayer, SharedTensors, kaiming_uniform_


class VeRAConfig(AdapterConfig):
    type: Literal["vera"] = "vera"
    r: int = Field(256, gt=0, description="rank of the shared random bases (may exceed a layer's widths)")
    d_initial: float = Field(0.1, description="initial value of every entry of the per-layer vector d")

    @model_validator(mode="after")
    def _no_alpha(self):
        if self.alpha is not None:
            raise ValueError(
                "VeRA has no alpha (scaling is 1; the vectors b and d learn the scale); remove adapter.alpha"
            )
        return self

    def default_alpha(self) -> float:
        return float(self.r)  # scaling = 1


def _kaiming_sampler(rounding_dtype: torch.dtype):
    """Kaiming-uniform bases rounded through ``rounding_dtype``, so that a copy requested in another dtype
    holds exactly the values stored in ``rounding_dtype``."""

    def sample(shape, generator):
        return kaiming_uniform_(torch.empty(shape), generator).to(rounding_dtype)

    return sample


class VeRALayer(AdapterLayer):
    # r is the shared bases' rank, not a per-layer rank: it may exceed min(in, out)
    r_must_fit: ClassVar[bool] = False

    def __init__(self, base_layer, config: VeRAConfig, shared: SharedTensors, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        own_shape = (self.in_features, self.out_features)
        if tuple(shared.target_shapes.get(name, ())) != own_shape:
            raise ValueError(
                f"VeRA layer {name} ({own_shape[0]}->{own_shape[1]}) is not listed in SharedTensors.target_shapes; "
                "build the SharedTensors with every adapted layer's (in, out), as inject_adapters does"
            )
        self.rank = config.r
        self.max_in = max(shape[0] for shape in shared.target_shapes.values())
        self.max_out = max(shape[1] for shape in shared.target_shapes.values())
        self._shared = shared
        self.lambda_d = nn.Parameter(
            torch.full((self.rank,), config.d_initial, device=self.device, dtype=torch.float32)
        )
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=self.device, dtype=torch.float32))
        self.shared_bases(self.device, frozen_dtype)  # generate them now, not in the first forward

    @property
    def shared_A(self) -> Tensor:
        """The model-wide A (r, max_in) as stored (``frozen_dtype``), on the parameters' device."""
        return self.shared_bases(self.lambda_d.device, self.frozen_dtype)[0]

    @property
    def shared_B(self) -> Tensor:
        return self.shared_bases(self.lambda_d.device, self.frozen_dtype)[1]

    def shared_bases(self, device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The model-wide (A, B), shapes (r, max_in) and (max_out, r), on ``device`` in ``dtype``."""
        sampler = _kaiming_sampler(self.frozen_dtype)
        A = self._shared.get(f"vera.A.{self.rank}x{self.max_in}", (self.rank, self.max_in), sampler, device, dtype)
        B = self._shared.get(f"vera.B.{self.max_out}x{self.rank}", (self.max_out, self.rank), sampler, device, dtype)
        return A, B

    def sliced_bases(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """This layer's A[:, :in] and B[:out, :] (views of the shared tensors) on the parameters' device."""
        A, B = self.shared_bases(self.lambda_d.device, dtype)
        return A[:, : self.in_features], B[: self.out_features, :]

    def delta(self, x: Tensor) -> Tensor:
        x = self.param_dtype_input(x)
        A, B = self.sliced_bases(self.compute_dtype(x))
        projected = nn.functional.linear(x, A) * self.lambda_d
        return nn.functional.linear(projected, self.lambda_b.unsqueeze(1) * B * self.scaling)

    def delta_weight(self) -> Tensor:
        left, right = self.factors()
        return left @ right

    def factors(self) -> tuple[Tensor, Tensor]:
        A, B = self.sliced_bases(torch.float32)
        return self.lambda_b.float().unsqueeze(1) * B * self.scaling, self.lambda_d.float().unsqueeze(1) * A

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        return config.r + out_features

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared bases {self.rank}x{self.max_in} and {self.max_out}x{self.rank}"


Config = VeRAConfig
Layer = VeRALayer
