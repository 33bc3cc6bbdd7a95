"""Paired comparison of two evaluations of the same examples: ``lrft eval --compare A.jsonl B.jsonl``.

Both files are ``lrft eval --predictions`` output (commonsense, ``--harness`` or ``--loss``), one row per
example with its ``id``. Two models scored on the same examples differ far less from one example to
the next than two independent samples would, so the comparison is paired: the examples are resampled
with replacement (10,000 times, seed 0), each resample scores both models on the same examples, and the
difference B - A gets a 95 % percentile interval and a two-sided p-value (twice the share of resamples
on the far side of zero, Koehn 2004). Resampling is stratified by task, so every resample keeps each
task's size, and the overall figure is the mean over tasks, as ``mean_accuracy`` is.

Accuracy rows (``correct``) compare accuracy; loss rows compare the answer-only loss and the
full-sequence loss, each the token-weighted mean (summed loss over summed tokens) as ``lrft eval --loss``
reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .io import read_json_lines

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
RESAMPLE_CHUNK = 500


def read_rows(path: Path) -> dict[str, dict]:
    """id -> row of a predictions file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--compare {path} does not exist; give two files written by lrft eval --predictions")
    rows: dict[str, dict] = {}
    for number, row in read_json_lines(path, str(path), "give a file written by lrft eval --predictions"):
        if not isinstance(row, dict) or "id" not in row:
            raise UserError(f"{path}, line {number}: no id; give a file written by lrft eval --predictions")
        rows[str(row["id"])] = row
    if not rows:
        raise UserError(f"{path} holds no rows; give a file written by lrft eval --predictions")
    return rows


def _kind(rows: dict[str, dict], path: Path) -> str:
    if all("correct" in r for r in rows.values()):
        return "accuracy"
    if all("answer_loss_sum" in r for r in rows.values()):
        return "loss"
    raise UserError(
        f"{path}: its rows have neither correct (accuracy) nor answer_loss_sum (lrft eval --loss) on every line; "
        "compare files written by lrft eval --predictions"
    )


class Measures:
    """Per-example figures of one file in a fixed example order; :meth:`score` gives a metric for any
    resampling of the examples (a tensor of index draws, one row per resample)."""

    def __init__(self, rows: list[dict], kind: str):
        self.kind = kind
        if kind == "accuracy":
            self.values = {"accuracy": (torch.tensor([float(bool(r["correct"])) for r in rows], dtype=torch.float64), None)}
        else:
            self.values = {
                "answer_loss": self._ratio(rows, "answer_loss_sum", "answer_tokens"),
                "loss": self._ratio(rows, "loss_sum", "tokens"),
            }

    @staticmethod
    def _ratio(rows, total, count):
        return (
            torch.tensor([float(r[total]) for r in rows], dtype=torch.float64),
            torch.tensor([float(r[count]) for r in rows], dtype=torch.float64),
        )

    def score(self, metric: str, draws: torch.Tensor) -> torch.Tensor:
        values, weights = self.values[metric]
        if weights is None:
            return values[draws].mean(-1)
        return values[draws].sum(-1) / weights[draws].sum(-1).clamp(min=1.0)


def _tasks(rows: list[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(str(row.get("task") or "all"), []).append(i)
    return groups


def paired_bootstrap(a_rows: list[dict], b_rows: list[dict], kind: str, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """{metric: {task or "mean": {n, a, b, difference, low, high, p}}}, rows in the same example order."""
    a, b = Measures(a_rows, kind), Measures(b_rows, kind)
    generator = torch.Generator().manual_seed(seed)
    tasks = {task: torch.tensor(members) for task, members in _tasks(a_rows).items()}
    resampled: dict[str, dict[str, list]] = {m: {t: [] for t in tasks} for m in a.values}
    # in chunks, so that a draw tensor stays small whatever the number of examples; the same draws serve
    # both models and every metric: the pairing
    for start in range(0, resamples, RESAMPLE_CHUNK):
        count = min(RESAMPLE_CHUNK, resamples - start)
        for task, index in tasks.items():
            draws = index[torch.randint(len(index), (count, len(index)), generator=generator)]
            for metric in a.values:
                resampled[metric][task].append(b.score(metric, draws) - a.score(metric, draws))
    out: dict[str, dict] = {}
    for metric in a.values:
        per_task = {}
        for task, index in tasks.items():
            score_a, score_b = float(a.score(metric, index[None])), float(b.score(metric, index[None]))
            per_task[task] = _summary(len(index), score_a, score_b, torch.cat(resampled[metric][task]))
        if len(tasks) > 1:
            mean_a = sum(s["a"] for s in per_task.values()) / len(tasks)
            mean_b = sum(s["b"] for s in per_task.values()) / len(tasks)
            mean_resampled = torch.stack([torch.cat(resampled[metric][t]) for t in tasks]).mean(0)
            per_task["mean"] = _summary(len(a_rows), mean_a, mean_b, mean_resampled)
        out[metric] = per_task
    return out


def _summary(n: int, a: float, b: float, resampled: torch.Tensor) -> dict:
    difference = b - a
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(resampled, torch.tensor([tail, 1 - tail], dtype=resampled.dtype)).tolist()
    if difference > 0:
        far = float((resampled <= 0).double().mean())
    elif difference < 0:
        far = float((resampled >= 0).double().mean())
    else:
        far = 0.5
    return {"n": n, "a": a, "b": b, "difference": difference, "low": low, "high": high, "p": min(1.0, 2 * far)}


def compare_files(a_path: Path, b_path: Path) -> dict:
    a_rows, b_rows = read_rows(a_path), read_rows(b_path)
    kind, b_kind = _kind(a_rows, a_path), _kind(b_rows, b_path)
    if kind != b_kind:
        raise UserError(f"{a_path} holds {kind} rows and {b_path} {b_kind} rows; compare two evaluations of the same kind")
    if a_rows.keys() != b_rows.keys():
        only_a, only_b = len(a_rows.keys() - b_rows.keys()), len(b_rows.keys() - a_rows.keys())
        raise UserError(
            f"the files hold different examples ({only_a} only in {a_path}, {only_b} only in {b_path}); compare "
            "evaluations of the same data, tasks and --limit"
        )
    ids = list(a_rows)
    if kind == "accuracy":
        differ = next((i for i in ids if a_rows[i].get("answer") != b_rows[i].get("answer")), None)
        if differ is not None:
            raise UserError(f"example {differ} has a different answer in each file; compare evaluations of the same data")
    a_list, b_list = [a_rows[i] for i in ids], [b_rows[i] for i in ids]
    result = {"a": str(a_path), "b": str(b_path), "kind": kind, "n": len(ids), "resamples": RESAMPLES, "seed": SEED,
              "level": LEVEL, "metrics": paired_bootstrap(a_list, b_list, kind)}
    if kind == "accuracy":
        result["only_a_correct"] = sum(1 for x, y in zip(a_list, b_list) if x["correct"] and not y["correct"])
        result["only_b_correct"] = sum(1 for x, y in zip(a_list, b_list) if y["correct"] and not x["correct"])
    return result


def _p_value(p: float, resamples: int) -> str:
    # no resample on the far side: all that can be said is below the resolution of the resamples
    return f"< {2 / resamples:.4f}" if p == 0 else f"{p:.3f}"


def print_comparison(result: dict, console) -> None:
    from rich.table import Table

    for metric, per_task in result["metrics"].items():
        table = Table(title=f"{metric}: B - A, paired bootstrap ({result['resamples']} resamples, {int(100 * result['level'])} % interval)")
        for column, justify in (("task", "left"), ("n", "right"), ("A", "right"), ("B", "right"), ("B - A", "right"),
                                ("interval", "right"), ("p", "right")):
            table.add_column(column, justify=justify, no_wrap=True)
        for task, s in per_task.items():
            if task == "mean":
                table.add_section()
            table.add_row(task, str(s["n"]), f"{s['a']:.3f}", f"{s['b']:.3f}", f"{s['difference']:+.3f}",
                          f"[{s['low']:+.3f}, {s['high']:+.3f}]", _p_value(s["p"], result["resamples"]))
        console.print(table)
    if result["kind"] == "accuracy":
        console.print(f"A: {result['a']}\nB: {result['b']}\nonly A right on {result['only_a_correct']} examples, "
                      f"only B right on {result['only_b_correct']}", highlight=False)
    else:
        console.print(f"A: {result['a']}\nB: {result['b']}  (lower loss is better)", highlight=False)


def run_compare(a_path: Path, b_path: Path, output: Optional[Path]) -> dict:
    from rich.console import Console

    from .io import write_json_atomic

    console = Console()
    result = compare_files(a_path, b_path)
    print_comparison(result, console)
    if output is not None:
        write_json_atomic(output, result)
        console.print(f"comparison written to {output}")
    return result
