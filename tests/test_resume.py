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


def test_resume_refuses_changed_sections(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run(train_cmd(tiny_model_dir, out, "--max-steps", "3")).returncode == 0  # checkpoint at step 2
    proc = run(train_cmd(tiny_model_dir, out, "--resume", "--set", "adapter.r=8"))
    assert proc.returncode == 2
    assert "adapter.r" in proc.stderr and "cannot resume" in proc.stderr


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
