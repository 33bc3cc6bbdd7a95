"""``lrft merge --format lora``: every adapter type's ΔW as a plain PEFT LoRA.

References are independent of lrft's export: each layer's naive float64 ΔW (adapter_reference.NAIVE, from the
paper's equation and the layer's own tensors), its SVD by torch.linalg.svd, and a model whose adapted weights
are W + that truncated ΔW. PEFT itself loads the exports."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from adapter_reference import naive_of
from conftest import lrft_main
from lrft.adapters import known_types
from test_merge import PROMPTS, make_adapter

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 64->64, 64->32, 128->64 on the tiny base: three shapes
EXACT_TYPES = ["lora", "rmlora", "adalora", "lora2", "nola"]  # rank(ΔW) <= 8 by their structure at these options
OPTIONS = {"lora2": {"r": 6, "k": 3}, "vera": {"r": 96}, "nola": {"r": 4, "num_basis": 24}, "randlora": {"r": 12}}


def adapter_for(kind, base, folder, bits=None):
    return make_adapter(base, folder, bits=bits, kind=kind, targets=TARGETS, alpha=None, **OPTIONS.get(kind, {}))


def naive_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """Every layer's ΔW from its naive float64 formula, on the weights it was trained on (DoRA)."""
    from lrft.adapter_folder import AdapterFolder

    layers, _ = AdapterFolder.read(adapter_dir).layers_for_delta()
    with torch.no_grad():
        return {name: naive_of(layer) for name, layer in layers.items()}


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def numerical_rank(delta: torch.Tensor) -> int:
    sigma = torch.linalg.svdvals(delta)
    return int((sigma > max(delta.shape) * torch.finfo(torch.float32).eps * sigma[0]).sum())


def exported_deltas(folder) -> dict[str, torch.Tensor]:
    """B·A (times PEFT's scaling) of every layer of an exported LoRA, read from the files alone."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace("lora_A", "lora_B")]
            rank = config["rank_pattern"].get(name, config["r"])
            alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
            assert A.shape[0] == B.shape[1] == rank
            deltas[name] = B.double() @ A.double() * (alpha / rank)
    return deltas


def logits_of(model, tokenizer):
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def peft_logits(base_folder, export):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32), export)
    return logits_of(model.eval(), AutoTokenizer.from_pretrained(base_folder))


def base_plus(base_folder, deltas):
    """The plain base with W + ΔW in every adapted layer: what a LoRA of those ΔW computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = model.get_submodule(name).weight
            weight.copy_((weight.double() + delta).float())
    return logits_of(model, AutoTokenizer.from_pretrained(base_folder))


def assert_same_logits(got, expected, rel=1e-4):
    for g, e in zip(got, expected):
        assert (g - e).abs().max() < rel * max(1.0, float(e.abs().max()))


# --- the maths ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [3, 50, 90])
def test_factored_svd_is_the_svd_of_the_product(inner):
    from lrft.diagnostics import factored_svd

    g = torch.Generator().manual_seed(inner)
    left, right = torch.randn(70, inner, generator=g, dtype=torch.float64), torch.randn(inner, 40, generator=g, dtype=torch.float64)
    U, S, Vh = factored_svd(left, right)
    product = left @ right
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, product, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(S, torch.linalg.svdvals(product)[: S.numel()], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(U.T @ U, torch.eye(S.numel(), dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(S.numel(), dtype=torch.float64), atol=1e-10, rtol=0)
    assert S.numel() == min(70, 40, inner)


# --- every type -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", known_types())
def test_rank_export_is_the_truncated_svd_of_the_naive_delta(kind, tiny_base, tmp_path):
    """--rank 8, 4-bit base: each layer's B·A is the best rank-8 approximation of its naive ΔW (the whole ΔW,
    float32-exact, for types of rank <= 8), the folder has one rank, PEFT loads it on the plain base and gives
    the logits of W + that truncated ΔW, and the metadata's shares of ‖ΔW‖² are the kept singular values'."""
    from lrft.merge import run_merge

    adapter = adapter_for(kind, tiny_base, tmp_path / kind, bits=4)
    naive = naive_deltas(adapter)
    report = run_merge(adapter, tmp_path / "export", fmt="lora", rank=8)
    exported = exported_deltas(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == {} and config["lora_alpha"] == config["r"]
    expected = {}
    for name, delta in naive.items():
        rank = min(8, numerical_rank(delta))
        expected[name] = truncated(delta, rank)
        scale = float(torch.linalg.matrix_norm(delta, 2))
        torch.testing.assert_close(exported[name], expected[name], atol=1e-5 * scale, rtol=0)
        sigma = torch.linalg.svdvals(delta)
        share = float((sigma[:rank] ** 2).sum() / (sigma**2).sum())
        assert report["layers"][name]["energy_kept"] == pytest.approx(share, rel=1e-6)
        assert report["layers"][name]["rank"] == rank
    assert config["r"] == max(report["layers"][n]["rank"] for n in naive)
    if kind in EXACT_TYPES:
        assert report["exact_layers"] == len(naive) and report["energy_by_module"]["all"]["energy_kept"] == pytest.approx(1.0)
        for name, delta in naive.items():  # exactly ΔW, to float32 rounding
            assert float((exported[name] - delta).abs().max()) < 1e-6 * float(delta.abs().max())
    else:
        assert report["energy_by_module"]["all"]["energy_kept"] < 1.0
    assert_same_logits(peft_logits(tiny_base, tmp_path / "export"), base_plus(tiny_base, expected))


@pytest.mark.parametrize("kind", known_types())
def test_only_dora_forms_delta_w(kind, tiny_base, tmp_path, monkeypatch):
    """Every type but DoRA is decomposed through its factors, delta_weight() never called; DoRA's ΔW, a
    rescaling of W + BA, is formed and decomposed densely. Either way U S Vh is the naive ΔW."""
    from lrft.adapter_folder import AdapterFolder
    from lrft.lora_export import decompose

    layers, _ = AdapterFolder.read(adapter_for(kind, tiny_base, tmp_path / kind)).layers_for_delta()
    layer = layers["model.layers.0.mlp.down_proj"]
    expected = naive_of(layer)
    if kind != "dora":
        monkeypatch.setattr(type(layer), "delta_weight", lambda self: pytest.fail("ΔW was formed"))
    U, S, Vh, method = decompose(layer)
    assert method == ("dense" if kind == "dora" else "factored")
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_energy_picks_per_layer_ranks_rounded_up_to_vllm_ranks(tiny_base, tmp_path):
    """--energy 0.9 on RandLoRA: per layer the smallest rank keeping 90 % of ‖ΔW‖², rounded up to a rank
    vLLM accepts and at most min(out, in); rank_pattern and alpha_pattern record the differing ranks, PEFT
    computes W + the truncated ΔW, and the per-module shares are Σ kept / Σ ‖ΔW‖² over that module's layers."""
    from lrft.merge import run_merge

    adapter = adapter_for("randlora", tiny_base, tmp_path / "randlora")
    naive = naive_deltas(adapter)
    report = run_merge(adapter, tmp_path / "export", fmt="lora", energy=0.9)
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    expected, kept, total = {}, {}, {}
    for name, delta in naive.items():
        squares = torch.linalg.svdvals(delta) ** 2
        needed = next(k for k in range(1, squares.numel() + 1) if squares[:k].sum() >= 0.9 * squares.sum())
        rank = min(next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= needed), min(delta.shape))
        expected[name] = truncated(delta, rank)
        kind = name.rsplit(".", 1)[-1].removesuffix("_proj")
        kept[kind] = kept.get(kind, 0.0) + float(squares[:rank].sum())
        total[kind] = total.get(kind, 0.0) + float(squares.sum())
        assert report["layers"][name]["rank"] == rank and report["layers"][name]["energy_kept"] >= 0.9
    ranks = {name: report["layers"][name]["rank"] for name in naive}
    assert len(set(ranks.values())) > 1, "the test adapter should need different ranks per layer"
    assert config["r"] == config["lora_alpha"] == max(ranks.values())
    assert config["rank_pattern"] == config["alpha_pattern"] == {n: r for n, r in ranks.items() if r != config["r"]}
    for kind in kept:
        assert report["energy_by_module"][kind]["energy_kept"] == pytest.approx(kept[kind] / total[kind], rel=1e-6)
    exported = exported_deltas(tmp_path / "export")
    for name in naive:
        torch.testing.assert_close(exported[name], expected[name], atol=1e-5 * float(naive[name].abs().max()), rtol=0)
    assert_same_logits(peft_logits(tiny_base, tmp_path / "export"), base_plus(tiny_base, expected))


def test_rank_above_a_narrow_layer_keeps_that_layer_whole_at_the_folders_rank(tiny_base, tmp_path):
    """--rank 48 is above v_proj's min(out, in) = 32: v_proj is exported whole and zero-padded to rank 48
    (one rank in the folder, no rank_pattern), the other layers truncated to 48."""
    from lrft.merge import run_merge

    adapter = adapter_for("randlora", tiny_base, tmp_path / "randlora")
    naive = naive_deltas(adapter)
    report = run_merge(adapter, tmp_path / "export", fmt="lora", rank=48)
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["r"] == 48 and config["rank_pattern"] == {}
    exported = exported_deltas(tmp_path / "export")
    for name, delta in naive.items():
        narrow = name.endswith("v_proj")
        assert report["layers"][name]["rank"] == (32 if narrow else 48)
        torch.testing.assert_close(exported[name], truncated(delta, 32 if narrow else 48), atol=1e-5 * float(delta.abs().max()), rtol=0)


# --- the folder -----------------------------------------------------------------------------------------------


def test_metadata_readme_and_check_on_the_4bit_base(tiny_base, tmp_path):
    """--check on the 4-bit base as trained: an exact export (LoRA r=4 at rank 8) changes nothing beyond
    float rounding; a truncated one (RandLoRA at rank 4) moves the logits far more. Both write their numbers
    into lrft_export.json and README.md."""
    from lrft.lora_export import CheckOptions
    from lrft.merge import run_merge

    options = CheckOptions(limit=2)
    figures = {}
    for kind, rank in (("lora", 8), ("randlora", 4)):
        adapter = adapter_for(kind, tiny_base, tmp_path / kind, bits=4)
        out = tmp_path / f"{kind}-lora"
        report = run_merge(adapter, out, fmt="lora", rank=rank, check=options)
        check = report["check"]
        assert check["quantization_bits"] == 4 and check["examples"] == 16 and check["prompts"] == 4
        assert report["trained_on"]["quantization_bits"] == 4
        assert json.loads((out / "lrft_export.json").read_text()) == json.loads(json.dumps(report))
        readme = (out / "README.md").read_text()
        assert f"{check['max_abs_logit_diff']:.4g}" in readme and f"{check['accuracy_change']:+.4f}" in readme
        assert "| all | 6 |" in readme and "base_model:" in readme
        figures[kind] = check
    exact = figures["lora"]
    assert exact["max_abs_logit_diff"] < 1e-4 * exact["max_abs_logit"] and exact["mean_kl"] < 1e-8
    assert exact["accuracy_change"] == 0.0 and exact["predictions_changed"] == 0
    assert figures["randlora"]["max_abs_logit_diff"] > 1e3 * exact["max_abs_logit_diff"]
    assert figures["randlora"]["accuracy_export"] - figures["randlora"]["accuracy_adapter"] == pytest.approx(
        figures["randlora"]["accuracy_change"])


def test_bfloat16_export_stores_bfloat16_factors(tiny_base, tmp_path):
    from lrft.merge import run_merge

    adapter = adapter_for("randlora", tiny_base, tmp_path / "randlora")
    report = run_merge(adapter, tmp_path / "export", fmt="lora", rank=8, dtype="bfloat16")
    tensors = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    assert report["dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert report["file_bytes"] > sum(t.numel() * 2 for t in tensors.values())


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_adapter(tiny_base, tmp_path):
    return adapter_for("randlora", tiny_base, tmp_path / "randlora")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "65"], "--rank 65 is above min(out, in) of every adapted layer"),
        ([], "needs --rank K or --energy E"),
        (["--energy", "1.5"], "--energy 1.5 is a share"),
        (["--rank", "0"], "--rank 0 must be at least 1"),
    ],
)
def test_bad_rank_options_are_one_line_and_exit_2(extra, message, lora_adapter, tmp_path, capfd):
    code, err = lrft_main(["merge", str(lora_adapter), "--output", str(tmp_path / "out"), "--format", "lora", *extra], capfd)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_other_bad_input_is_one_line_and_exit_2(lora_adapter, tmp_path, capfd, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    config = json.loads((lora_adapter / "adapter_config.json").read_text())
    config["adapter"]["type"] = "superlora"
    (unknown / "adapter_config.json").write_text(json.dumps(config))
    cases = [
        (["merge", str(lora_adapter), "--output", str(full), "--format", "lora", "--rank", "8"], "already exists and is not empty"),
        (["merge", str(unknown), "--output", str(tmp_path / "a"), "--format", "lora", "--rank", "8"], "unknown adapter type 'superlora'"),
        (["merge", str(lora_adapter), "--output", str(tmp_path / "a"), "--format", "gguf"], "--format 'gguf' is not supported"),
        (["merge", str(lora_adapter), "--output", str(tmp_path / "a"), "--rank", "8"], "apply to --format lora"),
        (["merge", str(lora_adapter), "--output", str(tmp_path / "a"), "--format", "lora", "--rank", "8", "--check",
          "--check-data", str(tmp_path)], "holds no known task"),
    ]
    for args, message in cases:
        code, err = lrft_main(args, capfd)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert (full / "keep").read_text() == "mine" and not (tmp_path / "a").exists()
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    code, err = lrft_main(["merge", str(lora_adapter), "--output", str(tmp_path / "a"), "--format", "lora", "--rank", "8", "--check"], capfd)
    assert code == 2 and "pip install peft" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


# --- the real model --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_exports_randlora_on_smollm2_with_check(tmp_path, capfd):
    """The command line end to end on SmolLM2-135M in 4 bits: a RandLoRA of three layer shapes at --rank 256
    (v_proj, 192 wide, is kept whole), checked on one example per task."""
    adapter = make_adapter("smollm2-135m-instruct", tmp_path / "randlora", bits=4, kind="randlora", r=16, alpha=320,
                           targets=TARGETS)
    out = tmp_path / "export"
    code, err = lrft_main(["merge", str(adapter), "--output", str(out), "--format", "lora", "--rank", "256", "--check",
                           "--check-limit", "1"], capfd)
    assert code == 0, err
    report = json.loads((out / "lrft_export.json").read_text())
    assert report["r"] == 256 and report["vllm_max_lora_rank"] == 256 and report["trained_on"]["quantization_bits"] == 4
    narrow = [entry for name, entry in report["layers"].items() if name.endswith("v_proj")]
    assert len(narrow) == 30 and all(entry["rank"] == 192 and entry["energy_kept"] == pytest.approx(1.0) for entry in narrow)
    check = report["check"]  # a random adapter truncated to 256 of 576: the numbers are reported, whatever they are
    assert check["examples"] == 8 and check["prompts"] == 4 and check["quantization_bits"] == 4
    assert all(math.isfinite(check[key]) for key in ("max_abs_logit_diff", "mean_kl", "accuracy_change"))
    assert check["max_abs_logit_diff"] > 0 and f"{check['max_abs_logit_diff']:.4g}" in (out / "README.md").read_text()
