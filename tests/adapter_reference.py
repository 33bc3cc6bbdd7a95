"""Independent references for the adapter contract (tests/test_adapter_contract.py).

``NAIVE[type](layer, tensors)`` is ΔW of one layer written from the paper's equation, in float64, with
explicit loops and diagonals, from the layer's trainable tensors (``tensors``: name -> tensor, the layer's
own or float64 copies that autograd differentiates) and its frozen ones. Every registered adapter type
must have an entry: the contract test fails for a type without one. ``CONTRACT_OPTIONS[type]`` are small
options that exercise the type (defaults: r = 4); ``CONTRACT_VARIANTS`` adds option sets that change how a
type builds ΔW (RandLoRA's ``keep_rank``), each checked by the whole contract too; ``RESUME_OPTIONS`` make a
type's controller act before and after the resume check's checkpoint.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors
from lrft.adapters.frozen_linear import dequantized_weight


def _lora(layer, t) -> Tensor:
    """Hu et al. 2021: ΔW = (alpha / r) B A."""
    return (t["lora_B"].double() @ t["lora_A"].double()) * layer.scaling


def _dora(layer, t) -> Tensor:
    """Liu et al. 2024, eq. 5: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output row, ΔW = (alpha / r) B A; the norm is
    a constant for autograd (sec. 4.3). Returns W' − W."""
    W = dequantized_weight(layer.base_layer, torch.float64)
    adapted = W + _lora(layer, t)
    norm = torch.linalg.vector_norm(adapted, dim=1).detach()
    return torch.diag(t["magnitude"].double() / norm) @ adapted - W


def _adalora(layer, t) -> Tensor:
    """Zhang et al. 2023, eq. 3: ΔW = P Λ Q (times alpha / r)."""
    return t["lora_P"].double() @ torch.diag(t["lora_lambda"].double()) @ t["lora_Q"].double() * layer.scaling


def _lora2(layer, t) -> Tensor:
    """LoRA² sec. 3.1: ΔW = P Λ Q with P = u v, Q = U V (times alpha / R)."""
    P = t["lora_u"].double() @ t["lora_v"].double()
    Q = t["lora_U"].double() @ t["lora_V"].double()
    return P @ torch.diag(t["lora_lambda"].double()) @ Q * layer.scaling


def _vera(layer, t) -> Tensor:
    """Kopiczko et al. 2024, eq. 2: ΔW = Λ_b B Λ_d A with the top-left slices of the model-wide bases."""
    A = layer.shared_A.double()[:, : layer.in_features]
    B = layer.shared_B.double()[: layer.out_features, :]
    return torch.diag(t["lambda_b"].double()) @ B @ torch.diag(t["lambda_d"].double()) @ A


def _nola(layer, t) -> Tensor:
    """Koohpayegani et al. 2024: ΔW = scaling (Σ_i α_i A_i)(Σ_j β_j B_j), A_i (out × r), B_j (r × in)."""
    out_bases, in_bases = (b.double() for b in layer.bases())
    A = sum(t["out_coefficients"][i].double() * out_bases[i] for i in range(layer.num_basis))
    B = sum(t["in_coefficients"][j].double() * in_bases[j] for j in range(layer.num_basis))
    return layer.scaling * (A @ B)


def _randlora(layer, t) -> Tensor:
    """Albert et al. 2025, eq. 3: ΔW = scaling Σ_j B_j Λ_j A_j Γ_j, A_j facing the smaller side (ΔW transposed
    when in > out); A_j = A for every j (eq. 4) unless keep_rank draws one per term."""
    A_stack = layer.bases.dense_A_stack().double()
    B = layer.bases.dense_B().double()
    r = layer.basis_rank
    total = torch.zeros(B.shape[0], A_stack.shape[1], dtype=torch.float64)
    for j in range(layer.num_terms):
        B_j = B[:, j * r : (j + 1) * r]
        A_j = A_stack[j * r : (j + 1) * r]
        total = total + B_j @ torch.diag(t["lambdas"][j].double()) @ A_j @ torch.diag(t["gammas"][j].double())
    total = total * layer.scaling
    return total if layer.in_features <= layer.out_features else total.T


NAIVE: dict[str, Callable[..., Tensor]] = {
    "lora": _lora,
    "rmlora": _lora,  # RM-LoRA's ΔW is LoRA's; its masks and regulariser act in training only
    "dora": _dora,
    "adalora": _adalora,
    "lora2": _lora2,
    "vera": _vera,
    "nola": _nola,
    "randlora": _randlora,
}

# Trainable parameters per layer as the papers count them (in, out: the layer's widths; d, D: the smaller and
# larger of them).
PARAMETERS: dict[str, Callable[..., int]] = {
    "lora": lambda i, o, c: c.r * (i + o),
    "rmlora": lambda i, o, c: c.r * (i + o),
    "dora": lambda i, o, c: c.r * (i + o) + o,  # LoRA plus the magnitude vector
    "adalora": lambda i, o, c: c.r * (i + o + 1),  # P, Q and the diagonal Λ
    "lora2": lambda i, o, c: c.k * (i + o) + 2 * c.k * c.r + c.r,  # u, V; v, U; Λ
    "vera": lambda i, o, c: c.r + o,  # d and b
    "nola": lambda i, o, c: 2 * c.num_basis,  # α and β
    "randlora": lambda i, o, c: -(-min(i, o) // c.r) * (c.r + min(i, o)),  # n = ⌈d / r⌉ pairs of Λ_j, Γ_j
}

CONTRACT_OPTIONS: dict[str, dict] = {
    "lora2": {"r": 6, "k": 3},
    "vera": {"r": 96},  # above the smaller width: allowed, ΔW just has rank <= min(in, out)
    "nola": {"r": 4, "num_basis": 24},
    "randlora": {"r": 12, "alpha": 24},  # r does not divide d = 64: n = 6 terms, n·r = 72 > d
}


# Options that change how a type builds ΔW, each run through the whole contract beside the type's own
# CONTRACT_OPTIONS (the test id is the key): case id -> (type, options).
CONTRACT_VARIANTS: dict[str, tuple[str, dict]] = {
    # one sparse A_j per term (eq. 3) instead of one shared A: its own bases and its own gradient path
    "randlora-keep_rank": ("randlora", {"r": 12, "alpha": 24, "basis": "sparse", "sparsity": 4, "keep_rank": True}),
    # PEFT's layout: one pair of bases for the whole model, sliced and paired per layer shape
    "randlora-peft_layout": ("randlora", {"r": 12, "alpha": 24, "basis_layout": "peft"}),
}


# Options added for the resume check (6 steps, the checkpoint after 3): the rank-budget schedules mask on both
# sides of the checkpoint (steps 1-3), freeze the final masks at step 4 and hold them at step 5.
RESUME_OPTIONS: dict[str, dict] = {
    "adalora": {"target_r": 2, "tinit": 1, "tfinal": 2, "delta_t": 1},
    "lora2": {"target_r": 2, "tinit": 1, "tfinal": 2, "delta_t": 1},
}


def options_for(kind: str) -> dict:
    return dict(CONTRACT_OPTIONS.get(kind, {"r": 4}))


def contract_cases(kinds) -> list:
    """pytest params (type, options) for every registered type and every variant, with readable ids."""
    import pytest

    cases = [pytest.param(kind, options_for(kind), id=kind) for kind in kinds]
    cases += [pytest.param(kind, dict(options), id=case) for case, (kind, options) in CONTRACT_VARIANTS.items()]
    return cases


def naive_of(layer) -> Tensor:
    """The naive ΔW of a layer from its own tensors."""
    return NAIVE[layer.config.type](layer, dict(layer.named_parameters()))


def build_layer(kind: str, base: str, in_f: int, out_f: int, randomize: bool = True, frozen_dtype=torch.float32, **options):
    """One layer of adapter type ``kind`` around a frozen linear of kind ``base`` (none, nf4, fp4, int8)."""
    spec = get_adapter(kind)
    config = spec.config(type=kind, **{**options_for(kind), **options})
    layer = spec.layer(make_linear(base, in_f, out_f), config, SharedTensors(config.seed, {"test": (in_f, out_f)}), "test", frozen_dtype)
    if randomize:
        randomize_trainables(layer)
    return layer


def randomize_trainables(layer, seed: int = 1, scale: float = 0.5):
    """Give every trainable tensor non-trivial values (many start at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad and not name.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def deterministic(layer):
    """Train mode with dropout off. (In eval mode, without gradients, bitsandbytes may repack a 4-bit weight
    for a bfloat16 CPU kernel on AVX512-BF16 machines; lrft's own model loading turns that off, the bare
    layers of these tests do not.)"""
    layer.train()
    if hasattr(layer.dropout, "p"):
        layer.dropout.p = 0.0
    return layer


def check_forward(layer, naive_delta, batch=(3, 5), atol=1e-4, rtol=1e-4):
    """forward(x) == x · (W + ΔW)ᵀ (+ bias) with ΔW from the naive float64 formula."""
    deterministic(layer)
    x = torch.randn(*batch, layer.in_features, generator=torch.Generator().manual_seed(7))
    W = dequantized_weight(layer.base_layer, torch.float64)
    dW = naive_delta(layer)
    assert dW.dtype == torch.float64 and dW.shape == (layer.out_features, layer.in_features)
    expected = x.double() @ (W + dW).T
    bias = getattr(layer.base_layer, "bias", None)
    if bias is not None:
        expected = expected + bias.double()
    got = layer(x).double()
    # the quantized base kernels round differently from a float64 matmul: compare the delta tightly
    # and the base output to the kernel's own result
    base_out = layer.base_layer(x).double()
    torch.testing.assert_close(got - base_out, x.double() @ dW.T, atol=atol, rtol=rtol)
    torch.testing.assert_close(base_out, expected - x.double() @ dW.T, atol=5e-2, rtol=5e-2)


def check_delta_weight(layer, naive_delta, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(layer.delta_weight().double(), naive_delta(layer), atol=atol, rtol=rtol)


def check_forward_uses_delta_weight(layer, atol=1e-4, rtol=1e-4):
    """The forward applies exactly delta_weight() (what merge folds in)."""
    deterministic(layer)
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(3))
    got = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(got.double(), x.double() @ layer.delta_weight().double().T, atol=atol, rtol=rtol)


def check_gradients(layer, naive_delta_fn, rel=1e-5):
    """Gradients of a scalar loss through the layer equal autograd of the naive float64 formula.

    ``naive_delta_fn(params: dict[str, Tensor(float64, requires_grad)]) -> ΔW`` builds ΔW from the
    layer's trainable tensors (passed by name) and its frozen tensors.
    """
    deterministic(layer)
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(5))
    target = torch.randn(6, layer.out_features, generator=torch.Generator().manual_seed(6))
    trainables = {n: p for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer.")}
    for p in trainables.values():
        p.grad = None
    loss = ((layer(x) - target) ** 2).sum()
    loss.backward()
    ref = {n: p.detach().double().clone().requires_grad_(True) for n, p in trainables.items()}
    base_out = layer.base_layer(x).double().detach()
    ref_out = base_out + x.double() @ naive_delta_fn(ref).T
    ((ref_out - target.double()) ** 2).sum().backward()
    assert trainables, "adapter has no trainable parameters"
    for n, p in trainables.items():
        assert p.grad is not None, f"no gradient for {n}"
        # float32 layer vs float64 reference: compare relative to the gradient's scale
        scale = ref[n].grad.abs().max().item() or 1.0
        torch.testing.assert_close(
            p.grad.double(), ref[n].grad, atol=rel * scale, rtol=0, msg=lambda m: f"{n}: {m}"
        )


def check_all(layer):
    """Forward, delta_weight and gradients of ``layer`` against its type's naive reference."""
    naive = NAIVE[layer.config.type]
    check_forward(layer, naive_of)
    check_delta_weight(layer, naive_of)
    check_forward_uses_delta_weight(layer)
    check_gradients(layer, lambda tensors: naive(layer, tensors))


def naive_figures(dW, top_r, tol=None):
    """inspect-rank's figures straight from their definitions, on the dense float64 ΔW."""
    m, n = dW.shape
    sigma = torch.linalg.svdvals(dW)
    threshold = (tol if tol is not None else max(m, n) * torch.finfo(torch.float32).eps) * sigma[0]
    p = sigma / sigma.sum()
    p = p[p > 0]
    return {
        "rank": int((sigma > threshold).sum()),
        "effective_rank": math.exp(-(p * p.log()).sum().item()),
        "stable_rank": (torch.linalg.matrix_norm(dW, "fro") ** 2 / torch.linalg.matrix_norm(dW, 2) ** 2).item(),
        "sigma_max": torch.linalg.matrix_norm(dW, 2).item(),
        "fro_norm": torch.linalg.matrix_norm(dW, "fro").item(),
        "top_r_energy": ((sigma[:top_r] ** 2).sum() / (sigma**2).sum()).item(),
        "orth_loss": ((dW @ dW.T - torch.eye(m, dtype=dW.dtype)) ** 2).sum().item(),
    }
