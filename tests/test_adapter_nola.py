import math

import torch

from adapter_reference import NAIVE, build_layer, check_gradients, naive_of, options_for
from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors

SPEC = get_adapter("nola")


def build_sharing(shared, in_f, out_f):
    """A NoLA layer (the contract's small options) drawing its bases from ``shared``."""
    config = SPEC.config(type="nola", **options_for("nola"))
    return SPEC.layer(make_linear("none", in_f, out_f), config, shared, "test")


def test_layers_share_bases_by_width_and_never_save_them():
    shared = SharedTensors(0)
    first = build_sharing(shared, 64, 128)
    same = build_sharing(shared, 64, 128)
    same_out = build_sharing(shared, 96, 128)
    other = build_sharing(shared, 128, 64)
    assert same.bases()[0] is first.bases()[0] and same.bases()[1] is first.bases()[1]
    assert same_out.bases()[0] is first.bases()[0] and same_out.bases()[1] is not first.bases()[1]
    assert other.bases()[0] is not first.bases()[0]
    assert first.bases()[0].shape == (24, 128, 4) and first.bases()[1].shape == (24, 4, 64)
    state = first.adapter_state_dict()
    assert set(state) == {"out_coefficients", "in_coefficients"}
    trainable = [p for n, p in first.named_parameters() if p.requires_grad]
    assert sum(v.numel() * v.element_size() for v in state.values()) == sum(
        p.numel() * p.element_size() for p in trainable
    )
    # the same seed regenerates the same bases
    again = build_layer("nola", "none", 64, 128)
    assert torch.equal(again.bases()[0], first.bases()[0]) and torch.equal(again.bases()[1], first.bases()[1])


def test_documented_defaults_and_initialisation():
    config = SPEC.config(type="nola")
    assert config.num_basis == 512 and config.r == 16 and config.scaling == 4 / 16
    torch.manual_seed(0)
    layer = build_layer("nola", "none", 300, 64, randomize=False, num_basis=2000)
    assert torch.count_nonzero(layer.out_coefficients) == 0
    assert torch.count_nonzero(layer.delta_weight()) == 0
    bound = math.sqrt(3 / 300)
    assert layer.in_coefficients.abs().max() <= bound
    # combined B has Kaiming-uniform variance 1/(3·in), like LoRA's A
    _, B = layer.combined_factors()
    assert abs(B.var().item() * 3 * 300 - 1) < 0.15
    out_bases, _ = layer.bases()
    assert out_bases.abs().max() <= 1 / math.sqrt(2000)
    # α gets a gradient on the first step because B ≠ 0
    layer(torch.randn(3, 300)).pow(2).sum().backward()
    assert layer.out_coefficients.grad.abs().sum() > 0


def test_bfloat16_bases_combine_in_float32_without_a_saved_copy():
    layer = build_layer("nola", "none", 64, 128, frozen_dtype=torch.bfloat16, num_basis=40)
    out_bases, in_bases = layer.bases()
    assert out_bases.dtype == in_bases.dtype == torch.bfloat16
    ref = naive_of(layer)  # exact upcast of the stored values
    torch.testing.assert_close(layer.delta_weight().double(), ref, atol=1e-6, rtol=1e-5)
    storages = {out_bases.untyped_storage().data_ptr(), in_bases.untyped_storage().data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        delta = layer.delta(torch.randn(4, 64))
    delta.sum().backward()
    basis_size = min(out_bases.numel(), in_bases.numel())
    large = [t for t in saved if t.numel() >= basis_size]
    assert large and all(t.untyped_storage().data_ptr() in storages for t in large)  # references, not copies


def test_chunked_combination_matches_one_product(monkeypatch):
    import lrft.adapters.nola as nola

    layer = build_layer("nola", "none", 64, 128, frozen_dtype=torch.bfloat16, num_basis=40)
    whole = layer.delta_weight()
    monkeypatch.setattr(nola, "_CHUNK_ELEMENTS", 600)  # several chunks per side
    coefficients = [layer.out_coefficients, layer.in_coefficients]
    chunked = layer.delta_weight()
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    layer(torch.randn(3, 64)).pow(2).sum().backward()
    assert all(c.grad is not None for c in coefficients)
    check_gradients(layer, lambda p: NAIVE["nola"](layer, p))
