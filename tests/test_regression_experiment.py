"""experiments/regression.py (issue 20, part 1) on its tiny preset: the runs, the resumable result files, the
generated page and plot, and that the fits mean something (LoRA at rank ≥ 8 recovers a rank-8 target; on
a flat target it converges to the Eckart-Young optimum), plus the script's two RandLoRA ablation layers
against their formulas."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_script

pytestmark = pytest.mark.study

@pytest.fixture(scope="module")
def reg():
    return load_script("experiments/regression.py", "regression_experiment")


@pytest.fixture(scope="module")
def tiny(reg, tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    argv = ["--preset", "tiny", "--results", str(out / "results"), "--page", str(out / "regression.md")]
    threads = torch.get_num_threads()
    try:
        reg.main(argv)
    finally:
        torch.set_num_threads(threads)
    return out, argv


def _records(out: Path):
    return [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]


def test_every_run_has_a_result_file(reg, tiny):
    out, argv = tiny
    args = reg.parse_args(argv)
    expected = 0
    for shape, target, bkey, budget, method in reg.cells(args):
        if method.plan(shape[0], shape[1], budget) is not None:
            expected += len(method.lrs) + args.seeds - 1
    assert expected >= 40
    records = _records(out)
    assert len(records) == expected
    for r in records:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["environment"]["torch"] == torch.__version__
        assert r["steps"] >= 1 and r["stop"] in ("exact", "plateau", "max_steps")
        # the layer's forward applies its delta_weight(), which is what the error is measured on
        assert r["forward_gap"] < 1e-4
        # budgets matched within the script's tolerance
        assert abs(r["params"] - r["settings"]["budget_params"]) <= reg.MATCH * r["settings"]["budget_params"]


def test_lora_recovers_a_rank8_target_and_reaches_eckart_young_on_flat(reg, tiny):
    out, _ = tiny
    records = _records(out)
    lora8 = [r for r in records if r["settings"]["method"] == "lora" and r["settings"]["target"] == "rank8"
             and r["settings"]["options"]["r"] >= 8]
    assert lora8 and min(r["rel_error"] for r in lora8) < 1e-3
    best = [r for r in lora8 if r["phase"] == "seeds"]
    assert best and all(r["rel_error"] < 1e-3 for r in best)
    assert all(abs(r["rel_output_error"] - r["rel_error"]) < 0.05 for r in lora8)
    for r in records:
        if r["settings"]["method"] == "lora" and r["settings"]["target"] == "flat" and r["phase"] == "seeds":
            d, rank = r["d"], r["settings"]["options"]["r"]
            bound = reg.eckart_young("flat", d, rank)
            assert bound - 1e-4 <= r["rel_error"] < bound + 5e-3, (rank, r["rel_error"], bound)
    # a full-rank RandLoRA reaches rank d (what its parameterisation can reach), LoRA its r
    for r in records:
        if r["settings"]["method"] == "randlora":
            assert r["reachable_rank"] == r["d"]
        if r["settings"]["method"] in ("lora", "randlora_a"):
            assert r["reachable_rank"] == r["settings"]["options"]["r"]


def test_page_and_plot_are_generated_from_the_files(reg, tiny):
    out, argv = tiny
    page = (out / "regression.md").read_text()
    assert (out / "regression.png").stat().st_size > 1000 and "(regression.png)" in page
    assert "python experiments/regression.py" in page.splitlines()[5] + page  # the command is on the page
    args = reg.parse_args(argv)
    table = reg.collect(args)
    shown = [e for e in table.values() if "mean" in e]
    assert shown
    for e in shown:
        assert f"**{reg.fmt(e['mean'], e['std'])}**" in page
    assert "CPU budget" in page and "torch " + torch.__version__ in page
    # --render-only rebuilds the same page from the files
    (out / "regression.md").unlink()
    reg.main(argv + ["--render-only"])
    assert (out / "regression.md").read_text() == page


def test_existing_results_are_skipped(reg, tiny):
    out, argv = tiny
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    threads = torch.get_num_threads()
    try:
        reg.main(argv + ["--no-render"])
    finally:
        torch.set_num_threads(threads)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert before == after


def _randomize(layer):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if p.requires_grad and not n.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_ablation_layers_match_their_formulas(reg, shape):
    in_f, out_f = shape
    d = min(shape)
    W0 = torch.randn(out_f, in_f)
    x = torch.randn(5, in_f)
    # RandLoRA-a: ΔW = scaling (Σ_j B_j Λ_j)(Σ_j A_j Γ_j), rank r, N·(r + d) trainables
    model = reg._Holder(W0)
    layer = reg._inject_custom(model, reg.RandLoRAAveraged, {"r": 3, "terms": 5}, seed=0)
    _randomize(layer)
    B = layer.bases.B.double()
    left = sum(B[:, j * 3:(j + 1) * 3] @ torch.diag(layer.lambdas[j].double()) for j in range(5))
    right = sum(layer.A_terms[j].double() @ torch.diag(layer.gammas[j].double()) for j in range(5))
    C = layer.scaling * left @ right
    expected = C if in_f <= out_f else C.T
    torch.testing.assert_close(layer.delta_weight().double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((model(x) - x @ W0.T).double(), x.double() @ expected.T, atol=1e-3, rtol=1e-4)
    from lrft.inject import trainable_parameters

    assert sum(p.numel() for p in trainable_parameters({"proj": layer})) == 5 * (3 + d)
    assert int(torch.linalg.matrix_rank(expected)) == 3
    # RandLoRA-b: lrft's RandLoRA with n limited to N terms, N·r = d/2
    from adapter_reference import NAIVE

    model = reg._Holder(W0)
    layer = reg._inject_custom(model, reg.RandLoRAHalfRank, {"r": 2, "terms": d // 4}, seed=0)
    _randomize(layer)
    naive = NAIVE["randlora"](layer, dict(layer.named_parameters()))
    torch.testing.assert_close(layer.delta_weight().double(), naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close((model(x) - x @ W0.T).double(), x.double() @ naive.T, atol=1e-3, rtol=1e-4)
    assert int(torch.linalg.matrix_rank(naive)) == d // 2
    assert math.isclose(layer.scaling, 20.0)
