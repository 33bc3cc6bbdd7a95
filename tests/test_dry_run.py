import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lrft.cli import app

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


# the published recipe points at commonsense_170k.json, which a clean checkout does not have
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "lrft" / "samples" / "commonsense" / "train_500.jsonl"


def write_llama3_config(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def test_dry_run_llama3_lora32_matches_published_count(tmp_path):
    folder = write_llama3_config(tmp_path / "llama3-8b")
    result = CliRunner().invoke(
        app, ["train", "recipes/llama3-commonsense-lora.yaml", "--set", f"model.name_or_path={folder}", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "56,623,104" in result.output
    # a clean checkout lacks the recipe's commonsense_170k.json: the plan still prints, with a warning
    assert "commonsense_170k.json" in result.output and "training would stop here" in result.output


def test_dry_run_plan_function(tmp_path):
    from lrft.recipe import load_recipe
    from lrft.plan import dry_run

    folder = write_llama3_config(tmp_path / "llama3-8b")
    plan = dry_run(load_recipe("recipes/llama3-commonsense-lora.yaml", [f"model.name_or_path={folder}", f"data.path={SAMPLE_DATA}"]))
    assert plan["trainable_parameters"] == plan["formula_trainable_parameters"] == 56_623_104
    assert plan["adapted_modules"] == 160
    assert 4.5 < plan["estimated_memory_gb"]["base_weights"] < 7  # ~5.5 GB for an 8B model in nf4


# --- data figures and the peak-memory estimate ------------------------------------------------------


def _tiny_recipe(name, folder, *sets):
    from lrft.recipe import load_recipe

    return load_recipe(f"recipes/{name}.yaml", [f"model.name_or_path={folder}", *sets])


def _training_data(recipe):
    from lrft.data import load_training_data
    from lrft.model import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name_or_path)
    return load_training_data(recipe.data, tokenizer, recipe.training.seed)


def test_dry_run_prints_data_figures_and_both_memory_figures(tiny_model_dir):
    """A shipped recipe (unpacked) on a tiny model: the printed figures, and the returned ones agree with
    the data, DataOrder and padded_tokens as training computes them."""
    import math

    from lrft.data import DataOrder, padded_tokens
    from lrft.plan import dry_run, percentiles

    args = ["train", "recipes/smollm2-commonsense-lora.yaml", "--set", f"model.name_or_path={tiny_model_dir}", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    for text in ("token lengths: p50", "p90", "p99", "max", "padding:", "steps per epoch:", "largest micro-batch",
                 "estimated peak memory", "without checkpointing", "with checkpointing", "the recipe trains without"):
        assert text in printed, text

    recipe = _tiny_recipe("smollm2-commonsense-lora", tiny_model_dir)
    plan = dry_run(recipe)
    data, train, tcfg = plan["data"], _training_data(recipe).train, recipe.training
    assert plan["data_problem"] is None and data["rows"] is None and data["packing_efficiency"] is None
    assert data["examples"] == len(train) and data["token_lengths"] == percentiles([len(e["input_ids"]) for e in train])
    assert data["steps_per_epoch"] == math.ceil(len(train) / tcfg.batch_size)
    order = DataOrder(len(train), tcfg.batch_size, tcfg.seed, recipe.data.shuffle)
    batches = [[train[i] for i in order.global_batch(step)] for step in range(data["steps_per_epoch"])]
    real = sum(len(e["input_ids"]) for batch in batches for e in batch)
    padded = sum(padded_tokens(batch, 1, tcfg.micro_batch_size) for batch in batches)
    assert data["padding_fraction"] == pytest.approx(1 - real / padded, abs=1e-12)
    assert data["micro_batches"] == data["steps_per_epoch"] * tcfg.batch_size // tcfg.micro_batch_size

    peak = plan["peak_memory"]
    assert peak["device"] == "cpu" and peak["gradient_checkpointing"] is False
    for key in ("without_checkpointing", "with_checkpointing"):
        assert peak[f"{key}_mb"] == pytest.approx(sum(peak["terms_mb"][key].values()))
    off, on = peak["terms_mb"]["without_checkpointing"], peak["terms_mb"]["with_checkpointing"]
    assert on["saved_activations"] < off["saved_activations"] and on["logits"] == off["logits"]
    rows, width = data["largest_micro_batch"]
    assert rows == tcfg.micro_batch_size and width <= data["token_lengths"]["max"]
    # through the loss head: one chunk of 8 bytes per logit on the CPU (float32 logits and the log-sum-exp
    # temporary) and the hidden-state gradient it keeps (at most every position's)
    from lrft.loss import chunk_rows

    chunk = min(rows * width, chunk_rows(49152))
    assert off["logits"] == pytest.approx((chunk * 49152 * 8 + rows * width * 64 * 4) / 2**20)


def test_dry_run_packed_figures(tiny_model_dir):
    """The packed chat recipe: rows, packing efficiency and steps count rows; group_by_length respected in
    the unpacked padding."""
    import math

    from lrft.plan import dry_run

    recipe = _tiny_recipe("smollm2-chat-lora", tiny_model_dir)
    plan = dry_run(recipe)
    data, rows = plan["data"], _training_data(recipe).train
    assert data["rows"] == len(rows) and data["padding_fraction"] is None
    assert data["packing_efficiency"] == pytest.approx(sum(len(r["input_ids"]) for r in rows) / (len(rows) * recipe.data.cutoff_len))
    assert data["steps_per_epoch"] == math.ceil(len(rows) / recipe.training.batch_size)
    assert data["examples"] == sum(1 for r in rows for p in r["position_ids"] if p == 0)

    grouped = dry_run(_tiny_recipe("smollm2-chat-lora", tiny_model_dir, "data.packing=false", "data.group_by_length=true"))
    plain = dry_run(_tiny_recipe("smollm2-chat-lora", tiny_model_dir, "data.packing=false"))
    assert grouped["data"]["padding_fraction"] < plain["data"]["padding_fraction"]


def test_saved_activations_match_autograd(tiny_model_dir):
    """The estimate's saved activations (base layers by formula, adapters measured on the meta device) are
    what autograd keeps in a real forward of the largest planned micro-batch, as training runs it (the
    loss head in place): counted with saved-tensor hooks on the tiny model (float32, LoRA with dropout),
    less the hidden-state gradient the loss head keeps, which the logits term counts."""
    from transformers import AutoModelForCausalLM

    from lrft.data import DataOrder, collate, micro_batches
    from lrft.activations import use_swiglu
    from lrft.loss import summed_token_loss, use_loss_head
    from lrft.inject import inject_adapters
    from lrft.plan import make_plan

    recipe = _tiny_recipe("smollm2-commonsense-lora", tiny_model_dir, "training.max_steps=2")
    plan, _ = make_plan(recipe)
    estimate = plan["peak_memory"]["terms_mb"]["without_checkpointing"]["saved_activations"] * 2**20
    rows, width = plan["data"]["largest_micro_batch"]
    train, tcfg = _training_data(recipe).train, recipe.training
    order = DataOrder(len(train), tcfg.batch_size, tcfg.seed, recipe.data.shuffle)
    chunks = [c for step in range(2) for c in micro_batches([train[i] for i in order.global_batch(step)], tcfg.micro_batch_size)]
    chunk = next(c for c in chunks if (len(c), max(len(e["input_ids"]) for e in c)) == (rows, width))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).requires_grad_(False)
    inject_adapters(model, recipe.adapter, torch.float32)
    assert use_swiglu(model) and use_loss_head(model)
    model.train()
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        summed_token_loss(model, collate(chunk, 2))
    labelled = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in chunk)
    measured = sum(saved.values()) - labelled * model.config.hidden_size * 4  # the loss head's gradient
    assert estimate == pytest.approx(measured, rel=0.02), (estimate, measured)


def test_dry_run_samples_large_data(tmp_path, tiny_model_dir):
    """More records than DATA_SAMPLE: a random sample is tokenized and the counts are scaled to the whole."""
    import math

    from lrft.plan import DATA_SAMPLE, dry_run

    lines = SAMPLE_DATA.read_text().splitlines()
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines * math.ceil(2.5 * DATA_SAMPLE / len(lines))) + "\n")
    total = len(lines) * math.ceil(2.5 * DATA_SAMPLE / len(lines))
    recipe = _tiny_recipe("smollm2-commonsense-lora", tiny_model_dir, f"data.path={big}")
    data = dry_run(recipe)["data"]
    assert data["tokenized"] == DATA_SAMPLE and data["records"] == total - recipe.data.val_size
    assert data["examples"] == pytest.approx(data["records"], rel=0.01)  # every sample record has targets
    assert data["steps_per_epoch"] == math.ceil(data["examples"] / recipe.training.batch_size)
    assert data["largest_micro_batch"] == [recipe.training.micro_batch_size, data["token_lengths"]["max"]]
