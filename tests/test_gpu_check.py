"""The GPU check's CPU rehearsal (docs/gpu-check.md): every step runs on tiny shapes, so the script cannot
rot between GPU sessions; the CUDA-only step (FSDP through accelerate launch) reports itself skipped."""

import json
import subprocess
import sys

from conftest import ROOT


def test_cpu_rehearsal_runs_every_step(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--types", "lora", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["env"]["device"] == "cpu"
    for kind in ("lora",):  # every type on the GPU; one here, to keep the rehearsal short
        row = result["adapters"][kind]
        for bits in ("4", "8"):
            losses = row[f"train_{bits}bit"]["losses"]
            assert len(losses) == 3 and all(isinstance(v, float) for v in losses)
        assert row["merge"]["passed"] and row["eval_generate"]["n"] == 4
    assert set(result["headline"]["variants"]) == {
        "lrft LoRA r=32", "lrft RandLoRA r=30 (uniform)", "lrft RandLoRA r=30 (sparse, s=sqrt(D))", "peft LoRA r=32", "peft RandLoRA r=30",
    }
    assert all("tokens_per_s" in v for v in result["headline"]["variants"].values())
    assert result["resume"]["bit_identical"]  # the CPU is deterministic
    assert result["fsdp"] == {"skipped": "needs CUDA"}
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[adapters] lora: 4-bit loss") for line in lines)
    assert any(line.startswith("[resume] SIGKILL after the step-4 checkpoint") for line in lines)
