"""Time ``lrft inspect-rank`` on a random LoRA adapter shaped for a real model, without building the model.

The default is the reviewer's check: LoRA r = 64 on LLaMA3-8B's five published targets in all 32 blocks
(160 layers: q 4096×4096, k / v 1024×4096, up 14336×4096, down 4096×14336; 450 MB of float32 factors).

    python benchmarks/inspect_rank.py [--folder DIR] [--rank 64] [--blocks 32] [--threads 2]

The adapter is written with ``save_adapter`` from layers built around shape-only stand-in bases
(:class:`lrft.adapter_folder.ShapeOnlyLinear`), so only the adapter's own tensors are ever in memory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors
from lrft.adapter_folder import ShapeOnlyLinear, save_adapter
from lrft.inspect_rank import run_inspect_rank

# (out, in) of each target of one LLaMA3-8B block
LLAMA3_8B_BLOCK = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}


def write_random_lora(
    folder: Path | str,
    block_shapes: dict[str, tuple[int, int]] = LLAMA3_8B_BLOCK,
    blocks: int = 32,
    rank: int = 64,
    seed: int = 0,
    base_name: str = "meta-llama/Meta-Llama-3-8B",
) -> Path:
    """An lrft LoRA adapter folder with Gaussian A and B (ΔW of full rank ``rank`` in every layer)."""
    spec = get_adapter("lora")
    config = spec.config(type="lora", r=rank, target_modules=sorted({n.rsplit(".", 1)[-1] for n in block_shapes}))
    shared = SharedTensors(config.seed)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for block in range(blocks):
        for suffix, (out_features, in_features) in block_shapes.items():
            name = f"model.layers.{block}.{suffix}"
            layer = spec.layer(ShapeOnlyLinear(in_features, out_features), config, shared, name)
            with torch.no_grad():
                layer.lora_A.normal_(0.0, in_features**-0.5, generator=generator)
                layer.lora_B.normal_(0.0, 0.01, generator=generator)
            layers[name] = layer
    base = {
        "base_model": {"name_or_path": base_name, "dtype": "bfloat16"},
        "quantization": {"bits": 4, "compute_dtype": "bfloat16"},
        "dtypes": {"load": "bfloat16", "compute": "bfloat16", "frozen": "bfloat16"},
    }
    return save_adapter(folder, layers, config, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where to write the adapter (default: a temporary folder)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch) / "lora-llama3-8b"
        started = time.perf_counter()
        write_random_lora(folder, blocks=args.blocks, rank=args.rank)
        print(f"wrote {folder} in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        payload = run_inspect_rank(folder, json_out=Path(scratch) / "report.json")
        elapsed = time.perf_counter() - started
        ranks = sorted({row["rank"] for row in payload["layers"]})
        print(f"inspect-rank: {len(payload['layers'])} layers in {elapsed:.1f} s "
              f"({args.threads} threads); numerical ranks found: {ranks}")


if __name__ == "__main__":
    main()
