"""inspect-rank: spectra and figures against naive float64 definitions, planted ranks, the closed form of
the orthogonality loss, the factored vs dense paths, PEFT folders against PEFT's own ΔW, and the command."""

import json
import sys

import pytest
import torch

from adapter_reference import naive_figures
from conftest import load_script, needs_cuda, tiny_llama_config
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors
from lrft.diagnostics import (
    LayerSpectrum,
    compute_spectra,
    dense_singular_values,
    factored_singular_values,
    layer_depth,
    module_type,
    orthogonality_loss,
    spectrum_figures,
)
from lrft.inspect_rank import inspect_adapters, load_adapter, run_inspect_rank
from lrft.errors import UserError
from lrft.adapter_folder import ShapeOnlyLinear, save_adapter


FLOAT32 = {"load": "float32", "compute": "float32", "frozen": "float32"}


# --- helpers ------------------------------------------------------------------------------------------


def write_adapter(folder, adapter_type, shapes, fill, **options):
    """An lrft adapter folder; ``shapes``: name -> (out, in); ``fill(name, layer)`` sets its tensors."""
    spec = get_adapter(adapter_type)
    config = spec.config(type=adapter_type, **options)
    shared = SharedTensors(config.seed, {name: (i, o) for name, (o, i) in shapes.items()})
    layers = {}
    for name, (out_features, in_features) in shapes.items():
        layer = spec.layer(ShapeOnlyLinear(in_features, out_features), config, shared, name)
        with torch.no_grad():
            fill(name, layer)
        layers[name] = layer
    base = {"base_model": {"name_or_path": "none"}, "quantization": {"bits": None}, "dtypes": FLOAT32}
    save_adapter(folder, layers, config, base)
    return folder


def random_fill(seed=0, scale=0.3):
    generator = torch.Generator().manual_seed(seed)

    def fill(name, layer):
        for key, p in layer.named_parameters():
            if not key.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=generator) * scale)

    return fill


def dense_delta(folder, name):
    """ΔW in float64: the product of the factors where there are factors (delta_weight() forms it in float32,
    whose rounding adds singular values of relative size 1e-7 that the entropy would count)."""
    layer = next(l for l in load_adapter(folder).layers if l.name == name)
    with torch.no_grad():
        factors = layer.factors()
        if factors is not None:
            return factors[0].double() @ factors[1].double()
        return layer.delta_weight(torch.device("cpu")).double()


def rows_by_name(payload):
    return {row["name"]: row for row in payload["layers"]}


def assert_figures_close(row, expected, rtol=1e-6):
    for key, value in expected.items():
        if key == "rank":
            assert row[key] == value, (row["name"], key)
        else:
            assert row[key] == pytest.approx(value, rel=rtol, abs=1e-9), (row["name"], key)


def inspect(folder, **kwargs):
    reports, top_r = inspect_adapters([folder], show_progress=False, **kwargs)
    return reports[0], top_r


# --- closed forms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,rank", [((12, 30), 12), ((30, 12), 12), ((20, 20), 4), ((9, 25), 3), ((25, 9), 9)])
def test_orthogonality_loss_closed_form_matches_dense(shape, rank):
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(rank, shape[1], generator=g, dtype=torch.float64)
    dense = ((dW @ dW.T - torch.eye(shape[0], dtype=torch.float64)) ** 2).sum().item()
    all_sigma = torch.linalg.svdvals(dW)  # min(m, n) values
    nonzero_sigma = all_sigma[:rank]  # what the factored path returns
    assert orthogonality_loss(all_sigma, shape[0]) == pytest.approx(dense, rel=1e-10)
    assert orthogonality_loss(nonzero_sigma, shape[0]) == pytest.approx(dense, rel=1e-10)


def test_orthogonality_loss_known_matrices(tmp_path):
    # rows orthonormal (m <= n): ΔWΔWᵀ = I exactly
    q, _ = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rows = q.T  # 8 × 32
    assert orthogonality_loss(torch.linalg.svdvals(rows), 8) == pytest.approx(0.0, abs=1e-20)
    # c·I_n: n (c² − 1)²
    c, n = 1.7, 16
    assert orthogonality_loss(torch.full((n,), c, dtype=torch.float64), n) == pytest.approx(n * (c**2 - 1) ** 2)

    # the same two through an adapter: LoRA with B = I / scaling, A = the matrix (r = min dim: dense path)
    def fill(name, layer):
        target = rows if name == "rows" else c * torch.eye(n, dtype=torch.float64)
        layer.lora_A.copy_(target.float())
        layer.lora_B.copy_(torch.eye(layer.out_features) / layer.scaling)

    rows_folder = write_adapter(tmp_path / "rows", "lora", {"rows": (8, 32)}, fill, r=8, target_modules=["x"])
    identity_folder = write_adapter(tmp_path / "identity", "lora", {"identity": (16, 16)}, fill, r=16, target_modules=["x"])
    rows_row = inspect(rows_folder)[0].rows[0]
    identity_row = inspect(identity_folder)[0].rows[0]
    assert rows_row["orth_loss"] == pytest.approx(0.0, abs=1e-9)
    assert rows_row["rank"] == 8
    assert identity_row["orth_loss"] == pytest.approx(n * (c**2 - 1) ** 2, rel=1e-6)
    assert identity_row["rank"] == n and identity_row["stable_rank"] == pytest.approx(n)
    assert identity_row["effective_rank"] == pytest.approx(n)


def test_factored_singular_values_match_svd_of_the_product():
    g = torch.Generator().manual_seed(2)
    B = torch.randn(3, 50, 6, generator=g, dtype=torch.float64)
    A = torch.randn(3, 6, 40, generator=g, dtype=torch.float64)
    expected = torch.linalg.svdvals(B @ A)[:, :6]
    torch.testing.assert_close(factored_singular_values(B, A), expected, rtol=1e-10, atol=1e-12)


def test_gram_path_is_used_when_accurate_and_replaced_by_svd_otherwise():
    g = torch.Generator().manual_seed(3)
    tall = torch.randn(2, 80, 20, generator=g, dtype=torch.float64)  # well conditioned
    sigma, methods = dense_singular_values(tall)
    assert methods == ["gram", "gram"]
    torch.testing.assert_close(sigma, torch.linalg.svdvals(tall), rtol=1e-9, atol=0)
    low_rank = torch.randn(1, 30, 3, generator=g, dtype=torch.float64) @ torch.randn(1, 3, 30, generator=g, dtype=torch.float64)
    sigma, methods = dense_singular_values(low_rank)
    assert methods == ["svd"]
    torch.testing.assert_close(sigma, torch.linalg.svdvals(low_rank))


def test_figures_of_a_zero_update():
    spectrum = LayerSpectrum("model.layers.3.mlp.up_proj", 12, 8, 4, torch.zeros(4, dtype=torch.float64), "factored")
    row = spectrum_figures(spectrum, top_r=4, tol=None)
    assert row["rank"] == 0 and row["sigma_max"] == 0 and row["top_r_energy"] is None
    assert row["orth_loss"] == 12  # ‖0 − I_12‖²
    assert (row["module_type"], row["depth"]) == ("up", 3)


def test_module_type_and_depth_from_names():
    assert module_type("model.layers.7.self_attn.q_proj") == "q"
    assert module_type("model.layers.7.mlp.gate_proj") == "gate"
    assert module_type("transformer.h.2.attn.c_attn") == "c_attn"
    assert layer_depth("model.layers.17.mlp.down_proj") == 17
    assert layer_depth("lm_head") is None


# --- lrft adapters ------------------------------------------------------------------------------------


SHAPES = {
    "model.layers.0.self_attn.q_proj": (48, 40),
    "model.layers.0.self_attn.k_proj": (24, 40),
    "model.layers.0.mlp.down_proj": (40, 64),
    "model.layers.1.self_attn.q_proj": (48, 40),
    "model.layers.1.self_attn.k_proj": (24, 40),
    "model.layers.1.mlp.down_proj": (40, 64),
}


def test_planted_rank_below_r_is_found(tmp_path):
    planted, r = 5, 12
    g = torch.Generator().manual_seed(4)

    def fill(name, layer):
        # B = U V with U (out × 5): ΔW = B A has rank 5 < r, up to float32 rounding of B
        layer.lora_B.copy_(torch.randn(layer.out_features, planted, generator=g) @ torch.randn(planted, r, generator=g))
        layer.lora_A.copy_(torch.randn(r, layer.in_features, generator=g))

    folder = write_adapter(tmp_path / "planted", "lora", SHAPES, fill, r=r)
    report, _ = inspect(folder)
    for row in report.rows:
        assert row["rank"] == planted, row["name"]
        assert row["rank_bound"] == r and row["method"] == "factored"


def test_planted_rank_through_zeroed_rows_of_A(tmp_path):
    def fill(name, layer):
        random_fill(5)(name, layer)
        layer.lora_A[5:] = 0.0  # exactly rank 5

    folder = write_adapter(tmp_path / "zeroed", "lora", SHAPES, fill, r=12)
    assert {row["rank"] for row in inspect(folder)[0].rows} == {5}


def test_random_lora_with_r_equal_to_the_smaller_side_is_full_rank(tmp_path):
    shapes = {"model.layers.0.mlp.up_proj": (56, 24), "model.layers.0.mlp.down_proj": (24, 56)}
    folder = write_adapter(tmp_path / "full", "lora", shapes, random_fill(6), r=24, target_modules=["up_proj", "down_proj"])
    for row in inspect(folder)[0].rows:
        assert row["rank"] == row["rank_bound"] == 24


@pytest.mark.parametrize("tol", [None, 1e-3])
def test_figures_match_naive_definitions(tmp_path, tol):
    folder = write_adapter(tmp_path / "lora", "lora", SHAPES, random_fill(7), r=6, alpha=9)
    report, top_r = inspect(folder, tol=tol)
    assert top_r == 6
    for row in report.rows:
        dW = dense_delta(folder, row["name"])
        assert_figures_close(row, naive_figures(dW, top_r, tol))


def test_orthogonality_of_the_factors(tmp_path):
    folder = write_adapter(tmp_path / "lora", "lora", SHAPES, random_fill(8), r=6, alpha=3)
    adapter = load_adapter(folder)
    report, _ = inspect(folder)
    for row, layer in zip(report.rows, adapter.layers):
        B, A = (t.double() for t in layer.orthogonality_factors())
        assert B.shape[1] == A.shape[0] == 6
        expected_A = ((A @ A.T - torch.eye(6, dtype=torch.float64)) ** 2).sum().item()
        expected_B = ((B.T @ B - torch.eye(6, dtype=torch.float64)) ** 2).sum().item()
        assert row["orth_loss_A"] == pytest.approx(expected_A, rel=1e-10)
        assert row["orth_loss_B"] == pytest.approx(expected_B, rel=1e-10)


@pytest.mark.parametrize("adapter_type,options", [("lora", {"r": 7}), ("adalora", {"r": 7}), ("lora2", {"r": 6, "k": 3})])
def test_factored_and_dense_paths_agree(tmp_path, adapter_type, options):
    folder = write_adapter(tmp_path / adapter_type, adapter_type, SHAPES, random_fill(9), **options)
    layers = load_adapter(folder).layers
    factored = compute_spectra(layers)
    dense = compute_spectra(layers, dense=True)
    assert {s.method for s in factored} == {"factored"}
    assert {s.method for s in dense} <= {"gram", "svd"}
    # the dense path forms ΔW in float32 (delta_weight()); its rounding is the only difference
    for a, b in zip(factored, dense):
        k = a.sigma.numel()
        torch.testing.assert_close(a.sigma, b.sigma[:k], rtol=1e-6, atol=1e-6 * a.sigma[0].item())
        assert b.sigma[k:].abs().max() <= 1e-6 * b.sigma[0]
        fa, fb = spectrum_figures(a, k, None), spectrum_figures(b, k, None)
        assert fa["rank"] == fb["rank"] == k
        for key in ("effective_rank", "stable_rank", "sigma_max", "fro_norm", "top_r_energy", "orth_loss"):
            assert fa[key] == pytest.approx(fb[key], rel=1e-5), key


def test_randlora_is_full_rank(tmp_path):
    shapes = {"model.layers.0.mlp.up_proj": (48, 32), "model.layers.0.mlp.down_proj": (32, 48)}

    def fill(name, layer):
        random_fill(10)(name, layer)

    folder = write_adapter(tmp_path / "randlora", "randlora", shapes, fill, r=8, target_modules=["up_proj", "down_proj"])
    report, top_r = inspect(folder)
    assert top_r == 8
    for row in report.rows:
        assert row["rank"] == row["rank_bound"] == 32
        assert row["method"] in ("gram", "svd") and "orth_loss_A" not in row
        assert_figures_close(row, naive_figures(dense_delta(folder, row["name"]), top_r))


def test_layers_regex_and_summaries(tmp_path):
    folder = write_adapter(tmp_path / "lora", "lora", SHAPES, random_fill(11), r=4)
    report, _ = inspect(folder, layers=r"self_attn")
    assert {module_type(row["name"]) for row in report.rows} == {"q", "k"}
    assert list(report.summary["by_module"]) == ["q", "k"]
    assert list(report.summary["by_depth"]) == ["0", "1"]
    q_rows = [row for row in report.rows if row["module_type"] == "q"]
    assert report.summary["by_module"]["q"]["layers"] == 2
    assert report.summary["by_module"]["q"]["mean_stable_rank"] == pytest.approx(sum(r["stable_rank"] for r in q_rows) / 2)
    assert report.summary["overall"]["layers"] == 4


def test_layers_needing_the_base_weight_are_loaded_with_their_model(tmp_path, monkeypatch):
    """DoRA-like adapters go through the recorded base model; the LoRA class stands in for one here."""
    from transformers import LlamaForCausalLM

    from lrft.adapters.lora import LoRALayer
    from lrft.inject import inject_adapters

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(tmp_path / "base")
    spec = get_adapter("lora")
    config = spec.config(type="lora", r=4, target_modules=["q_proj", "down_proj"])
    layers = inject_adapters(model, config)
    for name, layer in layers.items():
        with torch.no_grad():
            random_fill(12)(name, layer)
    base = {"base_model": {"name_or_path": str(tmp_path / "base"), "dtype": "float32"}, "quantization": {"bits": None}}
    save_adapter(tmp_path / "adapter", layers, config, base)
    stub_rows = inspect(tmp_path / "adapter")[0].rows
    monkeypatch.setattr(LoRALayer, "needs_base_weight", True, raising=False)
    report, _ = inspect(tmp_path / "adapter")
    assert "base model" in report.adapter.notes[0]
    for a, b in zip(stub_rows, report.rows):
        assert a["name"] == b["name"]
        assert a["sigma_max"] == pytest.approx(b["sigma_max"], rel=1e-9) and a["rank"] == b["rank"]


# --- PEFT adapter folders ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_base(tmp_path_factory):
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


def peft_adapter(random_base, folder, peft_config, seed=0):
    """A PEFT adapter on the tiny base with random trainables; returns (peft model, adapted module names)."""
    pytest.importorskip("peft")
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(random_base)
    peft_model = get_peft_model(model, peft_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(folder)
    return peft_model


def peft_delta(peft_model, name):
    return peft_model.base_model.model.get_submodule(name).get_delta_weight("default").double()


TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]


def peft_configs():
    from peft import AdaLoraConfig, LoraConfig, RandLoraConfig, VeraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
        "rslora+alpha_pattern": LoraConfig(
            r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 3}, target_modules=TARGETS, init_lora_weights=False
        ),
        "adalora": AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=5, target_modules=TARGETS),
        "vera": VeraConfig(r=8, target_modules=TARGETS),
        "randlora": RandLoraConfig(r=8, target_modules=TARGETS),
    }


@pytest.mark.parametrize("kind", ["lora", "rslora+alpha_pattern", "adalora", "vera", "randlora"])
def test_peft_folder_delta_equals_peft_delta(random_base, tmp_path, kind):
    pytest.importorskip("peft")
    peft_model = peft_adapter(random_base, tmp_path / kind, peft_configs()[kind])
    adapter = load_adapter(tmp_path / kind)
    assert adapter.format == "peft"
    names = {layer.name for layer in adapter.layers}
    assert len(names) == 2 * len(TARGETS)
    for layer in adapter.layers:
        with torch.no_grad():
            ours = layer.delta_weight(torch.device("cpu")).double()
        expected = peft_delta(peft_model, layer.name)
        # both float32, summed in different orders (lrft's own layer, not a replica of PEFT's formula)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * max(1.0, float(expected.abs().max())))
    report, _ = inspect(tmp_path / kind)
    for row in report.rows:
        assert_figures_close(row, naive_figures(peft_delta(peft_model, row["name"]), report.adapter.r), rtol=1e-5)
    if kind in ("lora", "adalora", "vera"):
        assert {row["method"] for row in report.rows} == {"factored"}


def test_peft_dora_delta_equals_merged_minus_base(random_base, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peft_adapter(random_base, tmp_path / "dora", config)
    adapter = load_adapter(tmp_path / "dora")
    assert adapter.type == "peft-dora"
    base = {l.name: peft_model.base_model.model.get_submodule(l.name).get_base_layer().weight.detach().double().clone()
            for l in adapter.layers}
    merged = peft_model.merge_and_unload()
    for layer in adapter.layers:
        with torch.no_grad():
            ours = layer.delta_weight(torch.device("cpu")).double()
        expected = merged.get_submodule(layer.name).weight.detach().double() - base[layer.name]
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    rows = inspect(tmp_path / "dora")[0].rows
    assert all(row["rank_bound"] == min(row["shape"]) for row in rows)  # the magnitude makes it full rank


def test_peft_projection_not_saved_is_refused(random_base, tmp_path):
    pytest.importorskip("peft")
    from peft import VeraConfig

    peft_adapter(random_base, tmp_path / "vera", VeraConfig(r=8, target_modules=TARGETS, save_projection=False))
    with pytest.raises(UserError, match="save_projection=True"):
        load_adapter(tmp_path / "vera")


def test_unsupported_peft_type_is_refused(tmp_path):
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(UserError, match="not supported"):
        load_adapter(tmp_path / "ia3")


# --- the command --------------------------------------------------------------------------------------------


def run_cli(args):
    from lrft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["inspect-rank", *map(str, args)])
    return exit_info.value.code


def test_command_writes_json_and_plot_and_compares(tmp_path, capsys):
    first = write_adapter(tmp_path / "r4", "lora", SHAPES, random_fill(13), r=4)
    second = write_adapter(tmp_path / "r8", "lora", SHAPES, random_fill(14), r=8)
    code = run_cli([first, "--compare", second, "--json", tmp_path / "out" / "report.json", "--plot", tmp_path / "spectra.png"])
    assert code in (0, None)
    payload = json.loads((tmp_path / "out" / "report.json").read_text())
    assert payload["adapter"] == str(first) and payload["top_r"] == 4
    assert len(payload["layers"]) == len(SHAPES)
    for key in ("name", "shape", "rank_bound", "rank", "effective_rank", "stable_rank", "sigma_max", "fro_norm",
                "top_r_energy", "orth_loss", "orth_loss_A", "orth_loss_B"):
        assert key in payload["layers"][0]
    assert set(payload["summary"]) == {"overall", "by_module", "by_depth"}
    assert [c["adapter"] for c in payload["compare"]] == [str(second)]
    assert {row["rank"] for row in payload["compare"][0]["layers"]} == {8}
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "r4" in out and "r8" in out and "mean per module type" in out


def test_default_table_shows_the_rank_bound_beside_the_rank(tmp_path, capsys):
    folder = write_adapter(tmp_path / "a", "lora", SHAPES, random_fill(18), r=4)
    assert run_cli([folder]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "erank" in line)
    assert header.index("bound") < header.index("rank ") < header.index("erank")
    rows = [line.split("│") for line in lines if line.startswith("│") and "layers" not in line]
    body = [[cell.strip() for cell in row[1:-1]] for row in rows if row[1].strip() and row[2].strip().isdigit()]
    assert body and all(cells[2] == cells[3] == "4" for cells in body)  # bound = rank = r for a random LoRA


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tol", "2"], "--tol"),
        (["--layers", "("], "not a valid regex"),
        (["--layers", "nothing_matches"], "matches no layer"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_command_errors_are_one_line(tmp_path, capsys, extra, message):
    folder = write_adapter(tmp_path / "a", "lora", SHAPES, random_fill(15), r=4)
    assert run_cli([folder, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_missing_folder_is_a_user_error(tmp_path, capsys):
    assert run_cli([tmp_path / "nope"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    folder = write_adapter(tmp_path / "a", "lora", SHAPES, random_fill(16), r=4)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        run_inspect_rank(folder, plot=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_benchmark_generator_writes_an_inspectable_adapter(tmp_path):
    """benchmarks/inspect_rank.py (the LLaMA3-8B timing) at toy scale."""
    benchmark = load_script("benchmarks/inspect_rank.py", "inspect_rank_benchmark")
    shapes = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (8, 32), "mlp.down_proj": (32, 96)}
    benchmark.write_random_lora(tmp_path / "toy", shapes, blocks=3, rank=4)
    payload = run_inspect_rank(tmp_path / "toy")
    assert len(payload["layers"]) == 9
    assert {row["rank"] for row in payload["layers"]} == {4}


@needs_cuda
def test_cuda_matches_cpu(tmp_path):
    folder = write_adapter(tmp_path / "lora", "lora", SHAPES, random_fill(17), r=6)
    cpu, _ = inspect(folder)
    cuda, _ = inspect(folder, device="cuda")
    assert json.loads(json.dumps(cuda.rows[0]))  # JSON-ready
    for a, b in zip(cpu.rows, cuda.rows):
        assert a["rank"] == b["rank"]
        for key in ("sigma_max", "fro_norm", "stable_rank", "orth_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
