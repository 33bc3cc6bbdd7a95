"""lrft.activations.SwiGLU against the model's own MLP: the same outputs and gradients (float64), for every
MLP class it replaces, with adapters on its projections; it keeps one intermediate-sized tensor less."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lrft.activations import SWIGLU_MLPS, SwiGLU, swiglu_mlps, use_swiglu

MODEL_TYPES = {"LlamaMLP": "llama", "MistralMLP": "mistral", "Qwen2MLP": "qwen2", "Qwen3MLP": "qwen3", "Olmo2MLP": "olmo2", "SmolLM3MLP": "smollm3"}


def tiny(model_type: str, **overrides):
    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double()


def test_every_replaced_mlp_class_is_tested():
    assert set(MODEL_TYPES) == SWIGLU_MLPS


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES.values()))
def test_swiglu_equals_the_models_mlp_with_an_adapter(model_type):
    from lrft.adapters import get_adapter
    from lrft.inject import inject_adapters

    model = tiny(model_type)
    adapter = get_adapter("lora").config(type="lora", r=4, target_modules=["up_proj", "down_proj", "gate_proj"])
    layers = inject_adapters(model, adapter, torch.float64)
    for layer in layers.values():
        layer.double()
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def output_and_grads():
        out = model(inputs_embeds=embeds).logits
        return (out, *torch.autograd.grad(out.pow(2).sum(), [embeds, *params]))

    expected = output_and_grads()
    assert use_swiglu(model) == 2 and swiglu_mlps(model) == []
    assert all(isinstance(layer.mlp, SwiGLU) for layer in model.model.layers)
    assert set(layers) <= {n for n, _ in model.named_modules()}  # the adapted projections keep their names
    for got, want in zip(output_and_grads(), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_swiglu_keeps_the_gate_and_up_outputs_only():
    model = tiny("llama").float().requires_grad_(False)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 5, 32, requires_grad=True)

    def saved_elements(module):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.numel() if t.shape == (3, 5, 48) else 0), t)[1], lambda t: t):
            module(x)
        return sum(sizes)

    assert saved_elements(mlp) == 3 * 3 * 5 * 48
    assert saved_elements(SwiGLU(mlp)) == 2 * 3 * 5 * 48


def test_other_activations_are_left_alone():
    model = tiny("llama", hidden_act="gelu")
    assert use_swiglu(model) == 0
