"""docs/evaluation.md's cross-check at full size: lm-eval's multiple-choice scoring of lrft's commonsense tasks
(``lrft eval --harness lrft_commonsense``) against ``lrft eval --mode loglik``, item by item, on a model.

    pip install -e '.[harness]'
    HF_HUB_OFFLINE=1 python benchmarks/harness_crosscheck.py [--adapter DIR | --model smollm2-135m-instruct] [--limit N]

writes benchmarks/results/harness-crosscheck.json and rewrites the table between its markers in
docs/evaluation.md (``--table-only`` rewrites it from that file). tests/test_harness.py checks the same on a
few items of every task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # lrft from this checkout; the sibling scripts

from docs_section import write_section  # noqa: E402
from memory import machine  # noqa: E402

PAGE = ROOT / "docs" / "evaluation.md"
RESULTS = ROOT / "benchmarks" / "results" / "harness-crosscheck.json"
BEGIN, END = "<!-- harness-crosscheck: begin (benchmarks/harness_crosscheck.py) -->", "<!-- harness-crosscheck: end -->"


def measure(adapter, model, limit, batch_size) -> dict:
    from lrft.evaluate import KNOWN_TASKS, candidate_labels, evaluate_model, read_task_records
    from lrft.harness import run_harness, task_manager
    from lrft.harness_tasks.utils import SHIPPED_DEV
    from lrft.inference import load_for_inference

    loaded = load_for_inference(Path(adapter) if adapter else None, model)
    names = [f"lrft_{task.lower().replace('-', '_')}" for task in KNOWN_TASKS]
    started = time.perf_counter()
    harness_rows: list = []
    harness = run_harness(loaded, names, task_manager(names, None, None), limit, batch_size, None, harness_rows)
    harness_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours_rows: list = []
    ours = evaluate_model(loaded.model, loaded.tokenizer, SHIPPED_DEV, None, limit, "loglik", batch_size, ours_rows)
    ours_seconds = time.perf_counter() - started
    theirs = {row["id"]: row for row in harness_rows}
    rows = []
    for task, name in zip(KNOWN_TASKS, names):
        records = read_task_records(SHIPPED_DEV / f"{task}.jsonl", task)[:limit]
        mine = [r for r in ours_rows if r["task"] == task]
        same, largest = 0, 0.0
        for i, (record, row) in enumerate(zip(records, mine)):
            labels = candidate_labels(task, record["instruction"])
            other = theirs[f"{name}/{i}"]
            same += labels[other["prediction"]] == row["prediction"]
            largest = max(largest, max(abs(a - b) for a, b in zip(other["scores"], row["scores"].values())))
        rows.append({"task": task, "n": len(mine), "same_choice": same, "max_abs_score_diff": largest,
                     "lrft_accuracy": ours["tasks"][task]["accuracy"], "lm_eval_acc": harness["tasks"][name]["metrics"]["acc"]})
    return {"model": loaded.name, "adapter": adapter, "lm_eval": harness["harness"]["lm_eval"], "limit": limit, "batch_size": batch_size, "machine": machine(),
            "seconds": {"lm_eval": round(harness_seconds, 1), "lrft_loglik": round(ours_seconds, 1)}, "tasks": rows}


def table(result: dict) -> str:
    lines = [
        f"Model: {result['model']}" + (f" + adapter {result['adapter']}" if result["adapter"] else "")
        + f"; lm-eval {result['lm_eval']}; {result['machine'].get('cpu', '')}.",
        "",
        "| task | items | same choice | max abs score difference | lrft loglik accuracy | lm-eval acc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["tasks"]:
        lines.append(f"| {r['task']} | {r['n']} | {r['same_choice']} | {r['max_abs_score_diff']:.1e} | "
                     f"{r['lrft_accuracy']:.3f} | {r['lm_eval_acc']:.3f} |")
    n = sum(r["n"] for r in result["tasks"])
    same = sum(r["same_choice"] for r in result["tasks"])
    lines.append(f"| all | {n} | {same} | {max(r['max_abs_score_diff'] for r in result['tasks']):.1e} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter")
    parser.add_argument("--model", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        model = None if args.adapter else (args.model or "smollm2-135m-instruct")
        result = measure(args.adapter, model, args.limit, args.batch_size)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    result = json.loads(RESULTS.read_text())
    write_section(BEGIN, END, "The cross-check at full size", table(result), PAGE)
    print(table(result))


if __name__ == "__main__":
    main()
