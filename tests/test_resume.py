"""Crash safety: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import lrft_main

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(model_dir, out, *extra):
    return [
        sys.executable, "-m", "lrft", "train", "recipes/smollm2-commonsense-lora.yaml",
        "--set", f"model.name_or_path={model_dir}", "--set", "data.cutoff_len=96", "--set", "data.val_size=0",
        "--set", "training.batch_size=4", "--set", "training.micro_batch_size=2", "--set", "training.save_steps=2",
        "--set", "training.save_total_limit=2", "--set", "adapter.dropout=0.1", "--set", "training.warmup_steps=2",
        "--max-steps", "8", "--output-dir", str(out), *extra,
    ]


def run(cmd, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kw)


def wait_for(path: Path, proc, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "process ended"
        assert time.time() - start < timeout
        time.sleep(0.05)


def test_sigkill_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    ref = tmp_path / "ref"
    assert run(train_cmd(tiny_model_dir, ref)).returncode == 0

    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(train_cmd(tiny_model_dir, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(out / "checkpoints" / "step-4" / "trainer_state.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()
    # what a kill in the middle of writing the next checkpoint leaves behind: a temporary folder, half full
    partial = out / "checkpoints" / ".step-6.tmp-killed"
    partial.mkdir(exist_ok=True)
    (partial / "adapter.safetensors").write_bytes(b"\x00" * 7)

    resumed = run(train_cmd(tiny_model_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(ref / "adapter" / "adapter.safetensors")
    b = load_file(out / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # only the last save_total_limit checkpoints are kept
    assert len(list((out / "checkpoints").glob("step-*"))) <= 2


def test_resume_refuses_changed_sections(checkpointed_run, tiny_model_dir, capfd):
    code, stderr = resume(tiny_model_dir, checkpointed_run, capfd, "--max-steps", "3", "--set", "adapter.r=8", "--set", "data.cutoff_len=80")
    assert code == 2
    assert "adapter.r, data.cutoff_len" in stderr and "cannot resume" in stderr


def test_sigterm_saves_a_checkpoint_and_exits_130(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = train_cmd(tiny_model_dir, out, "--max-steps", "200", "--set", "training.save_steps=1000")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "metrics.jsonl", proc)
    while not (out / "metrics.jsonl").read_text().strip():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stdout + stderr
    assert any((out / "checkpoints").glob("step-*/trainer_state.pt"))


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tmp_path_factory):
    """A finished 3-step run with a checkpoint at step 2."""
    from typer.testing import CliRunner

    from lrft.cli import app

    out = tmp_path_factory.mktemp("resume") / "run"
    result = CliRunner().invoke(app, train_cmd(tiny_model_dir, out, "--max-steps", "3")[3:])
    assert result.exit_code == 0, result.output
    return out


def resume(model_dir, out, capfd, *extra):
    """``lrft train ... --resume`` in this process: (exit code, stderr)."""
    return lrft_main(train_cmd(model_dir, out, "--resume", *extra)[3:], capfd)


@pytest.mark.parametrize(
    "key, change",
    [
        ("training.seed", ["--set", "training.seed=7"]),
        ("training.batch_size", ["--set", "training.batch_size=8"]),
        ("training.micro_batch_size", ["--set", "training.micro_batch_size=4"]),
        ("training.lr_scheduler", ["--set", "training.lr_scheduler=cosine"]),
        ("training.max_steps", ["--max-steps", "6"]),
        ("training.epochs", ["--set", "training.epochs=2"]),
        ("data.max_samples", ["--set", "data.max_samples=100"]),
    ],
)
def test_resume_refuses_changes_to_the_trajectory(checkpointed_run, tiny_model_dir, key, change, capfd):
    code, stderr = resume(tiny_model_dir, checkpointed_run, capfd, "--max-steps", "3", *change)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, stderr[-2000:]
    assert "cannot resume" in lines[0] and key in lines[0]


def test_resume_accepts_cadence_changes_and_extends_only_when_asked(checkpointed_run, tiny_model_dir, tmp_path, capfd):
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    cadence = ["--set", "training.logging_steps=2", "--set", "training.save_total_limit=3", "--set", "training.save_steps=1"]
    code, stderr = resume(tiny_model_dir, out, capfd, "--max-steps", "3", *cadence)
    assert code == 0, stderr[-3000:]

    code, stderr = resume(tiny_model_dir, out, capfd, "--max-steps", "5")
    assert code == 2 and "--extend-schedule" in stderr
    code, stderr = resume(tiny_model_dir, out, capfd, "--max-steps", "5", "--extend-schedule", *cadence)
    assert code == 0, stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["schedule_extended"] == {"at_step": 3, "from_total_steps": 3, "to_total_steps": 5}
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 5
    code, stderr = resume(tiny_model_dir, out, capfd, "--max-steps", "4", "--extend-schedule")
    assert code == 2 and "training.max_steps" in stderr


@pytest.mark.parametrize("damage", ["truncated", "wrong shape"])
def test_resume_from_a_damaged_checkpoint_adapter_is_one_line(checkpointed_run, tiny_model_dir, tmp_path, damage, capfd):
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    newest = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    weights = newest / "adapter" / "adapter.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
    else:
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("lora_A"))
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        save_file(tensors, str(weights))
    code, stderr = resume(tiny_model_dir, out, capfd, "--max-steps", "3")
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert str(weights) in lines[0] and ("truncated" in lines[0] if damage == "truncated" else "shape" in lines[0])
