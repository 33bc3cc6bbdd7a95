"""The benchmark's plan: every pair a goal of issue 8 compares runs back to back."""

import importlib.util
import sys

from conftest import ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


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


def test_workers_report_a_failing_or_overrunning_measurement():
    """The zygote forks one child per measurement: a child that raises and one past its timeout both come
    back as that measurement's error, and the zygote goes on serving."""
    bench = load_bench()
    workers = bench.Workers()
    try:
        failed = workers.run({"shape": "no-such-shape"}, timeout=60)
        assert failed["status"] == "error" and "no-such-shape" in failed["error"]
        spec = {"impl": "lrft", "case": {"key": "lora", "label": "LoRA", "adapter": "lora", "options": {}},
                "shape": "llama-tiny", "device": "cpu"}
        overran = workers.run(spec, timeout=0.01)
        assert overran == {"status": "error", "error": "timed out after 0 s"}
        assert workers.run({"shape": "again"}, timeout=60)["status"] == "error"
    finally:
        workers.close()
    assert workers.proc.returncode == 0
