"""`make gpu-check`: one prepared command that proves lrft's CUDA path, in under 8 minutes on one H100/H200.

    make gpu-check                                    # = python benchmarks/gpu_check.py --device cuda
    python benchmarks/gpu_check.py --device cpu       # the rehearsal: tiny shapes, the CUDA-only parts skipped

No download: every model is the embedded SmolLM2-135M-Instruct or is built from a config with random weights.
Steps, in order, each printing one line per figure (docs/gpu-check.md says what to expect), the whole writing
one JSON file (benchmarks/results/gpu-check-<device>.json, or --out):

1. env: torch / CUDA / bitsandbytes versions, the GPU, bf16 support.
2. adapters: every registered type, 3 training steps (`lrft train`) in 4-bit nf4 (bfloat16 compute on
   CUDA) and in 8-bit, loss finite and falling; then `lrft merge` with verification and one
   `lrft eval --mode generate` batch on the 4-bit adapter. One line per type.
3. headline: a LLaMA3-8B-shaped model (random weights, nf4, bfloat16 autocast, gradient checkpointing,
   micro-batch 4 x 256, targets q k v up down): LoRA-32, RandLoRA-30 dense and sparse, PEFT LoRA-32 and
   RandLoRA-30 in turn on one base; tokens/s and peak memory (torch.cuda.max_memory_allocated), ratios.
4. resume: `lrft train` killed (SIGKILL) after its step-4 checkpoint, `--resume`d, against the
   uninterrupted run: bit-identical or the largest difference, stated.
5. fsdp: FSDP + QLoRA through `accelerate launch` with one process (CUDA only).

The CPU rehearsal (tests/test_gpu_check.py) runs 1-4 on tiny shapes: the tiny random Llama for steps 2
and 4, a 2-block random LLaMA for step 3; step 5 is skipped without CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


# --- 1. environment ---------------------------------------------------------------------------------


def check_env(ctx) -> dict:
    import importlib.metadata as md

    info = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "bitsandbytes": md.version("bitsandbytes"), "transformers": md.version("transformers"),
        "accelerate": md.version("accelerate"), "device": ctx.device.type,
    }
    if ctx.device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(ctx.device), bf16=torch.cuda.is_bf16_supported(),
                    memory_gb=round(torch.cuda.get_device_properties(ctx.device).total_memory / 2**30, 1))
    say("env", ", ".join(f"{k} {v}" for k, v in info.items()))
    return info


# --- 2. every adapter type -------------------------------------------------------------------------


def lrft(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lrft", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train_args(ctx, kind: str, bits: str, out: Path, steps: int = 3, extra: tuple = ()) -> list[str]:
    return [
        "train", f"recipes/smollm2-commonsense-{kind}.yaml", "--set", f"model.name_or_path={ctx.model}",
        "--set", f"quantization.bits={bits}", "--set", "data.max_samples=4", "--set", "data.val_size=0",
        "--set", "data.cutoff_len=128", "--set", "training.batch_size=4", "--set", "training.micro_batch_size=4",
        "--set", "training.warmup_steps=0", "--set", "training.learning_rate=2e-3", "--set", "training.eval_steps=null",
        "--set", "training.save_steps=null", "--set", "eval=null", "--set", "adapter.dropout=0",
        "--max-steps", str(steps), "--output-dir", str(out), *extra,
    ]


def losses(run_dir: Path) -> list[Optional[float]]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_adapters(ctx) -> dict:
    rows = {}
    for kind in ctx.types:
        row: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for bits in ("4", "8"):
                out = Path(tmp) / f"run{bits}"
                proc = lrft(train_args(ctx, kind, bits, out))
                if proc.returncode != 0:
                    row[f"train_{bits}bit"] = f"failed: {last_line(proc.stderr)}"
                    continue
                values = losses(out)
                ok = all(v is not None for v in values) and values[-1] < values[0]
                row[f"train_{bits}bit"] = {"losses": values, "falling": ok}
            adapter = Path(tmp) / "run4" / "adapter"
            if adapter.exists():
                proc = lrft(["merge", str(adapter), "--output", str(Path(tmp) / "merged")])
                report = Path(tmp) / "merged" / "lrft_merge.json"
                row["merge"] = json.loads(report.read_text())["verification"] if proc.returncode == 0 else f"failed: {last_line(proc.stderr)}"
                proc = lrft(["eval", "--adapter", str(adapter), "--data", "lrft/samples/commonsense/dev", "--tasks", "boolq",
                             "--limit", "4", "--batch-size", "4", "--mode", "generate", "--output", str(Path(tmp) / "eval.json")])
                row["eval_generate"] = json.loads((Path(tmp) / "eval.json").read_text())["tasks"]["boolq"] if proc.returncode == 0 else f"failed: {last_line(proc.stderr)}"
        rows[kind] = row
        say("adapters", f"{kind}: {describe_adapter_row(row)}")
    return rows


def describe_adapter_row(row: dict) -> str:
    parts = []
    for bits in ("4", "8"):
        value = row.get(f"train_{bits}bit")
        if isinstance(value, dict):
            first, last = value["losses"][0], value["losses"][-1]
            parts.append(f"{bits}-bit loss {first:.3f} -> {last:.3f} ({'falling' if value['falling'] else 'NOT falling'})")
        else:
            parts.append(f"{bits}-bit {value}")
    merge = row.get("merge")
    if isinstance(merge, dict):
        parts.append(f"merge {'verified' if merge['passed'] else 'FAILED'} (max |Δlogit| {merge['max_abs_logit_diff']:.2g})")
    elif merge:
        parts.append(f"merge {merge}")
    evaluated = row.get("eval_generate")
    if isinstance(evaluated, dict):
        parts.append(f"eval generate {evaluated['n']} examples in {evaluated['seconds']:.1f} s")
    elif evaluated:
        parts.append(f"eval {evaluated}")
    return "; ".join(parts)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


# --- 3. the headline shape ----------------------------------------------------------------------------


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def headline_variants(bench) -> list:
    peft_lora = bench.Case("lora", "PEFT LoRA r=32", "lora", dict(r=32, alpha=64), "lora")
    peft_randlora = bench.Case("randlora", "PEFT RandLoRA r=30", "randlora", dict(r=30, alpha=600, basis="uniform"), "randlora")
    lrft_cases = {case.key: case for case in bench.cuda_cases()}
    return [("lrft", lrft_cases["lora"]), ("lrft", lrft_cases["randlora"]), ("lrft", lrft_cases["randlora-sparse"]),
            ("peft", peft_lora), ("peft", peft_randlora)]


def attach(impl: str, model, case, bench, frozen_dtype):
    """(model to call, trainable parameters, a function that removes the adapter again)."""
    if impl == "lrft":
        from lrft.inject import inject_adapters, replace_module, trainable_parameters

        layers = inject_adapters(model, bench.lrft_config(case, TARGETS), frozen_dtype)

        def detach():
            for name, layer in layers.items():
                replace_module(model, name, layer.base_layer)

        return model, trainable_parameters(layers), detach
    from peft import get_peft_model

    peft_model = get_peft_model(model, bench.peft_config(case, TARGETS))
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad], lambda: peft_model.unload()


def check_headline(ctx) -> dict:
    bench = load_benchmark_module()
    shape = bench.SHAPES["llama3-8b" if ctx.device.type == "cuda" else "llama-tiny"]
    compute = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    started = time.perf_counter()
    base = bench.build_random_llama(shape, ctx.device, compute)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    say("headline", f"{shape.description}: built in {time.perf_counter() - started:.0f} s")
    ids = torch.randint(0, shape.random_llama["vocab_size"], (shape.batch, shape.seq_len), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    rows = {}
    for impl, case in headline_variants(bench):
        key = f"{impl} {case.label.removeprefix('PEFT ')}"
        try:
            rows[key] = measure_variant(ctx, bench, base, impl, case, ids, compute)
            say("headline", f"{key}: {rows[key]['tokens_per_s']:.0f} tokens/s, peak {rows[key]['peak_gb']:.2f} GB "
                            f"(+{rows[key]['adapter_and_activations_gb']:.2f} GB over the base), {rows[key]['trainable']:,} trainable")
        except Exception as exc:  # noqa: BLE001 - report and go on to the next variant
            rows[key] = {"error": f"{type(exc).__name__}: {exc}"}
            say("headline", f"{key}: FAILED {rows[key]['error'][:200]}")
    ratios = {}
    for a, b in (("lrft LoRA r=32", "peft LoRA r=32"), ("lrft RandLoRA r=30 (uniform)", "peft RandLoRA r=30"),
                 ("lrft RandLoRA r=30 (uniform)", "lrft LoRA r=32"), ("lrft RandLoRA r=30 (sparse, s=sqrt(D))", "lrft LoRA r=32")):
        if "tokens_per_s" in rows.get(a, {}) and "tokens_per_s" in rows.get(b, {}):
            time_ratio = rows[b]["tokens_per_s"] / rows[a]["tokens_per_s"]
            memory_ratio = rows[a]["peak_gb"] / rows[b]["peak_gb"] if rows[b]["peak_gb"] else None  # CUDA only
            ratios[f"{a} / {b}"] = {"time": time_ratio, "memory": memory_ratio}
            memory = f", peak memory x{memory_ratio:.2f}" if memory_ratio is not None else ""
            say("headline", f"{a} / {b}: step time x{time_ratio:.2f}{memory}")
    return {"shape": shape.name, "variants": rows, "ratios": ratios}


def measure_variant(ctx, bench, base, impl: str, case, ids, compute, steps: int = 3) -> dict:
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
    torch.manual_seed(0)
    model, params, detach = attach(impl, base, case, bench, compute)
    try:
        model.train()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        one_step = bench.make_step(model, optimizer, None, False, ids, torch.ones_like(ids), ctx.device, compute if cuda else None)
        one_step(0)  # warm-up
        sync = torch.cuda.synchronize if cuda else (lambda *a: None)
        sync()
        started = time.perf_counter()
        for step in range(1, steps + 1):
            one_step(step)
        sync()
        seconds = (time.perf_counter() - started) / steps
        peak = torch.cuda.max_memory_allocated(ctx.device) if cuda else 0
        return {
            "tokens_per_s": ids.numel() / seconds, "step_s": seconds, "trainable": sum(p.numel() for p in params),
            "peak_gb": peak / 2**30, "adapter_and_activations_gb": (peak - before) / 2**30 if cuda else 0.0,
        }
    finally:
        base.zero_grad(set_to_none=True)
        detach()


# --- 4. resume ------------------------------------------------------------------------------------------


def check_resume(ctx) -> dict:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        extra = ("--set", "training.save_steps=2", "--set", "data.max_samples=64", "--set", "adapter.dropout=0.1")
        reference, killed = Path(tmp) / "reference", Path(tmp) / "killed"
        proc = lrft(train_args(ctx, "lora", "4", reference, steps=8, extra=extra))
        if proc.returncode != 0:
            return {"error": last_line(proc.stderr)}
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        child = subprocess.Popen([sys.executable, "-m", "lrft", *train_args(ctx, "lora", "4", killed, steps=8, extra=extra)],
                                 cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        marker = killed / "checkpoints" / "step-4" / "trainer_state.pt"
        deadline = time.time() + 300
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        proc = lrft(train_args(ctx, "lora", "4", killed, steps=8, extra=(*extra, "--resume")))
        if proc.returncode != 0:
            return {"error": last_line(proc.stderr)}
        a, b = load_file(reference / "adapter" / "adapter.safetensors"), load_file(killed / "adapter" / "adapter.safetensors")
        max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        scale = max(float(a[k].float().abs().max()) for k in a)
    result = {"killed_after_step_4": True, "bit_identical": max_diff == 0.0, "max_abs_diff": max_diff, "largest_value": scale}
    say("resume", "SIGKILL after the step-4 checkpoint, --resume: " + ("bit-identical" if max_diff == 0 else f"max |Δ| {max_diff:.3g} (largest value {scale:.3g})"))
    return result


# --- 5. FSDP + QLoRA, one process ---------------------------------------------------------------------------


def check_fsdp(ctx) -> dict:
    if ctx.device.type != "cuda":
        say("fsdp", "skipped: accelerate runs FSDP on GPUs only")
        return {"skipped": "needs CUDA"}
    with tempfile.TemporaryDirectory() as tmp:
        args = train_args(ctx, "lora", "4", Path(tmp) / "run", extra=(
            "--set", "quantization.quant_storage=bfloat16", "--set", "quantization.compute_dtype=bfloat16"))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml",
               "--num_processes", "1", "-m", "lrft", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            say("fsdp", f"FAILED: {last_line(proc.stderr)}")
            return {"error": last_line(proc.stderr)}
        run = json.loads((Path(tmp) / "run" / "run.json").read_text())
        values = losses(Path(tmp) / "run")
    say("fsdp", f"accelerate launch, FSDP over 1 process ({run['distributed']}): loss {values[0]:.3f} -> {values[-1]:.3f}")
    return {"distributed": run["distributed"], "losses": values}


# --- the run ---------------------------------------------------------------------------------------------

STEPS: dict[str, Callable] = {"env": check_env, "adapters": check_adapters, "headline": check_headline, "resume": check_resume, "fsdp": check_fsdp}


class Context:
    def __init__(self, device: torch.device, model: str, types: list[str]):
        self.device, self.model, self.types = device, model, types


def tiny_model(folder: Path) -> str:
    """The tiny random Llama of the tests, with the SmolLM2 tokenizer (the CPU rehearsal's model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lrft.model import load_tokenizer

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(folder)
        load_tokenizer("smollm2-135m-instruct").save_pretrained(folder)
    return str(folder)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", default=",".join(STEPS), help="which steps, comma-separated (default: all)")
    parser.add_argument("--out", type=Path, help="the JSON file (default benchmarks/results/gpu-check-<device>.json)")
    parser.add_argument("--types", help="adapter types of the adapters step (default: every registered type)")
    args = parser.parse_args(argv)
    from lrft.adapters import known_types

    types = args.types.split(",") if args.types else known_types()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; rehearse with --device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model = "smollm2-135m-instruct" if device.type == "cuda" else tiny_model(scratch / "tiny")
        ctx = Context(device, model, types)
        result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device, "model": model}
        started = time.perf_counter()
        for name in [s for s in args.steps.split(",") if s]:
            step_started = time.perf_counter()
            try:
                result[name] = STEPS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one failed step must not hide the others
                result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                say(name, f"FAILED: {result[name]['error'][:300]}")
            result.setdefault("seconds", {})[name] = round(time.perf_counter() - step_started, 1)
        result["total_seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"done in {result['total_seconds']:.0f} s; {out}", flush=True)
    failed = [name for name in STEPS if isinstance(result.get(name), dict) and "error" in result[name]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
