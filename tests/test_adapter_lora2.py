import pytest
import torch

from adapter_reference import build_layer, naive_of, randomize_trainables
from budget_reference import check_importance_against_naive, train_toy
from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors


def build(in_f, out_f, **options):
    """A LoRA² layer on a plain base; trainables at scale 0.3, as ΔW multiplies five of them."""
    layer = build_layer("lora2", "none", in_f, out_f, randomize=False, **options)
    randomize_trainables(layer, scale=0.3)
    return layer


@pytest.mark.parametrize("k,r", [(2, 5), (5, 2)])
def test_lora2_factors_multiply_to_delta_weight(k, r):
    layer = build(20, 12, r=r, k=k)
    B, A = layer.factors()
    assert B.shape[1] == min(k, r)
    torch.testing.assert_close(B @ A, layer.delta_weight(), atol=1e-5, rtol=1e-5)


def test_lora2_forward_never_builds_a_dense_delta():
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.shapes.add(tuple(t.shape))
            return out

    in_f, out_f, rank = 20, 12, 4
    layer = build(in_f, out_f, r=rank, k=2)
    x = torch.randn(3, in_f)
    with RecordShapes() as recorder:
        layer.delta(x).sum().backward()
    dense = {(out_f, in_f), (in_f, out_f), (out_f, rank), (rank, out_f), (rank, in_f), (in_f, rank)}
    assert recorder.shapes and not (recorder.shapes & dense), recorder.shapes & dense


def test_lora2_parameter_count_reproduces_the_paper():
    """k = 1, R = 8 on DeBERTaV3-base (12 layers, hidden 768, FFN 3072): Table 4's 37.4k (Q, K),
    56.2k (Q, K, V) and 167.6k (all six projections)."""
    config = get_adapter("lora2").config(type="lora2", k=1, r=8)
    count = get_adapter("lora2").layer.num_trainable
    square = count(768, 768, config)
    ffn = count(768, 3072, config) + count(3072, 768, config)
    assert round(12 * 2 * square / 100) / 10 == 37.4
    assert round(12 * 3 * square / 100) / 10 == 56.2
    assert round(12 * (4 * square + ffn) / 100) / 10 == 167.6


def test_lora2_defaults_and_initialisation():
    spec = get_adapter("lora2")
    config = spec.config(type="lora2")
    assert (config.r, config.k, config.target_rank, config.orth_reg) == (8, 8, 5, 0.001)
    torch.manual_seed(0)
    layer = spec.layer(make_linear("none", 256, 128), config, SharedTensors(0), "t")
    assert layer.scaling == 2.0
    # each factor starts near its orthogonality regulariser's minimum: unit-norm rows of V and columns of u
    assert abs(layer.lora_V.norm(dim=1).mean().item() - 1) < 0.1 and abs(layer.lora_u.norm(dim=0).mean().item() - 1) < 0.1
    assert "rank_mask" in layer.adapter_state_dict()


def test_lora2_builds_on_meta_device():
    spec = get_adapter("lora2")
    config = spec.config(type="lora2", r=4, k=2)
    layer = spec.layer(torch.nn.Linear(32, 16, bias=False, device="meta"), config, SharedTensors(0), "t")
    assert layer.lora_u.device.type == "meta" and "r=4" in repr(layer)


def test_lora2_orthogonal_regularisers_match_naive():
    layer = build(12, 10, r=4, k=3, orth_reg=0.2)
    names = ("lora_u", "lora_v", "lora_U", "lora_V")
    ref = {n: getattr(layer, n).detach().double().requires_grad_(True) for n in names}
    u, v, U, V = (ref[n] for n in names)
    P, Q = u @ v, U @ V

    def off_identity(m):
        return ((m - torch.eye(m.shape[0], dtype=torch.float64)) ** 2).sum()

    expected = 0.2 * (
        off_identity(P.T @ P) + off_identity(Q @ Q.T)  # R(P, Q)
        + off_identity(u.T @ u) + off_identity(v @ v.T)  # R(u, v)
        + off_identity(U.T @ U) + off_identity(V @ V.T)  # R(U, V)
    )
    got = layer.extra_loss()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    got.backward()
    for n in names:
        torch.testing.assert_close(getattr(layer, n).grad.double(), ref[n].grad, rtol=1e-4, atol=1e-5)


def test_lora2_reduced_importance_matches_naive():
    """Eq. 9: s(λ_i) + mean_j s(v[j, i]) + mean_j s(U[i, j]); u and V (gradients given too) do not enter."""
    check_importance_against_naive("lora2", ("lora_v", "lora_U"), r=3, k=2, beta1=0.8, beta2=0.7)


def test_lora2_prunes_to_target_budget_in_training_loop():
    model, layers, controller = train_toy(
        "lora2", total_steps=30, r=6, k=3, target_r=2, tinit=3, tfinal=10, delta_t=2
    )
    ranks = controller.summary()["ranks"]
    assert sum(ranks.values()) == 2 * len(layers)
    for name, layer in layers.items():
        assert torch.all(layer.lora_lambda[~layer.rank_mask] == 0)
        assert torch.count_nonzero(layer.lora_lambda[layer.rank_mask]) == ranks[name]
        ref = naive_of(layer)
        torch.testing.assert_close(layer.delta_weight().double(), ref, atol=1e-6, rtol=1e-5)
        assert torch.linalg.matrix_rank(layer.delta_weight()).item() <= min(ranks[name], 3)
