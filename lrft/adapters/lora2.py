"""LoRA² (multi-scale orthogonal low-rank approximation; the LoRA² paper, sec. 3 and Algorithm 1).

ΔW = (alpha / R) · P Λ Q with P = u v and Q = U V: two LoRA blocks in SVD form,

    u (out×k), v (k×R), Λ = diag(λ) (R entries, ``lora_lambda``), U (R×k), V (k×in).

``adapter.k`` is the projection dimension (it sets the parameter count); ``adapter.r`` is R, the number
of prunable singular values. Λ starts at 0, so training starts from the base model, and u, v, U, V are
Gaussian. The paper says only "random Gaussian"; we scale each factor so that it starts near the minimum
of its own orthogonality regulariser (below): std 1/√out for u and 1/√in for V (unit-norm columns of u,
rows of V), 1/√R for v and U (unit-norm rows of v, columns of U). P and Q then start with columns / rows
of norm about √(k/R), and ∂L/∂λ_i = scale · p_iᵀ G q_i is as large as in a LoRA. AdaLoRA's 0.02 for every
factor makes ΔW a product of four small factors and a zero, which does not train (docs/adapters.md).
The scaling alpha / R (alpha defaults to 2R, as for every lrft adapter) is our convention; the paper
writes ΔW = PΛQ with no scale. Paper defaults: R = 8 (its rank figures), k ∈ {1, 8}; ours are R = 8,
k = 8.

The forward never builds a dense (out×in) matrix: x → Vᵀ → Uᵀ → ·λ → vᵀ → uᵀ, all k- or R-wide.

Trainable parameters per layer (sec. 4.1: "primarily controlled by K"): ``k(in + out) + 2kR + R``.
With k = 1, R = 8 on the six projections of the 12 DeBERTaV3-base layers this gives the paper's 167.6k
(and 37.4k / 56.2k for two / three of the attention projections, Table 4).

Orthogonality (sec. 3.1, "dual regularisation"), added per layer as ``orth_reg · (R(P, Q) + R(u, v) +
R(U, V))`` with
``R(P, Q) = ‖PᵀP − I_R‖²_F + ‖QQᵀ − I_R‖²_F`` (between the two planes),
``R(u, v) = ‖uᵀu − I_k‖²_F + ‖vvᵀ − I_k‖²_F`` and ``R(U, V) = ‖UᵀU − I_k‖²_F + ‖VVᵀ − I_k‖²_F`` (within
each block). PᵀP = vᵀ(uᵀu)v and QQᵀ = U(VVᵀ)Uᵀ are formed from the k×k Gram matrices, never from P or Q.
With k < R, PᵀP has rank at most k, so R(P, Q) cannot reach 0; it still spreads the R directions.

Importance pruning (sec. 3.2): as AdaLoRA (sensitivity EMA β1 × uncertainty EMA β2, cubic budget from
``init_r`` to ``target_r``; :mod:`lrft.adapters.budget`) but with the paper's reduced score (eq. 9): the
score of λ_i is ``s(λ_i) + (1/k) Σ_j s(v[j, i]) + (1/k) Σ_j s(U[i, j])``. Only v's column i and U's row i
(k entries each) touch λ_i alone; the full-score terms from u and V (eq. 7) are sums over all their
entries, the same for every i, so they do not change the ranking and are not computed (the paper's
"≈98.5 % fewer sensitivity computations"). (The extracted eq. 9 reads "C(K, v, i) + C(K, V, i)"; with the
shapes above only v and U have an R-indexed side, so we read the second term as U.)
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import AdapterConfig, gram_residual
from .budget import BudgetConfig, BudgetController, RankPrunedLayer, gaussian_

class LoRA2Config(BudgetConfig):
    type: Literal["lora2"] = "lora2"
    r: int = Field(8, gt=0, description="R: number of prunable singular values (the paper uses 8)")
    k: int = Field(8, gt=0, description="projection dimension of the two LoRA blocks; sets the parameter count")


class LoRA2Layer(RankPrunedLayer):

    def __init__(self, base_layer, config: LoRA2Config, shared, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        rank, k = config.r, config.k
        kwargs = dict(device=self.device, dtype=torch.float32)
        self.lora_u = nn.Parameter(gaussian_(torch.empty(self.out_features, k, **kwargs), self.out_features**-0.5))
        self.lora_v = nn.Parameter(gaussian_(torch.empty(k, rank, **kwargs), rank**-0.5))
        self.lora_lambda = nn.Parameter(torch.zeros(rank, **kwargs))
        self.lora_U = nn.Parameter(gaussian_(torch.empty(rank, k, **kwargs), rank**-0.5))
        self.lora_V = nn.Parameter(gaussian_(torch.empty(k, self.in_features, **kwargs), self.in_features**-0.5))
        self.init_rank_mask(rank)

    def delta(self, x: Tensor) -> Tensor:
        linear = nn.functional.linear
        x = self.param_dtype_input(x)
        hidden = linear(linear(x, self.lora_V), self.lora_U) * self.lora_lambda
        return linear(linear(hidden, self.lora_v), self.lora_u) * self.scaling

    def left(self) -> Tensor:
        """P = u v (out×R)."""
        return self.lora_u.float() @ self.lora_v.float()

    def right(self) -> Tensor:
        """Q = U V (R×in)."""
        return self.lora_U.float() @ self.lora_V.float()

    def delta_weight(self) -> Tensor:
        return (self.left() * self.lora_lambda.float()) @ self.right() * self.scaling

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        k, rank = config.k, config.r
        return k * (in_features + out_features) + 2 * k * rank + rank

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) with ΔW = B @ A through the narrower of the two inner dimensions (k or R)."""
        weighted_v = self.lora_v.float() * self.lora_lambda.float() * self.scaling
        if self.config.k <= self.config.r:
            return self.lora_u.float(), weighted_v @ self.right()
        return self.lora_u.float() @ weighted_v, self.right()

    def orthogonality_factors(self) -> tuple[Tensor, Tensor]:
        """(P, Q): the between-planes term R(P, Q) of the dual regulariser."""
        return self.left(), self.right()

    def importance_factors(self) -> tuple[Tensor, Tensor]:
        # the reduced score (eq. 9): only v's columns and U's rows belong to a single λ_i
        return self.lora_v, self.lora_U

    def extra_loss(self) -> Optional[Tensor]:
        if self.config.orth_reg == 0:
            return None
        with torch.autocast(self.lora_u.device.type, enabled=False):
            u, v, U, V = (t.float() for t in (self.lora_u, self.lora_v, self.lora_U, self.lora_V))
            u_gram = u.T @ u  # k×k
            V_gram = V @ V.T  # k×k
            between_planes = gram_residual(v.T @ u_gram @ v) + gram_residual(U @ V_gram @ U.T)
            first_block = gram_residual(u_gram) + gram_residual(v @ v.T)
            second_block = gram_residual(U.T @ U) + gram_residual(V_gram)
        return self.config.orth_reg * (between_planes + first_block + second_block)


class LoRA2Controller(BudgetController):
    """Importance EMAs (reduced score) and rank masking for LoRA² layers (all in :class:`BudgetController`)."""


Config = LoRA2Config
Layer = LoRA2Layer
Controller = LoRA2Controller
