"""The adapters' dropout (lrft.adapters.base.MaskDropout): inverted dropout at the asked rate, a one-byte
mask kept for the backward, the gradient the mask times the scaling; identity in eval mode."""

import pytest
import torch

from lrft.adapters.base import MaskDropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_cpu_dropout_rate_scaling_and_gradient(p):
    torch.manual_seed(0)
    dropout = MaskDropout(p).train()
    x = torch.randn(513, 997, requires_grad=True)  # an element count that is not a multiple of 4
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.dtype), t)[1], lambda t: t):
        y = dropout(x)
    assert saved == [torch.bool]
    kept = y != 0
    n = kept.numel()
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations
    scale = 65536 / (65536 - round(p * 65536))
    torch.testing.assert_close(y[kept], x[kept] * scale)
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, 2.0 * scale * kept.to(x.dtype))
    assert abs(scale * (1 - p) - 1) < 1e-4  # p rounded to a multiple of 2^-16


def test_masks_differ_between_calls_and_follow_the_seed():
    dropout = MaskDropout(0.3).train()
    x = torch.ones(64, 64)
    torch.manual_seed(1)
    a, b = dropout(x), dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), a) and not torch.equal(a, b)


def test_eval_mode_is_the_identity():
    x = torch.randn(8, 8)
    assert MaskDropout(0.5).eval()(x) is x
