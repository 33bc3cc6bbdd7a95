"""lrft report: the summary rows against values computed naively from synthetic run folders (no training),
the EMA formula, the loss axis's clipping of first-step spikes, the PNG (valid, 1300 x 800, one colour per
run), running/stopped runs, skipped steps, errors, and the behaviour without matplotlib.

``example_png(path)`` draws docs/report-example.png from ``realistic_runs`` (from the repository root:
``.venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); import test_report as t; t.example_png(PATH)"``).
"""

import io
import json
import math
import random
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from lrft.errors import UserError
from lrft.report import (
    COMPARE_NAME,
    ema,
    ema_span,
    load_run,
    loss_axis,
    report_figure,
    run_report,
    summarize,
    write_run_report,
)


# --- synthetic run folders -------------------------------------------------------------------------------


def write_run(folder: Path, records, info=None, adapter=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "run.json").write_text(json.dumps(info if info is not None else {}))
    recipe = {"adapter": adapter or {"type": "lora", "r": 8}, "training": {"seed": 42}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder


def records_for(steps: int, planned: int, seed: int = 0, loss=(3.8, 2.1), val_every=25, speed=900.0, memory=3300.0,
                skipped=(), spike=None):
    """As lrft.train.after_step writes them: a noisy decaying loss, warmup then linear decay, noisy
    tokens/s, slowly rising peak memory, a validation loss every ``val_every`` steps and at the end."""
    rng = random.Random(seed)
    warmup, records, n_skipped = max(1, planned // 10), [], 0
    for step in range(1, steps + 1):
        progress = step / planned
        value = loss[1] + (loss[0] - loss[1]) * math.exp(-4 * progress) + rng.gauss(0, 0.12)
        record = {
            "step": step,
            "epoch": round(progress, 4),
            "loss": spike if spike is not None and step == 1 else value,
            "lr": 2e-4 * (step / warmup if step <= warmup else max(0.0, 1 - (step - warmup) / (planned - warmup))),
            "tokens_per_s": speed * (0.45 if step == 1 else 1.0) + rng.gauss(0, speed * 0.04),
            "pad_fraction": 0.12,
            "step_time_s": 2.0,
            "peak_mem_mb": memory * (0.8 if step == 1 else 1.0) + 60 * progress,
            "grad_norm": 1.0,
        }
        if step in skipped:
            record["loss"] = None
            n_skipped += 1
        if n_skipped:
            record["skipped_nonfinite"] = n_skipped
        if val_every and (step % val_every == 0 or step == planned):
            record["val_loss"] = loss[1] + 0.12 + (loss[0] - loss[1]) * math.exp(-4 * progress) + rng.gauss(0, 0.02)
        records.append(record)
    return records


def info_for(planned: int, finished_at=None, device="cuda:0", trainable=4_718_592, **extra):
    info = {"seed": 42, "device": device, "trainable_parameters": trainable, "total_steps": planned}
    if finished_at is not None:
        info.update(finished="2025-01-01T00:00:00+0000", final_step=finished_at, seconds=321.0)
    info.update(extra)
    return info


def realistic_runs(base: Path) -> list[Path]:
    """A finished LoRA run (100 steps, a first-step spike) and a RandLoRA run stopped at step 60 of 100
    with one step skipped for a non-finite loss."""
    lora = write_run(base / "smollm2-lora", records_for(100, 100, seed=0, spike=9.5), info_for(100, 100),
                     {"type": "lora", "r": 16})
    randlora = write_run(
        base / "smollm2-randlora",
        records_for(60, 100, seed=1, loss=(3.9, 2.0), speed=780.0, memory=3100.0, skipped=(33,)),
        info_for(100, trainable=1_105_920), {"type": "randlora", "r": 10},
    )
    return [lora, randlora]


def example_png(path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_report(realistic_runs(Path(tmp) / "runs"), output=path, console=Console(file=io.StringIO()))


def console():
    return Console(file=io.StringIO(), width=250)


# --- naive references ------------------------------------------------------------------------------------


def naive_ema_last(values):
    """sum_j beta^(k-j) x_j / sum_j beta^(k-j) at the last finite value, span = clamp(n // 10, 1, 200)."""
    finite = [v for v in values if v is not None]
    span = min(200, max(1, len(finite) // 10))
    beta = 1 - 2 / (span + 1)
    k = len(finite) - 1
    weights = [beta ** (k - j) for j in range(len(finite))]
    return sum(w * x for w, x in zip(weights, finite)) / sum(weights), span


def naive_median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def read_records(folder: Path):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --- the maths -------------------------------------------------------------------------------------------


def test_ema_is_the_bias_corrected_weighted_mean_and_skips_gaps():
    assert ema([1.0, None, 3.0], span=3) == [1.0, None, pytest.approx((0.5 * 1 + 3) / 1.5)]
    assert ema([5.0, 1.0, 2.0], span=1) == [5.0, 1.0, 2.0]  # span 1: no smoothing
    assert ema([]) == [] and ema([None]) == [None]
    assert [ema_span(n) for n in (0, 1, 19, 20, 100, 2000, 10**6)] == [1, 1, 1, 2, 10, 200, 200]


def test_loss_axis_clips_only_an_early_spike_and_says_what():
    steps = list(range(1, 101))
    values = [2.0 + 1.5 * math.exp(-s / 30) for s in steps]
    assert loss_axis([(steps, values)]).ylim is None  # a plain decaying curve: nothing clipped
    spiked = [40.0] + values[1:]
    axis = loss_axis([(steps, spiked)])
    assert axis.clipped == [(0, 1, 40.0)]
    low, high = axis.ylim
    assert high >= max(values[1:]) and low <= min(values)  # every other point stays on the axis
    late = values[:80] + [40.0] + values[81:]  # a spike late in the run is data, never clipped
    assert loss_axis([(steps, late)]).ylim is None
    assert loss_axis([(steps[:10], [40.0] + values[1:10])]).ylim is None  # too few points to judge


# --- the summary -----------------------------------------------------------------------------------------


def test_summary_rows_equal_naive_values_from_the_files(tmp_path):
    folder = write_run(
        tmp_path / "run-a", records_for(57, 57, seed=3, val_every=10, skipped=(20,)),
        info_for(57, 57, eval_mean_accuracy=0.625), {"type": "randlora", "r": 10},
    )
    records = read_records(folder)
    out = console()
    result = run_report([folder], console=out)
    json.dumps(result, allow_nan=False)  # JSON-able
    (row,) = result["runs"]
    final_loss, span = naive_ema_last([r["loss"] for r in records])
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert row["final_train_loss"] == pytest.approx(final_loss, rel=1e-12)
    assert row["train_loss_ema_span"] == span == 5
    assert row["median_tokens_per_s"] == pytest.approx(naive_median([r["tokens_per_s"] for r in records]))
    assert row["best_val_loss"] == min(vals) and row["final_val_loss"] == vals[-1]
    assert row["peak_mem_mb"] == max(r["peak_mem_mb"] for r in records)
    assert (row["adapter_type"], row["adapter_r"], row["trainable_parameters"]) == ("randlora", 10, 4_718_592)
    assert (row["status"], row["steps_done"], row["steps_planned"]) == ("finished", 57, 57)
    assert (row["eval_mean_accuracy"], row["skipped_steps"], row["label"]) == (0.625, 1, "run-a")
    table = out.file.getvalue()
    peak_gb = f"{row['peak_mem_mb'] / 1024:.2f} GB"
    expected = ["run-a", "randlora r=10", "57/57", f"{final_loss:.4f}", f"{min(vals):.4f}", peak_gb, "4,718,592", "0.625"]
    assert all(text in table for text in expected), table
    assert result["plot"] == str(folder / "report.png")


def test_a_running_run_reports_the_last_logged_step(tmp_path):
    folder = write_run(tmp_path / "live", records_for(40, 100), info_for(100))
    with open(folder / "metrics.jsonl", "a") as fh:  # killed while appending a record
        fh.write('{"step": 41, "loss": 2.')
    out = console()
    (row,) = run_report([folder], console=out)["runs"]
    assert (row["status"], row["steps_done"], row["steps_planned"]) == ("running/stopped", 40, 100)
    assert "40/100 running/stopped" in out.file.getvalue()
    figure = report_figure([load_run(folder)], [row])
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["live: lora r=8, running/stopped at step 40/100"]
    assert figure.axes[0].get_xlim()[1] >= 100  # the planned end is on the axis: the progress shows


def test_a_skipped_step_is_a_gap_in_both_loss_lines(tmp_path):
    folder = write_run(tmp_path / "gappy", records_for(50, 50, skipped=(20, 21)), info_for(50, 50))
    run = load_run(folder)
    row = summarize(run, "gappy")
    assert row["final_train_loss"] == pytest.approx(naive_ema_last([r["loss"] for r in read_records(folder)])[0])
    assert row["skipped_steps"] == 2
    loss_panel = report_figure([run], [row]).axes[0]
    raw, smooth = loss_panel.get_lines()[:2]
    for line in (raw, smooth):
        y = dict(zip(line.get_xdata(), line.get_ydata()))
        assert math.isnan(y[20]) and math.isnan(y[21]) and not math.isnan(y[22])
    assert "skipped as non-finite at step 20, 21" in loss_panel.get_title()


def test_png_is_1300_by_800_at_the_run_folder(tmp_path):
    from matplotlib.image import imread

    folder = write_run(tmp_path / "run", records_for(100, 100, spike=9.5), info_for(100, 100))
    path = write_run_report(folder)
    assert path == folder / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (800, 1300)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # written atomically
    title = report_figure([load_run(folder)], [summarize(load_run(folder), "run")]).axes[0].get_title()
    assert "1 early point above the axis (up to 9.5 at step 1)" in title


def test_several_runs_overlay_with_one_colour_each_and_a_comparison_in_the_current_folder(tmp_path, monkeypatch):
    from matplotlib.image import imread

    first, second = realistic_runs(tmp_path / "x")
    third = write_run(
        tmp_path / "y" / "smollm2-lora", records_for(30, 30, val_every=0, memory=700), info_for(30, 30, device="cpu")
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = run_report([first, second, third], console=console())
    assert result["plot"] == COMPARE_NAME and imread(work / COMPARE_NAME).shape[:2] == (800, 1300)
    assert not (first / "report.png").exists()  # a comparison never overwrites a run's own picture
    labels = [row["label"] for row in result["runs"]]
    assert labels == ["x/smollm2-lora", "smollm2-randlora", "y/smollm2-lora"]
    figure = report_figure([load_run(p) for p in (first, second, third)], result["runs"])
    colours = {line.get_color() for line in figure.axes[0].get_lines() if line.get_marker() != "^"}
    assert len(colours) == 3
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert len(figure.legends) == 1 and [text.split(":")[0] for text in legend] == labels


def test_single_step_without_validation(tmp_path):
    folder = write_run(tmp_path / "one", records_for(1, 50, val_every=0, memory=200), info_for(50, device="cpu"))
    run = load_run(folder)
    (row,) = run_report([folder], output=tmp_path / "one.png", console=console())["runs"]
    assert row["final_train_loss"] == run.records[0]["loss"] and row["best_val_loss"] is None
    figure = report_figure([run], [row])
    val_panel = figure.axes[1]
    assert "no validation loss logged" in val_panel.texts[0].get_text()
    assert figure.axes[4].get_ylabel() == "MB"


# --- errors ----------------------------------------------------------------------------------------------


def test_errors_name_the_folder_and_the_fix(tmp_path):
    run = write_run(tmp_path / "run", records_for(5, 5), info_for(5, 5))
    (run / "adapter").mkdir()
    with pytest.raises(UserError, match=r"not an lrft run folder \(no metrics.jsonl\).*did you mean .*run\?"):
        run_report([run / "adapter"], console=console())
    with pytest.raises(UserError, match="missing is not a folder"):
        run_report([tmp_path / "missing"], console=console())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write .*a-file/report.png.*--output"):
        run_report([run], output=blocker / "report.png", console=console())
    with pytest.raises(UserError, match="is a folder"):
        run_report([run], output=tmp_path, console=console())
    with pytest.raises(UserError, match=r"\.png"):
        run_report([run], output=tmp_path / "report.pdf", console=console())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(UserError, match="metrics.jsonl:2 is not a metrics record"):
        run_report([run], console=console())


# --- without matplotlib ----------------------------------------------------------------------------------


def test_without_matplotlib_the_table_still_prints(tmp_path, monkeypatch):
    folder = write_run(tmp_path / "run", records_for(20, 20), info_for(20, 20))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert write_run_report(folder) is None
    out = console()
    result = run_report([folder], console=out)
    assert result["plot"] is None and not (folder / "report.png").exists()
    assert "20/20" in out.file.getvalue() and "pip install 'lrft[plot]'" in out.file.getvalue()
    with pytest.raises(UserError, match=r"pip install 'lrft\[plot\]'"):
        run_report([folder], output=tmp_path / "x.png", console=console())
    assert not (tmp_path / "x.png").exists()
