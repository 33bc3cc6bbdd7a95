"""``lrft report``: the summary table and the picture of one or several training runs.

A run folder (the ``output_dir`` of ``lrft train``) holds ``metrics.jsonl`` (one record per logged step),
``run.json`` (``finished`` appears only when the run ended normally), ``recipe.yaml`` and, when the recipe
evaluates, ``eval.json``. A run that is still going or was interrupted has records but no ``finished``: it
is reported as "running/stopped at step N" (lrft cannot tell the two apart from the folder).

Smoothing. The training loss of a single step is noisy; the table's "train loss" and the thick line of the
picture are an exponential moving average (EMA) over the logged losses in step order, bias-corrected (every
value is a weighted mean of the losses so far, so it starts at the first loss instead of at 0)::

    span  s = min(200, max(1, n // 10))      n: number of finite logged losses of the run
    beta    = 1 - 2 / (s + 1)                 (s = 1: no smoothing)
    ema_k   = sum_{j<=k} beta^(k-j) x_j / sum_{j<=k} beta^(k-j)

where j and k count finite losses only: a step skipped for a non-finite loss (``loss: null``) neither
contributes nor decays, and is a gap in both lines. "final train loss" is ema at the last finite loss.
The tokens/s panel uses the same smoothing.

Outputs: ``write_run_report(RUN_DIR)`` writes ``RUN_DIR/report.png``; ``run_report`` prints the table and
writes ``RUN_DIR/report.png`` for one run, and for several runs ``report-compare.png`` in the current
folder (a comparison never overwrites a run's own report), or ``--output FILE.png``.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UserError
from .io import write_bytes_atomic

COMPARE_NAME = "report-compare.png"
FIGSIZE = (13, 8)  # inches, at DPI: 1300 x 800 pixels
DPI = 100
MAX_SPAN = 200
INSTALL_HINT = "pip install 'lrft[plot]'"


# --- reading a run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    records: list[dict]  # metrics.jsonl, one per logged step, sorted by step
    info: dict = field(default_factory=dict)  # run.json
    recipe: dict = field(default_factory=dict)  # recipe.yaml
    eval: Optional[dict] = None  # eval.json

    @property
    def finished(self) -> bool:
        return bool(self.info.get("finished"))

    @property
    def steps_done(self) -> int:
        last = self.records[-1]["step"] if self.records else 0
        return int(self.info.get("final_step") or last) if self.finished else last

    @property
    def steps_planned(self) -> Optional[int]:
        total = self.info.get("total_steps")
        return int(total) if total is not None else None

    @property
    def adapter(self) -> dict:
        adapter = self.recipe.get("adapter")
        return adapter if isinstance(adapter, dict) else {}


def load_run(run_dir: Path | str) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; give a run folder (the output_dir of `lrft train`, e.g. runs/NAME)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        hint = next((f"; did you mean {p}?" for p in path.parents[:2] if (p / "metrics.jsonl").is_file()), "")
        raise UserError(
            f"{path} is not an lrft run folder (no metrics.jsonl); give the output_dir of `lrft train`, "
            f"e.g. runs/NAME{hint}"
        )
    recipe = _read_optional(path / "recipe.yaml", _parse_yaml)
    evaluation = _read_optional(path / "eval.json", json.loads)
    info = _read_optional(path / "run.json", json.loads)
    return Run(path, _read_metrics(metrics), info or {}, recipe or {}, evaluation)


def _read_metrics(path: Path) -> list[dict]:
    """The records, one per step (the last record of a step wins), sorted by step. A last line cut short
    (the run was killed while appending it) is ignored; a bad line anywhere else is an error."""
    lines = path.read_text().splitlines()
    by_step: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                break
            raise UserError(f"{path}:{number} is not a metrics record; fix or delete that line") from None
        by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def _read_optional(path: Path, parse) -> Any:
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text())
    except ValueError:
        raise UserError(f"{path} cannot be parsed; fix or delete it") from None
    return value if isinstance(value, dict) else None


def _parse_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def labels_for(paths: Sequence[Path]) -> list[str]:
    """Folder names; a name two runs share gets as many parent folders as tell it apart (then a counter)."""
    parts = [Path(p).resolve().parts for p in paths]

    def label(i: int) -> str:
        for depth in range(1, len(parts[i]) + 1):
            mine = parts[i][-depth:]
            if all(other[-depth:] != mine for j, other in enumerate(parts) if j != i):
                return "/".join(mine)
        return "/".join(parts[i][1:]) + f" ({sum(other == parts[i] for other in parts[:i]) + 1})"

    return [label(i) for i in range(len(parts))]


# --- the maths -------------------------------------------------------------------------------------------


def _number(value: Any) -> Optional[float]:
    """A finite float, or None (null, NaN, inf, missing)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def series(run: Run, key: str) -> tuple[list[int], list[Optional[float]]]:
    """Steps and values of the records that have ``key``; non-finite values (a skipped step) are None."""
    kept = [r for r in run.records if key in r]
    return [int(r["step"]) for r in kept], [_number(r[key]) for r in kept]


def ema_span(n: int) -> int:
    """The EMA span for a run with n finite logged values: a tenth of them, between 1 and 200."""
    return min(MAX_SPAN, max(1, n // 10))


def ema(values: Sequence[Optional[float]], span: Optional[int] = None) -> list[Optional[float]]:
    """Bias-corrected EMA (module docstring); None in, None out, and a None neither counts nor decays."""
    if span is None:
        span = ema_span(sum(v is not None for v in values))
    beta = 1.0 - 2.0 / (span + 1)
    total = weight = 0.0
    out: list[Optional[float]] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        total = beta * total + value
        weight = beta * weight + 1.0
        out.append(total / weight)
    return out


def summarize(run: Run, label: str) -> dict[str, Any]:
    """The table's row for one run (JSON-able: None where a value is absent)."""
    losses = series(run, "loss")[1]
    smoothed = [v for v in ema(losses) if v is not None]
    val = series(run, "val_loss")[1]
    val_finite = [v for v in val if v is not None]
    speeds = [v for v in series(run, "tokens_per_s")[1] if v is not None]
    memory = [v for v in series(run, "peak_mem_mb")[1] if v is not None]
    skipped = max(int(r.get("skipped_nonfinite") or 0) for r in [*run.records, run.info])  # cumulative counts
    best_val = min(val_finite) if val_finite else _number(run.info.get("best_val_loss"))
    return {
        "label": label,
        "run_dir": str(run.path),
        "status": "finished" if run.finished else "running/stopped",
        "adapter_type": run.adapter.get("type"),
        "adapter_r": run.adapter.get("r"),
        "steps_done": run.steps_done,
        "steps_planned": run.steps_planned,
        "final_train_loss": smoothed[-1] if smoothed else None,
        "train_loss_ema_span": ema_span(len(smoothed)),
        "final_val_loss": next((v for v in reversed(val) if v is not None), None),
        "best_val_loss": best_val,
        "median_tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_mem_mb": max(memory) if memory else None,
        "trainable_parameters": run.info.get("trainable_parameters"),
        "eval_mean_accuracy": _number(run.info.get("eval_mean_accuracy", (run.eval or {}).get("mean_accuracy"))),
        "skipped_steps": skipped,
    }


@dataclass
class LossAxis:
    """The training-loss panel's y-range: None (automatic) unless a few early points would squash the rest
    of the curve, in which case the range covers everything else and ``clipped`` lists those points."""

    ylim: Optional[tuple[float, float]] = None
    clipped: list[tuple[int, int, float]] = field(default_factory=list)  # (run index, step, loss)


def early_points(n: int) -> int:
    """How many leading points of a run may be left off the loss axis: 5% of them, 1 to 10; none below 20."""
    return 0 if n < 20 else min(10, max(1, n // 20))


def loss_axis(curves: Sequence[tuple[Sequence[int], Sequence[Optional[float]]]]) -> LossAxis:
    """Leave off the axis only outliers among the first few points of each run (``early_points``): those
    more than the whole range of the later points above the later points' maximum (a first-step spike
    that would squash the curve into less than half of the panel). Later spikes are never clipped, and
    nothing else is: the axis still covers every other point."""
    head, rest = [], []
    for index, (steps, values) in enumerate(curves):
        points = [(s, v) for s, v in zip(steps, values) if v is not None]
        k = early_points(len(points))
        head += [(index, s, v) for s, v in points[:k]]
        rest += [v for _, v in points[k:]]
    if not head or not rest:
        return LossAxis()
    threshold = max(rest) + (max(rest) - min(rest))
    clipped = [point for point in head if point[2] > threshold]
    if not clipped:
        return LossAxis()
    kept = rest + [v for _, _, v in head if v <= threshold]
    low, high = min(kept), max(kept)
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return LossAxis((low - pad, high + pad), clipped)


def memory_unit(max_mb: Optional[float]) -> tuple[str, float]:
    """("GB", 1024) from 1024 MB up (GB = 1024 MB, as peak_mem_mb counts MiB), else ("MB", 1)."""
    return ("GB", 1024.0) if max_mb is not None and max_mb >= 1024 else ("MB", 1.0)


def status_text(row: dict[str, Any]) -> str:
    planned = row["steps_planned"]
    of = f"/{planned}" if planned is not None else ""
    if row["status"] == "finished":
        return f"finished, {row['steps_done']}{of} steps"
    return f"running/stopped at step {row['steps_done']}{of}"


def _points(spans: Sequence[int]) -> str:
    return f"span {'/'.join(map(str, spans))} point{'s' if spans != [1] else ''}"


def adapter_text(row: dict[str, Any]) -> str:
    kind = row["adapter_type"] or "—"
    return f"{kind} r={row['adapter_r']}" if row["adapter_r"] is not None else kind


# --- the table -------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _memory(mb: Optional[float]) -> str:
    unit, scale = memory_unit(mb)
    return "—" if mb is None else f"{mb / scale:.2f} GB" if unit == "GB" else f"{mb:.0f} MB"


def print_summary(rows: Sequence[dict[str, Any]], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    spans = sorted({row["train_loss_ema_span"] for row in rows})
    table = Table(
        title="training runs",
        caption=f"train loss: EMA of the logged losses, {_points(spans)} "
        "(a tenth of them, 1 to 200); tokens/s: real (non-padding) tokens, median over steps",
    )
    columns = ["run", "adapter", "steps", "train loss", "val loss", "best val", "tokens/s", "peak mem", "trainable"]
    with_eval = any(row["eval_mean_accuracy"] is not None for row in rows)
    for name in columns + (["eval acc"] if with_eval else []):
        table.add_column(name, justify="left" if name in ("run", "adapter", "steps") else "right")
    for row in rows:
        steps = f"{row['steps_done']}/{row['steps_planned'] if row['steps_planned'] is not None else '?'}"
        if row["status"] != "finished":
            steps += " [yellow]running/stopped[/]"
        if row["skipped_steps"]:
            steps += f" [dim]({row['skipped_steps']} skipped)[/]"
        trainable = row["trainable_parameters"]
        cells = [
            escape(row["label"]), escape(adapter_text(row)), steps,
            _fmt(row["final_train_loss"], ".4f"), _fmt(row["final_val_loss"], ".4f"), _fmt(row["best_val_loss"], ".4f"),
            _fmt(row["median_tokens_per_s"], ",.0f"), _memory(row["peak_mem_mb"]),
            f"{trainable:,}" if isinstance(trainable, int) else "—",
        ]
        table.add_row(*cells, *([_fmt(row["eval_mean_accuracy"], ".3f")] if with_eval else []))
    console.print(table)


# --- the picture -----------------------------------------------------------------------------------------

_PANELS = [["loss", "loss", "val"], ["lr", "speed", "memory"]]
_RAW = dict(linewidth=0.8, alpha=0.35)
_SMOOTH = dict(linewidth=2.0)


def _nan(values: Sequence[Optional[float]]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def _with_markers(style: dict, n: int, size: float = 3) -> dict:
    """With few points, small markers too, so that a single step (or one between two gaps) shows."""
    return dict(style, marker="o", markersize=size) if n < 30 else dict(style)


def _loss_notes(curves, axis: LossAxis) -> list[str]:
    """What the loss panel's title must say: skipped steps (the gaps) and points left off the axis."""
    notes = []
    skipped = sorted({s for steps, values in curves for s, v in zip(steps, values) if v is None})
    if skipped:
        where = f"step {', '.join(map(str, skipped))}" if len(skipped) <= 3 else f"{len(skipped)} steps"
        notes.append(f"gap: loss skipped as non-finite at {where}")
    if axis.clipped:
        n, (_, step, value) = len(axis.clipped), max(axis.clipped, key=lambda point: point[2])
        notes.append(f"▲ {n} early point{'s' if n > 1 else ''} above the axis (up to {value:.3g} at step {step})")
    return notes


def _draw_loss(ax, runs: Sequence[Run], colours: Sequence[str]) -> None:
    curves = [series(run, "loss") for run in runs]
    spans = []
    for (steps, values), colour in zip(curves, colours):
        if steps:
            spans.append(ema_span(sum(v is not None for v in values)))
            ax.plot(steps, _nan(values), color=colour, **_with_markers(_RAW, len(steps)))
            ax.plot(steps, _nan(ema(values)), color=colour, **_with_markers(_SMOOTH, len(steps), 4))
    axis = loss_axis(curves)
    if axis.ylim is not None:
        ax.set_ylim(*axis.ylim)
        ax.plot([s for _, s, _ in axis.clipped], [axis.ylim[1]] * len(axis.clipped), linestyle="none", marker="^",
                markersize=7, color="black", clip_on=False, zorder=5)
    title = "training loss: thin = every logged step, thick = EMA"
    title += f" ({_points(sorted(set(spans)))})" if spans else ""
    notes = _loss_notes(curves, axis)
    ax.set_title(title + ("\n" + "  ·  ".join(notes) if notes else ""))
    ax.set_ylabel("loss (mean token cross-entropy, nats)")


def _draw_val(ax, runs: Sequence[Run], colours: Sequence[str]) -> None:
    drawn = False
    for run, colour in zip(runs, colours):
        steps, values = series(run, "val_loss")
        if any(v is not None for v in values):
            ax.plot(steps, _nan(values), color=colour, marker="o", markersize=5, linewidth=1.2)
            drawn = True
    ax.set_title("validation loss")
    if drawn:
        ax.set_ylabel("loss (nats)")
    else:
        ax.text(0.5, 0.5, "no validation loss logged\n(data.val_size, training.eval_steps)", ha="center",
                va="center", transform=ax.transAxes, color="grey")
        ax.set_yticks([])


def _draw_lr(ax, runs: Sequence[Run], colours: Sequence[str]) -> None:
    for run, colour in zip(runs, colours):
        steps, values = series(run, "lr")
        ax.plot(steps, _nan(values), color=colour, **_with_markers({"linewidth": 1.6}, len(steps)))
    ax.set_title("learning rate")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))


def _draw_speed(ax, runs: Sequence[Run], colours: Sequence[str]) -> None:
    for run, colour in zip(runs, colours):
        steps, values = series(run, "tokens_per_s")
        ax.plot(steps, _nan(values), color=colour, **_with_markers(_RAW, len(steps)))
        ax.plot(steps, _nan(ema(values)), color=colour, **_with_markers(_SMOOTH, len(steps), 4))
    ax.set_title("throughput")
    ax.set_ylabel("real tokens / s (padding excluded)")
    ax.set_ylim(bottom=0)


def _memory_title(runs: Sequence[Run]) -> str:
    kinds = {str(run.info.get("device", "")).split(":")[0] for run in runs}
    if kinds == {"cuda"}:
        return "peak GPU memory (CUDA allocated)"
    if kinds == {"cpu"}:
        return "peak memory (process RSS)"
    return "peak memory (GPU allocated / CPU RSS)"


def _draw_memory(ax, runs: Sequence[Run], colours: Sequence[str]) -> None:
    peaks = [v for run in runs for v in series(run, "peak_mem_mb")[1] if v is not None]
    unit, scale = memory_unit(max(peaks) if peaks else None)
    for run, colour in zip(runs, colours):
        steps, values = series(run, "peak_mem_mb")
        ax.plot(steps, [v / scale for v in _nan(values)], color=colour, **_with_markers({"linewidth": 1.6}, len(steps)))
    ax.set_title(_memory_title(runs))
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)


def _x_range(runs: Sequence[Run]) -> float:
    """To the last step, or to the planned end of a run that has not finished (its progress shows)."""
    right = max([run.records[-1]["step"] for run in runs if run.records] + [1])
    for run in runs:
        if not run.finished and run.steps_planned:
            right = max(right, run.steps_planned)
    return right


def _legend(figure, rows: Sequence[dict[str, Any]], colours: Sequence[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=3) for c in colours]
    texts = [f"{row['label']}: {adapter_text(row)}, {status_text(row)}" for row in rows]
    figure.legend(handles, texts, loc="outside lower center", ncols=min(len(rows), 3), fontsize="large", frameon=False)


def _suptitle(rows: Sequence[dict[str, Any]]) -> str:
    if len(rows) == 1:
        return f"training run {rows[0]['label']}"
    names = ", ".join(row["label"] for row in rows)
    return f"{len(rows)} training runs: {names if len(names) <= 90 else names[:89] + '…'}"


def report_figure(runs: Sequence[Run], rows: Sequence[dict[str, Any]]):
    """The picture (a ``matplotlib.figure.Figure``, FIGSIZE): five panels against the optimizer step, one
    colour per run; ``rows`` are the runs' ``summarize`` rows (labels and legend texts)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = figure.subplot_mosaic(_PANELS, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    _draw_loss(axes["loss"], runs, colours)
    _draw_val(axes["val"], runs, colours)
    _draw_lr(axes["lr"], runs, colours)
    _draw_speed(axes["speed"], runs, colours)
    _draw_memory(axes["memory"], runs, colours)
    right = _x_range(runs)
    for name, ax in axes.items():
        ax.set_xlim(0, right + max(0.5, 0.01 * right))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8 if name == "loss" else 5, integer=True))  # fits 5-digit steps
        ax.tick_params(labelbottom=True)  # the wide loss panel's scale differs from the panels below it
        if name in _PANELS[-1]:
            ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    if not any(run.records for run in runs):
        axes["loss"].text(0.5, 0.5, "no step logged yet", ha="center", va="center", transform=axes["loss"].transAxes)
    _legend(figure, rows, colours)
    figure.suptitle(_suptitle(rows), fontsize="x-large", fontweight="bold")
    return figure


def render(runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> bytes:
    """The picture as PNG bytes, 1300 x 800 pixels."""
    figure = report_figure(runs, rows)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


# --- the commands ----------------------------------------------------------------------------------------


def _have_matplotlib() -> bool:
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def _write(path: Path, data: bytes, fix: str) -> None:
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); {fix}") from None


def _check_output(output: Path | str) -> Path:
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name, e.g. {path / 'report.png'}")
    if path.suffix.lower() != ".png":
        raise UserError(f"--output {path} must name a .png file, e.g. {path.with_suffix('.png')}")
    if not _have_matplotlib():
        raise UserError(f"--output needs matplotlib; install it with `{INSTALL_HINT}` (or `pip install matplotlib`)")
    return path


def default_output(runs: Sequence[Run]) -> Path:
    """RUN_DIR/report.png for one run; report-compare.png in the current folder for several."""
    return runs[0].path / "report.png" if len(runs) == 1 else Path(COMPARE_NAME)


def write_run_report(run_dir: Path | str) -> Optional[Path]:
    """RUN_DIR/report.png (written atomically); None when matplotlib is not installed. Prints nothing."""
    if not _have_matplotlib():
        return None
    run = load_run(run_dir)
    path = run.path / "report.png"
    _write(path, render([run], [summarize(run, labels_for([run.path])[0])]), "check the folder's permissions")
    return path


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)  # a pipe or a file: keep rows whole


def run_report(
    run_dirs: Sequence[Path | str] | Path | str, output: Optional[Path | str] = None, console=None
) -> dict[str, Any]:
    """The ``report`` command: the table on the console and the PNG (at ``output``, or ``default_output``;
    skipped with a note when matplotlib is missing and no ``output`` was asked for).
    Returns ``{"runs": [row, ...], "plot": path or None}``."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise UserError("give at least one run folder (the output_dir of `lrft train`)")
    path = _check_output(output) if output is not None else None
    runs = [load_run(run_dir) for run_dir in run_dirs]
    rows = [summarize(run, label) for run, label in zip(runs, labels_for([run.path for run in runs]))]
    console = console or _console()
    print_summary(rows, console)
    if path is None and not _have_matplotlib():
        console.print(f"no picture: matplotlib is not installed ({INSTALL_HINT})", style="dim", markup=False)
        return {"runs": rows, "plot": None}
    path = path or default_output(runs)
    _write(path, render(runs, rows), "give a writable --output FILE.png")
    console.print(f"picture written to {path}", markup=False)
    return {"runs": rows, "plot": str(path)}
