"""The machine a run or benchmark ran on, for run.json and the benchmark records: CPU model and the vector
extensions that change CPU kernel speed, cores, threads, GPU, library versions, and peak memory."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path
from typing import Any

import torch

from . import __version__


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated on a GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def library_versions() -> dict[str, str]:
    """lrft's, Python's and the main libraries' versions."""
    import importlib.metadata as md

    out = {"lrft": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "bitsandbytes", "accelerate", "datasets", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_info() -> dict[str, Any]:
    """The hardware a run or benchmark ran on: CPU model and the vector extensions that change CPU kernel
    speed (AVX-512, AVX512-BF16 and AMX machines are several times faster than AVX2 ones), cores, torch
    threads, and the GPU if one is used."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_flags": [],
                            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
                break
    except OSError:
        pass
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
