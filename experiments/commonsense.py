#!/usr/bin/env python
"""Reproduce the papers' central findings at laptop scale on the embedded SmolLM2-135M-Instruct (4-bit nf4).

Every number comes from the real CLI: ``lrft train`` (a shipped recipe plus ``--set`` overrides),
``lrft eval --mode loglik`` on the vendored dev subsets, and ``lrft inspect-rank --compare ... --json``.
Results land in experiments/results/*.json (kept on the branch study-results: docs/studies.md); docs/results.md
and its PNGs are rendered from those files only (``--render-only`` re-renders without training).

    python experiments/commonsense.py                     # everything, seed 42 (what docs/results.md shows)
    python experiments/commonsense.py --seeds 42,43,44    # mean ± std over 3 seeds
    python experiments/commonsense.py --only exp1         # one experiment (exp1..exp4) or run name(s)
    python experiments/commonsense.py --steps 2 --limit 2 --results /tmp/smoke   # smoke test

Experiments
  exp1  RM-LoRA Table 5: LoRA, GM-LoRA, R-LoRA, RM-LoRA at the same R
  exp2  RandLoRA vs LoRA at equal trainable parameters (RandLoRA paper Table 1 pairing), plus VeRA, NoLA
  exp3  LoRA² (importance pruning) vs LoRA at equal parameters: per-layer rank allocation
  exp4  RandLoRA bases: dense uniform vs sparse (66 % zeros; "very sparse" s = √D, ~93 % zeros)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import study  # experiments/ is on sys.path when a study runs as a script
from study import (HELDOUT, LORA2_ORTH_REG, LRFT, ORTH_REG, RANK_TOL, ROOT, SHAPES, TRAIN, child_env, fill_facts,
                   mean_last, read_metrics, table)

DEV = "lrft/samples/commonsense/dev"
HELDOUT_N = 40
DOCDIR = Path("docs")
TASKS = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]

RM_R = 16  # R for experiment 1 (the paper's Table 5 uses 32/64/80 on ViT-B/16's CIFAR-100 head; 16 fits the CPU budget)

# name -> (recipe type, overrides, label, experiments)
RUNS: dict[str, dict] = {
    "lora-r16": dict(recipe="lora", sets={"adapter.r": 16, "adapter.alpha": 32}, label="LoRA r=16",
                     exps=["exp1", "exp2", "exp3", "exp4"]),
    "gmlora-r16": dict(recipe="rmlora", sets={"adapter.r": RM_R, "adapter.alpha": 2 * RM_R, "adapter.orth_reg": 0,
                                              "adapter.mask_rank": RM_R // 2},
                       label=f"GM-LoRA r={RM_R} (mask {RM_R // 2})", exps=["exp1"]),
    "rlora-r16": dict(recipe="rmlora", sets={"adapter.r": RM_R, "adapter.alpha": 2 * RM_R, "adapter.orth_reg": ORTH_REG,
                                             "adapter.mask_rank": "null"},
                      label=f"R-LoRA r={RM_R} (orth_reg {ORTH_REG:g})", exps=["exp1"]),
    "rmlora-r16": dict(recipe="rmlora", sets={"adapter.r": RM_R, "adapter.alpha": 2 * RM_R,
                                              "adapter.orth_reg": ORTH_REG, "adapter.mask_rank": RM_R // 2},
                       label=f"RM-LoRA r={RM_R} (orth_reg {ORTH_REG:g}, mask {RM_R // 2})", exps=["exp1"]),
    "randlora-r10": dict(recipe="randlora", sets={"adapter.r": 10, "adapter.alpha": 200, "adapter.basis": "uniform"},
                         label="RandLoRA r=10 (dense uniform)", exps=["exp2", "exp4"]),
    "vera-r256": dict(recipe="vera", sets={"adapter.r": 256}, label="VeRA r=256", exps=["exp2"]),
    "nola-r8": dict(recipe="nola", sets={"adapter.r": 8}, label="NoLA r=8, k=512", exps=["exp2"]),
    "lora2-k16-R16": dict(recipe="lora2", sets={"adapter.k": 16, "adapter.r": 16, "adapter.target_r": 8,
                                                "adapter.alpha": 32, "adapter.orth_reg": LORA2_ORTH_REG},
                          label="LoRA² k=16, R=16 -> 8", exps=["exp3"]),
    "randlora-r10-sparse6": dict(recipe="randlora", sets={"adapter.r": 10, "adapter.alpha": 200, "adapter.basis": "sparse",
                                                          "adapter.sparsity": 6},
                                 label="RandLoRA r=10, sparse s=6", exps=["exp4"]),
    "randlora-r10-sparse-sqrtD": dict(recipe="randlora", sets={"adapter.r": 10, "adapter.alpha": 200,
                                                               "adapter.basis": "sparse"},
                                      label="RandLoRA r=10, sparse s=√D", exps=["exp4"]),
}
EXPERIMENTS = {
    "exp1": ["lora-r16", "gmlora-r16", "rlora-r16", "rmlora-r16"],
    "exp2": ["lora-r16", "randlora-r10", "vera-r256", "nola-r8"],
    "exp3": ["lora-r16", "lora2-k16-R16"],
    "exp4": ["lora-r16", "randlora-r10", "randlora-r10-sparse6", "randlora-r10-sparse-sqrtD"],
}
EXP_TITLES = {
    "exp1": "RM-LoRA Table 5: regulariser and gradient masking",
    "exp2": "RandLoRA vs LoRA at equal trainable parameters, with VeRA and NoLA",
    "exp3": "LoRA² pruning vs LoRA at equal parameters",
    "exp4": "Sparse RandLoRA bases",
}


def sh(cmd: list[str], log: Path, env: dict) -> float:
    """Run a command, append its output to ``log``; returns wall seconds; raises on failure."""
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed with exit code {proc.returncode}; see {log}")
    return time.time() - t0


def train_command(name: str, seed: int, args) -> list[str]:
    spec = RUNS[name]
    steps = args.steps
    sets = {
        "data.path": TRAIN,
        "data.cutoff_len": 256,
        "data.val_size": 0,
        "training.seed": seed,
        "adapter.seed": seed,
        "training.max_steps": steps,
        "training.batch_size": args.batch_size,
        "training.micro_batch_size": 4,
        **({} if args.lr == "recipe" else {"training.learning_rate": float(args.lr)}),
        "training.warmup_steps": max(1, steps // 10),
        "training.lr_scheduler": "linear",
        # no validation during training: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for
        # inference the first time it runs in eval mode without grad, and from then on its forward has no
        # autograd (input gradients silently vanish). Held-out loss is measured after training instead.
        "training.eval_steps": "null",
        "training.save_steps": "null",
        "output_dir": str(run_dir(name, seed)),
        **spec["sets"],
    }
    cmd = LRFT + ["train", f"recipes/smollm2-commonsense-{spec['recipe']}.yaml", "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


RUNS_DIR = Path("runs/commonsense")
TRAINED: list[str] = []  # runs trained by this invocation
# rough relative cost per step on the 2-core CPU (LoRA = 1), to order the runs
COST = {"vera": 2.8, "sparse": 2.5, "nola": 2.0, "randlora": 1.9, "rmlora": 1.2, "lora2": 1.2, "lora": 1.0}


def run_dir(name: str, seed: int) -> Path:
    return RUNS_DIR / f"{name}-s{seed}"


def do_run(name: str, seed: int, args, results: Path, logs: Path) -> dict:
    out = results / f"{name}-s{seed}.json"
    settings = {"steps": args.steps, "limit": args.limit, "batch_size": args.batch_size, "lr": args.lr if args.lr == "recipe" else float(args.lr)}
    if out.exists() and not args.force:
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            if args.generate_limit and name in args.generate_runs and \
                    (old.get("eval_generate") or {}).get("limit") != args.generate_limit:
                add_generate(old, name, seed, args, logs)
                out.write_text(json.dumps(old, indent=1) + "\n")
                return old
            print(f"[skip] {name} seed {seed}: {out} is up to date", flush=True)
            return old
    env = child_env(args.threads)
    log = logs / f"{name}-s{seed}.log"
    log.write_text("")
    directory = ROOT / run_dir(name, seed)
    print(f"[start] {name} seed {seed} ({time.strftime('%H:%M:%S')})", flush=True)
    cmd_train = train_command(name, seed, args)
    TRAINED.append(name)
    train_s = sh(cmd_train, log, env)
    eval_json = directory / "eval-loglik.json"
    cmd_eval = LRFT + ["eval", "--adapter", str(run_dir(name, seed) / "adapter"), "--data", DEV, "--mode", "loglik",
                       "--limit", str(args.limit), "--output", str(run_dir(name, seed) / "eval-loglik.json")]
    eval_s = sh(cmd_eval, log, env)
    loss_json = run_dir(name, seed) / "eval-heldout-loss.json"
    cmd_loss = LRFT + ["eval", "--adapter", str(run_dir(name, seed) / "adapter"), "--loss", "--data", HELDOUT,
                       "--limit", str(HELDOUT_N), "--output", str(loss_json)]
    loss_s = sh(cmd_loss, log, env)
    record = {
        "name": name,
        "seed": seed,
        "label": RUNS[name]["label"],
        "settings": settings,
        "commands": {"train": " ".join(cmd_train[2:]), "eval": " ".join(cmd_eval[2:]),
                     "heldout_loss": " ".join(cmd_loss[2:])},
        "wall_s": {"train": round(train_s, 1), "eval": round(eval_s, 1), "heldout_loss": round(loss_s, 1)},
        "run": json.loads((directory / "run.json").read_text()),
        "metrics": read_metrics(directory / "metrics.jsonl"),
        "eval_loglik": json.loads(eval_json.read_text()),
        "heldout_loss": json.loads((ROOT / loss_json).read_text()),
        "adapter_config": json.loads((directory / "adapter" / "adapter_config.json").read_text()),
    }
    if args.generate_limit and name in args.generate_runs:
        add_generate(record, name, seed, args, logs)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[done] {name} seed {seed}: train {train_s:.0f}s, eval {eval_s:.0f}s, "
          f"loglik {100 * record['eval_loglik']['mean_accuracy']:.1f} ({time.strftime('%H:%M:%S')})", flush=True)
    return record


def add_generate(record: dict, name: str, seed: int, args, logs: Path) -> None:
    """The published protocol (4-beam search) on the first ``--generate-limit`` examples per task."""
    gen_json = run_dir(name, seed) / "eval-generate.json"
    cmd_gen = LRFT + ["eval", "--adapter", str(run_dir(name, seed) / "adapter"), "--data", DEV, "--mode",
                      "generate", "--limit", str(args.generate_limit), "--output", str(gen_json)]
    print(f"[start] {name} seed {seed}: generate-mode eval ({time.strftime('%H:%M:%S')})", flush=True)
    record["wall_s"]["eval_generate"] = round(sh(cmd_gen, logs / f"{name}-s{seed}.log", child_env(args.threads)), 1)
    record["commands"]["eval_generate"] = " ".join(cmd_gen[2:])
    record["eval_generate"] = json.loads((ROOT / gen_json).read_text())


def do_base_eval(args, results: Path, logs: Path) -> None:
    """The untrained 4-bit base model, the reference every adapter starts from."""
    out = results / "base.json"
    settings = {"limit": args.limit}
    if out.exists() and not args.force and json.loads(out.read_text()).get("settings") == settings:
        return
    env = child_env(args.threads)
    log = logs / "base.log"
    log.write_text("")
    path = RUNS_DIR / "base-eval-loglik.json"
    (ROOT / path.parent).mkdir(parents=True, exist_ok=True)
    cmd = LRFT + ["eval", "--model", "smollm2-135m-instruct", "--quantization", "4", "--data", DEV,
                  "--mode", "loglik", "--limit", str(args.limit), "--output", str(path)]
    wall = sh(cmd, log, env)
    loss_path = RUNS_DIR / "base-heldout-loss.json"
    cmd_loss = LRFT + ["eval", "--model", "smollm2-135m-instruct", "--quantization", "4", "--loss", "--data", HELDOUT,
                       "--limit", str(HELDOUT_N), "--output", str(loss_path)]
    sh(cmd_loss, log, env)
    record = {"settings": settings, "command": " ".join(cmd[2:]), "command_loss": " ".join(cmd_loss[2:]),
              "wall_s": round(wall, 1), "eval_loglik": json.loads((ROOT / path).read_text()),
              "heldout_loss": json.loads((ROOT / loss_path).read_text())}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[done] base model: loglik {100 * record['eval_loglik']['mean_accuracy']:.1f}", flush=True)


def do_inspect(exp: str, seed: int, args, results: Path, logs: Path) -> None:
    names = [n for n in EXPERIMENTS[exp] if (ROOT / run_dir(n, seed) / "adapter" / "adapter_config.json").exists()]
    if len(names) < len(EXPERIMENTS[exp]):
        print(f"[note] inspect-rank {exp} seed {seed}: untrained, left out: "
              f"{sorted(set(EXPERIMENTS[exp]) - set(names))}", flush=True)
    if not names:
        return
    adapters = [run_dir(n, seed) / "adapter" for n in names]
    env = child_env(args.threads)
    log = logs / f"inspect-{exp}-s{seed}.log"
    log.write_text("")
    record = {"experiment": exp, "seed": seed, "names": names, "reports": {}}
    tols = [None, RANK_TOL] if exp in ("exp1", "exp3") else [None]
    for tol in tols:
        key = "default" if tol is None else f"tol{tol:g}"
        json_path = RUNS_DIR / f"inspect-{exp}-s{seed}-{key}.json"
        cmd = LRFT + ["inspect-rank", str(adapters[0])]
        for other in adapters[1:]:
            cmd += ["--compare", str(other)]
        cmd += ["--json", str(json_path)]
        if tol is not None:
            cmd += ["--tol", str(tol)]
        elif seed == args.seeds[0]:
            cmd += ["--plot", str(DOCDIR / f"results-{exp}-spectra.png")]
        wall = sh(cmd, log, env)
        payload = json.loads((ROOT / json_path).read_text())
        reports = [payload] + payload.get("compare", [])
        for name, report in zip(names, reports):
            entry = record["reports"].setdefault(name, {})
            entry[key] = {
                "summary": report["summary"],
                "layers": [{k: row.get(k) for k in ("name", "module_type", "depth", "shape", "rank_bound", "rank",
                                                      "effective_rank", "stable_rank", "orth_loss", "orth_loss_A",
                                                      "orth_loss_B", "sigma_max", "fro_norm")}
                           for row in report["layers"]],
            }
        record.setdefault("commands", {})[key] = " ".join(cmd[2:])
        record.setdefault("wall_s", {})[key] = round(wall, 1)
    (results / f"inspect-{exp}-s{seed}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[done] inspect-rank {exp} seed {seed}", flush=True)


# --- rendering ---------------------------------------------------------------------------------------------


def load_results(results: Path):
    runs: dict[str, dict[int, dict]] = {}
    inspect: dict[str, dict[int, dict]] = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        if path.name.startswith("inspect-"):
            inspect.setdefault(data["experiment"], {})[data["seed"]] = data
        elif path.name in ("base.json", "meta.json"):
            continue
        else:
            runs.setdefault(data["name"], {})[data["seed"]] = data
    base = json.loads((results / "base.json").read_text()) if (results / "base.json").exists() else None
    return runs, inspect, base


def stat(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sparse_zero_fraction(s_value, r: int = 10) -> dict:
    """Share of zeros in RandLoRA's sparse bases (A: r x d, B_j: D x r, j = 1..ceil(d / r)) on SmolLM2's targets."""
    out, total, zeros = {}, 0.0, 0.0
    for module, (fan_in, fan_out) in SHAPES.items():
        small, large = min(fan_in, fan_out), max(fan_in, fan_out)
        s_eff = s_value if s_value is not None else math.sqrt(large)
        frac = 1.0 - 2.0 / s_eff
        entries = math.ceil(small / r) * large * r + r * small
        out[module] = frac
        total += entries
        zeros += frac * entries
    out["overall"] = zeros / total
    return out


SHAPES_D = {m: min(i, o) for m, (i, o) in SHAPES.items()}


def expected_sparse_rank(s_value, r: int = 10) -> float:
    """Mean over the 5 target shapes of d·(1 − (1 − 2/s)^r): the expected number of non-zero columns of A."""
    vals = []
    for module, (fan_in, fan_out) in SHAPES.items():
        small, large = min(fan_in, fan_out), max(fan_in, fan_out)
        s_eff = s_value if s_value is not None else math.sqrt(large)
        vals.append(small * (1.0 - (1.0 - 2.0 / s_eff) ** r))
    return statistics.mean(vals)


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def median_step_time(metrics: list[dict]) -> float:
    values = [m["step_time_s"] for m in metrics if "step_time_s" in m][2:]
    return statistics.median(values) if values else float("nan")


def heldout(record: dict) -> float:
    return record.get("heldout_loss", {}).get("loss", float("nan"))


def acc_cell(seed_records: dict[int, dict]) -> str:
    """Mean accuracy (percent) with its binomial standard error (single seed) or std over seeds."""
    accs = [r["eval_loglik"]["mean_accuracy"] for r in seed_records.values()]
    if len(accs) == 1:
        r = next(iter(seed_records.values()))["eval_loglik"]
        n = sum(t["n"] for t in r["tasks"].values())
        return f"{100 * accs[0]:.1f} ± {100 * binomial_se(accs[0], n):.1f}"
    return stat(accs, 100)


def rank_summary(inspect: dict, exp: str, name: str, key: str = "default") -> list[dict]:
    out = []
    for seed, data in sorted(inspect.get(exp, {}).items()):
        if name in data["reports"] and key in data["reports"][name]:
            out.append(data["reports"][name][key]["summary"]["overall"])
    return out


def per_task_table(runs: dict, names: list[str], base: dict | None) -> str:
    header = ["method"] + TASKS + ["mean"]
    rows = []
    if base is not None:
        tasks = base["eval_loglik"]["tasks"]
        rows.append(["base model (no adapter)"] + [f"{100 * tasks[t]['accuracy']:.0f}" if t in tasks else "–" for t in TASKS]
                    + [f"{100 * base['eval_loglik']['mean_accuracy']:.1f}"])
    for name in names:
        if name not in runs:
            continue
        recs = runs[name]
        cells = []
        for t in TASKS:
            vals = [r["eval_loglik"]["tasks"][t]["accuracy"] for r in recs.values() if t in r["eval_loglik"]["tasks"]]
            cells.append(stat(vals, 100, 0))
        rows.append([RUNS[name]["label"]] + cells + [stat([r["eval_loglik"]["mean_accuracy"] for r in recs.values()], 100)])
    return table(header, rows)


def plot_losses(runs: dict, names: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        if name not in runs:
            continue
        seed, rec = sorted(runs[name].items())[0]
        m = rec["metrics"]
        steps = [x["step"] for x in m]
        loss = [x["loss"] for x in m]
        window = max(1, len(loss) // 7)
        smooth = [statistics.mean(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]
        (line,) = ax1.plot(steps, smooth, label=RUNS[name]["label"])
        ax1.plot(steps, loss, color=line.get_color(), alpha=0.15, linewidth=0.8)
        times = [x["step_time_s"] for x in m]
        smooth_t = [statistics.median(times[max(0, i - window + 1): i + 1]) for i in range(len(times))]
        ax2.plot(steps[2:], smooth_t[2:], label=RUNS[name]["label"], color=line.get_color())
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel(f"training LM loss ({window}-step moving mean)")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel(f"step wall time, s ({window}-step moving median)")
    ax2.set_title("shared CPU: other jobs ran at the same time", fontsize=8)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(title + f" (seed {seed})", fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / path, dpi=110)
    plt.close(fig)
    return True


def plot_allocation(layers: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modules = ["q", "k", "v", "up", "down"]
    depths = sorted({row["depth"] for row in layers})
    grid = [[float("nan")] * len(depths) for _ in modules]
    for row in layers:
        if row["module_type"] in modules:
            grid[modules.index(row["module_type"])][depths.index(row["depth"])] = row["rank"]
    fig, ax = plt.subplots(figsize=(11, 2.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xticks(range(len(depths)), depths, fontsize=7)
    ax.set_xlabel("decoder layer")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6, color="w" if value < 8 else "k")
    fig.colorbar(im, ax=ax, label="final rank")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / path, dpi=110)
    plt.close(fig)
    return True


def default_orth_reg() -> str:
    """lrft's current default ``orth_reg`` (RM-LoRA; AdaLoRA and LoRA² share it), read from the code."""
    try:
        from lrft.adapters.rmlora import DEFAULT_ORTH_REG

        return f"{DEFAULT_ORTH_REG:g}"
    except ImportError:
        return "–"


def recipe_learning_rate(kind: str) -> str:
    text = (ROOT / "recipes" / f"smollm2-commonsense-{kind}.yaml").read_text()
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "learning_rate":
            return f"{float(value.split('#')[0]):g}"
    return "–"


def reading_facts(runs: dict, inspect: dict, base: dict | None, settings: dict, results: Path) -> dict[str, str]:
    """Every measured number the hand-written readings quote (``{{key}}`` in experiments/readings.md), from the
    result files: the first seed's record where a reading speaks of one run. A fact whose runs are missing (a
    partial rerun into a scratch folder) is left out and rendered as "–"."""
    facts: dict[str, str] = {}
    steps, batch = settings["steps"], settings["batch_size"]
    facts.update(steps=str(steps), examples=str(steps * batch), lr=f"{settings['lr']:g}" if settings["lr"] != "recipe" else "recipe")
    any_rec = next(iter(next(iter(runs.values())).values()))
    n_task = any_rec["eval_loglik"]["limit"]
    n_total = sum(t["n"] for t in any_rec["eval_loglik"]["tasks"].values())
    facts["limit"] = str(n_task)
    facts["noise_band"] = f"{2 * math.sqrt(2) * 100 * binomial_se(0.5, n_total):.0f}"
    facts["default_orth_reg"] = default_orth_reg()
    facts["scale_up"] = f"{300 * 16 / (steps * batch):.0f}"  # the command the overall reading proposes
    first = {name: recs[min(recs)] for name, recs in runs.items()}

    def summary(exp: str, name: str, key: str = "default") -> dict:
        return rank_summary(inspect, exp, name, key)[0]

    def layers(exp: str, name: str) -> list[dict]:
        data = inspect[exp][min(inspect[exp])]
        return data["reports"][name]["default"]["layers"]

    def losses(short: str, name: str) -> None:
        facts[f"train_{short}"] = f"{mean_last(first[name]['metrics'], 'loss'):.3f}"
        facts[f"held_{short}"] = f"{heldout(first[name]):.3f}"

    def attempt(fn) -> None:
        try:
            fn()
        except (KeyError, IndexError, StopIteration, ValueError, ZeroDivisionError):
            pass

    if base is not None:
        facts["held_base"] = f"{heldout(base):.3f}"
    for short, name in [("lora", "lora-r16"), ("gm", "gmlora-r16"), ("r", "rlora-r16"), ("rm", "rmlora-r16"),
                        ("rand", "randlora-r10"), ("lora2", "lora2-k16-R16"), ("s6", "randlora-r10-sparse6"),
                        ("sqrtd", "randlora-r10-sparse-sqrtD")]:
        attempt(lambda: losses(short, name))

    def exp1() -> None:
        names = {"lora": "lora-r16", "gm": "gmlora-r16", "r": "rlora-r16", "rm": "rmlora-r16"}
        for short, name in names.items():
            d, t = summary("exp1", name), summary("exp1", name, f"tol{RANK_TOL:g}")
            facts[f"erank_{short}"] = f"{d['mean_effective_rank']:.2f}"
            facts[f"r10_{short}"] = f"{t['mean_rank']:.1f}"
            facts[f"orthA_{short}"] = f"{d['mean_orth_loss_A']:.2f}"
            facts[f"sigma_{short}"] = f"{d['mean_sigma_max']:.3f}"
            facts[f"fro_{short}"] = f"{d['mean_fro_norm']:.3f}"
        eranks = [summary("exp1", names[k])["mean_effective_rank"] for k in ("gm", "r", "rm")]
        facts["erank_spread"] = f"{min(eranks):.2f}–{max(eranks):.2f}"
        ratio = [summary("exp1", names[k])["mean_sigma_max"] / summary("exp1", "lora-r16")["mean_sigma_max"] for k in ("gm", "rm")]
        facts["mask_sigma_ratio"] = f"{min(ratio):.2f}–{max(ratio):.2f}"
        facts["r_exp1"] = f"{summary('exp1', 'lora-r16')['mean_rank']:.0f}"
        orth = [summary("exp1", n)["mean_orth_loss"] for n in names.values()]
        facts["orth_min"], facts["orth_max"] = f"{min(orth):.2f}", f"{max(orth):.2f}"
        facts["mean_out"] = f"{statistics.mean(row['shape'][0] for row in layers('exp1', 'lora-r16')):.1f}"
        facts["exp1_max_sigma"] = f"{max(row['sigma_max'] for n in names.values() for row in layers('exp1', n)):.2f}"

    def exp2() -> None:
        d = summary("exp2", "randlora-r10")
        facts["rand_rank"], facts["rand_bound"] = f"{d['mean_rank']:.1f}", f"{d['mean_rank_bound']:.1f}"
        facts["rand_min_layer_pct"] = f"{100 * min(row['rank'] / row['rank_bound'] for row in layers('exp2', 'randlora-r10')):.0f} %"
        facts["lora_r"] = str(RUNS["lora-r16"]["sets"]["adapter.r"])
        facts["nola_r"] = str(RUNS["nola-r8"]["sets"]["adapter.r"])
        vera_r = RUNS["vera-r256"]["sets"]["adapter.r"]
        facts["vera_r"] = str(vera_r)
        wide = [row for row in layers("exp2", "vera-r256") if min(row["shape"]) == 576]
        facts["vera_frac"] = f"{100 * statistics.mean(row['rank'] / 576 for row in wide):.0f} %"
        trainable = {n: first[n]["run"]["trainable_parameters"] for n in ("randlora-r10", "vera-r256", "nola-r8")}
        facts["param_ratio"] = f"{trainable['randlora-r10'] / trainable['vera-r256']:.0f}"
        n_layers = summary("exp2", "vera-r256")["layers"]
        facts["vera_per_layer"] = f"{trainable['vera-r256'] / n_layers:.0f}"
        facts["nola_per_layer"] = f"{trainable['nola-r8'] / n_layers:.0f}"
        rand, lora = RUNS["randlora-r10"]["sets"], RUNS["lora-r16"]["sets"]
        rand_scaling, lora_scaling = rand["adapter.alpha"] / rand["adapter.r"], lora["adapter.alpha"] / lora["adapter.r"]
        facts["rand_scaling"], facts["lora_scaling"] = f"{rand_scaling:g}", f"{lora_scaling:g}"
        facts["scaling_ratio"] = f"{rand_scaling / lora_scaling:g}"
        facts["rand_r"] = str(rand["adapter.r"])

    def exp3() -> None:
        ranks = first["lora2-k16-R16"]["adapter_config"]["summary"]["ranks"]
        by_module: dict[str, list[int]] = {}
        for lname, rank in ranks.items():
            by_module.setdefault(lname.split(".")[-1], []).append(rank)
        facts["lora2_kept"] = str(sum(ranks.values()))
        facts["lora2_range"] = f"{min(ranks.values())}–{max(ranks.values())}"
        means = [statistics.mean(v) for v in by_module.values()]
        facts["lora2_means"] = f"{min(means):.1f}–{max(means):.1f}"
        facts["lora2_zero"] = "no" if not any(v == 0 for v in ranks.values()) else str(sum(v == 0 for v in ranks.values()))
        facts["lora2_recipe_lr"] = recipe_learning_rate("lora2")

    def exp4() -> None:
        facts["zeros_s6"] = f"{100 * sparse_zero_fraction(6.0)['overall']:.0f} %"
        facts["zeros_sqrtd"] = f"{100 * sparse_zero_fraction(None)['overall']:.0f} %"
        d = summary("exp4", "randlora-r10-sparse-sqrtD")
        facts["sqrtd_rank"], facts["sqrtd_bound"] = f"{d['mean_rank']:.1f}", f"{d['mean_rank_bound']:.1f}"
        facts["sqrtd_rank_pct"] = f"{100 * d['mean_rank'] / d['mean_rank_bound']:.0f} %"
        facts["sqrtd_expected"] = f"{expected_sparse_rank(None):.1f}"
        facts["sqrtd_zero_cols_pct"] = f"{100 * (1 - expected_sparse_rank(None) / d['mean_rank_bound']):.0f} %"

    def generate() -> None:
        gen = [r for r in first.values() if "eval_generate" in r]
        lim = gen[0]["eval_generate"]["limit"]
        facts["gen_limit"], facts["gen_n"] = str(lim), str(8 * lim)
        evaluated = sum(sum(t["n"] for t in r["eval_loglik"]["tasks"].values()) for r in first.values())
        facts["loglik_s"] = f"{sum(r['wall_s']['eval'] for r in first.values()) / evaluated:.1f}"

    def overall() -> None:
        rm = first["rlora-r16"]["metrics"][0]
        facts["rm_ratio"] = f"{(0.1 / ORTH_REG) * rm['extra_loss'] / rm['loss']:.0f}"
        m = read_metrics(results / "discarded" / "lora2-k16-R16-orth0.1-s42.metrics.jsonl")
        facts["lora2_ratio"] = f"{m[0]['extra_loss'] / m[0]['loss']:.0f}"

    for part in (exp1, exp2, exp3, exp4, generate, overall):
        attempt(part)
    return facts


@dataclass
class Page:
    """What the sections of docs/results.md read (the result files, the run settings) and the page so far."""

    results: Path
    args: Any
    runs: dict
    inspect: dict
    base: Optional[dict]
    out: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.any_rec = next(iter(next(iter(self.runs.values())).values()))
        self.settings = self.any_rec["settings"]
        self.seeds = sorted({s for recs in self.runs.values() for s in recs})

    def w(self, text: str) -> None:
        self.out.append(text)

    def common_cols(self, name: str) -> list[str]:
        recs = self.runs[name]
        first = next(iter(recs.values()))
        return [
            RUNS[name]["label"],
            f"{first['run']['trainable_parameters']:,}",
            acc_cell(recs),
            stat([mean_last(r["metrics"], "loss") for r in recs.values()], 1, 3),
            stat([heldout(r) for r in recs.values()], 1, 3),
        ]

    def closing(self, exp: str, names: list[str]) -> None:
        """The end of every experiment's section: its loss-curve and spectra PNGs and its reading."""
        if plot_losses(self.runs, names, DOCDIR / Path(f"results-{exp}-loss.png"), EXP_TITLES[exp]):
            self.w(f"![{exp} loss curves](results-{exp}-loss.png)\n")
        if (ROOT / DOCDIR / f"results-{exp}-spectra.png").exists():
            self.w(f"![{exp} spectra](results-{exp}-spectra.png)\n")
        self.w(f"<!-- reading:{exp} -->\n")


def render(results: Path, doc: Path, args) -> None:
    """docs/results.md and its PNGs from the result files, one function per section."""
    runs, inspect, base = load_results(results)
    if not runs:
        print("nothing to render", flush=True)
        return
    page = Page(results, args, runs, inspect, base)
    for section in (head_section, setting_section, commands_section, exp1_section, exp2_section, exp3_section, exp4_section,
                    generate_section):
        section(page)
    doc.write_text(fill_readings("\n".join(page.out), page))
    print(f"rendered {doc}", flush=True)


def head_section(page: Page) -> None:
    """The title, how to rerun, and where the longer studies are."""
    w, args = page.w, page.args
    w("# Results: the papers' findings at laptop scale\n")
    w("Generated by `experiments/commonsense.py` from `experiments/results/*.json`; every measured number below is "
      "read from those files (nothing typed by hand; the readings' numbers are filled in from them too), and numbers "
      "attributed to a paper are quoted from it. Rerun everything, or one experiment, with:\n")
    w("```\npython experiments/commonsense.py                       # all four experiments, seed 42 (this page)\n"
      "python experiments/commonsense.py --only exp1           # one experiment (exp1..exp4) or a run name\n"
      "python experiments/commonsense.py --seeds 42,43,44      # 3 seeds: tables then show mean ± std\n"
      "python experiments/commonsense.py --render-only         # rebuild this page and the PNGs\n"
      "# rerun one experiment from scratch into a scratch folder and compare with this page:\n"
      "python experiments/commonsense.py --only exp1 --force --results /tmp/rerun --doc /tmp/rerun/results.md\n```\n"
      "Runs whose result file already exists with the same settings are skipped (this page's runs are the "
      "result files on the branch `study-results`, which the script fetches: [studies.md](studies.md)), hence "
      "`--force` or a fresh `--results` folder to "
      "retrain. Use the project's virtual environment (`.venv/bin/python`). Each run uses `--threads` torch "
      f"threads (default 1; this page's runs used {args.threads_used}, see the wall-time row); CPU results should "
      "repeat closely at the same thread count.\n")
    w("This page is a 20-step pilot. The longer study it leads to (200 optimizer steps and more, each method at "
      "its own learning rate from a sweep, matched trainable parameters, two seeds, the RM-LoRA Table 5 analogue) "
      "is [docs/long-runs.md](long-runs.md), generated the same way by `experiments/long_runs.py` from "
      "`experiments/results/long/*.json` (`--plan` lists its runs and their estimated CPU time). RandLoRA's "
      "central claim (full rank beats low rank at an equal parameter budget when the task needs rank) is tested "
      "in isolation, on a controlled regression with lrft's own layers, in [docs/regression.md](regression.md).\n")


def setting_section(page: Page) -> None:
    """The setting table, and the noise and scale caveats."""
    runs, base, w, args = page.runs, page.base, page.w, page.args
    any_rec, settings, seeds = page.any_rec, page.settings, page.seeds
    versions = any_rec["run"].get("versions", {})
    n_task = any_rec["eval_loglik"]["limit"]
    n_total = sum(t["n"] for t in any_rec["eval_loglik"]["tasks"].values())
    se_half = 100 * binomial_se(0.5, n_task)
    se_mean = 100 * binomial_se(0.5, n_total)
    w("## Setting\n")
    total_train = sum(r["wall_s"]["train"] for recs in runs.values() for r in recs.values())
    total_eval = sum(r["wall_s"]["eval"] for recs in runs.values() for r in recs.values())
    rows = [
        ["model", "`smollm2-135m-instruct` (embedded SmolLM2-135M-Instruct), "
                  "4-bit nf4, double quantization, float32 compute"],
        ["lrft", f"{any_rec['run'].get('lrft_version')}; torch {versions.get('torch', '?')}, "
                 f"transformers {versions.get('transformers', '?')}, bitsandbytes {versions.get('bitsandbytes', '?')}"],
        ["machine", f"{any_rec['machine']}" if "machine" in any_rec else args.machine],
        ["seeds", ", ".join(map(str, seeds)) + (" (single seed: the CPU budget allowed one; use `--seeds 42,43,44` "
                                                 "for mean ± std)" if len(seeds) == 1 else "")],
        ["training data", f"`{TRAIN}` (9,119 records from 5 tasks' training splits; see its NOTICE), "
                          f"held-out loss: `lrft eval --loss` on the first {HELDOUT_N} records of `{HELDOUT}` (disjoint)"],
        ["steps", f"{settings['steps']} optimizer steps of {settings['batch_size']} examples (micro-batch 4), "
                  f"lr {settings['lr']}, linear decay after {max(1, settings['steps'] // 10)} warm-up steps, "
                  "cutoff 256, AdamW, train_on_inputs"],
        ["targets", "q_proj, k_proj, v_proj, up_proj, down_proj of all 30 layers (150 adapted modules)"],
        ["evaluation", f"`lrft eval --mode loglik --limit {n_task}` on `{DEV}`: the first {n_task} examples of each "
                       f"of the 8 tasks ({n_total} in all); label likelihood, not comparable with the papers' "
                       "generate-mode numbers"],
        ["wall time", f"{total_train / 60:.0f} min training + {total_eval / 60:.0f} min loglik evaluation, summed "
                      f"over the runs ({args.jobs_used} runs at a time, {args.threads_used} torch thread each, on a "
                      "CPU shared with other jobs)"],
    ]
    w(table(["", ""], rows) + "\n")
    w(f"**Noise.** With {n_task} examples per task the binomial standard error of one task's accuracy is up to "
      f"{se_half:.1f} points (at 50 %), and of the 8-task mean ({n_total} examples) {se_mean:.1f} points; the "
      f"difference of two methods' means has a standard error of about {math.sqrt(2) * se_mean:.1f} points, so "
      f"differences within ±{2 * math.sqrt(2) * se_mean:.0f} points (two standard errors) are noise. The "
      "accuracy columns show ± one binomial standard error (single seed) or ± the standard deviation over seeds.\n")
    w(f"**Scale.** Each run sees {settings['steps']} × {settings['batch_size']} = "
      f"{settings['steps'] * settings['batch_size']} training examples. That is what the CPU budget of this page "
      f"allowed ({(total_train + total_eval) / 60:.0f} min of training and evaluation for the "
      f"{sum(len(recs) for recs in runs.values())} runs on two cores shared with other jobs), far from the papers' "
      "epochs over 15k-170k examples, and it limits what each column can show. Bounds that follow from the "
      "parameterisation hold after any number of steps: LoRA's rank ≤ r, RandLoRA's (near) full rank, the rank "
      "ceiling of sparse RandLoRA bases that share one A (section 4) and LoRA²'s pruning budget. Everything else "
      f"describes the ΔW of a {settings['steps']}-step run, not of a trained one: the accuracy columns test little "
      "more than \"does not break the model\"; the LoRA-family spectra are those of an update whose singular values "
      "are all still well below 1, so ‖ΔWΔWᵀ−I‖² mostly measures the layer width (section 1), and how flat a "
      "spectrum is may change as training goes on; LoRA²'s allocation comes from importance scores of a ΔW that has barely "
      "moved (section 3); and a loss after so few steps at one shared learning rate measures early speed, not "
      "the converged minima the papers compare. `--steps`, `--batch-size` and `--limit` scale the whole study "
      "up.\n")
    w("**No validation during training.** The runs set `training.eval_steps: null`: on this machine's CPU "
      "(AVX512-BF16) bitsandbytes repacks a 4-bit weight for inference the first time the layer runs in eval "
      "mode without gradients, and from then on the layer's forward has no autograd, so gradients stopped flowing "
      "through the frozen base layers for the rest of training. That was an lrft bug, fixed since these runs "
      "(`lrft.model.use_training_kernels` keeps the training kernel in eval mode; regression test in "
      "tests/test_train.py); the setting is kept so that reruns match this page. The held-out loss is "
      "measured after training, in a fresh process, with `lrft eval --loss`.\n")
    if base is not None:
        w(f"The untrained 4-bit base model scores {100 * base['eval_loglik']['mean_accuracy']:.1f} on the same "
          f"examples (first row of each per-task table) and has a held-out loss of {heldout(base):.3f}.\n")


def commands_section(page: Page) -> None:
    """The commands of every run (first seed) and of inspect-rank."""
    runs, inspect, seeds, w = page.runs, page.inspect, page.seeds, page.w
    w("Commands (each run: `lrft train` on a shipped recipe with `--set` overrides, then `lrft eval`; seed "
      f"{seeds[0]}):\n")
    w("```")
    for name in RUNS:
        if name in runs:
            rec = runs[name][seeds[0]] if seeds[0] in runs[name] else next(iter(runs[name].values()))
            w(f"# {name}")
            w(rec["commands"]["train"])
            w(rec["commands"]["eval"])
            if "heldout_loss" in rec["commands"]:
                w(rec["commands"]["heldout_loss"])
    for exp in EXPERIMENTS:
        for seed, data in sorted(inspect.get(exp, {}).items())[:1]:
            for cmd in data["commands"].values():
                w(cmd)
    w("```\n")


def exp1_section(page: Page) -> None:
    """1. RM-LoRA Table 5."""
    runs, inspect, base, w = page.runs, page.inspect, page.base, page.w
    common_cols, loss_curves_spectra_reading = page.common_cols, page.closing
    w("## 1. " + EXP_TITLES["exp1"] + "\n")
    w("RM-LoRA paper, Table 5: LoRA, GM-LoRA (gradient masking only: `rmlora`, `orth_reg: 0`), R-LoRA "
      "(regulariser only: `mask_rank: null`) and RM-LoRA (both) at the same R, same data and steps. "
      "Rank and orthogonality loss are means over the 150 adapted layers from `lrft inspect-rank --compare`: "
      "`rank` is the numerical rank (σ > max(m, n)·eps·σ_max), `rank@10%` counts σ > 0.1·σ_max (the paper's "
      "Table 5 reports 29 of 32, so it used some tolerance it does not state; with any nonzero B, a LoRA ΔW has "
      "numerical rank r almost surely), `erank` the effective rank; `‖ΔWΔWᵀ−I‖²` is the "
      "paper's orthogonality loss of ΔW (at least out − rank for a low-rank ΔW, so it mostly measures the layer "
      "width); `‖AAᵀ−I‖²` and `‖BᵀB−I‖²` are the regulariser's own terms on the unscaled factors (eq. 10), "
      "and `reg. term` is `orth_reg` times their sum over layers as logged in `metrics.jsonl` (`extra_loss`).\n")
    names = [n for n in EXPERIMENTS["exp1"] if n in runs]
    rows = []
    for name in names:
        d = rank_summary(inspect, "exp1", name)
        t = rank_summary(inspect, "exp1", name, f"tol{RANK_TOL:g}")
        rows.append(common_cols(name) + [
            stat([x.get("mean_rank") for x in d], 1, 1),
            stat([x.get("mean_rank") for x in t], 1, 1),
            stat([x.get("mean_effective_rank") for x in d], 1, 2),
            stat([x.get("mean_orth_loss") for x in d], 1, 2),
            stat([x.get("mean_orth_loss_A") for x in d], 1, 2),
            stat([x.get("mean_orth_loss_B") for x in d], 1, 2),
            stat([mean_last(r["metrics"], "extra_loss") if any("extra_loss" in m for m in r["metrics"]) else None
                  for r in runs[name].values()], 1, 3),
        ])
    w(table(["method", "trainable", "dev acc (loglik, %)", "train loss (last 10)", "held-out loss", "rank of ΔW",
             "rank@10%", "erank", "‖ΔWΔWᵀ−I‖²", "‖AAᵀ−I‖²", "‖BᵀB−I‖²", "reg. term (last 10)"], rows) + "\n")
    if "rlora-r16" in runs:
        first = sorted(runs["rlora-r16"].items())[0][1]["metrics"][0]
        factor = 0.1 / ORTH_REG
        w(f"**Choice of `orth_reg`.** At step 1 of R-LoRA the regulariser term was {first['extra_loss']:.2f} with "
          f"`orth_reg: {ORTH_REG:g}` (squared norms, eq. 10 as printed, summed over the 150 layers) against an LM loss "
          f"of {first['loss']:.2f}. The term is linear in `orth_reg`, so the authors' 0.1 with this squared form would have started at "
          f"{factor * first['extra_loss']:.0f}, {factor * first['extra_loss'] / first['loss']:.0f}× the LM loss: "
          "the optimisation would have been about orthogonality, not the task. (0.1 is the authors' value for the "
          "unsquared, layer-averaged form of their code, `orth_reg_norm: frobenius`.) These runs use "
          f"`orth_reg: {ORTH_REG:g}`, which makes the two terms comparable. Most of what is left is the B term: "
          "B starts at 0, where ‖BᵀB − I‖² = r has zero gradient, so only the task gradient moves B.\n")
    w(per_task_table(runs, names, base) + "\n")
    loss_curves_spectra_reading("exp1", names)


def exp2_section(page: Page) -> None:
    """2. RandLoRA against LoRA at equal parameters, with VeRA and NoLA."""
    runs, inspect, base, w = page.runs, page.inspect, page.base, page.w
    common_cols, loss_curves_spectra_reading = page.common_cols, page.closing
    w("## 2. " + EXP_TITLES["exp2"] + "\n")
    w("RandLoRA paper, Table 1 pairing (Qwen2-0.5B: LoRA-16 ~ RandLoRA-10; SmolLM2's widths give the same "
      "pairing), with VeRA and NoLA at their published defaults. `rank bound` is what the parameterisation "
      "allows (mean over layers); step time is the median of the per-step wall times in `metrics.jsonl` "
      "(steps 3 on).\n")
    names = [n for n in EXPERIMENTS["exp2"] if n in runs]
    rows = []
    for name in names:
        d = rank_summary(inspect, "exp2", name)
        rows.append(common_cols(name) + [
            stat([x.get("mean_rank_bound") for x in d], 1, 1),
            stat([x.get("mean_rank") for x in d], 1, 1),
            stat([x.get("mean_effective_rank") for x in d], 1, 1),
            stat([x.get("mean_stable_rank") for x in d], 1, 2),
            stat([median_step_time(r["metrics"]) for r in runs[name].values()], 1, 2),
        ])
    w(table(["method", "trainable", "dev acc (loglik, %)", "train loss (last 10)", "held-out loss", "rank bound",
             "rank of ΔW", "erank", "stable rank", "step time (s)"], rows) + "\n")
    w(per_task_table(runs, names, base) + "\n")
    loss_curves_spectra_reading("exp2", names)


def exp3_section(page: Page) -> None:
    """3. LoRA² pruning against LoRA."""
    runs, inspect, w = page.runs, page.inspect, page.w
    common_cols, loss_curves_spectra_reading = page.common_cols, page.closing
    results = page.results
    w("## 3. " + EXP_TITLES["exp3"] + "\n")
    parts = []
    if "lora2-k16-R16" in runs and "lora-r16" in runs:
        p2 = next(iter(runs["lora2-k16-R16"].values()))["run"]["trainable_parameters"]
        p1 = next(iter(runs["lora-r16"].values()))["run"]["trainable_parameters"]
        parts.append(f"LoRA² with k = 16 and R = 16 has {100 * (p2 / p1 - 1):.1f} % more trainable parameters than "
                     "LoRA r = 16 (k·(in + out) + 2kR + R per layer against r·(in + out)).")
    parts.append("The importance pruning cuts the R = 16 singular values to a budget of 8 per layer on average "
                 "(AdaLoRA's cubic schedule: warm-up 10 %, final 30 % of the steps). "
                 f"`orth_reg: {LORA2_ORTH_REG:g}`, not the 0.1 that was lrft's LoRA² default when these runs were "
                 f"made (the default is now {default_orth_reg()}, as for RM-LoRA and AdaLoRA):")
    discarded = results / "discarded" / "lora2-k16-R16-orth0.1-s42.metrics.jsonl"
    if discarded.exists():
        m = read_metrics(discarded)
        parts.append(f"a first run with 0.1 (its metrics are kept in `{discarded.relative_to(ROOT)}`) started "
                     f"with a regulariser term of {m[0]['extra_loss']:.0f} against an LM loss of {m[0]['loss']:.2f}, "
                     f"{m[0]['extra_loss'] / m[0]['loss']:.0f}×; its gradient norm stayed near {m[-1]['grad_norm']:.1f} "
                     "(clipped to 1, so nearly all of each update served the regulariser).")
    parts.append("Same issue as RM-LoRA's: the Gram penalties are summed over layers, so a given weight "
                 "counts for more the more layers are adapted.")
    w(" ".join(parts) + "\n")
    names = [n for n in EXPERIMENTS["exp3"] if n in runs]
    rows = []
    for name in names:
        d = rank_summary(inspect, "exp3", name)
        rows.append(common_cols(name) + [stat([x.get("mean_rank") for x in d], 1, 2),
                                         stat([x.get("mean_effective_rank") for x in d], 1, 2)])
    w(table(["method", "trainable", "dev acc (loglik, %)", "train loss (last 10)", "held-out loss", "mean rank of ΔW",
             "erank"], rows) + "\n")
    lora2_allocation(page)
    loss_curves_spectra_reading("exp3", names)


def lora2_allocation(page: Page) -> None:
    """LoRA²'s final rank per module type and depth, from its adapter_config.json summary."""
    runs, w = page.runs, page.w
    if "lora2-k16-R16" not in runs:
        return
    rec = sorted(runs["lora2-k16-R16"].items())[0][1]
    ranks = rec["adapter_config"].get("summary", {}).get("ranks") or {}
    if not ranks:  # older adapters: fall back to inspect-rank's numerical rank
        ranks = {}
    by_module: dict[str, list[int]] = {}
    by_depth: dict[int, list[int]] = {}
    layers = []
    for lname, rank in ranks.items():
        parts = lname.split(".")
        mtype = parts[-1].removesuffix("_proj")
        depth = next(int(p) for p in parts if p.isdigit())
        by_module.setdefault(mtype, []).append(rank)
        by_depth.setdefault(depth, []).append(rank)
        layers.append({"module_type": mtype, "depth": depth, "rank": rank})
    if ranks:
        w(f"Final rank allocation of LoRA² (pruned from R = 16 to a budget of 8 per layer on average, "
          f"{sum(ranks.values())} of {16 * len(ranks)} singular values kept), from the adapter's "
          "`adapter_config.json` summary:\n")
        mods = ["q", "k", "v", "up", "down"]
        w(table(["module"] + mods, [["mean final rank"] + [f"{statistics.mean(by_module[m]):.1f}" for m in mods if m in by_module],
                                    ["min–max"] + [f"{min(by_module[m])}–{max(by_module[m])}" for m in mods if m in by_module],
                                    ["layers pruned to 0"] + [str(sum(1 for v in by_module[m] if v == 0)) for m in mods if m in by_module]]) + "\n")
        thirds = [("layers 0–9", range(0, 10)), ("layers 10–19", range(10, 20)), ("layers 20–29", range(20, 30))]
        w(table(["depth"] + [t for t, _ in thirds],
                [["mean final rank"] + [f"{statistics.mean([v for d in r for v in by_depth.get(d, [])]):.1f}" for _, r in thirds]]) + "\n")
        if plot_allocation(layers, DOCDIR / Path("results-exp3-allocation.png"), "LoRA² final rank per layer"):
            w("![exp3 allocation](results-exp3-allocation.png)\n")


def exp4_section(page: Page) -> None:
    """4. Sparse RandLoRA bases."""
    runs, inspect, base, w = page.runs, page.inspect, page.base, page.w
    common_cols, loss_curves_spectra_reading = page.common_cols, page.closing
    w("## 4. " + EXP_TITLES["exp4"] + "\n")
    zf = {s_: sparse_zero_fraction(s_) for s_ in (6.0, None)}
    w("RandLoRA paper, Table 4 and sec. 6.4. lrft's sparse basis has entries ±√(s/2) with probability 1/s each "
      "and 0 otherwise, so a fraction 1 − 2/s is zero, for 2 ≤ s ≤ √D (D the layer's larger side). "
      f"s = 6 gives {100 * zf[6.0]['overall']:.1f} % zeros. The paper's 93 % (s ≈ 28) exceeds √576 = 24 on SmolLM2's "
      "q/k/v layers (lrft refuses it), so the \"very sparse\" run leaves `sparsity` unset: s = √D per layer, "
      f"24 on q, k, v ({100 * zf[None]['q']:.1f} % zeros) and √1536 ≈ 39.2 on up and down "
      f"({100 * zf[None]['up']:.1f} % zeros): {100 * zf[None]['overall']:.1f} % of all basis entries "
      "(A and every B_j, counted per layer).\n")
    names = [n for n in EXPERIMENTS["exp4"] if n in runs]
    rows = []
    sparsity_of = {"randlora-r10": "dense", "randlora-r10-sparse6": 6.0, "randlora-r10-sparse-sqrtD": None}
    for name in names:
        d = rank_summary(inspect, "exp4", name)
        sp = sparsity_of.get(name, "lora")
        expected = "–" if sp in ("lora",) else (
            f"{statistics.mean(SHAPES_D[m] for m in SHAPES):.1f}" if sp == "dense" else
            f"{expected_sparse_rank(sp):.1f}")
        rows.append(common_cols(name) + [
            stat([x.get("mean_rank_bound") for x in d], 1, 1),
            expected,
            stat([x.get("mean_rank") for x in d], 1, 1),
            stat([x.get("mean_effective_rank") for x in d], 1, 1),
            stat([median_step_time(r["metrics"]) for r in runs[name].values()], 1, 2)])
    w(table(["method", "trainable", "dev acc (loglik, %)", "train loss (last 10)", "held-out loss", "rank bound",
             "expected rank (A's non-zero columns)", "rank of ΔW", "erank", "step time (s)"], rows) + "\n")
    w("**Sparse bases and rank.** RandLoRA's n terms share one A (r × d, d the smaller side): ΔW = Σ_j B_j Λ_j A Γ_j "
      "maps every input direction through A, so a column of A that is entirely zero is a direction of the "
      "smaller side that no term can ever reach. With r = 10 rows and a fraction 1 − 2/s of zeros, a column is all "
      "zero with probability (1 − 2/s)^10, so rank(ΔW) ≤ d·(1 − (1 − 2/s)^10) in expectation: the "
      "`expected rank` column (mean over the 150 layers). The measured ranks follow it. Every layer of one "
      "shape shares the same A (same seed), so they all lose the same columns. These runs use that one shared A, "
      "lrft's default and what the paper's eq. 4, the authors' code and PEFT do; `adapter.keep_rank: true` draws "
      "a separate sparse A_j for every term (eq. 3) and keeps full rank at the same sparsity (docs/adapters.md), "
      "and lrft warns when a sparse setting's expected rank is below 90 % of d.\n")
    w(per_task_table(runs, names, base) + "\n")
    loss_curves_spectra_reading("exp4", names)


def generate_section(page: Page) -> None:
    """The generate-mode evaluation, and the place of the overall reading."""
    runs, w = page.runs, page.w
    gen = {n: r for n, recs in runs.items() for s, r in recs.items() if "eval_generate" in r}
    w("## Generate-mode evaluation\n")
    if gen:
        lim = next(iter(gen.values()))["eval_generate"]["limit"]
        rows = [[RUNS[n]["label"], f"{100 * r['eval_generate']['mean_accuracy']:.1f}",
                 str(sum(t['no_answer'] for t in r['eval_generate']['tasks'].values())),
                 f"{r['wall_s']['eval_generate'] / 60:.1f}"] for n, r in gen.items()]
        w(f"The published protocol (4-beam search, 32 new tokens, first regex match) was run on a subset only, "
          f"the first {lim} examples per task for the runs below: on this CPU it costs far more than loglik. "
          f"With {8 * lim} examples the standard error of the mean is about "
          f"{100 * binomial_se(0.5, 8 * lim):.1f} points.\n")
        w(table(["method", f"dev acc (generate, %, {lim}/task)", "no answer parsed", "minutes"], rows) + "\n")
    else:
        w("Not run: see the reading below.\n")
    w("<!-- reading:generate -->\n")
    w("## Reading\n")
    w("<!-- reading:overall -->\n")


def fill_readings(text: str, page: Page) -> str:
    """The hand-written readings (experiments/readings.md) in their places, their facts filled in."""
    readings = ROOT / "experiments" / "readings.md"
    if readings.exists():
        sections = {}
        current = None
        for line in readings.read_text().splitlines():
            if line.startswith("<!-- reading:"):
                current = line.strip()
                sections[current] = []
            elif current:
                sections[current].append(line)
        for key, lines in sections.items():
            text = text.replace(key, "\n".join(lines).strip() + "\n")
        text = fill_facts(text, reading_facts(page.runs, page.inspect, page.base, page.settings, page.results))
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated experiments (exp1..exp4) or run names")
    p.add_argument("--seeds", default="42", help="comma-separated seeds (default 42)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    p.add_argument("--lr", default="3e-4", help="learning rate for every run, or 'recipe' for each shipped "
                   "recipe's own (this page: 3e-4 for all)")
    p.add_argument("--limit", type=int, default=20, help="dev examples per task for loglik evaluation")
    p.add_argument("--generate-limit", type=int, default=0, help="also run generate-mode eval on N per task")
    p.add_argument("--generate-runs", default="lora-r16,randlora-r10", help="runs that get the generate-mode eval")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (at most 2 on a 2-core machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--results", default="experiments/results", help="folder for the result JSON files")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--runs-dir", default="runs/commonsense", help="where lrft writes the runs")
    p.add_argument("--force", action="store_true", help="rerun runs whose results already exist")
    p.add_argument("--inspect", default=None, help="comma-separated experiments to run inspect-rank for "
                   "(default: every experiment touched)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--no-render", action="store_true")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    global DOCDIR, RUNS_DIR
    RUNS_DIR = Path(args.runs_dir)
    DOCDIR = Path(os.path.relpath((ROOT / args.doc).resolve().parent, ROOT))
    args.generate_runs = set(filter(None, args.generate_runs.split(",")))
    results = ROOT / args.results
    study.ensure(results)
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU, Python {platform.python_version()}"
    meta_path = results / "meta.json"
    if not args.render_only:
        names: list[str] = []
        selected = args.only.split(",") if args.only else list(EXPERIMENTS)
        for item in selected:
            if item in EXPERIMENTS:
                names += [n for n in EXPERIMENTS[item] if n not in names]
            elif item in RUNS:
                names.append(item) if item not in names else None
            elif item != "base":
                sys.exit(f"--only {item}: unknown; choose from {', '.join(list(EXPERIMENTS) + list(RUNS))}")
        exps = [e for e in EXPERIMENTS if args.only is None or e in selected or any(n in names for n in EXPERIMENTS[e])]
        if args.inspect is not None:
            exps = [e for e in exps if e in args.inspect.split(",")]
        t0 = time.time()
        # cheapest first: if the machine is slower than planned, whole experiments finish before the costly runs
        jobs = sorted(((n, s) for s in args.seeds for n in names),
                      key=lambda j: COST["sparse" if "sparse" in j[0] else RUNS[j[0]]["recipe"]])
        failures = []
        if args.only is None or "base" in selected:  # the untrained base: after the cheap runs
            jobs.insert(min(len(jobs), 4), ("base", 0))
        with ThreadPoolExecutor(max_workers=max(1, min(2, args.jobs))) as pool:
            futures = {(pool.submit(do_base_eval, args, results, logs) if n == "base" else
                        pool.submit(do_run, n, s, args, results, logs)): (n, s) for n, s in jobs}
            for future, key in futures.items():
                try:
                    future.result()
                except Exception as exc:  # keep going: report at the end
                    failures.append((key, str(exc)))
                    print(f"[FAILED] {key}: {exc}", flush=True)
        for exp in exps:
            for seed in args.seeds:
                try:
                    do_inspect(exp, seed, args, results, logs)
                except Exception as exc:
                    failures.append(((exp, seed), str(exc)))
                    print(f"[FAILED] inspect {exp}: {exc}", flush=True)
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if TRAINED:  # record how the training runs were scheduled
            meta.update({"machine": args.machine, "jobs": args.jobs, "threads": args.threads})
        meta.update({"last_invocation": " ".join(sys.argv), "last_wall_s": round(time.time() - t0, 1)})
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        print(f"finished in {(time.time() - t0) / 60:.1f} min; failures: {failures or 'none'}", flush=True)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    args.machine = meta.get("machine", args.machine)
    args.jobs_used = meta.get("jobs", args.jobs)
    args.threads_used = meta.get("threads", args.threads)
    if not args.no_render:
        render(results, ROOT / args.doc, args)


if __name__ == "__main__":
    main()
