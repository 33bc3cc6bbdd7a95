"""``lrft merge``: merged weights are exactly W + ΔW, the merged model reproduces base + adapter, the
output loads with plain transformers, shards, atomicity, verification failure, PEFT export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from lrft.errors import UserError

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
PROMPTS = ["The capital of France is", "Question: 2 + 2 =\nAnswer:"]


# --- fixtures -----------------------------------------------------------------------------------------


def make_adapter(base_folder, folder, bits=None, quant_type="nf4", targets=TARGETS, r=4, alpha=8.0, kind="lora", **options):
    """Train nothing: inject an adapter into the (quantized) base, give every trainable tensor random
    non-zero values (most start at zero, which would hide bugs), save it."""
    from lrft.adapters import get_adapter
    from lrft.adapter_folder import base_record, save_adapter
    from lrft.inject import inject_adapters
    from lrft.model import Dtypes, load_base_model
    from lrft.recipe import ModelSection, QuantizationSection

    model_section = ModelSection(name_or_path=str(base_folder), dtype="float32")
    quant = QuantizationSection(bits=bits, quant_type=quant_type, compute_dtype="float32")
    model = load_base_model(model_section, quant, torch.device("cpu"))
    if alpha is not None:  # None: the type's own default (VeRA has no alpha at all)
        options["alpha"] = alpha
    config = get_adapter(kind).config(type=kind, r=r, target_modules=targets, **options)
    torch.manual_seed(1)
    layers = inject_adapters(model, config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base_layer."):
                    p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    save_adapter(folder, layers, config, base_record(model_section, quant, Dtypes.resolve(model_section, quant, torch.device("cpu"))))
    return folder


def reference_logits(adapter_dir):
    """base + adapter as trained, in fp32 (lrft keeps bitsandbytes' 4-bit layers on their training
    kernel in eval mode: see lrft.model.use_training_kernels)."""
    from lrft.adapter_folder import AdapterFolder

    from lrft.model import load_tokenizer

    folder = AdapterFolder.read(adapter_dir)
    model, _ = folder.load_model(torch.device("cpu"))
    tokenizer = load_tokenizer(folder.base_name)
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS]


def plain_logits(folder, dtype=None):
    """Load with transformers alone (no lrft) and run the prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model, [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def layer_delta(adapter_dir, name):
    """ΔW of one layer straight from the saved tensors (LoRA: (alpha / r) B A)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["adapter"]
    state = load_file(str(Path(adapter_dir) / "adapter.safetensors"))
    return (state[f"{name}.lora_B"].double() @ state[f"{name}.lora_A"].double()) * (config["alpha"] / config["r"])


def merged_state(folder):
    folder = Path(folder)
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


@pytest.fixture(scope="module")
def adapter_none(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("ad") / "none")


@pytest.fixture(scope="module")
def adapter_nf4(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("ad") / "nf4", bits=4)


# --- merging ------------------------------------------------------------------------------------------


def test_float32_merge_is_w_plus_delta_and_matches_base_plus_adapter(tiny_base, adapter_none, tmp_path):
    from lrft.merge import run_merge

    out = tmp_path / "merged"
    report = run_merge(adapter_none, out, dtype="float32")
    base = load_file(str(tiny_base / "model.safetensors"))
    merged = merged_state(out)
    name = "model.layers.1.self_attn.q_proj"
    expected = base[f"{name}.weight"].double() + layer_delta(adapter_none, name)
    torch.testing.assert_close(merged[f"{name}.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(merged[f"{name}.weight"] - base[f"{name}.weight"]) > 0
    for key in ("model.layers.1.self_attn.o_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged[key], base[key])  # not adapted: copied bit for bit
    assert set(merged) == set(base) and "lm_head.weight" not in merged  # tied head stays tied

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32" and config["tie_word_embeddings"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).exists()

    model, logits = plain_logits(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for got, ref in zip(logits, reference_logits(adapter_none)):
        assert (got - ref).abs().max() < 1e-4
    figures = report["verification"]
    assert figures["passed"] and figures["strict"] and figures["max_abs_logit_diff"] < 1e-4
    assert figures["mean_kl"] < 1e-8 and figures["max_abs_logit"] > 1.0


def test_4bit_merge_uses_the_dequantized_weights_the_adapter_saw(tiny_base, adapter_nf4, tmp_path):
    from lrft.adapter_folder import AdapterFolder
    from lrft.merge import run_merge
    from lrft.adapters.frozen_linear import dequantized_weight

    out = tmp_path / "merged"
    report = run_merge(adapter_nf4, out)  # --dtype auto: float32, the dtype this CPU run trained in
    assert report["dtype"] == "float32"
    model, layers = AdapterFolder.read(adapter_nf4).load_model(torch.device("cpu"))
    merged = merged_state(out)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"):
        expected = dequantized_weight(layers[name].base_layer, torch.float64) + layer_delta(adapter_nf4, name)
        torch.testing.assert_close(merged[f"{name}.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    # a quantized linear the adapter does not touch is dequantized too: the adapter was trained on that
    o_proj = model.get_submodule("model.layers.0.self_attn.o_proj")
    assert torch.equal(merged["model.layers.0.self_attn.o_proj.weight"], dequantized_weight(o_proj))

    _, logits = plain_logits(out)
    for got, ref in zip(logits, reference_logits(adapter_nf4)):
        assert (got - ref).abs().max() < 1e-4
    assert report["verification"]["passed"] and report["verification"]["max_abs_logit_diff"] < 1e-4


def test_original_base_adds_the_quantization_error_and_warns(tiny_base, adapter_nf4, tmp_path, capsys):
    from lrft.merge import run_merge

    out = tmp_path / "merged"
    report = run_merge(adapter_nf4, out, dtype="float32", base="original")
    base = load_file(str(tiny_base / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    expected = base[f"{name}.weight"].double() + layer_delta(adapter_nf4, name)
    torch.testing.assert_close(merged_state(out)[f"{name}.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    figures = report["verification"]
    assert not figures["strict"] and figures["passed"] and figures["max_abs_logit_diff"] > 1e-3
    err = capsys.readouterr().err
    assert "quantization error the adapter never saw" in err and "changes the outputs" in err


def test_bfloat16_merge_passes_its_tolerance(adapter_nf4, tmp_path):
    from lrft.merge import run_merge

    out = tmp_path / "merged"
    report = run_merge(adapter_nf4, out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in merged_state(out).values())
    figures = report["verification"]
    assert figures["passed"] and figures["tolerance_for"] == "bfloat16"
    assert 1e-5 < figures["max_abs_logit_diff"] < figures["tolerance_max_abs"]


def test_int8_adapter_merges_against_llm_int8_weights(tiny_base, tmp_path):
    from lrft.adapter_folder import AdapterFolder
    from lrft.merge import run_merge
    from lrft.adapters.frozen_linear import dequantized_weight

    adapter = make_adapter(tiny_base, tmp_path / "int8", bits=8)
    out = tmp_path / "merged"
    report = run_merge(adapter, out, dtype="float32")
    _, layers = AdapterFolder.read(adapter).load_model(torch.device("cpu"))
    name = "model.layers.1.mlp.up_proj"
    expected = dequantized_weight(layers[name].base_layer, torch.float64) + layer_delta(adapter, name)
    torch.testing.assert_close(merged_state(out)[f"{name}.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    figures = report["verification"]
    assert figures["passed"] and figures["tolerance_for"] == "float32" and figures["max_abs_logit_diff"] < 1e-4
    # LLM.int8 also quantizes the activations, which no merged model can: reported, not checked
    assert figures["as_run"]["max_abs_logit_diff"] > 10 * figures["max_abs_logit_diff"]


def test_adapted_tied_head_is_untied(tiny_base, tmp_path):
    from lrft.merge import run_merge

    adapter = make_adapter(tiny_base, tmp_path / "head", targets=["q_proj", "lm_head"])
    out = tmp_path / "merged"
    run_merge(adapter, out, dtype="float32")
    base = load_file(str(tiny_base / "model.safetensors"))
    merged = merged_state(out)
    embed = base["model.embed_tokens.weight"]
    assert torch.equal(merged["model.embed_tokens.weight"], embed)
    torch.testing.assert_close(
        merged["lm_head.weight"].double(), embed.double() + layer_delta(adapter, "lm_head"), atol=1e-6, rtol=1e-6
    )
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model, logits = plain_logits(out)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for got, ref in zip(logits, reference_logits(adapter)):
        assert (got - ref).abs().max() < 1e-4


def test_small_shard_size_writes_several_shards_and_an_index(adapter_nf4, tmp_path):
    from lrft.merge import run_merge

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run_merge(adapter_nf4, single, dtype="float32", verify=False)
    run_merge(adapter_nf4, sharded, dtype="float32", max_shard_bytes=50_000)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not list(sharded.glob("*.partial"))
    a, b = merged_state(single), merged_state(sharded)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    _, logits_a = plain_logits(single)
    _, logits_b = plain_logits(sharded)
    assert all(torch.equal(x, y) for x, y in zip(logits_a, logits_b))


def test_requantize_nf4_saves_a_quantized_model_and_reports_the_change(adapter_nf4, tmp_path, capsys):
    from lrft.merge import run_merge

    out = tmp_path / "merged"
    report = run_merge(adapter_nf4, out, dtype="float32", requantize="nf4")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] and config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model, logits = plain_logits(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert all(torch.isfinite(t).all() for t in logits)
    figures = report["verification"]
    assert not figures["strict"] and figures["max_abs_logit_diff"] > 1e-4
    assert "re-quantizing to nf4 changes the outputs" in capsys.readouterr().err


# --- failures -------------------------------------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_exception_midway_leaves_no_output(adapter_nf4, tmp_path, monkeypatch):
    from lrft import merge

    calls = []
    real = merge.delta_weight

    def fail_on_third(folder, name, base_layer):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(folder, name, base_layer)

    monkeypatch.setattr(merge, "delta_weight", fail_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge.run_merge(adapter_nf4, tmp_path / "merged", dtype="float32", max_shard_bytes=100_000)
    assert not (tmp_path / "merged").exists() and not _leftovers(tmp_path, "merged")


def test_verification_failure_exits_1_and_writes_nothing(adapter_nf4, tmp_path, monkeypatch, capsys):
    """A wrong ΔW (here: doubled) must be caught by the comparison with base + adapter."""
    from lrft import cli, merge

    real = merge.delta_weight
    monkeypatch.setattr(merge, "delta_weight", lambda folder, n, b: 2 * real(folder, n, b))
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exc:
        cli.main(["merge", str(adapter_nf4), "--output", str(out), "--dtype", "float32"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "differs from base + adapter" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not _leftovers(tmp_path, "merged")


def test_kill_midway_leaves_no_output(adapter_nf4, tmp_path):
    """SIGKILL while shards are being written: OUT_DIR never appears (only a hidden temp folder)."""
    out = tmp_path / "merged"
    script = textwrap.dedent(
        f"""
        import time
        from lrft import merge
        real_flush = merge.ShardWriter.flush
        def slow_flush(self):
            real_flush(self)
            time.sleep(60)  # park after the first shard so the parent can kill us mid-merge
        merge.ShardWriter.flush = slow_flush
        merge.run_merge({str(adapter_nf4)!r}, {str(out)!r}, dtype="float32", max_shard_bytes=100_000)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".merged.tmp-*/*.partial")):
            assert proc.poll() is None, "merge exited before it could be killed"
            time.sleep(0.1)
        assert list(tmp_path.glob(".merged.tmp-*/*.partial")), "no shard appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()


def test_bad_options_are_user_errors(adapter_none, tmp_path):
    from lrft.merge import run_merge

    with pytest.raises(UserError, match="--dtype"):
        run_merge(adapter_none, tmp_path / "a", dtype="float64")
    with pytest.raises(UserError, match="--requantize"):
        run_merge(adapter_none, tmp_path / "a", requantize="fp8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        run_merge(adapter_none, tmp_path / "full")
    with pytest.raises(UserError, match="does not exist"):
        run_merge(tmp_path / "missing", tmp_path / "c")


# --- PEFT export ----------------------------------------------------------------------------------------


def peft_logits(base_folder, peft_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS]


def test_peft_export_round_trips_lora(tiny_base, adapter_none, tmp_path):
    from lrft.merge import run_merge

    out = tmp_path / "peft"
    run_merge(adapter_none, out, fmt="peft")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 8.0 and config["r"] == 4
    for got, ref in zip(peft_logits(tiny_base, out), reference_logits(adapter_none)):
        assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kind, targets, options",
    [
        ("rmlora", TARGETS, {}),
        ("dora", TARGETS, {}),
        ("vera", TARGETS, {"r": 16}),
        ("adalora", TARGETS, {}),
        # PEFT shares one pair of RandLoRA bases across layers: exact only for one layer shape
        ("randlora", ["q_proj", "o_proj"], {"r": 16}),
    ],
)
def test_peft_export_round_trips(kind, targets, options, tiny_base, tmp_path):
    from lrft.merge import run_merge

    adapter = make_adapter(tiny_base, tmp_path / kind, kind=kind, targets=targets, alpha=None, **options)
    if kind == "adalora":  # prune some ranks: the export must keep them pruned
        from safetensors.torch import save_file

        state = load_file(str(adapter / "adapter.safetensors"))
        for key in [k for k in state if k.endswith(".rank_mask")]:
            state[key][1] = False
            state[key.replace("rank_mask", "lora_lambda")][1] = 0.0
        save_file(state, str(adapter / "adapter.safetensors"))
    out = tmp_path / "peft"
    run_merge(adapter, out, fmt="peft")
    for got, ref in zip(peft_logits(tiny_base, out), reference_logits(adapter)):
        assert (got - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max())


def test_peft_export_refuses_what_peft_cannot_express(tiny_base, tmp_path):
    from lrft.merge import run_merge
    from lrft.peft_format import UNSUPPORTED

    adapter = make_adapter(tiny_base, tmp_path / "randlora", kind="randlora", r=16)
    with pytest.raises(UserError, match="several .*--format hf"):
        run_merge(adapter, tmp_path / "a", fmt="peft")
    assert not (tmp_path / "a").exists()
    for kind in UNSUPPORTED:
        adapter = make_adapter(tiny_base, tmp_path / kind, kind=kind, alpha=None)
        with pytest.raises(UserError, match="PEFT has no .*--format hf"):
            run_merge(adapter, tmp_path / "b", fmt="peft")
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["randlora", "rmlora", "adalora", "lora2", "dora", "vera", "nola"])
def test_every_adapter_type_merges_through_delta_weight(kind, tiny_base, tmp_path):
    """Merge knows no adapter type: whatever delta_weight() returns is folded in, and the merged model
    reproduces base + adapter on a 4-bit base."""
    from lrft.merge import run_merge

    adapter = make_adapter(tiny_base, tmp_path / kind, bits=4, kind=kind, targets=["q_proj", "down_proj"], alpha=None)
    report = run_merge(adapter, tmp_path / "merged", dtype="float32")
    figures = report["verification"]
    assert figures["passed"] and figures["max_abs_logit_diff"] < 1e-4 * max(1.0, figures["max_abs_logit"])
