"""benchmarks/run.py: its run order (every pair a goal of issue 8 compares runs back to back) and its
forked worker processes."""

from dataclasses import asdict

import pytest
from conftest import load_script


def load_bench():
    return load_script("benchmarks/run.py", "bench_run")


def test_compared_pairs_run_back_to_back():
    bench = load_bench()
    plan = []
    for case in bench.cpu_cases(6):
        plan.append(bench.Measurement("lrft", case))
        if case.peft:
            plan.append(bench.Measurement("peft", case))
    order = bench.run_order(plan)
    assert sorted(map(id, order)) == sorted(map(id, plan))  # a permutation: nothing dropped or repeated
    position = {(m.impl, m.case.key): i for i, m in enumerate(order)}

    def adjacent(a, b):
        return abs(position[a] - position[b]) == 1

    for m in plan:
        if m.impl == "peft":
            assert adjacent(("lrft", m.case.key), ("peft", m.case.key)), m.case.key
    assert adjacent(("lrft", "randlora"), ("lrft", "lora-matched"))
    assert adjacent(("lrft", "lora-matched"), ("lrft", "randlora-sparse"))
    assert adjacent(("lrft", "gmlora"), ("lrft", "lora"))


@pytest.mark.parametrize("preload", [True, False])
def test_workers_measure_and_report_failures(preload):
    """The zygote forks one child per measurement: a measurement comes back with its counts and times, a
    child that raises and one past its timeout come back as that measurement's error, and the zygote
    goes on serving."""
    bench = load_bench()
    shape = bench.SHAPES["llama-tiny"]
    case = bench.Case("lora", "LoRA r=4", "lora", dict(r=4, alpha=8), "lora")
    expected = bench.expected_trainable(case, bench.target_shapes(shape), shape.targets)
    spec = {"impl": "lrft", "case": asdict(case), "shape": shape.name, "device": "cpu", "memory_steps": 1,
            "warmup": 0, "steps": 2, "threads": 1, "profile": False, "expected_trainable": expected}
    workers = bench.Workers(preload=preload)
    try:
        measured = workers.run(spec, timeout=120)
        assert measured["status"] == "ok", measured
        # 2 blocks x r=4 x (in + out) of q (128->128), k, v (128->64), up (128->256), down (256->128)
        assert measured["trainable"] == expected == 2 * 4 * (256 + 192 + 192 + 384 + 384)
        assert len(measured["step_s"]) == 2 and measured["adapter_file_bytes"] > 4 * expected
        failed = workers.run({"shape": "no-such-shape"}, timeout=60)
        assert failed["status"] == "error" and "no-such-shape" in failed["error"]
        overran = workers.run(spec, timeout=0.01)
        assert overran == {"status": "error", "error": "timed out after 0 s"}
        assert workers.run(spec, timeout=120)["status"] == "ok"
    finally:
        workers.close()
    assert workers.proc.returncode == 0


def test_memory_benchmark_row_and_table():
    """benchmarks/memory.py: a row from a plan and a (fake) measurement, and docs/memory.md's table from rows."""
    memory = load_script("benchmarks/memory.py", "bench_memory")
    terms = {"without_checkpointing": {"runtime": 1000.0, "activations": 1500.0, "heap_retention": 500.0},
             "with_checkpointing": {"runtime": 1000.0, "activations": 600.0, "heap_retention": 200.0}}
    plan = {"data": {"largest_micro_batch": [4, 132]},
            "peak_memory": {"without_checkpointing_mb": 3000.0, "with_checkpointing_mb": 1800.0, "terms_mb": terms}}
    off = memory.make_row("smollm2-x", False, plan, 2500.0, 2, 30.0, fixed_threshold_mb=2000.0)
    on = memory.make_row("smollm2-x", True, plan, 1300.0, 2, 40.0)
    assert (off["estimate_mb"], off["ratio"], off["pass"]) == (3000.0, 1.2, True)
    assert (on["estimate_mb"], round(on["ratio"], 2), on["pass"]) == (1800.0, 1.38, False)  # |1.38 - 1| > 0.25
    assert on["terms_mb"] == terms["with_checkpointing"] and on["working_set_ratio"] is None
    assert (off["working_set_mb"], off["working_set_ratio"]) == (2500.0, 1.25)  # the estimate less heap retention
    machine = {"cpu": "cpu", "cpu_cores": 2, "cpu_flags": "avx2", "versions": {"torch": "2"}}
    text = memory.table({"machine": machine, "date": "today", "rows": {"a": off, "b": on}})
    assert "| smollm2-x | off | 2 | 4 x 132 | 3,000 | 2,500 | 1.20 | yes | 2,500 | 2,000 | 1.25 |" in text
    assert "**no**" in text and "1 of 2 within" in text and "worst ratio is 1.38 (smollm2-x +checkpointing)" in text


def test_serve_table_rows():
    """benchmarks/serve_table.py: docs/deploy.md's table from (fake) export reports, the base alone as rank 0."""
    serve = load_script("benchmarks/serve_table.py", "bench_serve_table")
    check = {"base_model": "smollm2", "quantization_bits": 4, "examples": 160, "limit": 20, "prompts": 4,
             "max_abs_logit": 60.0, "max_abs_logit_diff": 12.5, "mean_kl": 0.5, "accuracy_change": -0.025,
             "predictions_changed": 96}
    shares = {k: {"energy_kept": v} for k, v in (("q", 0.2), ("v", 0.55), ("down", 0.16), ("all", 0.18))}
    export = {"check": check, "energy_by_module": shares, "file_bytes": 3 * 2**20, "dtype": "float32",
              "decomposition_seconds": 95.2, "layers": {"a": {}, "b": {}}, "decomposition": {"factored": 2}}
    base = {"check": {**check, "max_abs_logit_diff": 30.0, "accuracy_change": -0.05}, "file_bytes": 0}
    machine = {"cpu": "cpu", "cpu_cores": 2, "cpu_flags": "avx2", "versions": {"torch": "2", "peft": "0.21"}}
    config = {"type": "randlora", "r": 16, "alpha": 320, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    text = serve.table({"machine": machine, "date": "today", "adapter_config": config, "accuracy_adapter": 0.4125,
                        "rows": {"0": base, "8": export}})
    assert "| 0 | 0 | 0 | 0 | 0 | 30 | 0.5 | -0.0500 | 96 of 160 | 0.0 |" in text
    assert "| 8 | 0.200 | 0.550 | 0.160 | 0.180 | 12.5 | 0.5 | -0.0250 | 96 of 160 | 3.0 |" in text
    assert "through its factors (2 factored)" in text and "scores 0.4125" in text


def test_harness_crosscheck_table_is_in_the_docs_and_agrees():
    """benchmarks/harness_crosscheck.py: docs/evaluation.md holds the table of its committed result, in which
    lm-eval and lrft's loglik choose alike on every item."""
    import json

    crosscheck = load_script("benchmarks/harness_crosscheck.py", "bench_harness_crosscheck")
    result = json.loads(crosscheck.RESULTS.read_text())
    assert crosscheck.table(result) in crosscheck.PAGE.read_text()
    assert all(row["same_choice"] == row["n"] for row in result["tasks"])
    assert sum(row["n"] for row in result["tasks"]) == 1600


def test_peers_table_is_in_the_docs():
    """benchmarks/peers.py: docs/benchmarks.md holds the table of its committed result."""
    import json

    peers = load_script("benchmarks/peers.py", "bench_peers")
    result = json.loads(peers.RESULTS.read_text())
    assert peers.table(result) in (peers.ROOT / "docs" / "benchmarks.md").read_text()
