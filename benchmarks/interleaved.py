"""Whole-model optimizer steps of several configurations, interleaved step by step in one process.

``benchmarks/run.py`` measures each configuration in its own fresh process, which is right for peak
memory but makes the step-time ratios only as good as the machine's quiet: on a shared machine, a burst
of other work during one process and not the next moves a ratio by 2x or more. This script is the
check for that case. It builds every configuration (each on its own copy of the base model, as
``run.py``'s worker does), then runs one optimizer step of each in turn, round after round, so that
whatever the machine does hits every configuration alike, and reports per configuration the median
wall time and the median CPU time of this process (``time.process_time``) with one torch thread by
default: with one thread the CPU time excludes the time other processes hold the core, so it is the
steadiest measure of the compute itself on a busy machine.

    python benchmarks/interleaved.py --cases lrft:lora,peft:lora,lrft:randlora,peft:randlora
    python benchmarks/interleaved.py --cases lrft:randlora,lrft:lora-matched --steps 10 --profile

Case keys are ``run.py``'s (``lora``, ``dora``, ``vera``, ``randlora``, ``adalora``, ``randlora-sparse``,
``lora-matched``, ``gmlora``, ``rmlora``, ``lora2``, ``nola``), prefixed with ``lrft:`` or ``peft:``.
The model is ``run.py --quick``'s (the first 8 SmolLM2 blocks) unless ``--shape`` says otherwise.
Memory is not measured here (the configurations share one process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: the same cases, configs and model builder)


def build(impl: str, case: bench.Case, shape: bench.Shape, device):
    import torch

    model, frozen_dtype, _autocast = bench.load_base(shape, device)
    torch.manual_seed(0)
    controller, peft_adalora = None, False
    if impl == "lrft":
        from lrft.adapters import get_adapter
        from lrft.inject import count_trainable, inject_adapters, trainable_parameters

        config = bench.lrft_config(case, shape.targets)
        layers = inject_adapters(model, config, frozen_dtype)
        controller = get_adapter(case.adapter).controller(layers, config, bench.NOMINAL_TOTAL_STEPS)
        params, trainable = trainable_parameters(layers), count_trainable(layers)
    else:
        from peft import get_peft_model

        model = get_peft_model(model, bench.peft_config(case, shape.targets))
        peft_adalora = case.peft == "adalora"
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model.train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (shape.batch, shape.seq_len), generator=generator)

    one_step = bench.make_step(model, optimizer, controller, peft_adalora, input_ids, torch.ones_like(input_ids), input_ids.device)
    return one_step, trainable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", required=True, help="comma-separated impl:case, e.g. lrft:lora,peft:lora")
    parser.add_argument("--shape", default="smollm2-8blocks", choices=sorted(bench.SHAPES))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of one more step each")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    bench.set_malloc_thresholds(bench.TIMING_MMAP_THRESHOLD)
    device = torch.device("cpu")
    shape = bench.SHAPES[args.shape]
    shapes = bench.target_shapes(shape)
    randlora_count = bench.expected_trainable(
        bench.Case("r", "", "randlora", dict(r=32, alpha=640)), shapes, shape.targets
    )
    cases = {c.key: c for c in bench.cpu_cases(bench.closest_lora_rank(randlora_count, shapes))}
    runs = []
    for item in args.cases.split(","):
        impl, key = item.split(":")
        one_step, trainable = build(impl, cases[key], shape, device)
        runs.append({"name": item, "step": one_step, "trainable": trainable, "wall": [], "cpu": []})
        print(f"built {item}: {trainable:,} trainable", flush=True)

    for step in range(args.warmup + args.steps):
        for r in runs:
            w0, c0 = time.perf_counter(), time.process_time()
            r["step"](step)
            if step >= args.warmup:
                r["wall"].append(time.perf_counter() - w0)
                r["cpu"].append(time.process_time() - c0)
    reference = runs[0]
    ref_cpu, ref_wall = statistics.median(reference["cpu"]), statistics.median(reference["wall"])
    print(f"\n{shape.description}; batch {shape.batch} x {shape.seq_len}; {args.threads} thread(s); "
          f"{args.steps} interleaved steps after {args.warmup}")
    print(f"{'config':28s} {'trainable':>10s} {'cpu s':>7s} {'wall s':>7s} {'cpu/first':>9s} {'wall/first':>10s}")
    for r in runs:
        cpu, wall = statistics.median(r["cpu"]), statistics.median(r["wall"])
        r.update(median_cpu_s=cpu, median_wall_s=wall)
        print(f"{r['name']:28s} {r['trainable']:>10,} {cpu:7.3f} {wall:7.3f} {cpu / ref_cpu:9.2f} {wall / ref_wall:10.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for r in runs:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                r["step"](args.warmup + args.steps)
            print(f"\n--- {r['name']}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))
    if args.json:
        out = [{k: v for k, v in r.items() if k != "step"} for r in runs]
        Path(args.json).write_text(json.dumps(out, indent=2))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
