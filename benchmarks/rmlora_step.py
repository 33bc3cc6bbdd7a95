"""Cost of one GM-LoRA optimizer step against a LoRA step (RM-LoRA paper sec. 4.3).

One frozen 576->1536 nn.Linear (SmolLM2's up_proj shape), 512 tokens, r = 32, mask_rank = 8:
forward + backward + AdamW step (+ the controller's hooks), median of 10 steps. Times are this
process's CPU time (``time.process_time``: with one thread, the compute without the waits that other
processes on a shared machine add); the variants run interleaved, step by step, so that cache and
memory-bandwidth contention hits them alike.

    python benchmarks/rmlora_step.py [--threads N] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors


def make_variant(adapter_type: str, in_features: int, out_features: int, **options):
    spec = get_adapter(adapter_type)
    config = spec.config(type=adapter_type, **options)
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    layer = spec.layer(base, config, SharedTensors(config.seed), "up_proj").train()
    layers = {"up_proj": layer}
    controller = spec.controller(layers, config, total_steps=1000)
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-4, weight_decay=0.01)
    return layer, controller, optimizer


def one_step(variant, x: torch.Tensor, step: int) -> float:
    layer, controller, optimizer = variant
    start = time.process_time()
    controller.start_step(step)
    loss = layer(x).square().mean()
    extra = controller.extra_loss()
    if extra is not None:
        loss = loss + extra
    loss.backward()
    controller.before_optimizer_step(step, optimizer)
    optimizer.step()
    controller.after_optimizer_step(step, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--mask-rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    in_f, out_f = 576, 1536
    variants = {
        "lora": dict(adapter_type="lora", r=args.r),
        "gm-lora exact": dict(adapter_type="rmlora", r=args.r, mask_rank=args.mask_rank, orth_reg=0.0),
        "gm-lora grad_only": dict(
            adapter_type="rmlora", r=args.r, mask_rank=args.mask_rank, orth_reg=0.0, mask_mode="grad_only"
        ),
        "rm-lora exact (reg 0.1)": dict(adapter_type="rmlora", r=args.r, mask_rank=args.mask_rank, orth_reg=0.1),
    }
    print(f"{in_f}->{out_f}, {args.tokens} tokens, r={args.r}, mask_rank={args.mask_rank}, {args.threads} threads")
    for input_needs_grad in (False, True):
        built = {name: make_variant(in_features=in_f, out_features=out_f, **opts) for name, opts in variants.items()}
        x = torch.randn(args.tokens, in_f, requires_grad=input_needs_grad)
        times: dict[str, list[float]] = {name: [] for name in built}
        for step in range(args.steps + 3):
            for name, variant in built.items():
                elapsed = one_step(variant, x, step)
                if step >= 3:  # warm-up
                    times[name].append(elapsed)
        print(f"input needs grad: {input_needs_grad}")
        base = statistics.median(times["lora"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:26s} {median * 1e3:7.2f} ms CPU  ({median / base:.2f}x lora)")


if __name__ == "__main__":
    main()
