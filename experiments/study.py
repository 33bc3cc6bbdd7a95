#!/usr/bin/env python
"""What the studies in experiments/ share: their result files, and the settings and helpers that more than
one study uses (a study imports them from here, never from another study).

The result files live on the orphan branch ``study-results`` of this repository, not in the product tree
(docs/studies.md). ``fetch`` writes them into experiments/results/ (git-ignored); the study scripts call
``ensure`` first, so ``--render-only`` and ``--resume`` find every finished run. New result files are
recorded on the branch with ``commit``, which builds the commit in a temporary index: the checked-out
branch, its index and its working tree are not touched.

    python experiments/study.py fetch              # the branch's result files into experiments/results/
    python experiments/study.py status             # local result files that are new or differ from the branch
    python experiments/study.py commit -m MESSAGE  # record experiments/results/ on the branch
    python experiments/study.py land               # join the branch into main's history (no file changes)

Only main lands, so ``land`` is what makes a clone of main carry the results: ``fetch`` finds the newest
results commit in the checked-out history when the clone has no branch of that name.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the studies import lrft from this checkout, installed or not
    sys.path.insert(0, str(ROOT))

BRANCH = "study-results"
RESULTS = ROOT / "experiments" / "results"
RESULTS_PATH = "experiments/results"  # the same folder inside the branch's tree

# --- settings the studies share -----------------------------------------------------------------------

LRFT = [sys.executable, "-m", "lrft"]
TRAIN = "lrft/samples/commonsense/train_mix.jsonl"
HELDOUT = "lrft/samples/commonsense/train_500.jsonl"  # disjoint from train_mix.jsonl (see its NOTICE)
SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "up": (576, 1536), "down": (1536, 576)}  # (in, out)
# RM-LoRA regulariser weight used here. With the default squared form (eq. 10 as printed) and the authors'
# orth_reg = 0.1, the regulariser starts near 0.1 x 150 layers x (r + r) = 480 for r = 16 (A A^T is ~0 and
# B = 0 at init), against an LM loss of ~2: it would dominate the loss. 1e-3 brings it to ~5 at step 1,
# decaying to ~2.4 (the B term, which has zero gradient at B = 0) as A's rows normalise: comparable with
# the LM loss. See docs/results.md.
ORTH_REG = 1.0e-3
# LoRA²'s dual regulariser has the same problem: with orth_reg 0.1 (lrft's default when these runs were made; now
# 0.001), summed over 150 layers and
# six Gram penalties each, it starts near 1,220 against an LM loss of ~3.8 (measured: the LM loss did not move
# in 20 steps). 2.5e-4 starts it near 3.
LORA2_ORTH_REG = 2.5e-4
RANK_TOL = 0.1  # second rank count: singular values above 10 % of the largest


# --- helpers the studies share ------------------------------------------------------------------------


def child_env(threads: int) -> dict:
    """The environment of an lrft child process: ``threads`` BLAS/OpenMP threads, plain terminal output."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["TERM"] = "dumb"
    env.setdefault("COLUMNS", "120")
    return env


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_last(metrics: list[dict], key: str, k: int = 10) -> float:
    values = [m[key] for m in metrics if key in m]
    return statistics.mean(values[-k:]) if values else float("nan")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fill_facts(text: str, facts: dict[str, str]) -> str:
    """Replace every ``{{key}}`` by its fact; an unknown key is rendered "–" and named on stdout."""
    missing = sorted({key for key in re.findall(r"\{\{(\w+)\}\}", text) if key not in facts})
    if missing:
        print(f"[note] readings quote facts these results do not have, rendered as –: {', '.join(missing)}", flush=True)
    return re.sub(r"\{\{(\w+)\}\}", lambda m: facts.get(m.group(1), "–"), text)


# --- the results branch --------------------------------------------------------------------------------


class MissingResults(RuntimeError):
    """This clone has no results branch (CI clones main only)."""


def _git(*args: str, env: Optional[dict] = None, text: bool = True):
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=text,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise RuntimeError(f"git {' '.join(args[:2])} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return proc.stdout.strip() if text else proc.stdout


def _ref(ref: str) -> Optional[str]:
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RuntimeError:
        return None


MARK = f"{BRANCH}: "  # the first words of every results commit, so that one is found in main's history


def branch_commit() -> Optional[str]:
    """The results' commit: the local branch, else a fetched remote-tracking one, else the newest results
    commit in the checked-out history (``land`` joins them there); None without any."""
    local = _ref(f"refs/heads/{BRANCH}") or _ref(f"refs/remotes/origin/{BRANCH}")
    if local:
        return local
    try:
        return _git("rev-list", "-1", "--fixed-strings", f"--grep={MARK}", "HEAD") or None
    except RuntimeError:
        return None


def missing_branch_message() -> str:
    return (f"the study results are on the branch {BRANCH}, which neither this clone nor its history has: "
            f"git fetch origin {BRANCH}:{BRANCH} (docs/studies.md)")


def fetch(force: bool = False) -> int:
    """Write the branch's result files into experiments/results/; a file that exists is kept (a newer local
    result wins) unless ``force``. Returns how many files were written."""
    commit = branch_commit()
    if commit is None:
        raise MissingResults(missing_branch_message())
    archive = _git("archive", "--format=tar", commit, "--", RESULTS_PATH, text=False)
    written = 0
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            target = ROOT / member.name
            if not member.isfile() or (target.exists() and not force):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            written += 1
    return written


def ensure(folder) -> None:
    """Before a study reads or extends its results: fetch them when ``folder`` is (inside) experiments/results/.
    Without the branch a folder that already holds results is used as it is; an empty one ends the study with
    one line (it would otherwise rerun every finished run)."""
    path = Path(folder) if Path(folder).is_absolute() else ROOT / folder
    if path.resolve() != RESULTS.resolve() and RESULTS.resolve() not in path.resolve().parents:
        return  # a scratch folder (--results /tmp/...): nothing to fetch
    try:
        written = fetch()
    except MissingResults as exc:
        if any(path.glob("*.json")):
            return
        raise SystemExit(f"error: {exc}") from None
    if written:
        print(f"[study] fetched {written} result files from the branch {BRANCH}", flush=True)


def _results_tree(index: Path) -> tuple[Optional[str], str]:
    """(branch commit, tree) of the branch with experiments/results/ as it is on disk, in index file ``index``."""
    env = {"GIT_INDEX_FILE": str(index)}
    parent = branch_commit()
    _git("read-tree", *([parent] if parent else ["--empty"]), env=env)
    # --force: the folder is git-ignored in the product tree; --ignore-removal: a file missing on disk stays
    _git("add", "--force", "--ignore-removal", "--", RESULTS_PATH, env=env)
    return parent, _git("write-tree", env=env)


def changes() -> list[str]:
    """Result files on disk that the branch lacks or holds otherwise (``git diff --name-status`` lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        parent, tree = _results_tree(Path(tmp) / "index")
        base = parent or _git("hash-object", "-t", "tree", "/dev/null")
        return [line for line in _git("diff-tree", "-r", "--name-status", base, tree).splitlines() if line]


def commit(message: str) -> Optional[str]:
    """Record experiments/results/ on the branch (created if missing) as one commit; None when nothing changed.
    Files deleted on disk stay on the branch: a partial fetch never removes results."""
    local = _ref(f"refs/heads/{BRANCH}")  # the update below refuses to run if another commit landed meanwhile
    with tempfile.TemporaryDirectory() as tmp:
        parent, tree = _results_tree(Path(tmp) / "index")
        if parent and _git("rev-parse", f"{parent}^{{tree}}") == tree:
            return None
        message = message if message.startswith(MARK) else MARK + message
        new = _git("commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
    _git("update-ref", f"refs/heads/{BRANCH}", new, local or "")  # "": the local branch must not exist yet
    return new


def land() -> str:
    """Join the results into the checked-out branch's history: a merge that keeps that branch's files as they
    are (``-s ours``), so that a clone of main alone carries the results and ``fetch`` finds them. Returns
    the merge commit."""
    commit_ = branch_commit()
    if commit_ is None:
        raise MissingResults(missing_branch_message())
    proc = subprocess.run(["git", "merge-base", "--is-ancestor", commit_, "HEAD"], cwd=ROOT)
    if proc.returncode == 0:
        return _git("rev-parse", "HEAD")
    _git("merge", "-s", "ours", "--allow-unrelated-histories", "--no-edit", "-m", f"Land the study results ({commit_[:12]}) with the product tree's history", commit_)
    return _git("rev-parse", "HEAD")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="write the branch's result files into experiments/results/").add_argument(
        "--force", action="store_true", help="overwrite local files with the branch's")
    sub.add_parser("status", help="local result files that are new or differ from the branch")
    sub.add_parser("commit", help="record experiments/results/ on the branch").add_argument(
        "-m", "--message", required=True)
    sub.add_parser("land", help="join the branch into the checked-out history, files untouched (merge -s ours)")
    args = p.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"{fetch(args.force)} files written into {RESULTS_PATH}/ from {BRANCH} ({branch_commit()[:12]})")
        elif args.command == "status":
            lines = changes()
            print("\n".join(lines) if lines else f"{RESULTS_PATH}/ holds nothing that {BRANCH} lacks")
        elif args.command == "land":
            print(f"{BRANCH} is in the history of HEAD ({land()[:12]})")
        else:
            new = commit(args.message)
            print(f"{BRANCH}: {new[:12]}" if new else f"nothing to commit: {BRANCH} already holds {RESULTS_PATH}/")
    except (MissingResults, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)  # as lrft's own commands: the input (the checkout's state) is what is wrong


if __name__ == "__main__":
    main()
