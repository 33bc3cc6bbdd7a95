"""``lrft eval --compare A.jsonl B.jsonl``: the paired bootstrap against what it must give on rows built here
(no model): no difference for identical runs, the binomial interval of the paired differences, strata kept,
token-weighted losses, and one-line errors."""

import json
import math
import random

import pytest

from conftest import lrft_main
from lrft.compare import compare_files


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def accuracy_rows(correct, task="boolq"):
    return [{"id": f"{task}/{i}", "task": task, "index": i, "answer": "true", "correct": bool(c)} for i, c in enumerate(correct)]


def test_identical_runs_differ_by_nothing(tmp_path):
    rows = accuracy_rows([i % 3 == 0 for i in range(60)])
    result = compare_files(write_rows(tmp_path / "a.jsonl", rows), write_rows(tmp_path / "b.jsonl", rows))
    s = result["metrics"]["accuracy"]["boolq"]
    assert s["difference"] == 0 and s["low"] == 0 and s["high"] == 0 and s["p"] == 1.0
    assert result["only_a_correct"] == result["only_b_correct"] == 0


def test_the_interval_is_that_of_the_paired_differences(tmp_path):
    """B = A with 8 of 200 wrong answers turned right: every paired difference is 0 or 1, so the interval is
    the binomial one around 0.04 (normal approximation, sd 0.0139), which excludes 0; resampling A and B
    apart would give sd 0.05 and include it."""
    rng = random.Random(0)
    a = [rng.random() < 0.5 for _ in range(200)]
    wrong = [i for i, c in enumerate(a) if not c][:8]
    b = [c or i in wrong for i, c in enumerate(a)]
    result = compare_files(write_rows(tmp_path / "a.jsonl", accuracy_rows(a)), write_rows(tmp_path / "b.jsonl", accuracy_rows(b)))
    s = result["metrics"]["accuracy"]["boolq"]
    assert s["difference"] == pytest.approx(0.04)
    sd = math.sqrt(0.04 * 0.96 / 200)
    assert s["low"] == pytest.approx(0.04 - 1.96 * sd, abs=0.006) and s["high"] == pytest.approx(0.04 + 1.96 * sd, abs=0.006)
    assert s["low"] > 0 and s["p"] < 0.01
    assert result["only_b_correct"] == 8 and result["only_a_correct"] == 0


def test_tasks_are_strata_and_the_mean_is_over_tasks(tmp_path):
    a = accuracy_rows([True] * 10, "boolq") + accuracy_rows([False] * 30, "piqa")
    b = accuracy_rows([True] * 10, "boolq") + accuracy_rows([i < 15 for i in range(30)], "piqa")
    result = compare_files(write_rows(tmp_path / "a.jsonl", a), write_rows(tmp_path / "b.jsonl", b))
    metrics = result["metrics"]["accuracy"]
    assert metrics["boolq"]["n"] == 10 and metrics["piqa"]["n"] == 30
    assert metrics["piqa"]["difference"] == pytest.approx(0.5)
    # the mean over tasks, as mean_accuracy: (0 + 0.5) / 2, not 15 / 40
    assert metrics["mean"]["difference"] == pytest.approx(0.25)
    assert metrics["mean"]["a"] == pytest.approx(0.5) and metrics["mean"]["b"] == pytest.approx(0.75)
    # boolq never differs, so every resample of the mean is half piqa's: the interval is half piqa's
    assert metrics["mean"]["low"] == pytest.approx(metrics["piqa"]["low"] / 2, abs=0.02)


def test_losses_are_token_weighted(tmp_path):
    rng = random.Random(1)
    a, b = [], []
    for i in range(40):
        tokens, answer = rng.randint(20, 80), rng.randint(1, 10)
        loss_a, loss_b = rng.uniform(1, 3), rng.uniform(1, 3)
        for rows, loss in ((a, loss_a), (b, loss_b)):
            rows.append({"id": i, "index": i, "tokens": tokens, "loss_sum": loss * tokens, "answer_tokens": answer,
                         "answer_loss_sum": 0.5 * loss * answer})
    result = compare_files(write_rows(tmp_path / "a.jsonl", a), write_rows(tmp_path / "b.jsonl", b))
    assert result["kind"] == "loss"
    for metric, total, count in (("loss", "loss_sum", "tokens"), ("answer_loss", "answer_loss_sum", "answer_tokens")):
        mean = lambda rows: sum(r[total] for r in rows) / sum(r[count] for r in rows)  # noqa: E731
        s = result["metrics"][metric]["all"]
        assert s["a"] == pytest.approx(mean(a)) and s["b"] == pytest.approx(mean(b))
        assert s["low"] <= s["difference"] <= s["high"]


def test_the_command_writes_its_json(tmp_path, capfd):
    rows = accuracy_rows([True, False] * 10)
    a, b = write_rows(tmp_path / "a.jsonl", rows), write_rows(tmp_path / "b.jsonl", rows[::-1])
    out = tmp_path / "cmp.json"
    code, err = lrft_main(["eval", "--compare", str(a), str(b), "--output", str(out)], capfd)
    assert code == 0, err
    assert json.loads(out.read_text())["metrics"]["accuracy"]["boolq"]["n"] == 20


@pytest.mark.parametrize(
    "b_rows, extra, message",
    [
        (accuracy_rows([True] * 5), [], "different examples"),
        ([{**r, "answer": "false"} for r in accuracy_rows([True] * 6)], [], "different answer"),
        ([{"id": f"boolq/{i}", "tokens": 1, "loss_sum": 1.0, "answer_tokens": 1, "answer_loss_sum": 1.0} for i in range(6)],
         [], "same kind"),
        (accuracy_rows([True] * 6), ["--model", "m"], "loads no model"),
    ],
)
def test_bad_comparisons_exit_2(b_rows, extra, message, tmp_path, capfd):
    a = write_rows(tmp_path / "a.jsonl", accuracy_rows([True] * 6))
    b = write_rows(tmp_path / "b.jsonl", b_rows)
    code, err = lrft_main(["eval", "--compare", str(a), str(b), *extra], capfd)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_unreadable_files_exit_2(tmp_path, capfd):
    a = write_rows(tmp_path / "a.jsonl", accuracy_rows([True] * 6))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    for other, message in ((tmp_path / "none.jsonl", "does not exist"), (tmp_path / "bad.jsonl", "not valid JSON")):
        code, err = lrft_main(["eval", "--compare", str(a), str(other)], capfd)
        assert code == 2 and message in err, err
