"""PEFT's format, both directions: adapters trained by PEFT itself evaluate and merge through lrft with
PEFT's logits. Every lrft type's export (PEFT's logits, read back with its ΔW, or refused with the reason) is
checked over the registry in test_adapter_contract.py; here what is PEFT's own: its patterns, its pruned
AdaLoRA, RandLoRA's shared layout over several layer shapes."""

import json

import pytest
import torch

peft = pytest.importorskip("peft")

PROMPTS = ["The capital of France is", "Question: 2 + 2 =\nAnswer:"]
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def peft_configs():
    from peft import AdaLoraConfig, LoraConfig, RandLoraConfig, VeraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        "rslora+patterns": LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3},
            target_modules=TARGETS,
        ),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
        # pruned during training: PEFT saves the resized tensors with a rank_pattern
        "adalora": AdaLoraConfig(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=4, lora_alpha=5, target_modules=TARGETS),
        "vera": VeraConfig(r=16, target_modules=TARGETS),
        "randlora": RandLoraConfig(r=8, target_modules=TARGETS),
    }


def train_with_peft(base_folder, folder, config, steps=4):
    """A few AdamW steps of PEFT itself on random tokens, then save_pretrained."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if hasattr(model.base_model, "update_and_allocate"):  # AdaLoRA's budget
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


def logits(model, tokenizer):
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def peft_logits(base_folder, peft_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft_folder).eval()
    return logits(model, AutoTokenizer.from_pretrained(base_folder))


def assert_same(got, expected):
    for g, e in zip(got, expected):
        assert (g - e).abs().max() < 1e-4 * max(1.0, float(e.abs().max()))


@pytest.mark.parametrize("kind", ["lora", "rslora+patterns", "dora", "adalora", "vera", "randlora"])
def test_peft_trained_adapter_evaluates_and_merges_with_peft_logits(kind, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrft.adapter_folder import AdapterFolder
    from lrft.merge import run_merge

    folder = train_with_peft(tiny_base, tmp_path / "peft", peft_configs()[kind])
    if kind == "adalora":
        assert json.loads((folder / "adapter_config.json").read_text())["rank_pattern"], "PEFT did not prune"
    expected = peft_logits(tiny_base, folder)
    adapter = AdapterFolder.read(folder)
    assert adapter.format == "peft"
    model, _ = adapter.load_model(torch.device("cpu"))
    assert_same(logits(model, AutoTokenizer.from_pretrained(tiny_base)), expected)  # what `lrft eval --adapter` runs

    report = run_merge(folder, tmp_path / "merged", dtype="float32")
    assert report["verification"]["passed"] and report["adapter_format"] == "peft"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_same(logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged")), expected)


def test_lrft_eval_takes_a_peft_adapter(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from lrft.cli import app

    folder = train_with_peft(tiny_base, tmp_path / "peft", peft_configs()["randlora"], steps=1)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, [
        "eval", "--adapter", str(folder), "--data", "lrft/samples/commonsense/dev", "--tasks", "boolq",
        "--limit", "2", "--mode", "loglik", "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["tasks"]["boolq"]["n"] == 2


def test_peft_layout_randlora_of_several_shapes_exports_with_peft_logits(tiny_base, tmp_path):
    """adapter.basis_layout: peft draws PEFT's one pair of bases for the whole model and slices it per layer
    as PEFT does, so a RandLoRA of three layer shapes exports with --format peft: PeftModel.from_pretrained
    gives lrft's logits, the file holds PEFT's pair (r, 1, d_max) and (D_max, n_max, r), and it reads back
    with every layer's ΔW. The same adapter with lrft's default layout is refused."""
    from safetensors.torch import load_file

    from lrft.adapter_folder import AdapterFolder
    from lrft.errors import UserError
    from lrft.merge import run_merge
    from test_merge import make_adapter, reference_logits

    targets = ["q_proj", "v_proj", "down_proj"]  # 64->64, 64->32, 128->64
    adapter = make_adapter(tiny_base, tmp_path / "peft-layout", kind="randlora", targets=targets, alpha=None, r=8,
                           basis_layout="peft")
    run_merge(adapter, tmp_path / "export", fmt="peft")
    assert_same(peft_logits(tiny_base, tmp_path / "export"), reference_logits(adapter))
    tensors = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    assert tuple(tensors["base_model.randlora_A"].shape) == (8, 1, 64)  # d_max = min(largest out, largest in)
    assert tuple(tensors["base_model.randlora_B"].shape) == (128, 8, 8)  # (D_max, ⌈64 / 8⌉, r)
    original, imported = AdapterFolder.read(adapter), AdapterFolder.read(tmp_path / "export")
    assert imported.config.basis_layout == "peft"
    with torch.no_grad():
        for name in original.layer_shapes:
            torch.testing.assert_close(imported.layer(name).delta_weight(), original.layer(name).delta_weight(),
                                       atol=1e-6, rtol=1e-5)

    default_layout = make_adapter(tiny_base, tmp_path / "lrft-layout", kind="randlora", targets=targets, alpha=None, r=8)
    with pytest.raises(UserError, match="basis_layout: peft"):
        run_merge(default_layout, tmp_path / "refused", fmt="peft")
    assert not (tmp_path / "refused").exists()


def test_peft_layout_needs_dense_bases_and_every_target():
    from pydantic import ValidationError

    from lrft.adapters import get_adapter
    from lrft.adapters.base import SharedTensors
    from conftest import make_linear

    spec = get_adapter("randlora")
    with pytest.raises(ValidationError, match="basis_layout: peft applies to dense bases"):
        spec.config(type="randlora", basis="sparse", basis_layout="peft")
    config = spec.config(type="randlora", r=8, basis_layout="peft")
    with pytest.raises(ValueError, match="not listed in SharedTensors.target_shapes"):
        spec.layer(make_linear("none", 64, 32), config, SharedTensors(0, {"other": (64, 64)}), "layer")
