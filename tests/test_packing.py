"""Packing through the model: a packed batch computes the loss and gradients of the same examples unpacked
(float64, exactly; the embedded SmolLM2 in 4-bit, within float32 rounding), on every attention
implementation, and a packed run resumes bit-identically."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import needs_cuda, tiny_llama_config
from lrft import packed_attention
from lrft.cli import app
from lrft.data import collate, pack, target_tokens
from test_data import random_examples


def loss_and_grads(model, layers, batch, n_target):
    from lrft.loss import summed_token_loss

    for layer in layers.values():
        for p in layer.parameters():
            p.grad = None
    loss = summed_token_loss(model, batch) / n_target
    loss.backward()
    grads = {f"{name}.{key}": p.grad.clone() for name, layer in layers.items() for key, p in layer.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("adapter_type", ["lora", "randlora"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", packed_attention.NAME])
def test_packed_batch_equals_the_same_examples_unpacked_in_float64(adapter_type, attention):
    from transformers import LlamaForCausalLM

    from adapter_reference import options_for, randomize_trainables
    from lrft.adapters import get_adapter
    from lrft.inject import inject_adapters

    packed_attention.register()
    torch.manual_seed(0)
    config = tiny_llama_config(attn_implementation=attention)
    model = LlamaForCausalLM(config).double().train()
    adapter = get_adapter(adapter_type).config(type=adapter_type, target_modules=["q_proj", "v_proj", "down_proj"], **options_for(adapter_type))
    layers = inject_adapters(model, adapter, torch.float64)
    for layer in layers.values():
        layer.double()
        randomize_trainables(layer, scale=0.1)
    examples = random_examples(12, seed=2)
    n_target = target_tokens(examples)
    loss, grads = loss_and_grads(model, layers, collate(examples, pad_id=0), n_target)
    rows = pack(examples, 64)
    assert len(rows) < len(examples)
    if attention == packed_attention.NAME:  # one row, no padding at all
        assert collate(rows, 0, attention)["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    layouts = {"packed": collate(rows, 0, attention, torch.float64)}
    if attention == packed_attention.NAME:  # unpacked examples too are trained as one row of real tokens
        layouts["one row"] = collate(examples, 0, attention)
        assert layouts["one row"]["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    for layout, batch in layouts.items():
        packed_loss, packed_grads = loss_and_grads(model, layers, batch, n_target)
        torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-10, msg=layout)
        for key, grad in grads.items():
            torch.testing.assert_close(packed_grads[key], grad, rtol=0, atol=1e-10, msg=lambda m: f"{layout} {key}: {m}")


@pytest.mark.slow
def test_packed_batch_on_the_embedded_smollm2_in_4bit():
    """The real model, nf4, float32 compute, laid out as training does: packed and unpacked agree to
    float32 rounding (the 4-bit kernels and SDPA run on other shapes)."""
    from adapter_reference import randomize_trainables
    from lrft.adapters import get_adapter
    from lrft.inject import inject_adapters
    from lrft.model import load_base_model, load_tokenizer
    from lrft.recipe import ModelSection, QuantizationSection

    model = load_base_model(ModelSection(), QuantizationSection(bits=4), torch.device("cpu")).train()
    adapter = get_adapter("lora").config(type="lora", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    layers = inject_adapters(model, adapter)
    for layer in layers.values():
        randomize_trainables(layer, scale=0.02)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    examples = random_examples(8, seed=5, low=20, high=120, vocab=49152)
    n_target = target_tokens(examples)
    loss, grads = loss_and_grads(model, layers, collate(examples, tokenizer.pad_token_id), n_target)
    rows = pack(examples, 256)
    attention = packed_attention.use_row_attention(model)
    assert attention == packed_attention.NAME
    packed_loss, packed_grads = loss_and_grads(model, layers, collate(rows, tokenizer.pad_token_id, attention), n_target)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    for key, grad in grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(packed_grads[key], grad, rtol=0, atol=1e-4 * scale, msg=lambda m: f"{key}: {m}")


@needs_cuda
def test_packed_batch_with_flash_attention_on_cuda():
    """FlashAttention-2's variable-length path, chosen by a packed bf16 run on CUDA: one row, no mask, the
    boundaries read from the position ids."""
    pytest.importorskip("flash_attn")
    from transformers import LlamaForCausalLM

    from lrft.loss import summed_token_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")).to("cuda", torch.bfloat16)
    examples = random_examples(12, seed=2)
    n_target = target_tokens(examples)
    with torch.no_grad():
        unpacked = summed_token_loss(model, {k: v.cuda() for k, v in collate(examples, 0).items()}) / n_target
        assert packed_attention.use_row_attention(model, torch.bfloat16) == "flash_attention_2"
        batch = collate(pack(examples, 64), 0, "flash_attention_2")
        assert "attention_mask" not in batch
        packed = summed_token_loss(model, {k: v.cuda() for k, v in batch.items()}) / n_target
    torch.testing.assert_close(packed, unpacked, rtol=2e-2, atol=0)


def test_a_packed_run_resumes_bit_identically(tiny_model_dir, tmp_path):
    args = [
        "train", "recipes/smollm2-chat-lora.yaml", "--set", f"model.name_or_path={tiny_model_dir}", "--set", "quantization.bits=none",
        "--set", "data.cutoff_len=256", "--set", "data.val_size=0", "--set", "training.save_steps=2",
        "--set", "adapter.dropout=0.1", "--max-steps", "4",
    ]
    assert CliRunner().invoke(app, [*args, "--output-dir", str(tmp_path / "ref")]).exit_code == 0
    out = tmp_path / "resumed"  # what a kill after the step-2 checkpoint leaves
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    result = CliRunner().invoke(app, [*args, "--output-dir", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    reference, resumed = load_file(tmp_path / "ref/adapter/adapter.safetensors"), load_file(out / "adapter/adapter.safetensors")
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4] and all(r["pad_fraction"] < 0.2 for r in records)


def test_packed_attention_is_plain_sdpa_on_batches_that_are_not_packed():
    """After a packed run switches the model to it, evaluation and left-padded generation batches get SDPA's
    own result (its mask included)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")).double().eval()
    ids = torch.randint(3, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :2] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert packed_attention.use_row_attention(model) == packed_attention.NAME
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_segment_bounds_read_the_examples_from_position_ids():
    assert packed_attention.segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [0, 3, 5, 9]
    assert packed_attention.segment_bounds(torch.tensor([[0, 1, 2, 3]])) is None  # one example
    assert packed_attention.segment_bounds(torch.tensor([[0, 1, 0], [0, 1, 2]])) is None  # not one row
