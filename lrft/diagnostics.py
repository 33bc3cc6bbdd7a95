"""Rank and orthogonality maths: the spectrum of an adapted layer's ΔW and what it says about rank and
orthogonality (the ``lrft inspect-rank`` command and its tables and plots are in :mod:`lrft.inspect_rank`).

Per layer, from the singular values σ_1 ≥ σ_2 ≥ … of ΔW (shape m × n = out × in):

* ``rank_bound``: what the parameterisation allows: min(m, n, k) for a product B·A with inner
  dimension k (LoRA r, VeRA r, …), min(m, n) for full-rank adapters (RandLoRA, DoRA), lowered to the
  number of directions the frozen bases reach where they leave some empty (sparse RandLoRA with one A
  shared by all terms: its all-zero columns; ``AdapterLayer.rank_ceiling``).
* ``rank``: the numerical rank, the number of σ_i above ``max(m, n) · eps · σ_max`` (the rule of
  ``numpy.linalg.matrix_rank``) with eps that of float32, the dtype ΔW is defined in (``delta_weight()`` and
  ``factors()`` return float32; adapters store float32 or less). The spectrum itself is computed in float64
  on the CPU and float32 on CUDA; with the float32 eps the default gives the same ranks on both, and the
  float32 rounding of stored factors (relative 1e-7) does not count as rank. ``--tol t`` replaces the rule
  by ``t · σ_max``.
* ``effective_rank``: exp of the Shannon entropy of p_i = σ_i / Σσ (Roy & Vetterli, 2007).
* ``stable_rank``: ‖ΔW‖²_F / ‖ΔW‖²₂ = Σσ² / σ_max².
* ``sigma_max``, ``fro_norm``; ``top_r_energy``: Σ_{i≤R} σ_i² / Σσ² with R the adapter's ``r`` (with
  ``--compare``, the smallest ``r`` among the adapters, so that the column compares like with like).
* ``orth_loss``: ‖ΔWΔWᵀ − I‖²_F as in Table 5 of the RM-LoRA paper. ΔWΔWᵀ is m × m (out × out) with
  eigenvalues σ_i² (i ≤ min(m, n)) and m − min(m, n) zeros, so
  ``‖ΔWΔWᵀ − I‖²_F = Σ_{i≤k} (σ_i² − 1)² + (m − k)`` for any k singular values that include every non-zero
  one (each zero one adds (0 − 1)² = 1). It is at least m − rank: a low-rank update of a wide layer is far
  from orthogonal whatever its factors; the figures compare adapters of the same layer shapes. (Table 5 is
  discussed in the paper's sec. 5.2, where LoRA adapts only ViT-B/16's classification layer on CIFAR-100,
  100 outputs: there the bound is small, e.g. 100 − 69 = 31 for RM-LoRA at R = 80, whose reported 48.8
  is above it; on a transformer's 576- to 1536-wide projections the bound dominates the figure.)
* ``orth_loss_A`` = ‖AAᵀ − I‖²_F and ``orth_loss_B`` = ‖BᵀB − I‖²_F of the unscaled factors the paper's
  regulariser acts on (RM-LoRA eq. 10; AdaLoRA / LoRA² P and Q), for adapters that have them
  (``AdapterLayer.orthogonality_factors()``).

Cost: no layer gets a full SVD when its structure allows less. A product ΔW = B·A with inner dimension
k < min(m, n) gives its k singular values from thin QRs B = Q_B R_B and Aᵀ = Q_A R_A and the SVD of the
k × k core R_B R_Aᵀ (ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ): O((m + n) k²). Full-rank ΔW (RandLoRA, DoRA) is formed and
reduced in float64 on the CPU through the eigenvalues of its Gram matrix on the smaller side (one matrix
product and a symmetric eigensolve, several times faster than an SVD), kept only when every eigenvalue is
large enough for the Gram matrix's rounding (k · eps · λ_max) to leave it six correct digits; otherwise
that layer gets singular values from an SVD. On CUDA it is an SVD in float32. Layers of equal shape are
batched. On the CPU the small per-layer work runs on one thread (see ``one_thread``).

:func:`lrft.adapters.base.orthogonality_residuals` is the one definition of ‖AAᵀ − I‖ and ‖BᵀB − I‖: the
regularisers of RM-LoRA, AdaLoRA and LoRA² call it in training and inspect-rank calls it to report them.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from .adapters.base import orthogonality_residuals

# ΔW is defined in float32 (see the module docstring): the default rank rule uses its eps.
RANK_EPS = torch.finfo(torch.float32).eps
# A Gram-matrix eigenvalue is kept when its rounding error, about k·eps·λ_max, is below this fraction of it.
GRAM_RELATIVE_ACCURACY = 1e-6
# Most bytes one batch of stacked matrices may take in the computation dtype.
BATCH_BYTES = 512 * 2**20


# --- what an adapted layer's ΔW is made of ---------------------------------------------------------


@dataclass
class InspectedLayer:
    """One adapted layer, ΔW available three ways (all float32, scaling included)."""

    name: str
    out_features: int
    in_features: int
    factors: Callable[[], Optional[tuple[Tensor, Tensor]]]  # (B, A) with ΔW = B @ A, or None
    delta_weight: Callable[[torch.device], Tensor]  # dense ΔW (out, in), formed on the given device
    orthogonality_factors: Callable[[], Optional[tuple[Tensor, Tensor]]] = lambda: None  # unscaled (B, A)
    rank_ceiling: Callable[[], Optional[int]] = lambda: None  # AdapterLayer.rank_ceiling


# --- spectra -----------------------------------------------------------------------------------------


def factored_singular_values(left: Tensor, right: Tensor) -> Tensor:
    """Singular values of ``left @ right`` (batched: (b, m, k) @ (b, k, n)), descending, without forming it:
    left = Q_l R_l and rightᵀ = Q_r R_r, so left @ right = Q_l (R_l R_rᵀ) Q_rᵀ has the singular values of
    the small core R_l R_rᵀ."""
    _, r_left = torch.linalg.qr(left, mode="r")
    _, r_right = torch.linalg.qr(right.mT, mode="r")
    return torch.linalg.svdvals(r_left @ r_right.mT)


def factored_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD (U, S, Vh) of ``left @ right`` ((m, k) @ (k, n)) without forming it, as
    :func:`factored_singular_values` with the orthonormal factors kept: U = Q_l U_c, Vh = Vh_c Q_rᵀ for the SVD
    U_c S Vh_c of the core R_l R_rᵀ, which is at most min(m, k) × min(n, k)."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.mT)
    core_u, sigma, core_vh = torch.linalg.svd(r_left @ r_right.mT, full_matrices=False)
    return q_left @ core_u, sigma, core_vh @ q_right.mT


def dense_singular_values(weights: Tensor, use_gram: bool = True) -> tuple[Tensor, list[str]]:
    """Singular values of each matrix in ``weights`` (b, m, n), descending, and how each was obtained.

    With ``use_gram``, from the eigenvalues of the Gram matrix on the smaller side; a matrix any of whose
    eigenvalues lies within the Gram matrix's rounding error (see GRAM_RELATIVE_ACCURACY) gets an SVD.
    """
    if not use_gram:
        return torch.linalg.svdvals(weights), ["svd"] * weights.shape[0]
    tall = weights.shape[-2] >= weights.shape[-1]
    gram = weights.mT @ weights if tall else weights @ weights.mT
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)  # descending
    size = gram.shape[-1]
    floor = size * torch.finfo(weights.dtype).eps * eigenvalues[:, :1] / GRAM_RELATIVE_ACCURACY
    reliable = ((eigenvalues >= floor) | (eigenvalues[:, :1] == 0)).all(dim=1)
    sigma = eigenvalues.sqrt()
    methods = ["gram" if ok else "svd" for ok in reliable.tolist()]
    redo = (~reliable).nonzero().flatten()
    if redo.numel():
        sigma[redo] = torch.linalg.svdvals(weights[redo])
    return sigma, methods


@dataclass
class LayerSpectrum:
    name: str
    out_features: int
    in_features: int
    rank_bound: int
    sigma: Tensor  # float64, CPU, descending
    method: str  # factored | gram | svd
    orth_loss_A: Optional[float] = None
    orth_loss_B: Optional[float] = None


@contextlib.contextmanager
def one_thread(enabled: bool = True):
    """Run small per-layer CPU work (loading, thin QRs, k×k products, copies) on one thread: it gains little
    from more, and MKL's OpenMP threads slow it down twenty-fold when the cores are shared with other work."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def spectrum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cuda" else torch.float64


def _orthogonality(layer: InspectedLayer) -> tuple[Optional[float], Optional[float]]:
    factors = layer.orthogonality_factors()
    if factors is None:
        return None, None
    B, A = (t.detach().to("cpu", torch.float64) for t in factors)
    return tuple(float(t) for t in orthogonality_residuals(B, A))


def compute_spectra(
    layers: list[InspectedLayer],
    device: torch.device = torch.device("cpu"),
    dense: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> list[LayerSpectrum]:
    """Every layer's spectrum: low-rank products one at a time through their factors, full-rank ΔW formed
    and batched with the other layers of its shape (up to BATCH_BYTES).

    ``dense=True`` forms every ΔW even when it is a low-rank product (the tests compare both paths).
    ``progress(n)`` is called as n more layers are done.
    """
    dtype = spectrum_dtype(device)
    itemsize = torch.finfo(dtype).bits // 8
    results: list[Optional[LayerSpectrum]] = [None] * len(layers)
    pending: dict[tuple[int, int], list[int]] = defaultdict(list)  # layer shape -> indices waiting to be formed

    def record(index: int, sigma: Tensor, method: str, inner_dim: Optional[int]) -> None:
        layer = layers[index]
        ceiling = layer.rank_ceiling()
        bound = min(layer.out_features, layer.in_features, inner_dim or layer.out_features,
                    layer.out_features if ceiling is None else ceiling)
        orth_A, orth_B = _orthogonality(layer)
        results[index] = LayerSpectrum(
            layer.name, layer.out_features, layer.in_features, bound, sigma.cpu().double(), method, orth_A, orth_B
        )

    def form_and_reduce(shape: tuple[int, int]) -> None:
        indices = pending.pop(shape)
        with torch.no_grad():
            weights = torch.stack([layers[i].delta_weight(device).detach().to(dtype) for i in indices])
            sigma, methods = dense_singular_values(weights, use_gram=device.type == "cpu")
            del weights
        for row, index in enumerate(indices):
            record(index, sigma[row], methods[row], None)
        if progress:
            progress(len(indices))

    for index, layer in enumerate(layers):
        shape = (layer.out_features, layer.in_features)
        with torch.no_grad(), one_thread(device.type == "cpu"):
            factors = None if dense else layer.factors()
            if factors is not None and factors[0].shape[-1] < min(shape):
                B, A = (t.detach().to(device, dtype) for t in factors)
                record(index, factored_singular_values(B, A), "factored", B.shape[-1])
                if progress:
                    progress(1)
                continue
        pending[shape].append(index)
        if len(pending[shape]) * shape[0] * shape[1] * itemsize * 2 >= BATCH_BYTES:  # ΔW and its Gram product
            form_and_reduce(shape)
    for shape in list(pending):
        form_and_reduce(shape)
    return results  # type: ignore[return-value]


# --- figures ------------------------------------------------------------------------------------------


def rank_threshold(sigma_max: float, out_features: int, in_features: int, tol: Optional[float]) -> float:
    if tol is not None:
        return tol * sigma_max
    return max(out_features, in_features) * RANK_EPS * sigma_max


def orthogonality_loss(sigma: Tensor, out_features: int) -> float:
    """‖ΔWΔWᵀ − I_out‖²_F from singular values that include every non-zero one (module docstring)."""
    sigma = sigma.double()
    return float(((sigma**2 - 1.0) ** 2).sum()) + (out_features - sigma.numel())


def spectrum_figures(spectrum: LayerSpectrum, top_r: int, tol: Optional[float]) -> dict[str, Any]:
    sigma = spectrum.sigma.double()
    m, n = spectrum.out_features, spectrum.in_features
    sigma_max = float(sigma[0]) if sigma.numel() else 0.0
    threshold = rank_threshold(sigma_max, m, n, tol)
    energy = sigma**2
    total_energy = float(energy.sum())
    if sigma_max > 0:
        p = sigma[sigma > 0] / sigma.sum()
        effective_rank = math.exp(float(-(p * p.log()).sum()))
        stable_rank = total_energy / sigma_max**2
        top_r_energy = float(energy[:top_r].sum()) / total_energy
    else:  # ΔW = 0 (an untrained LoRA): no direction at all
        effective_rank, stable_rank, top_r_energy = 0.0, 0.0, None
    figures = {
        "name": spectrum.name,
        "module_type": module_type(spectrum.name),
        "depth": layer_depth(spectrum.name),
        "shape": [m, n],
        "rank_bound": spectrum.rank_bound,
        "rank": int((sigma > threshold).sum()) if sigma_max > 0 else 0,
        "rank_threshold": threshold,
        "effective_rank": effective_rank,
        "stable_rank": stable_rank,
        "sigma_max": sigma_max,
        "fro_norm": math.sqrt(total_energy),
        "top_r_energy": top_r_energy,
        "orth_loss": orthogonality_loss(sigma, m),
        "method": spectrum.method,
    }
    if spectrum.orth_loss_A is not None:
        figures["orth_loss_A"] = spectrum.orth_loss_A
        figures["orth_loss_B"] = spectrum.orth_loss_B
    return figures


_DEPTH = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def module_type(name: str) -> str:
    """q, k, v, o, gate, up, down for the usual ``*_proj`` names; the last name component otherwise."""
    last = name.rsplit(".", 1)[-1]
    return last[: -len("_proj")] if last.endswith("_proj") else last


def layer_depth(name: str) -> Optional[int]:
    """The block index in names like ``model.layers.12.self_attn.q_proj``."""
    found = _DEPTH.search(name)
    return int(found.group(1)) if found else None


SUMMARY_FIELDS = (
    "rank_bound", "rank", "effective_rank", "stable_rank", "sigma_max", "fro_norm", "top_r_energy",
    "orth_loss", "orth_loss_A", "orth_loss_B",
)


def _mean_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"layers": len(rows)}
    for key in SUMMARY_FIELDS:
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            summary[f"mean_{key}"] = sum(values) / len(values)
    return summary


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_module: dict[str, list] = defaultdict(list)
    by_depth: dict[str, list] = defaultdict(list)
    for row in rows:
        by_module[row["module_type"]].append(row)
        by_depth["-" if row["depth"] is None else str(row["depth"])].append(row)
    depth_order = sorted(by_depth, key=lambda d: (d == "-", int(d) if d != "-" else 0))
    return {
        "overall": _mean_figures(rows),
        "by_module": {key: _mean_figures(by_module[key]) for key in module_order(by_module)},
        "by_depth": {key: _mean_figures(by_depth[key]) for key in depth_order},
    }


_USUAL_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]


def module_order(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: (_USUAL_ORDER.index(k) if k in _USUAL_ORDER else len(_USUAL_ORDER), k))
