import math

import pytest
import torch
from pydantic import ValidationError

from adapter_reference import check_all, naive_of, randomize_trainables
from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors

SPEC = get_adapter("vera")
# a wider layer among the targets, so that the layers under test use strict slices of the shared bases
OTHER_TARGET = (160, 192)


def shared_for(*shapes, seed=0):
    targets = {"test": shapes[0], "other": OTHER_TARGET}
    targets.update({f"extra{i}": s for i, s in enumerate(shapes[1:])})
    return SharedTensors(seed, targets)


def build(kind, in_f, out_f, shared=None, name="test", frozen_dtype=torch.float32, randomize=True, **cfg):
    config = SPEC.config(type="vera", **cfg)
    shared = shared if shared is not None else shared_for((in_f, out_f), seed=config.seed)
    layer = SPEC.layer(make_linear(kind, in_f, out_f), config, shared, name, frozen_dtype)
    if randomize:
        randomize_trainables(layer)
    return layer


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_strict_slices_of_the_shared_bases_match_naive_reference(shape):
    """The contract builds each layer as the only target, so its slices are the whole bases; here a wider
    target makes them strict top-left slices (forward, ΔW and gradients against the naive reference)."""
    check_all(build("none", *shape, r=96))


def test_one_pair_of_bases_for_all_layers_sized_by_the_largest_target():
    shared = shared_for((64, 128), (128, 64))
    first = build("none", 64, 128, shared=shared, r=32)
    second = build("none", 128, 64, shared=shared, name="extra0", r=32)
    assert first.shared_A is second.shared_A and first.shared_B is second.shared_B
    assert first.shared_A.shape == (32, 160) and first.shared_B.shape == (192, 32)
    assert len(shared.tensors()) == 2  # one A and one B for the model
    # published initialisation: Kaiming-uniform(a=√5), bound 1/√fan_in (A: max_in, B: r)
    assert first.shared_A.abs().max() <= 1 / math.sqrt(160) and first.shared_B.abs().max() <= 1 / math.sqrt(32)
    assert first.shared_A.abs().max() > 0.9 / math.sqrt(160)
    # the same seed regenerates the same values (what reloading relies on)
    again = build("none", 64, 128, shared=shared_for((64, 128), (128, 64)), r=32)
    assert torch.equal(again.shared_A, first.shared_A) and torch.equal(again.shared_B, first.shared_B)


def test_state_holds_only_the_vectors():
    layer = build("none", 64, 128, r=32)
    state = layer.adapter_state_dict()
    assert set(state) == {"lambda_d", "lambda_b"}  # the bases are regenerated from the seed, never saved
    trainable = [p for n, p in layer.named_parameters() if p.requires_grad]
    assert sum(v.numel() * v.element_size() for v in state.values()) == sum(
        p.numel() * p.element_size() for p in trainable
    )


def test_published_defaults():
    layer = build("none", 64, 128, randomize=False)
    assert layer.config.r == 256 and layer.scaling == 1.0
    assert torch.all(layer.lambda_d == 0.1) and torch.count_nonzero(layer.lambda_b) == 0
    assert torch.count_nonzero(layer.delta_weight()) == 0
    # b gets a gradient on the first step because d ≠ 0
    layer(torch.randn(3, 64)).pow(2).sum().backward()
    assert layer.lambda_b.grad.abs().sum() > 0
    assert build("none", 64, 128, randomize=False, d_initial=0.5).lambda_d[0] == 0.5


def test_config_validation():
    with pytest.raises(ValidationError, match="no alpha"):
        SPEC.config(type="vera", alpha=16)
    with pytest.raises(ValidationError):
        SPEC.config(type="vera", r=0)


def test_layer_needs_every_target_shape():
    config = SPEC.config(type="vera", r=8)
    with pytest.raises(ValueError, match="target_shapes"):
        SPEC.layer(make_linear("none", 64, 128), config, SharedTensors(0), "test")
    with pytest.raises(ValueError, match="target_shapes"):  # listed with another shape
        SPEC.layer(make_linear("none", 64, 128), config, SharedTensors(0, {"test": (64, 96)}), "test")


def test_bases_are_stored_in_frozen_dtype_and_match_the_float32_compute_copy():
    layer = build("none", 64, 128, frozen_dtype=torch.bfloat16, r=16)
    assert layer.shared_A.dtype == layer.shared_B.dtype == torch.bfloat16
    assert layer.lambda_d.dtype == layer.lambda_b.dtype == torch.float32
    A32, B32 = layer.sliced_bases(torch.float32)
    assert torch.equal(A32, layer.shared_A[:, :64].float()) and torch.equal(B32, layer.shared_B[:128].float())
    ref = naive_of(layer)
    torch.testing.assert_close(layer.delta_weight().double(), ref, atol=1e-6, rtol=1e-5)


def test_inject_sizes_the_shared_bases_by_the_models_largest_target(tiny_model):
    from lrft.inject import inject_adapters

    config = SPEC.config(type="vera", seed=3)  # r = 256 > every width of the tiny model: allowed
    layers = inject_adapters(tiny_model, config)
    first = next(iter(layers.values()))
    assert {id(l.shared_A) for l in layers.values()} == {id(first.shared_A)}
    assert first.shared_A.shape == (256, 128)  # max in: down_proj's 128
    assert first.shared_B.shape == (128, 256)  # max out: up_proj's 128
    assert len(tiny_model.lrft_shared.tensors()) == 2
