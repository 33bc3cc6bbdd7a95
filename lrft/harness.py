"""lm-evaluation-harness on whatever lrft loads: ``lrft eval --harness TASK[,TASK...]``.

lm-eval (the optional extra ``harness``) runs its own tasks, prompts and metrics; lrft hands it the model
``--adapter`` or ``--model`` names, loaded as every other command loads it (an adapter folded into its
base once, or kept as trained with ``--keep-quantized``), through lm-eval's ``HFLM`` wrapper of an
in-memory model. So its numbers are lm-eval's numbers for that model, comparable with the tables that
quote lm-eval, and the adapter type does not matter.

Tasks are lm-eval's registry (``arc_easy``, ``hellaswag``, ``mmlu`` ...; their datasets come from the
Hugging Face hub, so the first run needs the network or a filled ``HF_DATASETS_CACHE``), task files of the
user's (``--include-path DIR``, as lm-eval's ``--include_path``), and lrft's own ``lrft_commonsense``
group (``lrft/harness_tasks``): the commonsense-8 tasks in lrft's prompt over the shipped dev subsets (or
``--data DIR``), which run offline and score exactly what ``lrft eval --mode loglik`` scores.
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Any, Optional, Union

from .errors import UserError

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
INSTALL_HINT = "pip install 'lrft[harness]' (or pip install lm-eval)"


def require_lm_eval():
    """The lm_eval package, or a one-line error saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"--harness needs lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None
    return lm_eval


def parse_task_names(harness: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in harness.split(",") if name.strip()))
    if not names:
        raise UserError("--harness is empty; give comma-separated lm-eval task names, e.g. --harness arc_easy,hellaswag")
    return names


def task_manager(names: list[str], include_path: Optional[Path], data: Optional[Path]):
    """An lm-eval TaskManager that knows every name in ``names``. lrft's tasks and ``include_path`` alone
    index in a moment; lm-eval's own registry (about 15 s) is indexed only when a name needs it. An
    unknown name is a one-line error with the closest known names."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise UserError(f"--include-path {include_path} is not a folder; give the folder of your lm-eval task .yaml files")
    paths = [str(TASKS_DIR)] + ([str(Path(include_path).expanduser())] if include_path is not None else [])
    metadata = {"data": str(Path(data).expanduser())} if data is not None else None
    manager = None
    for include_defaults in (False, True):
        manager = TaskManager(verbosity="ERROR", include_path=paths, include_defaults=include_defaults, metadata=metadata)
        known = set(manager.all_tasks)
        if all(name in known for name in names):
            return manager
    missing = next(name for name in names if name not in known)
    close = difflib.get_close_matches(missing, sorted(known), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown lm-eval task {missing!r}; {hint}`lm-eval ls tasks` lists lm-eval's tasks; lrft's own are "
        "lrft_commonsense and its lrft_<task> parts; your own task files go in --include-path DIR"
    )


def _metric_name(key: str) -> str:
    """lm-eval's "acc,none" -> "acc"; a filtered metric keeps its filter: "exact_match,strict-match" ->
    "exact_match/strict-match"."""
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}/{filter_name}"


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None  # lm-eval writes "N/A" where it has no stderr


def _examples(raw: dict, name: str) -> Optional[int]:
    """A task's evaluated examples; a group's, summed over its tasks."""
    if name in raw.get("n-samples", {}):
        return raw["n-samples"][name].get("effective")
    parts = [_examples(raw, part) for part in raw.get("group_subtasks", {}).get(name, [])]
    return sum(parts) if parts and None not in parts else None


def summarize(raw: dict) -> dict[str, dict]:
    """Each task's and group's metrics from lm-eval's results: {name: {"n": examples, "metrics": {..}}}."""
    summary = {}
    # a group is listed under "results" too; "groups" has its aggregate metrics
    for section in ("results", "groups"):
        for name, values in raw.get(section, {}).items():
            n = _examples(raw, name)
            entry = summary.setdefault(name, {"n": n, "metrics": {}, "group": False})
            entry["group"] = entry["group"] or section == "groups"
            for key, value in values.items():
                if "," in key and (_number(value) is not None or _metric_name(key) not in entry["metrics"]):
                    entry["metrics"][_metric_name(key)] = _number(value)
    return summary


def _choice(sample: dict) -> tuple[Any, Optional[list[float]]]:
    """(prediction, scores): for a multiple-choice sample the index of the most likely choice and every
    choice's log-likelihood; for a generated one its (filtered) text."""
    responses = sample.get("filtered_resps") or []
    if responses and all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], float) for r in responses):
        scores = [float(r[0]) for r in responses]
        return max(range(len(scores)), key=scores.__getitem__), [round(s, 6) for s in scores]
    return (responses[0] if len(responses) == 1 else responses), None


def sample_rows(raw: dict) -> list[dict]:
    """One row per example and task, as ``lrft eval --predictions`` writes them: id, task, index, prediction,
    answer, correct (from lm-eval's acc or exact_match where the task has one), the example's metrics and,
    for multiple choice, every choice's log-likelihood."""
    rows = []
    for task, samples in raw.get("samples", {}).items():
        for sample in samples:
            metrics = {m: _number(sample[m]) for m in sample.get("metrics", []) if m in sample}
            prediction, scores = _choice(sample)
            target = sample.get("target")
            row = {
                "id": f"{task}/{sample['doc_id']}",
                "task": task,
                "index": sample["doc_id"],
                "prediction": prediction,
                "answer": target if isinstance(target, (int, float, str)) or target is None else str(target),
                "metrics": metrics,
            }
            for key in ("acc", "exact_match"):
                if metrics.get(key) is not None:
                    row["correct"] = metrics[key] >= 1.0
                    break
            if scores is not None:
                row["scores"] = scores
            rows.append(row)
    return rows


def run_harness(
    loaded, names: list[str], manager, limit: Optional[int], batch_size: int, num_fewshot: Optional[int],
    predictions: Optional[list] = None, apply_chat_template: bool = False,
) -> dict:
    """lm-eval's ``simple_evaluate`` of ``loaded`` (a :class:`lrft.inference.Loaded`) on ``names``; lrft's
    results dictionary, the example rows appended to ``predictions``."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("lm-eval").setLevel(logging.ERROR)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model = loaded.model.eval()
    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    try:
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=predictions is not None, verbosity="ERROR", apply_chat_template=apply_chat_template,
            # few-shot examples as earlier turns of the conversation, as lm-eval does by default with a template
            fewshot_as_multiturn=apply_chat_template,
        )
    except (ConnectionError, OSError) as exc:
        raise UserError(
            f"an lm-eval task's dataset could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "lm-eval's tasks download their data from the Hugging Face hub: run once with the network, or use "
            "tasks over local files (lrft_commonsense, or your own with --include-path)"
        ) from None
    if predictions is not None:
        predictions.extend(sample_rows(raw))
    return {
        "mode": "harness",
        "harness": {"lm_eval": getattr(lm_eval, "__version__", None), "tasks": names, "num_fewshot": num_fewshot,
                    "apply_chat_template": apply_chat_template},
        "limit": limit,
        "batch_size": batch_size,
        "tasks": summarize(raw),
    }


def print_harness_results(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"lm-evaluation-harness {results['harness']['lm_eval'] or ''}".strip())
    table.add_column("task")
    table.add_column("n", justify="right")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    for name, entry in results["tasks"].items():
        metrics = entry["metrics"]
        shown = [m for m in metrics if not m.split("/")[0].endswith("_stderr")]
        for i, metric in enumerate(shown):
            base, _, filter_name = metric.partition("/")
            stderr = metrics.get(f"{base}_stderr" + (f"/{filter_name}" if filter_name else ""))
            value = metrics[metric]
            table.add_row(
                (name if not entry.get("group") else f"[bold]{name}[/bold]") if i == 0 else "",
                str(entry["n"]) if i == 0 and entry["n"] is not None else "",
                metric,
                "-" if value is None else f"{value:.4f}",
                "" if stderr is None else f"{stderr:.4f}",
            )
    console.print(table)


def harness_data(data: Optional[Union[str, Path]]) -> Optional[Path]:
    """``--data`` with ``--harness``: the folder lrft's own tasks read instead of the shipped dev subsets."""
    if data is None:
        return None
    path = Path(data).expanduser()
    if not path.is_dir():
        raise UserError(f"--data {data} with --harness must be a folder of <task>.json(l) files (for the lrft_ tasks)")
    return path
