"""End-to-end training on a tiny random Llama (seconds) and, marked slow, on the real embedded model."""

import json
import math

import pytest
from typer.testing import CliRunner

from lrft.cli import app

SAMPLE = "lrft/samples/commonsense/train_500.jsonl"


def run_cli(args):
    result = CliRunner().invoke(app, args)
    return result


def tiny_args(model_dir, out, *extra):
    return [
        "train", "recipes/smollm2-commonsense-lora.yaml",
        "--set", f"model.name_or_path={model_dir}",
        "--set", "data.cutoff_len=96",
        "--set", "data.val_size=8",
        "--set", "training.batch_size=8",
        "--set", "training.micro_batch_size=4",
        "--set", "training.eval_steps=5",
        "--set", "training.save_steps=5",
        "--output-dir", str(out),
        *extra,
    ]


def test_train_writes_the_run_layout(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "6"))
    assert result.exit_code == 0, result.output
    for rel in ("adapter/adapter_config.json", "adapter/adapter.safetensors", "metrics.jsonl", "recipe.yaml", "run.json", "report.png",
                "checkpoints/step-5/trainer_state.pt", "checkpoints/step-5/adapter/adapter.safetensors"):
        assert (out / rel).exists(), rel
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        for key in ("step", "loss", "lr", "tokens_per_s", "peak_mem_mb"):
            assert math.isfinite(r[key]), key
    assert any("val_loss" in r for r in records)
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfg["adapter"]["type"] == "lora" and cfg["base_model"]["name_or_path"] == str(tiny_model_dir)
    assert len(cfg["layers"]) == 2 * 5
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 42 and "torch" in run["versions"] and run["recipe_hash"]
    assert run["machine"]["cpu_cores"] >= 1 and isinstance(run["machine"]["cpu_flags"], list)  # speeds need the flags
    # "auto" is recorded as what it resolved to: float32 on a CPU
    assert run["dtypes"] == {"load": "float32", "compute": "float32", "frozen": "float32"}


def test_eval_section_writes_results_and_every_example(tiny_model_dir, tmp_path, capfd):
    """The recipe's eval section: eval.json, run.json's mean accuracy, and eval_predictions.jsonl, which
    lrft eval --compare takes (a run against itself: no difference)."""
    out = tmp_path / "run"
    result = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--set", "eval.data=lrft/samples/commonsense/dev",
                               "--set", "eval.tasks=[boolq,piqa]", "--set", "eval.limit=3", "--set", "eval.mode=loglik"))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"{t}/{i}" for t in ("boolq", "piqa") for i in range(3)]
    assert results["mean_accuracy"] == pytest.approx(sum(
        sum(r["correct"] for r in rows if r["task"] == t) / 3 for t in ("boolq", "piqa")) / 2)
    assert json.loads((out / "run.json").read_text())["eval_mean_accuracy"] == results["mean_accuracy"]
    from conftest import lrft_main

    code, err = lrft_main(["eval", "--compare", str(out / "eval_predictions.jsonl"), str(out / "eval_predictions.jsonl"),
                           "--output", str(tmp_path / "cmp.json")], capfd)
    assert code == 0, err
    assert json.loads((tmp_path / "cmp.json").read_text())["metrics"]["accuracy"]["mean"]["difference"] == 0


def test_loss_falls_on_the_sample(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "30", "--set", "training.learning_rate=3e-3",
                               "--set", "training.save_steps=100", "--set", "adapter.dropout=0"))
    assert result.exit_code == 0, result.output
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2  # a random tiny model: LoRA can only nudge it


def test_existing_output_dir_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "1"))
    from lrft.errors import UserError

    assert isinstance(result.exception, UserError) and "is not empty" in str(result.exception)
    assert (out / "keep.txt").exists()


@pytest.mark.slow
def test_train_on_embedded_smollm2_4bit(tmp_path):
    out = tmp_path / "run"
    result = run_cli([
        "train", "recipes/smollm2-commonsense-lora.yaml", "--max-steps", "2", "--output-dir", str(out),
        "--set", "training.batch_size=4", "--set", "data.cutoff_len=128", "--set", "data.val_size=0",
        "--set", "training.save_steps=100",
    ])
    assert result.exit_code == 0, result.output
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert (out / "adapter/adapter.safetensors").stat().st_size > 0


def test_validation_in_eval_mode_keeps_4bit_training_intact(tiny_model_dir):
    """An eval-mode no-grad forward (validation, lrft eval) must not change a 4-bit base. bitsandbytes'
    CPU inference kernel (AVX512-BF16 machines) repacks the weight in place at that moment, with
    bfloat16 block scales, and its forward has no autograd from then on: gradients would stop flowing
    back through the frozen layers for the rest of training. lrft keeps the training kernel."""
    import torch

    from lrft.adapters.lora import LoRAConfig
    from lrft.inject import inject_adapters
    from lrft.adapters.frozen_linear import dequantized_weight
    from lrft.model import load_base_model
    from lrft.recipe import ModelSection, QuantizationSection

    model = load_base_model(ModelSection(name_or_path=str(tiny_model_dir)), QuantizationSection(bits=4), torch.device("cpu"))
    layers = inject_adapters(model, LoRAConfig(r=4, target_modules=["q_proj"]), torch.float32)
    probe = "model.layers.0.mlp.down_proj"
    before = dequantized_weight(model.get_submodule(probe))
    ids = torch.randint(0, 1000, (2, 16))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    torch.manual_seed(0)
    for layer in layers.values():  # B starts at 0: give it values so that A's gradient is not 0 by design
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.equal(dequantized_weight(model.get_submodule(probe)), before)
    first = layers["model.layers.0.self_attn.q_proj"]
    assert first.lora_A.grad is not None and first.lora_A.grad.abs().sum() > 0  # flows through both blocks' 4-bit layers


def test_skipped_nonfinite_step_skips_only_the_update(tiny_model_dir, tmp_path, monkeypatch):
    """A non-finite loss at the budget's final step: the parameters are not updated, but AdaLoRA's final
    mask is still applied (ranks end at target_r), and the step is logged."""
    import torch
    from safetensors.torch import load_file

    from lrft import train as train_module

    steps, micro_batches = 4, 2
    real_load = train_module.load_base_model
    forwards = {"n": 0}

    def poisoned(*args, **kwargs):
        model = real_load(*args, **kwargs)

        def hook(module, inputs, output):
            if torch.is_grad_enabled():
                forwards["n"] += 1
                if forwards["n"] > (steps - 1) * micro_batches:  # the last step's micro-batches
                    return output * float("nan")
            return None

        model.model.norm.register_forward_hook(hook)  # the head itself is replaced by the loss head
        return model

    monkeypatch.setattr(train_module, "load_base_model", poisoned)
    out = tmp_path / "run"
    args = [
        "train", "recipes/smollm2-commonsense-adalora.yaml", "--set", f"model.name_or_path={tiny_model_dir}",
        "--set", "eval=null", "--set", "data.cutoff_len=64", "--set", "data.val_size=0",
        "--set", "training.batch_size=8", "--set", "training.micro_batch_size=4", "--set", "training.warmup_steps=0",
        "--set", "training.skip_nonfinite=true", "--set", "adapter.r=6", "--set", "adapter.target_r=2",
        "--set", "adapter.tinit=0", "--set", "adapter.tfinal=0", "--set", "adapter.target_modules=[q_proj,v_proj]",
        "--max-steps", str(steps), "--output-dir", str(out),
    ]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert forwards["n"] == steps * micro_batches
    masks = {k: v for k, v in load_file(str(out / "adapter/adapter.safetensors")).items() if k.endswith("rank_mask")}
    assert len(masks) == 4 and sum(int(m.sum()) for m in masks.values()) == 2 * 4  # target_r x layers
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["skipped_nonfinite"] == 1 and records[-1]["loss"] is None
    assert all(math.isfinite(r["loss"]) for r in records[:-1])
    assert json.loads((out / "run.json").read_text())["skipped_nonfinite"] == 1


@pytest.mark.parametrize("form", ["openai", "sharegpt"])
def test_chat_recipe_trains_on_assistant_turns_and_the_loss_falls(tiny_model_dir, tmp_path, form):
    """The shipped chat recipe (messages, assistant-only loss, packing) on the tiny model, with the sample in
    either form; LoRA can only nudge the random model."""
    from pathlib import Path

    sample = Path("lrft/samples/chat/commonsense_chat.jsonl")
    if form == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        records = [json.loads(line) for line in sample.read_text().splitlines()]
        converted = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r["messages"]]} for r in records]
        sample = tmp_path / "sharegpt.jsonl"
        sample.write_text("".join(json.dumps(r) + "\n" for r in converted))
    out = tmp_path / "run"
    result = run_cli([
        "train", "recipes/smollm2-chat-lora.yaml", "--set", f"model.name_or_path={tiny_model_dir}", "--set", "quantization.bits=none",
        "--set", f"data.path={sample}", "--set", "data.cutoff_len=256", "--set", "training.learning_rate=1e-2",
        "--set", "training.save_steps=100", "--set", "adapter.dropout=0", "--max-steps", "12", "--output-dir", str(out),
    ])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in records[-3:]) / 3 < records[0]["loss"] - 0.5  # measured: 10.84 -> 9.9
    assert all(r["pad_fraction"] < 0.2 for r in records)
    run = json.loads((out / "run.json").read_text())
    assert run["train_examples"] == 191 and run["packed_rows"] < 191 and run["skipped_records"] == 0


def test_8bit_adamw_trains(tiny_model_dir, tmp_path):
    """bitsandbytes' AdamW8bit (QLoRA's optimizer) on the CPU: its state is 8-bit, and the loss falls."""
    out = tmp_path / "run"
    result = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "8", "--set", "training.optimizer=adamw_8bit",
                               "--set", "training.learning_rate=3e-3", "--set", "adapter.dropout=0", "--set", "adapter.r=32",
                               "--set", "adapter.target_modules=[down_proj]"))  # lora_A 32 x 128: 8-bit state from 4096 entries
    assert result.exit_code == 0, result.output
    import torch

    state = torch.load(out / "checkpoints/step-5/trainer_state.pt", weights_only=False)["optimizer"]["state"]

    def tensors(obj):  # bitsandbytes nests its quantized state in dicts and tuples
        if torch.is_tensor(obj):
            yield obj
        for value in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ():
            yield from tensors(value)

    assert any(t.dtype == torch.uint8 for t in tensors(state))
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_tensorboard_scalars_equal_the_metrics_file(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "6", "--set", "training.report_to=[tensorboard]"))
    assert result.exit_code == 0, result.output
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for key in ("loss", "lr", "tokens_per_s", "pad_fraction", "peak_mem_mb", "grad_norm", "val_loss"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        for (_, value), (_, want) in zip(got, expected):
            assert value == pytest.approx(want, rel=1e-6), key  # TensorBoard stores float32


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, tmp_path):
    """Activation checkpointing recomputes the forward in the backward: the same steps, losses and adapter
    to float32 rounding, through transformers' current entry point (the old name warns of its removal)."""
    import warnings

    import torch
    from safetensors.torch import load_file

    runs = {}
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "3", "--set", "adapter.dropout=0",
                                       "--set", "training.learning_rate=3e-3", "--set", "training.save_steps=100",
                                       "--set", f"training.gradient_checkpointing={str(checkpointing).lower()}"))
        assert result.exit_code == 0, result.output
        assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]
        losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs[checkpointing] = (losses, load_file(out / "adapter" / "adapter.safetensors"))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-4, atol=1e-6)
