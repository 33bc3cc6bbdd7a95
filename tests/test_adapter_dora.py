import pytest
import torch

from adapter_reference import NAIVE, naive_of, options_for, randomize_trainables
from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors
from lrft.adapters.frozen_linear import dequantized_weight

SPEC = get_adapter("dora")
KINDS = ["none", "nf4", "fp4", "int8"]


def build(kind, in_f, out_f, bias=False, randomize=True, frozen_dtype=torch.float32, **cfg):
    """A DoRA layer, with a bias if asked (the contract's layers have none), trainables small and the
    magnitudes near the rows' norms."""
    config = SPEC.config(type="dora", **{**options_for("dora"), **cfg})
    layer = SPEC.layer(make_linear(kind, in_f, out_f, bias=bias), config, SharedTensors(config.seed), "test", frozen_dtype)
    if randomize:
        randomize_trainables(layer, scale=0.1)
        # magnitudes around the rows' norms, as after some training (randn ones would be of either sign)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            rows = dequantized_weight(layer.base_layer).norm(dim=1)
            layer.magnitude.copy_(rows * (0.5 + torch.rand(out_f, generator=g)))
    return layer


def naive_norm(layer):
    """‖W + ΔW‖ of each output row, ΔW = scaling·B A, float64."""
    W = dequantized_weight(layer.base_layer, torch.float64)
    return torch.linalg.vector_norm(W + NAIVE["lora"](layer, dict(layer.named_parameters())), dim=1).detach()


def naive_output(layer, x, tensors, detach_norm=True):
    """y = s ⊙ (x Wᵀ + x ΔWᵀ) + bias with s = m / ‖W + ΔW‖ (eq. 5), ΔW = scaling·B A from ``tensors``
    (lora_A, lora_B, magnitude), float64; x Wᵀ from the frozen kernel, as the layer does."""
    W = dequantized_weight(layer.base_layer, torch.float64)
    delta = NAIVE["lora"](layer, tensors)
    norm = torch.linalg.vector_norm(W + delta, dim=1)
    if detach_norm:
        norm = norm.detach()
    bias = layer.base_layer.bias
    kernel = layer.base_layer(x).double().detach()
    linear = kernel - bias.double() if bias is not None else kernel
    out = (tensors["magnitude"].double() / norm) * (linear + x.double() @ delta.T)
    return out + bias.double() if bias is not None else out


def params(layer):
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "kind,shape,bias",
    # with a bias on every base (the contract's layers have none), and without on int8, which the contract
    # skips for DoRA (LLM.int8's kernel is not x·Wᵀ, so only this kernel-based reference applies)
    [(kind, (64, 128), True) for kind in KINDS] + [("int8", (128, 64), False)],
)
def test_dora_matches_naive_reference(kind, shape, bias):
    # train mode (dropout is 0): in eval mode bitsandbytes repacks 4-bit weights for a bfloat16 CPU kernel,
    # whose rounding would hide small errors (test_eval_on_cpu_packed_4bit_weights covers that path)
    layer = build(kind, *shape, bias=bias, alpha=8).train()
    x = torch.randn(3, 5, shape[0], generator=torch.Generator().manual_seed(7))
    expected = naive_output(layer, x, params(layer))
    got = layer(x).double()
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)

    # delta_weight is W' − W, so merging gives W' exactly; and the forward applies exactly that merged weight
    torch.testing.assert_close(layer.delta_weight().double(), naive_of(layer), atol=1e-5, rtol=1e-5)
    merged = dequantized_weight(layer.base_layer, torch.float32) + layer.delta_weight()
    by_merge = x @ merged.T + (layer.base_layer.bias if bias else 0)
    torch.testing.assert_close(got.float(), by_merge, atol=1e-4 * by_merge.abs().max().item(), rtol=0)
    # and delta() is what the layer adds to the base output
    torch.testing.assert_close(layer.delta(x), got.float() - layer.base_layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_eval_on_cpu_packed_4bit_weights(kind):
    """Eval-mode inference may repack the 4-bit weight in place (AVX512-BF16 CPUs); the norm and merge
    must then read the repacked weight correctly (dequantized_weight handles that layout)."""
    layer = build(kind, 64, 128, bias=True).eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        layer(x)  # the first inference call is where bitsandbytes repacks
        layer.invalidate_weight_norm()
        got = layer(x).double()
        expected = naive_output(layer, x, params(layer))
        torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
        merged = dequantized_weight(layer.base_layer) + layer.delta_weight()
        by_merge = (x @ merged.T + layer.base_layer.bias).double()
        # the repacked kernel computes in bfloat16: compare at that precision
        torch.testing.assert_close(got, by_merge, atol=1e-2 * by_merge.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["none", "nf4", "int8"])
def test_gradients_match_naive_reference_with_detached_norm(kind):
    layer = build(kind, 64, 128, bias=True).train()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    target = torch.randn(6, 128, generator=torch.Generator().manual_seed(6))
    ((layer(x) - target) ** 2).sum().backward()
    ref = {n: p.detach().double().clone().requires_grad_(True) for n, p in params(layer).items()}
    out = naive_output(layer, x, ref, detach_norm=True)
    ((out - target.double()) ** 2).sum().backward()
    assert set(ref) == {"lora_A", "lora_B", "magnitude"}
    for n, p in params(layer).items():
        scale = ref[n].grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), ref[n].grad, atol=1e-5 * scale, rtol=0, msg=lambda m: f"{n}: {m}")

    # the norm really is a constant for autograd: differentiating through it gives other gradients
    through = {n: p.detach().double().clone().requires_grad_(True) for n, p in params(layer).items()}
    out = naive_output(layer, x, through, detach_norm=False)
    ((out - target.double()) ** 2).sum().backward()
    assert not torch.allclose(through["lora_B"].grad, ref["lora_B"].grad, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kind", ["none", "nf4", "int8"])
def test_starts_as_the_base_layer(kind):
    layer = build(kind, 64, 128, bias=True, randomize=False)
    W = dequantized_weight(layer.base_layer)
    torch.testing.assert_close(layer.magnitude, W.norm(dim=1))
    assert layer.delta_weight().abs().max() < 1e-6
    x = torch.randn(4, 64)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=1e-6)
    assert layer.scaling == 2.0  # LoRA's default alpha = 2r


def test_state_and_no_factored_form():
    layer = build("none", 40, 24, r=5)
    state = layer.adapter_state_dict()
    assert set(state) == {"lora_A", "lora_B", "magnitude"}
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in params(layer).values())
    assert layer.factors() is None  # W' − W is not B·A: inspect-rank must not take the factored path


def count_dequantizations(monkeypatch):
    import lrft.adapters.dora as dora

    calls = []

    def counting(base, dtype=torch.float32):
        calls.append(1)
        return dequantized_weight(base, dtype)

    monkeypatch.setattr(dora, "dequantized_weight", counting)
    return calls


def assert_norm_is_fresh(layer):
    torch.testing.assert_close(layer.weight_norm().double(), naive_norm(layer), atol=1e-5, rtol=1e-5)


def test_norm_is_computed_once_per_optimizer_step(monkeypatch):
    layer = build("nf4", 64, 128).train()
    calls = count_dequantizations(monkeypatch)
    optimizer = torch.optim.AdamW(params(layer).values(), lr=0.01, foreach=False)
    for step in range(2):
        for _ in range(3):  # micro-batches of one accumulation cycle: one dequantization in all
            layer(torch.randn(2, 64)).pow(2).sum().backward()
        assert len(calls) == step + 1
        optimizer.step()
        optimizer.zero_grad()
    assert_norm_is_fresh(layer)  # the step's in-place update bumped the version counters
    assert len(calls) == 3
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
        layer(torch.randn(2, 64))
    assert len(calls) == 3


def test_controller_invalidates_what_version_counters_miss():
    layer = build("none", 64, 128).train()
    controller = SPEC.controller({"test": layer}, layer.config, total_steps=2)
    layer(torch.randn(2, 64)).pow(2).sum().backward()
    layer.weight_norm()
    # fused AdamW and writes through .data leave the version counters alone
    with torch.no_grad():
        layer.lora_B.data.add_(0.5)
    assert not torch.allclose(layer.weight_norm().double(), naive_norm(layer))  # stale, as documented
    controller.after_optimizer_step(0, None)
    assert_norm_is_fresh(layer)

    optimizer = torch.optim.AdamW(params(layer).values(), lr=0.01, fused=True)
    layer(torch.randn(2, 64)).pow(2).sum().backward()
    optimizer.step()
    controller.after_optimizer_step(1, optimizer)
    assert_norm_is_fresh(layer)


def test_loading_state_and_inference_mode_refresh_the_norm():
    layer = build("none", 64, 128)
    other = build("none", 64, 128)
    with torch.no_grad():
        other.lora_B.add_(1.0)
    layer.weight_norm()
    layer.load_adapter_state_dict(other.adapter_state_dict())
    assert_norm_is_fresh(layer)
    with torch.inference_mode():
        layer(torch.randn(2, 64))
    layer(torch.randn(2, 64)).sum().backward()  # no "inference tensor saved for backward"
    assert layer.magnitude.grad is not None


def test_builds_on_meta_device():
    with torch.device("meta"):
        base = torch.nn.Linear(128, 64, bias=False)
    layer = SPEC.layer(base, SPEC.config(type="dora", r=4), SharedTensors(0), "t")
    assert layer.magnitude.device.type == "meta" and layer.magnitude.shape == (64,)
