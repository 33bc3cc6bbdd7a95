import pytest
import torch

from adapter_reference import (
    check_delta_weight,
    check_forward,
    check_forward_uses_delta_weight,
    check_gradients,
    randomize_trainables,
)
from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors


def build(kind, in_f, out_f, **cfg):
    spec = get_adapter("lora")
    config = spec.config(type="lora", **cfg)
    layer = spec.layer(make_linear(kind, in_f, out_f), config, SharedTensors(config.seed), "test")
    randomize_trainables(layer)
    return layer


def naive(A, B, scaling):
    return (B.double() @ A.double()) * scaling


@pytest.mark.parametrize("kind", ["none", "nf4", "fp4", "int8"])
@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_lora_matches_naive_reference(kind, shape):
    layer = build(kind, *shape, r=4, alpha=8)
    ref = lambda l: naive(l.lora_A, l.lora_B, l.scaling)  # noqa: E731
    check_forward(layer, ref)
    check_delta_weight(layer, ref)
    check_forward_uses_delta_weight(layer)
    check_gradients(layer, lambda p: naive(p["lora_A"], p["lora_B"], layer.scaling))


def test_lora_parameter_count_matches_formula():
    layer = build("none", 40, 24, r=5)
    n = sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad)
    assert n == 5 * (40 + 24) == layer.num_trainable(40, 24, layer.config)


def test_lora_starts_at_zero_delta():
    spec = get_adapter("lora")
    config = spec.config(type="lora", r=4)
    layer = spec.layer(make_linear("none", 16, 8), config, SharedTensors(0), "t")
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert layer.scaling == 2.0  # default alpha = 2r
