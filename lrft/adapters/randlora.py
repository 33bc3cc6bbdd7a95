"""RandLoRA (Albert et al., ICLR 2025): full-rank updates from learned diagonal scalings of frozen random
low-rank bases.

    ΔW = scaling · Σ_{j=1..n} B_j Λ_j A Γ_j                                  (paper, eq. 4)

For a layer whose weight is (out, in), let d = min(in, out) and D = max(in, out). B_j (D×r) and A (r×d,
one matrix shared by the n terms, as in the paper's eq. 4; one A_j per term, eq. 3, with ``keep_rank``) are
frozen and random; Λ_j (r×r) and Γ_j (d×d) are trainable diagonals.
n = ceil(d / r), so n·r ≥ d and the sum can reach full rank d. Trainable parameters per layer: n·(r + d).
When in ≤ out the sum is ΔW itself; when in > out the roles swap and ΔW is its transpose: A always faces
the smaller side, which keeps Γ, the bulk of the parameters, as small as possible (and is what the
paper's parameter counts assume).

Choices, and why
----------------
* Initialisation follows the authors' public code: Λ = 0 and Γ = 1/d. ΔW starts at exactly zero; Λ gets a
  gradient on the first step because Γ is non-zero, and Γ starts moving once Λ has.
* scaling = alpha / r with **default alpha = 20·r** (scaling 20): the authors' code default and their
  recommendation for commonsense reasoning (they report 2r to 20r working; lower it if training is
  unstable at a high learning rate). With Γ = 1/d and unit-variance bases, rms(ΔW·x) ≈
  scaling · rms(Λ) · rms(x) · √(in / d), whatever the layer's width.
* Every basis is normalised to unit variance (the authors found std normalisation best):
  ``uniform`` U(-√3, √3) (the default, best in Table 4), ``normal`` N(0, 1), ``binary`` ±1, and ``sparse``
  (sec. 6.4, Bingham & Mannila / Li et al.): +1 and -1 with probability 1/s each, 0 otherwise (a fraction
  1 - 2/s of zeros: s = 6 gives 66 %, s = √768 ≈ 28 gives 93 %), scaled by √(s/2); 2 ≤ s ≤ √D.
  ``sparsity`` left unset means s = √D of each layer, Li et al.'s "very sparse" bound. What the paper
  measured of it (Table 4, sec. 6.4, "early results", one run per row, no error bars): CLIP ViT-B/32
  with both encoders fine-tuned on the 22 classification datasets (its dense-uniform row, 85.98, is
  Table 3's RandLoRA-6 on 100 % of the data, so presumably r = 6) at 66 / 93 / 98 / 99 % zeros (s = 6,
  √D with D = 768, 100, 200): 85.43 / 85.57 / 84.35 / 83.34 against 85.98 dense (uniform; 85.61 normal,
  85.52 binary); and LLaMA3-8B on commonsense at 66 % only (s = 6): 85.42 against 85.59. So √D was
  measured on one vision-language model, never on a language model, and came within 0.4 points of dense
  in a single run.
* **Rank of sparse bases.** ΔW reads its input through A Γ_j only: an input direction k whose column of A
  is all zero is read by no term, whatever Γ learns. With one shared A a column is empty with probability
  (1 − 2/s)^r, so the expected rank of ΔW is at most d·(1 − (1 − 2/s)^r): 36 % of d for Table 4's 93 %
  row (r = 6, s ≈ 28), 11 % and 6 % for its 98 % and 99 % rows, 91 % for 66 %; 41 % on SmolLM2's
  576×1536 layers at r = 10, s = √1536 (measured: rank 223 of 576, tests/test_adapter_randlora.py). The
  authors' code and PEFT share A for sparse bases too, so Table 4's √D run trained an update of about a
  third of full rank: it shows that such an update did as well on that benchmark, not that sparse bases
  keep RandLoRA full rank, and its loss at 98-99 % confounds sparsity with rank. A layer whose setting
  expects less than 90 % of d prints a warning once. Filling the empty columns is not enough: M =
  [Λ_1 A Γ_1; …; Λ_n A Γ_n] has column k equal to A's column k ⊗ (γ_1k, …, γ_nk), and for generic Γ such
  columns are independent only if every set T of columns has n·rank(A_T) ≥ |T| (the rank of a union of
  n copies of A's column matroid); the columns that avoid one row of A span at most r − 1 dimensions, so
  every row of A needs at least d − n(r − 1) ≈ n non-zeros, about d/r, more than the 2d/s of a sparse
  row when s > 2r (and it is still not sufficient: at r = 10, s = √1536, one A with every empty column
  filled and full row rank gave rank 574 of 576). ``keep_rank: true`` therefore draws every term's A_j
  independently (the paper's eq. 3, which eq. 4 simplified "without loss of expressivity", true of dense
  bases only): a column is then empty with probability (1 − 2/s)^(n·r) ≈ e^(−2d/s), and the n·r × d stack
  of sparse rows has full rank d with high probability (576 of 576 in the same test). It costs nothing
  extra in memory (the shared A is stored tiled n times anyway) and about the same time (the gradient of
  M on its pattern becomes one sampled product, :meth:`RandomBases._per_term_scaling_grads`; measured in
  docs/adapters.md); it is off by default so that runs stay comparable with the paper's and PEFT's, and
  PEFT's format, which has one A, cannot hold it.
* The bases come from ``config.seed`` through :class:`SharedTensors`: every layer with the same d (and r)
  uses one A, every layer with the same (D, n, r) one B, in ``frozen_dtype``; they are never saved.
  ``basis_layout: peft`` draws instead PEFT's one pair for the whole model, A (r × d_max) and B
  (D_max × n_max × r), sized by the largest targets, and slices it per layer as PEFT does (A[:, :d],
  B[:D, :n] paired as :func:`peft_column_order` says), so that PEFT's single-pair format can hold an
  adapter of several layer shapes. Dense bases only (a sparse basis has a sparsity per layer shape).

Compute
-------
The forward never forms the n·r×d "scaled basis" M = [Λ_1 A Γ_1; …; Λ_n A Γ_n] for the backward's sake:
a custom autograd function keeps only what it must (x when the input is the small side, the (T, n·r)
projection x·B when it is the large side) and rebuilds M from Λ, Γ and A in the backward, which costs
n·r·d elementwise work next to the matmuls' T·n·r·(d + D).

For T tokens, with dense bases there are two ways to apply ΔW:
  factored  x → x·Mᵀ → ·Bᵀ        forward T·nr·(d+D), backward T·nr·(D+2d) multiply-adds
  formed    C = B·M, then x·Cᵀ     forward nr·d·D + T·D·d, backward 2·nr·d·D + 2·T·D·d
and each call takes the cheaper by these counts (backward counted only when a gradient will flow).
With nr ≈ d, a forward-only call forms ΔW once T > D; training forms it only for near-square layers and
T > 1.5·D or so. C is a temporary either way. Sparse bases always use the factored path, computed
sparse (forming C would throw the sparsity away), in a token-minor layout: activations are transposed
once to (features, T) on the way in and once back on the way out. Each product with a sparse matrix
(B, its transpose, and M, whose sparsity pattern is A's tiled n times, or the n A_j stacked with
``keep_rank``) is a weighted embedding-bag sum over the rows of such an activation, with a CSR row (int32
indices) as the bag. The gradient of M is needed only on its non-zeros; with one shared A every row of the
pattern has the columns of one row of A, so it comes from one batched dense product per row of A, without
a sampled-product kernel; with ``keep_rank`` the n·r rows all differ, and torch's sampled product
(``torch.sparse.sampled_addmm``) computes it on the pattern directly.
"""

from __future__ import annotations

import math
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..errors import UserError
from .base import AdapterConfig, AdapterLayer, SharedTensors, building_for_training

Basis = Literal["uniform", "normal", "binary", "sparse"]


class RandLoRAConfig(AdapterConfig):
    type: Literal["randlora"] = "randlora"
    basis: Basis = Field(
        "uniform", description="distribution of the frozen random bases (all normalised to unit variance)"
    )
    sparsity: Optional[float] = Field(
        None,
        ge=2.0,
        description="s for basis: sparse; entries are ±1 with probability 1/s each, 0 otherwise; "
        "2 <= s <= sqrt(larger dimension); unset = sqrt(larger dimension) of each layer",
    )

    keep_rank: bool = Field(
        False,
        description="basis: sparse only: draw a separate sparse A_j for every term (the paper's eq. 3) instead of "
        "one A shared by all terms (eq. 4), so that ΔW can reach full rank at any sparsity; same products and "
        "memory for the bases, not exportable to PEFT",
    )

    basis_layout: Literal["lrft", "peft"] = Field(
        "lrft",
        description="lrft: one pair of bases per layer shape; peft: one pair for the whole model, sized by the "
        "largest targets and sliced per layer as PEFT's RandLoRA does, so that merge --format peft exports "
        "adapters of several layer shapes (dense bases only)",
    )

    @model_validator(mode="after")
    def _sparsity_needs_sparse_basis(self):
        if self.sparsity is not None and self.basis != "sparse":
            raise ValueError(
                f"sparsity applies only to basis: sparse (basis is {self.basis}); "
                "set adapter.basis: sparse or remove adapter.sparsity"
            )
        if self.keep_rank and self.basis != "sparse":
            raise ValueError(
                f"keep_rank applies only to basis: sparse (basis is {self.basis}, whose one shared A already "
                "reaches full rank); set adapter.basis: sparse or remove adapter.keep_rank"
            )
        if self.basis_layout == "peft" and self.basis == "sparse":
            raise ValueError(
                "basis_layout: peft applies to dense bases (uniform, normal, binary): sparse bases are drawn per "
                "layer shape with their own sparsity; set adapter.basis to a dense one or remove adapter.basis_layout"
            )
        return self

    def default_alpha(self) -> float:
        return 20.0 * self.r


# --- samplers (float32 on the CPU; SharedTensors moves and casts) ---------------------------------

def _uniform(shape, generator):
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * math.sqrt(3.0)


def _normal(shape, generator):
    return torch.randn(shape, generator=generator)


def _ternary(shape, generator, s: float) -> Tensor:
    """+c and -c with probability 1/s each, 0 otherwise, with c = √(s/2) so the variance is 1 (s = 2: ±1)."""
    u = torch.rand(shape, generator=generator)
    magnitude = math.sqrt(s / 2.0)
    values = torch.zeros(shape)
    values[u < 1.0 / s] = -magnitude
    values[u >= 1.0 - 1.0 / s] = magnitude
    return values


@contextmanager
def _quiet_sparse():
    """Silence torch's one-time "sparse CSR support is in beta" warning: the kernels used here are tested."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def _csr_int32(dense: Tensor) -> Tensor:
    """CSR with int32 indices: half the index memory, and MKL's CSR kernels are faster with them."""
    with _quiet_sparse():
        csr = dense.to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(), csr.shape,
            check_invariants=True,
        )


def _transposed_csr(csr: Tensor) -> Tensor:
    return csr.t().to_sparse_csr()


def _tiled_csr(block: Tensor, times: int) -> Tensor:
    """[block; block; …] (``times`` copies stacked vertically) as CSR, built from the block's own CSR."""
    crow, col, values = block.crow_indices(), block.col_indices(), block.values()
    nnz = values.numel()
    offsets = torch.arange(times, dtype=crow.dtype).unsqueeze(1) * nnz
    stacked_crow = torch.cat([(crow[:-1].unsqueeze(0) + offsets).flatten(), crow.new_tensor([times * nnz])])
    rows, cols = block.shape
    with _quiet_sparse():
        return torch.sparse_csr_tensor(
            stacked_crow, col.repeat(times), values.repeat(times), (times * rows, cols), check_invariants=True
        )


def _padded_rows(tiled: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A's rows (the first ``rank`` rows of the tiled CSR) as (columns, values), each (rank, L): the
    entries of each row, padded to the longest row with column 0 and value 0."""
    crow = tiled.crow_indices()[: rank + 1].long()
    counts = crow.diff()
    nnz = int(crow[-1])
    row = torch.repeat_interleave(torch.arange(rank, device=crow.device), counts)
    slot = torch.arange(nnz, device=crow.device) - crow[row]
    longest = max(int(counts.max()), 1)
    columns = torch.zeros(rank, longest, dtype=torch.int64, device=crow.device)
    values = torch.zeros(rank, longest, dtype=tiled.dtype, device=crow.device)
    columns[row, slot] = tiled.col_indices()[:nnz].long()
    values[row, slot] = tiled.values()[:nnz]
    return columns, values


# --- PEFT's layout: one pair of bases for the whole model ------------------------------------------

def peft_layout_names(basis: str) -> tuple[str, str]:
    """SharedTensors names of the model-wide pair of ``basis_layout: peft`` (also what a PEFT import provides)."""
    return f"randlora.peft.{basis}.A", f"randlora.peft.{basis}.B"


def peft_column_order(terms: int, rank: int) -> Tensor:
    """For each of lrft's B columns j·r + i (term j, rank i), the column of PEFT's flattened B that meets the
    same term and rank. PEFT stacks the scaled rows of A rank-major (row i·n + j is term j, rank i), flattens
    B (D, n, r) term-major (column j·r + i) and pairs row k with column k: term j, rank i meet at column i·n + j."""
    column = torch.arange(terms * rank)
    return (column % rank) * terms + column // rank


@dataclass(frozen=True)
class PeftPair:
    """The sizes of PEFT's model-wide pair, A (r, small) and B (large, terms, r), as PEFT's ``_find_dim`` sets
    them: the elementwise largest (out, in) over the targets, its smaller side facing A."""

    small: int
    large: int
    terms: int

    @classmethod
    def of(cls, target_shapes: dict[str, tuple[int, int]], rank: int) -> "PeftPair":
        largest_in = max(shape[0] for shape in target_shapes.values())
        largest_out = max(shape[1] for shape in target_shapes.values())
        small = min(largest_in, largest_out)
        return cls(small, max(largest_in, largest_out), math.ceil(small / rank))


def _peft_pair_tensors(shared: SharedTensors, basis: str, sampler, pair: PeftPair, rank: int, device,
                       dtype) -> tuple[Tensor, Tensor]:
    """The model-wide A (r, small) and B (large, terms, r), drawn from the seed or provided (a PEFT import)."""
    a_name, b_name = peft_layout_names(basis)
    return (shared.get(a_name, (rank, pair.small), sampler, device, dtype),
            shared.get(b_name, (pair.large, pair.terms, rank), sampler, device, dtype))


def _peft_layout_bases(shared: SharedTensors, basis: str, sampler, pair: PeftPair, rank: int, small: int,
                       large: int, terms: int, device, dtype) -> tuple[Tensor, Tensor]:
    """A (r, d) and B (D, n·r, lrft's column order) of one layer shape, sliced from the model-wide pair; the
    slices are cached per shape like lrft's own bases."""
    a_name, b_name = peft_layout_names(basis)

    def a_slice(shape, generator):
        return _peft_pair_tensors(shared, basis, sampler, pair, rank, device, dtype)[0][:, :small].contiguous()

    def b_slice(shape, generator):
        model_wide = _peft_pair_tensors(shared, basis, sampler, pair, rank, device, dtype)[1]
        flat = model_wide[:large, :terms, :].reshape(large, terms * rank)
        return flat[:, peft_column_order(terms, rank).to(flat.device)]

    A = shared.get(f"{a_name}.{rank}x{small}", (rank, small), a_slice, device, dtype)
    B = shared.get(f"{b_name}.{large}x{terms}x{rank}", (large, terms * rank), b_slice, device, dtype)
    return A, B


# --- the frozen bases of one layer shape ----------------------------------------------------------

class RandomBases:
    """A layer's handles on its shared frozen bases (references into SharedTensors, never copies).

    Dense: ``A`` (r, d) and ``B`` (D, n·r). Sparse: ``B`` and ``B_t`` (its transpose) as CSR, and the n
    terms' A stacked, ``A_tiled`` (n·r, d), with its transpose ``A_tiled_t``, as CSR: the stack is the
    sparsity pattern of the scaled basis M, whose values are rebuilt from Λ and Γ on every call. Without
    ``per_term`` the stack is one A tiled n times (eq. 4); with it (``keep_rank``) every term has its own
    A_j, drawn independently (eq. 3): the same number of stored entries, since the tiling is stored anyway.
    """

    def __init__(self, shared: SharedTensors, basis: str, sparsity: Optional[float], large: int, small: int,
                 rank: int, num_terms: int, device: torch.device, dtype: torch.dtype, per_term: bool = False,
                 peft_pair: Optional[PeftPair] = None):
        self.large, self.small, self.rank, self.num_terms = large, small, rank, num_terms
        self.sparse = basis == "sparse"
        self.per_term = per_term and self.sparse
        self.device = torch.device(device)
        self.dtype = dtype
        self.basis, self.peft_pair, self._shared = basis, peft_pair, shared
        stacked = num_terms * rank
        if not self.sparse:
            sampler = {"uniform": _uniform, "normal": _normal, "binary": lambda sh, g: _ternary(sh, g, 2.0)}[basis]
            self._sampler = sampler
            if peft_pair is not None:
                self.A, self.B = _peft_layout_bases(shared, basis, sampler, peft_pair, rank, small, large, num_terms,
                                                    device, dtype)
            else:
                self.A = shared.get(f"randlora.{basis}.A.{rank}x{small}", (rank, small), sampler, device, dtype)
                b_name = f"randlora.{basis}.B.{large}x{num_terms}x{rank}"
                self.B = shared.get(b_name, (large, stacked), sampler, device, dtype)
            self.A_tiled = self.A_tiled_t = self.B_t = self.A_columns = self.A_values = None
            return
        tag = f"randlora.sparse{sparsity:g}"
        # per-term A under its own name: a different tensor from the shared one, never a cache hit for it
        a_name = f"{tag}.{'A_terms' if self.per_term else 'A'}.{num_terms}x{rank}x{small}"
        self._a_name = a_name
        b_name = f"{tag}.B.{large}x{num_terms}x{rank}"

        def a_tiled(shape, generator):
            if self.per_term:
                return _csr_int32(_ternary((stacked, small), generator, sparsity))
            return _tiled_csr(_csr_int32(_ternary((rank, small), generator, sparsity)), num_terms)

        def b(shape, generator):
            return _csr_int32(_ternary(shape, generator, sparsity))

        self.A_tiled = shared.get(a_name, (stacked, small), a_tiled, device, dtype)
        self.B = shared.get(b_name, (large, stacked), b, device, dtype)
        # The transposes are derived from the tensors above (same seed), cached under their own names.
        self.A_tiled_t = shared.get(
            a_name + ".t", (small, stacked), lambda shape, g: _transposed_csr(self.A_tiled), device, dtype
        )
        self.B_t = shared.get(b_name + ".t", (stacked, large), lambda shape, g: _transposed_csr(self.B), device, dtype)
        self.A = None
        if self.per_term:  # the gradient of M is a sampled product on the pattern itself
            self.A_columns = self.A_values = None
            return
        # A's rows padded to the longest (rank, L ≤ small), for the gradient of M on its pattern
        self.A_columns = shared.get(
            a_name + ".columns", (rank, small), lambda shape, g: _padded_rows(self.A_tiled, rank)[0], device,
            torch.int64,
        )
        self.A_values = shared.get(
            a_name + ".values", (rank, small), lambda shape, g: _padded_rows(self.A_tiled, rank)[1], device, dtype
        )

    def dense_A(self) -> Tensor:
        """A (r, d) as a dense tensor (for references and diagnostics); per-term bases have no single A."""
        if self.per_term:
            raise ValueError("per-term (keep_rank) bases have one A per term: use dense_A_stack()")
        if self.sparse:
            return self.A_tiled.to_dense()[: self.rank]
        return self.A

    def dense_A_stack(self) -> Tensor:
        """The n terms' A_j stacked, (n·r, d), rows j·r … j·r + r − 1 being A_j, as a dense tensor."""
        if self.sparse:
            return self.A_tiled.to_dense()
        return self.A.repeat(self.num_terms, 1)

    def dense_B(self) -> Tensor:
        return self.B.to_dense() if self.sparse else self.B

    def peft_bases(self) -> tuple[Tensor, Tensor]:
        """PEFT's shared pair, A (r, d) and B (D, n, r): the model-wide tensors with ``basis_layout: peft``; this
        shape's own pair in PEFT's column order otherwise (PEFT's pair for an adapter whose layers all have
        this shape)."""
        if self.peft_pair is not None:
            return _peft_pair_tensors(self._shared, self.basis, self._sampler, self.peft_pair, self.rank, self.device,
                                      self.dtype)
        to_peft = torch.argsort(peft_column_order(self.num_terms, self.rank))
        permuted = self.dense_B()[:, to_peft.to(self.device)]
        return self.dense_A(), permuted.reshape(self.large, self.num_terms, self.rank)

    # M = scaling · [Λ_1 A Γ_1; …; Λ_n A Γ_n], shape (n·r, d)
    def scaled_basis(self, lambdas: Tensor, gammas: Tensor, scaling: float, dtype: torch.dtype,
                     need_M: bool = True, need_M_t: bool = True):
        """(M, Mᵀ) in ``dtype``: dense tensors (Mᵀ a view), or two CSR tensors sharing A_tiled's indices.

        Sparse: only the orientations asked for are built (the other is None); each costs a pass over
        the nnz values."""
        if not self.sparse:
            scaled = self.A.to(lambdas.dtype).unsqueeze(0) * (gammas * scaling).unsqueeze(1)
            scaled.mul_(lambdas.unsqueeze(2))
            M = scaled.reshape(-1, self.small).to(dtype)
            return M, M.mT
        lambdas, gammas = lambdas.float(), gammas.float()
        M = self._sparse_scaled(self.A_tiled, lambdas, gammas, scaling, dtype, transposed=False) if need_M else None
        M_t = (
            self._sparse_scaled(self.A_tiled_t, lambdas, gammas, scaling, dtype, transposed=True) if need_M_t else None
        )
        return M, M_t

    def _entry_indices(self, tiled: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
        """For every stored entry of a tiled-A CSR: its flat index into Λ (n·r) and into Γ (n·d).

        Fixed by the sparsity pattern, so computed once per pattern and orientation and shared like the
        bases themselves (one (2, nnz) int64 tensor in SharedTensors), not on every forward and backward."""
        name = self._a_name + (".index.t" if transposed else ".index")
        nnz = tiled.values().numel()
        stacked = self._shared.get(
            name, (2, nnz), lambda shape, g: torch.stack(self._compute_entry_indices(tiled, transposed)),
            tiled.device, torch.int64,
        )
        return stacked[0], stacked[1]

    def _compute_entry_indices(self, tiled: Tensor, transposed: bool) -> tuple[Tensor, Tensor]:
        crow = tiled.crow_indices().long()
        rows = torch.repeat_interleave(torch.arange(tiled.shape[0], device=crow.device), crow.diff())
        cols = tiled.col_indices().long()
        stacked_row, feature = (cols, rows) if transposed else (rows, cols)
        term = torch.div(stacked_row, self.rank, rounding_mode="floor")
        return stacked_row, term * self.small + feature

    def _sparse_scaled(self, tiled, lambdas, gammas, scaling, dtype, transposed):
        lambda_index, gamma_index = self._entry_indices(tiled, transposed)
        values = tiled.values().float() * lambdas.flatten()[lambda_index] * gammas.flatten()[gamma_index]
        values = (values * scaling).to(dtype)
        with _quiet_sparse():
            return torch.sparse_csr_tensor(
                tiled.crow_indices(), tiled.col_indices(), values, tiled.shape, check_invariants=False
            )

    def scaling_grads(self, grad_M: Tensor, lambdas: Tensor, gammas: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        """(dL/dΛ, dL/dΓ) in the parameters' dtype from a dense dL/dM (n·r, d).

        M[j,i,k] = scaling·Λ[j,i]·A[i,k]·Γ[j,k], so dΛ[j,i] = scaling·Σ_k g[j,i,k]·A[i,k]·Γ[j,k] and
        dΓ[j,k] = scaling·Σ_i g[j,i,k]·Λ[j,i]·A[i,k].
        """
        n, r, d = self.num_terms, self.rank, self.small
        weighted = grad_M.to(lambdas.dtype).reshape(n, r, d).mul_(self.A.to(lambdas.dtype))  # our own temporary: in place
        grad_lambdas = torch.bmm(weighted, gammas.unsqueeze(2)).squeeze(2)
        grad_gammas = torch.bmm(lambdas.unsqueeze(1), weighted).squeeze(1)
        return grad_lambdas * scaling, grad_gammas * scaling

    def sparse_scaling_grads(self, left_t: Tensor, right_t: Tensor, lambdas: Tensor, gammas: Tensor,
                             scaling: float) -> tuple[Tensor, Tensor]:
        """(dL/dΛ, dL/dΓ) when dL/dM = left_t·right_tᵀ (left_t (n·r, T), right_t (d, T)), taken only on
        M's pattern and never formed.

        Every row (j, i) of M has the columns of A's row i, so one batched product of left's rows
        (n, T) with right's rows at A_i's columns (T, L) gives g[j,i,k] on the whole pattern: the
        multiply-adds of a sampled product (SDDMM), as dense GEMMs: on the CPU a little faster than
        torch's ``sampled_addmm`` (which has no half-precision kernels) with its index arithmetic.
        Padding slots have A value 0 and add nothing. The formulas are those of :meth:`scaling_grads`.
        """
        lambdas, gammas = lambdas.float(), gammas.float()
        if self.per_term:
            return self._per_term_scaling_grads(left_t, right_t, lambdas, gammas, scaling)
        n, r, d = self.num_terms, self.rank, self.small
        columns, values = self.A_columns, self.A_values.float()  # (r, L)
        tokens = left_t.shape[1]
        per_row = left_t.reshape(n, r, tokens).transpose(0, 1)  # (r, n, T)
        gathered = right_t.index_select(0, columns.flatten()).view(*columns.shape, tokens)  # (r, L, T)
        grad_M = torch.bmm(per_row, gathered.transpose(1, 2)).float()  # (r, n, L)
        weighted = grad_M.mul_(values.unsqueeze(1) * scaling)
        grad_lambdas = (weighted * gammas[:, columns].transpose(0, 1)).sum(2).T  # (n, r)
        by_entry = (weighted * lambdas.T.unsqueeze(2)).transpose(1, 2).reshape(-1, n)  # (r·L, n)
        grad_gammas = torch.zeros(d, n, device=by_entry.device).index_add_(0, columns.flatten(), by_entry).T
        return grad_lambdas, grad_gammas

    def _per_term_scaling_grads(self, left_t: Tensor, right_t: Tensor, lambdas: Tensor, gammas: Tensor,
                                scaling: float) -> tuple[Tensor, Tensor]:
        """:meth:`sparse_scaling_grads` when every row (j, i) of M has its own columns (A_j's row i, keep_rank):
        no rows to share a gather, so dL/dM on the pattern comes from torch's sampled product (SDDMM, one
        dot product of length T per stored entry, float32: it has no half-precision kernels), then Λ's and
        Γ's gradients by scattering the entries through their flat indices."""
        n, r, d = self.num_terms, self.rank, self.small
        tiled = self.A_tiled
        lambda_index, gamma_index = self._entry_indices(tiled, transposed=False)
        a_values = tiled.values().float()
        with _quiet_sparse():
            pattern = torch.sparse_csr_tensor(
                tiled.crow_indices(), tiled.col_indices(), a_values, tiled.shape, check_invariants=False
            )
            sampled = torch.sparse.sampled_addmm(pattern, left_t.float(), right_t.float().mT, beta=0.0)
        weighted = sampled.values().mul_(a_values * scaling)  # scaling·A_j[i, k]·g[j, i, k] on the pattern
        grad_lambdas = torch.zeros(n * r, device=weighted.device).index_add_(
            0, lambda_index, weighted * gammas.flatten()[gamma_index]
        )
        grad_gammas = torch.zeros(n * d, device=weighted.device).index_add_(
            0, gamma_index, weighted * lambdas.flatten()[lambda_index]
        )
        return grad_lambdas.view(n, r), grad_gammas.view(n, d)


# --- the products -------------------------------------------------------------------------------

def _bag_product(matrix: Tensor, table: Tensor) -> Tensor:
    """matrix @ table for a CSR ``matrix`` (m, k) and a dense ``table`` (k, T), as a weighted embedding-bag
    sum: each CSR row is a bag of table rows with its values as weights. On the CPU this runs 2-3x
    faster than torch's CSR x dense kernel at every T measured (128-8192, docs/benchmarks.md), and it
    has half-precision kernels, which the CSR ones lack."""
    return torch.nn.functional.embedding_bag(
        matrix.col_indices(), table, matrix.crow_indices(), mode="sum",
        per_sample_weights=matrix.values().to(table.dtype), include_last_offset=True,
    )


@dataclass
class _Plan:
    bases: RandomBases
    scaling: float
    input_is_small: bool  # in_features <= out_features: x meets A's side first
    form_weight: bool
    dtype: torch.dtype


class _DenseRandLoRAProduct(torch.autograd.Function):
    """x (T, in) → x·ΔWᵀ with dense bases, saving no scaled basis for the backward (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambdas: Tensor, gammas: Tensor, plan: _Plan) -> Tensor:
        bases = plan.bases
        with torch.autocast(x.device.type, enabled=False):
            M, _ = bases.scaled_basis(lambdas, gammas, plan.scaling, plan.dtype)
            B = bases.B.to(plan.dtype)
            if plan.form_weight:
                C = B @ M  # (D, d)
                y = x @ C.mT if plan.input_is_small else x @ C
                saved = x
            elif plan.input_is_small:
                y = (x @ M.mT) @ B.mT
                saved = x
            else:
                saved = x @ B  # u = x·B, (T, n·r): smaller than x, and all the backward needs
                y = saved @ M
        ctx.save_for_backward(saved, lambdas, gammas)
        ctx.plan = plan
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        saved, lambdas, gammas = ctx.saved_tensors
        plan: _Plan = ctx.plan
        bases = plan.bases
        need_x = ctx.needs_input_grad[0]
        need_scales = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_x = grad_M = None
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_y = grad_y.to(plan.dtype)
            M, _ = bases.scaled_basis(lambdas, gammas, plan.scaling, plan.dtype)  # rebuilt, not kept
            B = bases.B.to(plan.dtype)
            if plan.form_weight:
                C = B @ M
                x = saved
                if plan.input_is_small:  # y = x·Cᵀ
                    grad_x = grad_y @ C if need_x else None
                    grad_C = grad_y.mT @ x if need_scales else None
                else:  # y = x·C
                    grad_x = grad_y @ C.mT if need_x else None
                    grad_C = x.mT @ grad_y if need_scales else None
                del C
                grad_M = B.mT @ grad_C if need_scales else None
            elif plan.input_is_small:  # y = (x·Mᵀ)·Bᵀ
                x = saved
                grad_u = grad_y @ B
                grad_x = grad_u @ M if need_x else None
                grad_M = grad_u.mT @ x if need_scales else None
            else:  # y = (x·B)·M
                u = saved
                grad_x = (grad_y @ M.mT) @ B.mT if need_x else None
                grad_M = u.mT @ grad_y if need_scales else None
            del M
            grad_lambdas = grad_gammas = None
            if need_scales:
                grad_lambdas, grad_gammas = bases.scaling_grads(grad_M, lambdas, gammas, plan.scaling)
        return grad_x, grad_lambdas, grad_gammas, None


class _SparseRandLoRAProduct(torch.autograd.Function):
    """x (T, in) → x·ΔWᵀ with sparse bases: every product is an embedding-bag sum over the rows of a
    token-minor (features, T) activation, so activations are transposed once on the way in and once on
    the way out, and each product hands the next a contiguous (k, T) buffer.

    With v_t denoting vᵀ: input on the small side, z_t = M·x_t and y_t = B·z_t; on the large side,
    u_t = Bᵀ·x_t and y_t = Mᵀ·u_t. The backward saves x_t or u_t (no scaled basis) and builds only the
    orientation of M that the input gradient needs."""

    @staticmethod
    def forward(ctx, x: Tensor, lambdas: Tensor, gammas: Tensor, plan: _Plan) -> Tensor:
        bases = plan.bases
        with torch.autocast(x.device.type, enabled=False):
            x_t = x.mT.contiguous()
            if plan.input_is_small:
                M, _ = bases.scaled_basis(lambdas, gammas, plan.scaling, plan.dtype, need_M=True, need_M_t=False)
                saved = x_t
                y_t = _bag_product(bases.B, _bag_product(M, x_t))
            else:
                _, M_t = bases.scaled_basis(lambdas, gammas, plan.scaling, plan.dtype, need_M=False, need_M_t=True)
                saved = _bag_product(bases.B_t, x_t)  # u_t (n·r, T): smaller than x_t
                y_t = _bag_product(M_t, saved)
        ctx.save_for_backward(saved, lambdas, gammas)
        ctx.plan = plan
        # Transposed back by a copy: an add with a transposed operand (the base's output, autograd's sum of
        # input gradients) runs 3-4x slower than the copy and a contiguous add together.
        return y_t.mT.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        saved, lambdas, gammas = ctx.saved_tensors
        plan: _Plan = ctx.plan
        bases = plan.bases
        need_x = ctx.needs_input_grad[0]
        need_scales = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_x = grad_lambdas = grad_gammas = None
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_t = grad_y.to(plan.dtype).mT.contiguous()
            if plan.input_is_small:  # dL/dM = (Bᵀ·grad_t)·x_tᵀ
                left_t, right_t = _bag_product(bases.B_t, grad_t), saved
                if need_x:
                    _, M_t = bases.scaled_basis(lambdas, gammas, plan.scaling, plan.dtype, need_M=False)
                    grad_x = _bag_product(M_t, left_t).mT.contiguous()
            else:  # dL/dM = u_t·grad_tᵀ
                left_t, right_t = saved, grad_t
                if need_x:
                    M, _ = bases.scaled_basis(lambdas, gammas, plan.scaling, plan.dtype, need_M_t=False)
                    grad_x = _bag_product(bases.B, _bag_product(M, grad_t)).mT.contiguous()
            if need_scales:
                grad_lambdas, grad_gammas = bases.sparse_scaling_grads(
                    left_t, right_t, lambdas, gammas, plan.scaling
                )
        return grad_x, grad_lambdas, grad_gammas, None


def expected_sparse_rank(small: int, rank: int, sparsity: float, terms: int = 1) -> float:
    """Expected number of the d input directions (columns of the stacked A) that some term reaches, with
    ``terms`` independent sparse A's of ``rank`` rows: d·(1 − (1 − 2/s)^(terms·r)). A column of zeros in
    every A is a direction ΔW cannot read, so this bounds the expected rank of ΔW: with one shared A
    (``terms`` = 1), d·(1 − (1 − 2/s)^r)."""
    return small * (1.0 - (1.0 - 2.0 / sparsity) ** (terms * rank))


# a warning is printed once per process for each distinct setting (d, r, s)
RANK_WARNING_FRACTION = 0.9
_WARNED: set[tuple] = set()


def _warn_low_rank(small: int, large: int, rank: int, sparsity: float, explicit: bool) -> None:
    key = (small, rank, sparsity)
    expected = expected_sparse_rank(small, rank, sparsity)
    if expected >= RANK_WARNING_FRACTION * small or key in _WARNED:
        return
    _WARNED.add(key)
    source = f"adapter.sparsity={sparsity:g}" if explicit else f"s = sqrt({large}) = {sparsity:.1f}"
    smaller_s = 2.0 / (1.0 - (1.0 - RANK_WARNING_FRACTION) ** (1.0 / rank))
    larger_r = math.ceil(math.log(1.0 - RANK_WARNING_FRACTION) / math.log(1.0 - 2.0 / sparsity))
    print(
        f"warning: RandLoRA sparse bases ({source}, r={rank}) on layers with d={small}: one A shared by all terms "
        f"leaves on average {small - expected:.0f} of {small} input directions empty, so ΔW's expected rank is "
        f"{expected:.0f} ({expected / small:.0%} of d); set adapter.keep_rank: true (a sparse A per term, full "
        f"rank) or, for 90 %, adapter.sparsity <= {smaller_s:.1f} or adapter.r >= {larger_r}",
        file=sys.stderr, flush=True,
    )


def forming_is_cheaper(tokens: int, large: int, small: int, stacked: int, backward: bool) -> bool:
    """Whether applying ΔW formed (C = B·M, then x·Cᵀ) costs fewer multiply-adds than the factored chain."""
    factored = tokens * stacked * (small + large)
    formed = stacked * small * large + tokens * large * small
    if backward:
        factored += tokens * stacked * (large + 2 * small)
        formed += 2 * stacked * small * large + 2 * tokens * large * small
    return formed < factored


class RandLoRALayer(AdapterLayer):

    def __init__(self, base_layer, config: RandLoRAConfig, shared, name, frozen_dtype=torch.float32):
        super().__init__(base_layer, config, shared, name, frozen_dtype)
        self.small_features = min(self.in_features, self.out_features)
        self.large_features = max(self.in_features, self.out_features)
        self.input_is_small = self.in_features <= self.out_features
        self.basis_rank = config.r
        self.num_terms = math.ceil(self.small_features / config.r)
        self.sparsity = self._resolve_sparsity(config)
        self.keep_rank = config.keep_rank
        if self.sparsity is not None and not self.keep_rank and building_for_training():
            _warn_low_rank(self.small_features, self.large_features, self.basis_rank, self.sparsity,
                           config.sparsity is not None)
        # Λ_j diagonals as rows (n, r); Γ_j diagonals as rows (n, d).
        self.lambdas = nn.Parameter(
            torch.zeros(self.num_terms, self.basis_rank, device=self.device, dtype=torch.float32)
        )
        self.gammas = nn.Parameter(
            torch.full((self.num_terms, self.small_features), 1.0 / self.small_features, device=self.device,
                       dtype=torch.float32)
        )
        self._shared = shared
        self._bases = self._make_bases(self.device)

    def _resolve_sparsity(self, config: RandLoRAConfig) -> Optional[float]:
        if config.basis != "sparse":
            return None
        bound = math.sqrt(self.large_features)
        if config.sparsity is None:
            return max(2.0, bound)
        if config.sparsity > bound + 1e-9:
            raise UserError(
                f"adapter.sparsity={config.sparsity:g} exceeds sqrt({self.large_features}) = {bound:.1f} for "
                f"{self.name}; use 2 <= sparsity <= {math.floor(bound)} or leave it unset for sqrt(D) per layer"
            )
        return float(config.sparsity)

    def _make_bases(self, device) -> RandomBases:
        return RandomBases(self._shared, self.config.basis, self.sparsity, self.large_features,
                           self.small_features, self.basis_rank, self.num_terms, device, self.frozen_dtype,
                           per_term=self.keep_rank, peft_pair=self._peft_pair())

    def _peft_pair(self) -> Optional[PeftPair]:
        if self.config.basis_layout != "peft":
            return None
        own_shape = (self.in_features, self.out_features)
        if tuple(self._shared.target_shapes.get(self.name, ())) != own_shape:
            # the model-wide pair is sized by every target: sized from this layer alone it would differ
            raise ValueError(
                f"RandLoRA layer {self.name} ({own_shape[0]}->{own_shape[1]}) with basis_layout: peft is not listed in "
                "SharedTensors.target_shapes; build the SharedTensors with every adapted layer's (in, out)"
            )
        return PeftPair.of(self._shared.target_shapes, self.basis_rank)

    @property
    def bases(self) -> RandomBases:
        """The shared bases on the parameters' device (fetched again if the module was moved)."""
        if self._bases.device != self.lambdas.device:
            self._bases = self._make_bases(self.lambdas.device)
        return self._bases

    def delta(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype(x)
        bases = self.bases
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        backward = torch.is_grad_enabled() and (
            flat.requires_grad or self.lambdas.requires_grad or self.gammas.requires_grad
        )
        form = not bases.sparse and forming_is_cheaper(
            flat.shape[0], self.large_features, self.small_features, self.num_terms * self.basis_rank, backward
        )
        plan = _Plan(bases, self.scaling, self.input_is_small, form, dtype)
        product = _SparseRandLoRAProduct if bases.sparse else _DenseRandLoRAProduct
        out = product.apply(flat, self.lambdas, self.gammas, plan)
        return out.reshape(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> Tensor:
        bases = self.bases
        M, _ = bases.scaled_basis(self.lambdas.detach().float(), self.gammas.detach().float(), self.scaling, torch.float32)
        if bases.sparse:
            C = torch.sparse.mm(bases.B.float(), M.to_dense())
        else:
            C = bases.B.float() @ M
        return C if self.input_is_small else C.mT.contiguous()

    def factors(self) -> tuple[Tensor, Tensor]:
        """ΔW = B·M (or its transpose) with M = scaling·[Λ_1 A Γ_1; …; Λ_n A Γ_n]: inner dimension n·r ≥ d."""
        bases = self.bases
        M, _ = bases.scaled_basis(self.lambdas.detach().float(), self.gammas.detach().float(), self.scaling, torch.float32)
        B = bases.dense_B().float()
        M = M.to_dense() if bases.sparse else M
        return (B, M) if self.input_is_small else (M.mT, B.mT)

    def rank_ceiling(self) -> Optional[int]:
        # ΔW = B·M reads only the small-side directions some A_j has a non-zero in, and writes only the
        # large-side ones some row of B reaches (with one shared A, about d·(1 − (1 − 2/s)^r) of d)
        if not self.bases.sparse:
            return None
        small_side = int((self.bases.dense_A_stack() != 0).any(dim=0).sum())
        large_side = int((self.bases.dense_B() != 0).any(dim=1).sum())
        return min(small_side, large_side)

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        small = min(in_features, out_features)
        num_terms = math.ceil(small / config.r)
        return num_terms * (config.r + small)

    def extra_repr(self) -> str:
        basis = self.config.basis + (f"(s={self.sparsity:g})" if self.sparsity else "")
        basis += ", keep_rank" if self.keep_rank else ""
        return f"{super().extra_repr()}, n={self.num_terms}, basis={basis}"


Config = RandLoRAConfig
Layer = RandLoRALayer
