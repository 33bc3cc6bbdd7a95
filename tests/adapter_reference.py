"""Shared checks that pin an adapter layer to a naive float64 reference.

``naive_delta(layer)`` is written per adapter in its test file, from the paper's equation, using only the
layer's tensors (trainable and frozen) in float64; these helpers compare the layer against it.
"""

from __future__ import annotations

import torch

from lrft.model import dequantized_weight


def randomize_trainables(layer, seed: int = 1, scale: float = 0.5):
    """Give every trainable tensor non-trivial values (many start at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad and not name.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def check_forward(layer, naive_delta, batch=(3, 5), atol=1e-4, rtol=1e-4):
    """forward(x) == x · (W + ΔW)ᵀ (+ bias) with ΔW from the naive float64 formula."""
    layer.eval()
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
    layer.eval()
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(3))
    got = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(got.double(), x.double() @ layer.delta_weight().double().T, atol=atol, rtol=rtol)


def check_gradients(layer, naive_delta_fn, rel=1e-5):
    """Gradients of a scalar loss through the layer equal autograd of the naive float64 formula.

    ``naive_delta_fn(params: dict[str, Tensor(float64, requires_grad)]) -> ΔW`` builds ΔW from the
    layer's trainable tensors (passed by name) and its frozen tensors.
    """
    layer.train()
    if hasattr(layer.dropout, "p"):
        layer.dropout.p = 0.0
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
