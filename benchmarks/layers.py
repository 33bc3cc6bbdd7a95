"""Forward + backward of one adapted layer, per SmolLM2 projection shape: where RandLoRA's time goes.

For each shape of SmolLM2's seven targets, one frozen ``nn.Linear`` alone and wrapped in LoRA r=6
(RandLoRA r=32's parameter count on the whole model) and in RandLoRA r=32 with uniform (dense) and
sparse (s = √D) bases, the latter with one shared A and with one A_j per term (``keep_rank``). The
input needs a gradient, as every projection's does inside a model. Times are this process's CPU time
(``time.process_time``, one thread by default: the compute without the waits other processes add), the
variants stepped in turn so that contention hits them alike; the
median of ``--steps``; glibc's mmap threshold fixed as in run.py's timed steps (else fresh buffers are
mapped and faulted in on every call). A second table times the adapters' own part (``delta``) alone,
forward and backward. ``--profile`` adds torch.profiler's self-CPU shares for the sparse layer (the
profiler's own overhead inflates the shares of short ops).

    python benchmarks/layers.py [--tokens 512] [--steps 20] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import run as bench  # benchmarks/run.py: the allocator setting of its timed steps
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors

SHAPES = {"q, o": (576, 576), "k, v": (576, 192), "gate, up": (576, 1536), "down": (1536, 576)}
VARIANTS = {
    "base": None,
    "LoRA r=6": dict(type="lora", r=6, alpha=12),
    "RandLoRA dense": dict(type="randlora", r=32, alpha=640, basis="uniform"),
    "RandLoRA sparse": dict(type="randlora", r=32, alpha=640, basis="sparse"),
    # one sparse A_j per term (full rank): the M-gradient becomes torch's sampled product
    "RandLoRA sparse keep_rank": dict(type="randlora", r=32, alpha=640, basis="sparse", keep_rank=True),
}


def build(options, in_features: int, out_features: int) -> torch.nn.Module:
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
    if options is None:
        return base
    spec = get_adapter(options["type"])
    config = spec.config(**options)
    shared = SharedTensors(config.seed, {"layer": (in_features, out_features)})
    return spec.layer(base, config, shared, "layer").train()


def clear_grads(layer: torch.nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def step(layer: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.process_time()
    layer(x).square().mean().backward()
    elapsed = time.process_time() - start
    clear_grads(layer, x)
    return elapsed


def delta_step(layer: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """CPU seconds of the adapter's own forward and backward (the frozen layer left out)."""
    start = time.process_time()
    out = layer.delta(x)
    middle = time.process_time()
    out.backward(torch.ones_like(out))
    end = time.process_time()
    clear_grads(layer, x)
    return middle - start, end - middle


def timed_in_turn(variants: list[str], in_features: int, out_features: int, timer, tokens: int, steps: int):
    """{variant: [timer's result per step]}: every variant stepped once per round on the same input, the
    first 2 rounds dropped as warm-up."""
    layers = {name: build(VARIANTS[name], in_features, out_features) for name in variants}
    x = torch.randn(tokens, in_features, requires_grad=True)
    times: dict[str, list] = {name: [] for name in variants}
    for i in range(steps + 2):
        for name, layer in layers.items():
            elapsed = timer(layer, x)
            if i >= 2:
                times[name].append(elapsed)
    return times


def profile_sparse(in_features: int, out_features: int, x: torch.Tensor, steps: int) -> None:
    layer = build(VARIANTS["RandLoRA sparse"], in_features, out_features)
    step(layer, x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(layer, x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile, RandLoRA sparse {in_features}->{out_features}, {steps} steps (self CPU share):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"  {e.key:40s} {100 * e.self_cpu_time_total / total:5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench.set_malloc_thresholds(bench.TIMING_MMAP_THRESHOLD)
    print(f"{args.tokens} tokens, {args.threads} thread(s), CPU ms per forward + backward, median of {args.steps}")
    print(f"| layer (in→out) | {' | '.join(VARIANTS)} |")
    print(f"|---|{'---:|' * len(VARIANTS)}")
    for label, (in_features, out_features) in SHAPES.items():
        times = timed_in_turn(list(VARIANTS), in_features, out_features, step, args.tokens, args.steps)
        cells = " | ".join(f"{1e3 * statistics.median(t):.1f}" for t in times.values())
        print(f"| {in_features}→{out_features} ({label}) | {cells} |", flush=True)
    adapters = [name for name, options in VARIANTS.items() if options is not None]
    print(f"\nthe adapter alone (delta): CPU ms forward / backward, median of {args.steps}")
    print(f"| layer (in→out) | {' | '.join(adapters)} |")
    print(f"|---|{'---:|' * len(adapters)}")
    for label, (in_features, out_features) in SHAPES.items():
        times = timed_in_turn(adapters, in_features, out_features, delta_step, args.tokens, args.steps)
        cells = " | ".join(
            f"{1e3 * statistics.median(f for f, _ in t):.2f} / {1e3 * statistics.median(b for _, b in t):.2f}"
            for t in times.values()
        )
        print(f"| {in_features}→{out_features} ({label}) | {cells} |", flush=True)
    if args.profile:
        x = torch.randn(args.tokens, 576, requires_grad=True)
        profile_sparse(576, 1536, x, args.steps)


if __name__ == "__main__":
    main()
