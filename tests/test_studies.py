"""experiments/study.py and the pages the studies generate: the results branch is fetched without overwriting
local results, committed to without touching the checked-out branch, missing with one line; and every page
in docs/ that a study renders is exactly what its result files give (``--render-only``)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, load_script

pytestmark = pytest.mark.study

sys.path.append(str(ROOT / "experiments"))
import study  # noqa: E402


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with a product commit on main and study.py pointed at it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / ".gitignore").write_text("experiments/results/\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-qm", "product")
    monkeypatch.setattr(study, "ROOT", repo)
    monkeypatch.setattr(study, "RESULTS", repo / "experiments" / "results")
    return repo


def test_commit_and_fetch_round_trip_without_touching_the_checkout(repo):
    results = study.RESULTS / "long"
    results.mkdir(parents=True)
    (results / "final-lora-s42.json").write_text('{"loss": 1.0}\n')
    assert study.changes() == ["A\texperiments/results/long/final-lora-s42.json"]
    first = study.commit("first result")
    assert first and study.branch_commit() == first and study.commit("again") is None  # nothing new
    assert git(repo, "branch", "--show-current") == "main" and git(repo, "status", "--porcelain") == ""

    (results / "final-lora-s42.json").unlink()  # a partial folder never deletes results on the branch
    (results / "final-lora-s43.json").write_text('{"loss": 1.1}\n')
    second = study.commit("second result")
    assert git(repo, "rev-parse", f"{second}^") == first
    assert git(repo, "ls-tree", "-r", "--name-only", second).splitlines() == [
        "experiments/results/long/final-lora-s42.json", "experiments/results/long/final-lora-s43.json"]

    (results / "final-lora-s43.json").write_text('{"loss": 9.9}\n')  # a newer local file is kept
    assert study.fetch() == 1 and (results / "final-lora-s42.json").read_text() == '{"loss": 1.0}\n'
    assert (results / "final-lora-s43.json").read_text() == '{"loss": 9.9}\n'
    assert study.fetch(force=True) == 2 and (results / "final-lora-s43.json").read_text() == '{"loss": 1.1}\n'


def test_landed_results_travel_with_a_clone_of_main_alone(repo, tmp_path, monkeypatch):
    (study.RESULTS / "long").mkdir(parents=True)
    (study.RESULTS / "long" / "final-lora-s42.json").write_text('{"loss": 1.0}\n')
    results = study.commit("first result")
    merge = study.land()
    assert git(repo, "rev-parse", f"{merge}^2") == results and study.land() == merge  # once
    assert git(repo, "ls-tree", "-r", "--name-only", "HEAD").splitlines() == [".gitignore"]  # files untouched

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--single-branch", "--branch", "main", str(repo), str(clone))
    monkeypatch.setattr(study, "ROOT", clone)
    monkeypatch.setattr(study, "RESULTS", clone / "experiments" / "results")
    assert git(clone, "branch", "-a").split() == ["*", "main", "remotes/origin/HEAD", "->", "origin/main",
                                                     "remotes/origin/main"]
    assert study.branch_commit() == results and study.fetch() == 1
    assert (study.RESULTS / "long" / "final-lora-s42.json").read_text() == '{"loss": 1.0}\n'


def test_a_clone_without_the_branch_says_so_in_one_line(repo, tmp_path):
    with pytest.raises(study.MissingResults, match="git fetch origin study-results:study-results"):
        study.fetch()
    with pytest.raises(SystemExit) as exc:  # a study would otherwise rerun every finished run
        study.ensure(study.RESULTS)
    assert str(exc.value).count("\n") == 0 and "study-results" in str(exc.value)
    study.ensure(tmp_path / "scratch")  # a scratch folder needs no branch


# --- the pages --------------------------------------------------------------------------------------------


def test_long_runs_page_is_the_result_files(tmp_path):
    long_runs = load_script("experiments/long_runs.py", "long_runs_page")
    long_runs.main(["--render-only", "--doc", str(tmp_path / "long-runs.md")])
    assert (tmp_path / "long-runs.md").read_text() == (ROOT / "docs" / "long-runs.md").read_text()


def test_regression_page_is_the_result_files(tmp_path):
    regression = load_script("experiments/regression.py", "regression_page")
    regression.main(["--render-only", "--page", str(tmp_path / "regression.md")])
    assert (tmp_path / "regression.md").read_text() == (ROOT / "docs" / "regression.md").read_text()


def test_pilot_page_is_the_result_files(tmp_path):
    commonsense = load_script("experiments/commonsense.py", "commonsense_page")
    for png in (ROOT / "docs").glob("results-exp*-spectra.png"):  # inspect-rank's plots, made by the runs
        shutil.copy(png, tmp_path)
    commonsense.main(["--render-only", "--doc", str(tmp_path / "results.md")])
    assert (tmp_path / "results.md").read_text() == (ROOT / "docs" / "results.md").read_text()
