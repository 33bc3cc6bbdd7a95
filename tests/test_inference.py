"""`lrft generate` and `lrft chat`: streamed and batched generation, the chat loop through a pipe, base +
adapter and its merged model giving the same greedy text, and ΔW folded once for inference."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT
from lrft.cli import app

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """A RandLoRA adapter on the 4-bit tiny base with random trainables (a full-rank ΔW: folded by merging),
    and its merged model."""
    from adapter_reference import randomize_trainables
    from lrft.adapter_folder import base_record, save_adapter
    from lrft.adapters import get_adapter
    from lrft.inject import inject_adapters
    from lrft.merge import run_merge
    from lrft.model import Dtypes, load_base_model
    from lrft.recipe import ModelSection, QuantizationSection

    model_section = ModelSection(name_or_path=str(tiny_base), dtype="float32")
    quant = QuantizationSection(bits=4, compute_dtype="float32")
    model = load_base_model(model_section, quant, torch.device("cpu"))
    config = get_adapter("randlora").config(type="randlora", r=8, alpha=16, target_modules=TARGETS)
    torch.manual_seed(1)
    layers = inject_adapters(model, config)
    for layer in layers.values():
        randomize_trainables(layer, scale=0.2)
    root = tmp_path_factory.mktemp("inference")
    save_adapter(root / "adapter", layers, config, base_record(model_section, quant, Dtypes.resolve(model_section, quant, torch.device("cpu"))))
    run_merge(root / "adapter", root / "merged", dtype="float32")
    return root


def cli(args, input=None):
    result = CliRunner().invoke(app, args, input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_generate_streams_one_prompt_and_the_merged_model_says_the_same(trained):
    args = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "12"]
    with_adapter = cli([*args, "--adapter", str(trained / "adapter")]).stdout
    merged = cli([*args, "--model", str(trained / "merged")]).stdout
    assert with_adapter.strip() and with_adapter == merged  # greedy: the same text


def test_generate_batches_a_jsonl_file(trained, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": "Once upon a time"},
        {"messages": [{"role": "user", "content": "Which is heavier, a kilogram of feathers or of iron?"}]},
        {"conversations": [{"from": "human", "value": "2 + 2 ="}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    cli(["generate", "--adapter", str(trained / "adapter"), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "8", "--batch-size", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["completion"], str) and r["completion"] for r in rows)
    assert rows[0]["prompt"] == "Once upon a time" and rows[2]["messages"][0]["role"] == "user"
    # the batch gives each prompt what it gets alone (left padding with its attention mask)
    alone = cli(["generate", "--adapter", str(trained / "adapter"), "--prompt", "Once upon a time", "--max-new-tokens", "8"]).stdout
    assert alone.strip() == rows[0]["completion"].strip()


def test_chat_through_a_pipe(trained):
    """A real process with its stdin piped: replies stream, /system and /reset take effect, /exit ends."""
    script = "Hello there\n/system You are terse.\nWhat is 2 + 2?\n/reset\nAnd again?\n/exit\nnever read\n"
    proc = subprocess.run(
        [sys.executable, "-m", "lrft", "chat", "--adapter", str(trained / "adapter"), "--max-new-tokens", "6"],
        input=script, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant> ") == 3
    assert "(system prompt set; conversation reset)" in proc.stdout and "(conversation reset)" in proc.stdout
    assert "ΔW folded for inference" in proc.stderr


def test_chat_keeps_the_conversation_and_uses_the_training_template(trained, monkeypatch):
    """Each turn is rendered by lrft.data.render_chat over the whole conversation so far."""
    from lrft import data
    from lrft.inference import Sampling, load_for_inference, run_chat

    seen = []
    real = data.render_chat

    def spy(tokenizer, messages, add_generation_prompt, template=None):
        seen.append([m["role"] for m in messages])
        return real(tokenizer, messages, add_generation_prompt, template)

    monkeypatch.setattr(data, "render_chat", spy)
    loaded = load_for_inference(trained / "adapter", None)
    import io

    out = io.StringIO()
    messages = run_chat(loaded, Sampling(max_new_tokens=4), system="Be brief.", stdin=io.StringIO("one\ntwo\n"), out=out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"]]


def test_folding_is_what_the_adapter_computes(trained):
    """Folded (RandLoRA: merged into dense weights) vs the adapter's training-time path: the tolerance of
    merge verification in float32."""
    from lrft.inference import load_for_inference
    from lrft.merge import TOLERANCES, compare_logits

    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    folded = load_for_inference(trained / "adapter", None)
    kept = load_for_inference(trained / "adapter", None, keep_quantized=True)
    assert "8 layers merged into dense float32 weights" in folded.note and "training-time path" in kept.note
    with torch.no_grad():
        a = [folded.model(input_ids=ids).logits[i].float() for i in range(2)]
        b = [kept.model(input_ids=ids).logits[i].float() for i in range(2)]
    figures = compare_logits(b, a)
    rel, kl = TOLERANCES["float32"]
    assert figures["max_abs_logit_diff"] <= rel * max(1.0, figures["max_abs_logit"]) and figures["mean_kl"] <= kl
