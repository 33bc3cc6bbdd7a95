import json
from pathlib import Path

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
