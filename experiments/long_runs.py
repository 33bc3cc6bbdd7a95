#!/usr/bin/env python
"""SmolLM2 at a length where methods separate (issue 20, part 3): held-out loss after 200+ optimizer steps on
``train_mix`` for LoRA, RandLoRA (dense, and sparse with ``keep_rank``), RM-LoRA (both masking modes) and LoRA²
at matched trainable parameters, each at its own best learning rate, two seeds; RM-LoRA's regulariser weight
swept in both norms; the RM-LoRA paper's Table 5 analogue from the long runs.

Like experiments/commonsense.py every number comes from the real CLI (``lrft train``
on a shipped SmolLM2 recipe with ``--set`` overrides, ``lrft eval --loss``, ``lrft inspect-rank --json``), one
result file per run lands in experiments/results/long/ as soon as the run is done (record it on the branch
study-results with ``python experiments/study.py commit``: docs/studies.md), and docs/long-runs.md is rendered
from those files only.

    .venv/bin/python experiments/long_runs.py --plan                 # every run, its state and estimated time
    .venv/bin/python experiments/long_runs.py --budget-minutes 240   # run what fits in 4 h, then stop
    .venv/bin/python experiments/long_runs.py                        # everything (many CPU hours)
    .venv/bin/python experiments/long_runs.py --render-only          # rebuild docs/long-runs.md
    .venv/bin/python experiments/long_runs.py --stages sweep --methods lora,lora2   # a part
    # smoke test into a scratch folder:
    .venv/bin/python experiments/long_runs.py --steps 4 --sweep-steps 2 --limit 2 --save-steps 2 \\
        --methods lora --seeds 42 --results /tmp/long --runs-dir /tmp/long/runs --doc /tmp/long/long-runs.md

Stages (run in this order; a later stage reads the choices of an earlier one from its result files)
  sweep  ``--sweep-steps`` (40) steps, first seed, each method over its learning-rate grid (RandLoRA: lr ×
         scaling alpha/r), scored by the loss on the *selection* split of the held-out file; the lowest wins.
  final  ``--steps`` (200) steps, every seed, each method at its chosen (lr, scaling), scored on the *test*
         split (disjoint from the selection split), plus the untrained base model on the test split;
         ``lrft inspect-rank`` at the default tolerance and at σ > ``RANK_TOL``·σ_max.
  reg    ``--steps`` steps, ``--reg-seeds`` (first seed): RM-LoRA (exact masking) at RM-LoRA's chosen lr with
         ``orth_reg`` swept in both norms, GM-LoRA (orth_reg 0) and R-LoRA (no masking): Table 5's rows.

Resuming. A run whose result file exists with the same settings is skipped. Every training run saves a
checkpoint every ``--save-steps`` (25) steps; a rerun of this script continues an interrupted run with
``lrft train ... --resume`` (from its newest complete checkpoint), finishes an evaluation that was cut off, and
restarts from scratch only when the run's settings changed. ``--budget-minutes N`` starts a run only when its
estimated remaining time fits in what is left of N minutes of wall time (with ``--fill``, it starts it anyway),
and at the deadline stops the run in flight with SIGTERM: lrft finishes its step, writes a checkpoint and
exits; the next invocation resumes it. Ctrl+C does the same. Once a run's result file is written its
checkpoints are deleted (``--keep-checkpoints`` keeps them); the adapter stays for inspect-rank. Estimates (``--plan``) come from measured step
times: this study's own finished runs first (at the same thread count, and on this CPU type, AVX2 or
AVX-512, when any ran on it), then ``--measure``'s file, then the pilot's 20-step runs in
experiments/results/*.json (batch 4, micro-batch 4, at the thread count in its meta.json), scaled linearly in
the batch size; the plan says which source each method's estimate uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import study  # experiments/ is on sys.path when a study runs as a script: the shared settings and helpers

ROOT = study.ROOT
LRFT = study.LRFT
TRAIN = study.TRAIN
HELDOUT_SOURCE = study.HELDOUT  # train_500.jsonl: 400 records, 100 per task, disjoint from train_mix.jsonl
N_LAYERS = 30  # SmolLM2-135M decoder layers; 5 targets each (study.SHAPES)
LORA_R = 16  # the reference budget: LoRA r = 16 on the 150 targets (3,317,760 trainable parameters)
PARAM_TOL = 0.03  # every method's trainable count within 3 % of LoRA's
RANK_TOL = study.RANK_TOL  # the stated tolerance of the Table 5 rank: σ > 0.1 σ_max
ORTH_REG = study.ORTH_REG  # RM-LoRA's squared-norm weight in the sweep and final stages (lrft's default, 1e-3)
LORA2_ORTH_REG = study.LORA2_ORTH_REG  # as in the pilot (docs/results.md section 3)
MICRO_BATCH = 4

# What each stage sweeps. The middle entry is the centre (the shipped recipe's value); ``--sweep-points 1``
# keeps only the centre, for smoke tests.
LORA_LRS = [1e-4, 3e-4, 1e-3]
LORA2_LRS = [1e-2, 3e-2, 1e-1]  # the recipe's 3e-2 in the middle: Λ starts at 0 (docs/results.md section 3)
RANDLORA_SCALINGS = [2.0, 20.0]  # alpha / r: the authors report 2r..20r working; 20 is lrft's default
REG_SQUARED = [0.0, 1e-4, 1e-3, 1e-2]  # eq. 10 as printed, summed over layers (0 = GM-LoRA)
REG_FROBENIUS = [0.01, 0.1, 1.0]  # the authors' code: unsquared, averaged over factors; 0.1 is theirs
# A method whose best sweep point (over all its rows) sits at the edge of its row (same scaling) has not
# bracketed the optimum: that row, and only that one, gets the next value of this ladder beyond that edge, up to
# MAX_EXTEND values beyond its initial grid per direction (``extension``; a short sweep that stops at its grid's
# edge picks the edge by construction, which is what the first 8 runs did for LoRA and RandLoRA).
LR_LADDER = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
MAX_EXTEND = 2
SELECT_EVERY, SELECT_N = 4, 100  # selection split: records 0, 4, 8, ... of train_500.jsonl (25 per task)
TEST_N = 200  # test split: the odd records (50 per task); disjoint from the selection split


@dataclass
class Method:
    key: str
    label: str
    recipe: str  # recipes/smollm2-commonsense-<recipe>.yaml
    sets: dict  # adapter overrides besides the size, which ``matched_sizes`` chooses
    lrs: list
    scalings: Optional[list] = None  # RandLoRA: alpha = scaling · r, swept with the lr
    cost: str = ""  # which pilot run's step time estimates this one
    lr_from: Optional[str] = None  # no sweep of its own: its final runs take this method's choice (an ablation)


METHODS: dict[str, Method] = {m.key: m for m in [
    Method("lora", "LoRA", "lora", {}, LORA_LRS, cost="lora-r16"),
    Method("randlora", "RandLoRA dense (uniform)", "randlora", {"adapter.basis": "uniform"}, LORA_LRS,
           RANDLORA_SCALINGS, cost="randlora-r10"),
    Method("randlora-sparse-keep", "RandLoRA sparse s=√D, keep_rank", "randlora",
           {"adapter.basis": "sparse", "adapter.keep_rank": True}, LORA_LRS, RANDLORA_SCALINGS,
           cost="randlora-r10-sparse-sqrtD"),
    # issue 20 part 2 on SmolLM2: the same sparse bases with one A shared by all terms (lrft's default, the
    # paper's eq. 4, PEFT), at keep_rank's (lr, scaling) so that only the sharing differs
    Method("randlora-sparse-shared", "RandLoRA sparse s=√D, one shared A", "randlora",
           {"adapter.basis": "sparse", "adapter.keep_rank": False}, LORA_LRS, RANDLORA_SCALINGS,
           cost="randlora-r10-sparse-sqrtD", lr_from="randlora-sparse-keep"),
    Method("rmlora-exact", "RM-LoRA, exact masking (lrft's extension)", "rmlora",
           {"adapter.orth_reg": ORTH_REG, "adapter.orth_reg_norm": "squared", "adapter.mask_mode": "exact"},
           LORA_LRS, cost="rmlora-r16"),
    Method("rmlora-grad_only", "RM-LoRA, grad_only masking (authors' code)", "rmlora",
           {"adapter.orth_reg": ORTH_REG, "adapter.orth_reg_norm": "squared", "adapter.mask_mode": "grad_only"},
           LORA_LRS, cost="rmlora-r16"),
    Method("lora2", "LoRA²", "lora2", {"adapter.orth_reg": LORA2_ORTH_REG}, LORA2_LRS, cost="lora2-k16-R16"),
]}


# --- matched parameter counts --------------------------------------------------------------------------


def recipe_path(recipe: str) -> Path:
    return ROOT / "recipes" / f"smollm2-commonsense-{recipe}.yaml"


def trainable_count(recipe: str, sets: dict) -> int:
    """Trainable parameters of the adapter a recipe with these overrides builds, from lrft's own
    ``num_trainable`` over SmolLM2's 150 target shapes (what ``run.json`` reports after training)."""
    from lrft.adapters import get_adapter
    from lrft.recipe import load_recipe

    config = load_recipe(recipe_path(recipe), [f"{k}={fmt_value(v)}" for k, v in sets.items()]).adapter
    layer = get_adapter(config.type).layer
    return N_LAYERS * sum(layer.num_trainable(fan_in, fan_out, config) for fan_in, fan_out in study.SHAPES.values())


def size_sets(key: str, size: int, lora_r: int) -> dict:
    """The size overrides of a method at size ``size`` (LoRA / RM-LoRA r, RandLoRA basis rank r, LoRA² k)."""
    if key in ("lora", "rmlora-exact", "rmlora-grad_only"):
        sets = {"adapter.r": size, "adapter.alpha": 2 * size}
        if key.startswith("rmlora"):
            sets["adapter.mask_rank"] = max(1, size // 2)  # the authors' r̂ = r/2
        return sets
    if key.startswith("randlora"):
        return {"adapter.r": size}  # alpha from the scaling: alpha = scaling · r
    if key == "lora2":  # R = LoRA's r prunable values, pruned to half (as the pilot's exp3)
        return {"adapter.k": size, "adapter.r": lora_r, "adapter.target_r": max(1, lora_r // 2),
                "adapter.alpha": 2 * lora_r}
    raise KeyError(key)


def matched_sizes(lora_r: int = LORA_R) -> dict[str, dict]:
    """For every method, the size whose trainable count is closest to LoRA r's (ties: the smaller count):
    {key: {"size", "sets", "params", "rel"}} with rel the relative difference to LoRA's count."""
    reference = trainable_count("lora", size_sets("lora", lora_r, lora_r))
    out = {}
    for key, method in METHODS.items():
        if key in ("lora", "rmlora-exact", "rmlora-grad_only"):  # LoRA's own parameterisation
            candidates = [lora_r]
        elif key.startswith("randlora"):  # n·(r + d) per layer decreases in r: search around the pairing
            candidates = range(2, 4 * lora_r)
        else:  # LoRA²: k(in + out) + 2kR + R per layer, increasing in k
            candidates = range(1, 2 * lora_r)
        best = None
        for size in candidates:
            sets = {**method.sets, **size_sets(key, size, lora_r)}
            if key.startswith("randlora"):
                sets["adapter.alpha"] = 20 * size  # does not change the count
            params = trainable_count(method.recipe, sets)
            score = (abs(params - reference), params)
            if best is None or score < best[0]:
                best = (score, size, params)
        _, size, params = best
        out[key] = {"size": size, "sets": size_sets(key, size, lora_r), "params": params,
                    "rel": params / reference - 1.0}
    return out


# --- the runs ------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    name: str
    stage: str  # sweep | final | reg | base
    method: str  # a METHODS key (reg runs: the RM-LoRA variant they belong to)
    seed: int
    steps: int
    split: str  # select | test
    label: str
    lr: Optional[float] = None  # None: waits for the sweep
    scaling: Optional[float] = None
    sets: dict = field(default_factory=dict)  # adapter overrides (size, method, alpha)
    inspect: bool = False
    cost: str = ""  # pilot run name for the step-time estimate
    waits_for: Optional[str] = None  # the method whose sweep sets this run's lr


def fmt_value(v) -> str:
    """A --set value as YAML reads it back (PyYAML needs the dot in 1.0e-05 to see a float)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = f"{v:.10g}"
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    return str(v)


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def grid(values: list, points: int) -> list:
    """The middle ``points`` values of a grid (all of it by default)."""
    if points >= len(values):
        return list(values)
    start = (len(values) - points) // 2
    return list(values[start:start + points])


def centre(values: list):
    return values[(len(values) - 1) // 2] if len(values) % 2 else values[len(values) // 2]


def method_sets(key: str, sizes: dict, scaling: Optional[float]) -> dict:
    m = METHODS[key]
    sets = {**m.sets, **sizes[key]["sets"]}
    if scaling is not None:
        sets["adapter.alpha"] = scaling * sets["adapter.r"]
    return sets


def ladder_step(lr: float, direction: int) -> Optional[float]:
    """The LR_LADDER value next to ``lr`` in ``direction`` (+1 up, -1 down); None past the ladder's end."""
    i = min(range(len(LR_LADDER)), key=lambda j: abs(math.log(LR_LADDER[j] / lr)))
    j = i + direction
    return LR_LADDER[j] if 0 <= j < len(LR_LADDER) else None


def sweep_spec(args, sizes: dict, key: str, lr: float, scaling: Optional[float]) -> RunSpec:
    m, seed = METHODS[key], args.seeds[0]
    tag = f"lr{lr_tag(lr)}" + ("" if scaling is None else f"-a{scaling:g}")
    return RunSpec(f"sweep-{key}-{tag}-s{seed}", "sweep", key, seed, args.sweep_steps, "select",
                   f"{m.label}, lr {lr:g}" + ("" if scaling is None else f", alpha/r {scaling:g}"),
                   lr, scaling, method_sets(key, sizes, scaling), False, m.cost)


def best_point(records: dict[str, dict], points: list[RunSpec]) -> Optional[tuple[float, RunSpec]]:
    """(loss, spec) of the lowest finite selection loss once every point is done; None while one is missing or
    when all diverged."""
    if not points or any(s.name not in records for s in points):
        return None
    finite = [(held(records[s.name]), s) for s in points if math.isfinite(held(records[s.name]))]
    return min(finite, key=lambda x: x[0]) if finite else None


def row_lrs(points: list[RunSpec], scaling: Optional[float]) -> list[float]:
    return sorted({s.lr for s in points if s.scaling == scaling})


def extension(records: dict[str, dict], points: list[RunSpec], base_lrs: list) -> Optional[tuple[float, Optional[float]]]:
    """(lr, scaling) of the next sweep point when the best so far sits at the edge of its row and the row has
    been extended fewer than MAX_EXTEND times that way; None otherwise."""
    found = best_point(records, points)
    if found is None or len(base_lrs) < 2:
        return None
    best = found[1]
    row = row_lrs(points, best.scaling)
    direction = 1 if best.lr == row[-1] else -1 if best.lr == row[0] else 0
    beyond = [x for x in row if (x > max(base_lrs) if direction > 0 else x < min(base_lrs))]
    if direction == 0 or len(beyond) >= MAX_EXTEND:
        return None
    lr = ladder_step(best.lr, direction)
    return None if lr is None else (lr, best.scaling)


def sweep_specs(args, sizes: dict, records: Optional[dict[str, dict]] = None) -> list[RunSpec]:
    """Every method's grid (RandLoRA: lr x scaling), then, given the finished ``records``, the points that
    extend a row whose best lr is at its edge (see LR_LADDER)."""
    specs = []
    for key in args.methods:
        m = METHODS[key]
        if m.lr_from:
            continue
        scalings = [None] if m.scalings is None else (
            m.scalings if args.sweep_points >= len(m.lrs) else [RANDLORA_SCALINGS[-1]])
        base_lrs = grid(m.lrs, args.sweep_points)
        points = [sweep_spec(args, sizes, key, lr, scaling) for scaling in scalings for lr in base_lrs]
        while records is not None:
            more = extension(records, points, base_lrs)
            if more is None:
                break
            points.append(sweep_spec(args, sizes, key, *more))
        specs += points
    return specs


def selection(records: dict[str, dict], sweep: list[RunSpec], key: str) -> Optional[dict]:
    """The chosen (lr, scaling) of a method: the lowest selection-split loss once every sweep point is done
    (diverged runs count as infinitely bad); None while a point is missing. ``edge``: the choice is still at
    the end of its row (same scaling) of learning rates, so the optimum may lie beyond it."""
    points = [s for s in sweep if s.method == key]
    if not points or any(s.name not in records for s in points):
        return None
    found = best_point(records, points)
    if found is None:
        return {"lr": None, "scaling": None, "loss": float("inf"), "edge": False, "all_diverged": True}
    loss, best = found
    row = row_lrs(points, best.scaling)
    edge = len(row) > 1 and best.lr in (row[0], row[-1])
    return {"lr": best.lr, "scaling": best.scaling, "loss": loss, "edge": edge, "run": best.name}


def final_specs(args, sizes: dict, records: dict, sweep: list[RunSpec]) -> list[RunSpec]:
    specs = [RunSpec("base-test", "base", "base", 0, 0, "test", "base model (no adapter)")]
    for seed in args.seeds:  # seed-major: an interrupted study has whole seeds
        for key in args.methods:
            m = METHODS[key]
            chosen = selection(records, sweep, m.lr_from or key)
            lr = chosen["lr"] if chosen else None
            scaling = chosen["scaling"] if chosen else (RANDLORA_SCALINGS[-1] if m.scalings else None)
            specs.append(RunSpec(f"final-{key}-s{seed}", "final", key, seed, args.steps, "test", m.label, lr, scaling,
                                 method_sets(key, sizes, scaling), True, m.cost, waits_for=m.lr_from or key))
    return specs


def reg_variants(r: int) -> list[tuple[str, str, dict]]:
    """(name, label, adapter overrides) of the reg stage's RM-LoRA variants at rank r."""
    variants = []
    for norm, weights in (("squared", REG_SQUARED), ("frobenius", REG_FROBENIUS)):
        for weight in weights:
            if norm == "squared" and weight == ORTH_REG:
                continue  # = final-rmlora-exact
            if weight == 0 and norm != "squared":
                continue
            name = "gmlora" if weight == 0 else f"rmlora-{norm}-{weight:g}"
            label = (f"GM-LoRA (orth_reg 0, mask {r // 2})" if weight == 0 else
                     f"RM-LoRA, {norm} orth_reg {weight:g} (mask {r // 2})")
            variants.append((name, label, {"adapter.orth_reg": weight, "adapter.orth_reg_norm": norm}))
    variants.append(("rlora", f"R-LoRA (squared orth_reg {ORTH_REG:g}, no masking)", {"adapter.mask_rank": None}))
    return variants


def reg_specs(args, sizes: dict, records: dict, sweep: list[RunSpec]) -> list[RunSpec]:
    """RM-LoRA (exact masking) at RM-LoRA's chosen lr: orth_reg over both norms, GM-LoRA (orth_reg 0) and
    R-LoRA (no masking). The squared 1e-3 point is the final stage's rmlora-exact run, not repeated."""
    if "rmlora-exact" not in args.methods:
        return []
    chosen = selection(records, sweep, "rmlora-exact")
    lr = chosen["lr"] if chosen else None
    base = method_sets("rmlora-exact", sizes, None)
    variants = reg_variants(base["adapter.r"])
    specs = []
    for seed in args.reg_seeds:
        for name, label, extra in variants:
            specs.append(RunSpec(f"reg-{name}-s{seed}", "reg", "rmlora-exact", seed, args.steps, "test", label, lr, None,
                                 {**base, **extra}, True, "rmlora-r16", waits_for="rmlora-exact"))
    return specs


def all_specs(args, sizes: dict, records: dict) -> dict[str, list[RunSpec]]:
    sweep = sweep_specs(args, sizes, records)
    # choices come from every method's sweep, so that a part (--methods) can run a final whose lr another
    # invocation's sweep chose
    every_sweep = sweep_specs(argparse.Namespace(**{**vars(args), "methods": list(METHODS)}), sizes, records)
    stages = {"sweep": sweep, "final": final_specs(args, sizes, records, every_sweep),
              "reg": reg_specs(args, sizes, records, every_sweep)}
    out = {}
    for stage in args.stages:
        specs = stages[stage]
        if args.only:
            specs = [s for s in specs if re.search(args.only, s.name)]
        out[stage] = specs
    return out


# --- settings, commands, run folders --------------------------------------------------------------------


def settings_of(spec: RunSpec, args) -> dict:
    """What a result file must match to be reused (and a checkpoint to be resumed)."""
    if spec.stage == "base":
        return {"split": "test", "heldout_n": heldout_n(args, "test")}
    return {"steps": spec.steps, "batch_size": args.batch_size, "micro_batch_size": MICRO_BATCH, "lr": spec.lr,
            "warmup_steps": warmup(spec.steps), "sets": {k: spec.sets[k] for k in sorted(spec.sets)},
            "split": spec.split, "heldout_n": heldout_n(args, spec.split), "seed": spec.seed}


def warmup(steps: int) -> int:
    return max(1, steps // 10)


def heldout_n(args, split: str) -> int:
    n = SELECT_N if split == "select" else TEST_N
    return min(n, args.limit) if args.limit else n


def split_path(args, split: str) -> Path:
    return Path(args.runs_dir) / "data" / f"heldout-{split}.jsonl"


def write_splits(args) -> None:
    """The two held-out splits of train_500.jsonl (deterministic; both spread over its four tasks)."""
    lines = [line for line in (ROOT / HELDOUT_SOURCE).read_text().splitlines() if line.strip()]
    select = [line for i, line in enumerate(lines) if i % SELECT_EVERY == 0][:SELECT_N]
    test = [line for i, line in enumerate(lines) if i % 2 == 1][:TEST_N]
    for split, rows in (("select", select), ("test", test)):
        path = ROOT / split_path(args, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(row + "\n" for row in rows)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def run_dir(spec: RunSpec, args) -> Path:
    return Path(args.runs_dir) / spec.name


def study_path(spec: RunSpec, args) -> Path:
    """The runner's notes on a run (its settings, attempts, the pid of the lrft process in flight)."""
    return Path(args.runs_dir) / f"{spec.name}.study.json"


def train_command(spec: RunSpec, args, resume: bool) -> list[str]:
    sets = {
        "data.path": TRAIN,
        "data.cutoff_len": 256,
        "data.val_size": 0,
        "training.seed": spec.seed,
        "adapter.seed": spec.seed,
        "training.max_steps": spec.steps,
        "training.batch_size": args.batch_size,
        "training.micro_batch_size": MICRO_BATCH,
        "training.learning_rate": spec.lr,
        "training.warmup_steps": warmup(spec.steps),
        "training.lr_scheduler": "linear",
        "training.eval_steps": None,  # held-out loss is measured after training, in a fresh process
        "training.save_steps": args.save_steps,  # a resume point every N steps (free to change on resume)
        "output_dir": str(run_dir(spec, args)),
        **spec.sets,
    }
    cmd = LRFT + ["train", str(recipe_path(METHODS[spec.method].recipe).relative_to(ROOT)),
                  "--resume" if resume else "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={fmt_value(value)}"]
    return cmd


def loss_command(spec: RunSpec, args) -> list[str]:
    out = run_dir(spec, args) / f"heldout-{spec.split}-loss.json"
    source = (["--model", "smollm2-135m-instruct", "--quantization", "4"] if spec.stage == "base"
              else ["--adapter", str(run_dir(spec, args) / "adapter")])
    return LRFT + ["eval"] + source + ["--loss", "--data", str(split_path(args, spec.split)),
                                       "--limit", str(heldout_n(args, spec.split)), "--output", str(out)]


def inspect_command(spec: RunSpec, args, tol: Optional[float]) -> list[str]:
    key = "default" if tol is None else f"tol{tol:g}"
    cmd = LRFT + ["inspect-rank", str(run_dir(spec, args) / "adapter"),
                  "--json", str(run_dir(spec, args) / f"inspect-{key}.json")]
    return cmd + ([] if tol is None else ["--tol", str(tol)])


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_state(spec: RunSpec, args) -> dict:
    """Where a run stands on disk: done (result file), trained (adapter saved), resumable at a step, or new."""
    out = {"state": "new", "step": 0}
    record = read_json(results_dir(args) / f"{spec.name}.json")
    settings = settings_of(spec, args)
    if record and record.get("settings") == settings:
        return {"state": "done", "step": spec.steps}
    if spec.stage == "base":
        return out
    directory = ROOT / run_dir(spec, args)
    notes = read_json(ROOT / study_path(spec, args), {}) or {}
    if notes.get("settings") != settings:
        return out
    run = read_json(directory / "run.json", {})
    if run.get("finished") and (directory / "adapter" / "adapter_config.json").exists():
        return {"state": "trained", "step": spec.steps}
    steps = [int(m.group(1)) for p in (directory / "checkpoints").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer_state.pt").exists()]
    if steps:
        return {"state": "resume", "step": max(steps)}
    return out


def results_dir(args) -> Path:
    return ROOT / args.results


def load_records(args) -> dict[str, dict]:
    return {p.stem: data for p in sorted(results_dir(args).glob("*.json"))
            if p.name not in ("meta.json", "step-times.json") and (data := read_json(p)) and "stage" in data}


def held(record: dict) -> float:
    if record.get("diverged"):
        return float("inf")
    return (record.get("heldout_loss") or {}).get("loss", float("nan"))


# --- time estimates --------------------------------------------------------------------------------------


def step_seconds(metrics: list[dict]) -> Optional[float]:
    """Median step wall time, leaving out the first steps (start-up); None without one."""
    times = [m["step_time_s"] for m in metrics if "step_time_s" in m]
    times = times[2:] if len(times) > 3 else times[1:]
    return statistics.median(times) if times else None


class Estimator:
    """Seconds per training example (step time / batch size) per method, and the start-up, evaluation and
    inspect-rank costs, from the most specific measurement available (see the module docstring)."""

    def __init__(self, args, records: dict[str, dict], cpu: Optional[str] = None):
        self.args = args
        self.per_example: dict[str, tuple[float, str]] = {}
        pilot_dir = ROOT / args.pilot_results
        pilot_threads = (read_json(pilot_dir / "meta.json", {}) or {}).get("threads", "?")
        measured = read_json(results_dir(args) / "step-times.json", {}) or {}
        overheads, per_record, eval_start, inspect_s = [], [], [], []
        self.inspect_by_method: dict[str, list[float]] = {}
        pilot_keys: list[str] = []  # methods whose estimate is the pilot's step time
        this_cpu = cpu or cpu_label({"machine": machine()})  # the CPU the remaining runs will train on
        pilot_per_example: dict[str, float] = {}  # every method the pilot timed
        for key, method in METHODS.items():
            pilot = read_json(pilot_dir / f"{method.cost}-s42.json")
            if pilot and step_seconds(pilot["metrics"]):
                pilot_per_example[key] = step_seconds(pilot["metrics"]) / pilot["settings"]["batch_size"]
            timed = [r for r in records.values()
                     if r.get("method") == key and r.get("stage") in ("sweep", "final", "reg")
                     and r.get("threads") == args.threads and step_seconds(r.get("metrics", []))]
            # step times differ by CPU type (docs/long-runs.md groups them so): this CPU's runs first
            here = [r for r in timed if cpu_label(r) == this_cpu]
            if own := [step_seconds(r["metrics"]) / r["settings"]["batch_size"] for r in (here or timed)]:
                self.per_example[key] = (statistics.median(own), f"this study's runs ({len(own)}, "
                                         f"{this_cpu if here else 'other CPUs'}), {args.threads} thread(s)")
                continue
            entry = (measured.get("methods") or {}).get(key, {}).get(str(args.threads))
            if entry:
                self.per_example[key] = (entry["step_time_s"] / measured["batch_size"],
                                         f"--measure ({args.threads} thread(s), batch {measured['batch_size']})")
                continue
            if key in pilot_per_example:
                self.per_example[key] = (pilot_per_example[key], f"pilot {method.cost} (20 steps, "
                                                                 f"{pilot_threads} thread(s))")
                pilot_keys.append(key)
        # The pilot ran on a CPU shared with other jobs: its step times are rescaled by the median ratio
        # (this study / pilot) of the methods measured both ways, which keeps the pilot's relative costs.
        ratios = [self.per_example[key][0] / pilot_per_example[key] for key in pilot_per_example
                  if key in self.per_example and key not in pilot_keys]
        if ratios:
            ratio = statistics.median(ratios)
            for key in pilot_keys:
                value, source = self.per_example[key]
                self.per_example[key] = (value * ratio, f"{source} x {ratio:.2f}, the median ratio of "
                                                        f"{len(ratios)} method(s) timed both ways")
        for rec in list(records.values()) + [read_json(p) for p in pilot_dir.glob("*-s42.json")]:
            if not rec or "metrics" not in rec or "wall_s" not in rec:
                continue
            steps = [m["step_time_s"] for m in rec["metrics"] if "step_time_s" in m]
            if rec["wall_s"].get("train"):
                overheads.append(rec["wall_s"]["train"] - sum(steps))
            loss = rec.get("heldout_loss") or {}
            wall = rec["wall_s"].get("heldout_loss")
            if wall and loss.get("n") and loss.get("seconds") is not None:
                per_record.append(loss["seconds"] / loss["n"])
                eval_start.append(wall - loss["seconds"])
            for key in ("inspect_default", f"inspect_tol{RANK_TOL:g}"):
                if rec["wall_s"].get(key) and rec.get("method") in METHODS:
                    self.inspect_by_method.setdefault(rec["method"], []).append(rec["wall_s"][key])
        for data in [read_json(p) for p in pilot_dir.glob("inspect-exp*-s42.json")]:
            if data and data.get("wall_s"):  # one call over several adapters: per adapter
                inspect_s += [w / max(1, len(data["names"])) for w in data["wall_s"].values()]
        self.overhead = statistics.median(overheads) if overheads else 40.0
        self.per_record = statistics.median(per_record) if per_record else 1.5
        self.eval_start = statistics.median(eval_start) if eval_start else 30.0
        # the pilot's calls mix cheap factored LoRA spectra with RandLoRA's full-rank ones: take the dearest
        self.inspect = max(inspect_s) if inspect_s else 30.0
        fallback = statistics.median([v for v, _ in self.per_example.values()]) if self.per_example else 4.0
        for key in METHODS:
            self.per_example.setdefault(key, (fallback, "no measurement: median of the others"))

    def seconds(self, spec: RunSpec, state: dict) -> float:
        """Wall seconds the run still needs from its state on disk."""
        if state["state"] == "done":
            return 0.0
        total = self.eval_start + self.per_record * heldout_n(self.args, spec.split)
        if spec.stage == "base":
            return total
        if state["state"] != "trained":
            remaining = spec.steps - state["step"]
            total += self.overhead + remaining * self.args.batch_size * self.per_example[spec.method][0]
        if spec.inspect:
            own = self.inspect_by_method.get(spec.method)
            total += 2 * (statistics.median(own) if own else self.inspect)
        return total


# --- executing -------------------------------------------------------------------------------------------


class Stop(Exception):
    """Budget deadline or Ctrl+C / SIGTERM: the run in flight was stopped cleanly; nothing more starts."""


class Runner:
    def __init__(self, args):
        self.args = args
        self.child: Optional[subprocess.Popen] = None
        self.stop_requested = False
        self.deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self.stop_requested:
            print(f"[stop] signal {signum}: the run in flight checkpoints and stops; nothing more starts", flush=True)
        self.stop_requested = True
        self._stop_child()

    def _stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None and not getattr(self.child, "stopping", False):
            self.child.stopping = True
            self.child.send_signal(signal.SIGTERM)  # lrft: finish the step, checkpoint, exit 130

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def sh(self, cmd: list[str], log: Path, on_start=None) -> tuple[int, float]:
        """Run one lrft command in its own session (so that only this runner signals it; it gets SIGTERM if
        this process dies), appending to ``log``; returns (exit code, wall seconds). At the deadline or on
        Ctrl+C / SIGTERM the command gets one SIGTERM: lrft train finishes its step, checkpoints, exits 130."""
        t0 = time.time()
        with open(log, "a") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            self.child = subprocess.Popen(cmd, cwd=ROOT, env=study.child_env(self.args.threads), stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent)
            if on_start:
                on_start(self.child)
            self.load_samples = []
            try:
                while True:
                    try:
                        rc = self.child.wait(timeout=2.0)
                        break
                    except subprocess.TimeoutExpired:
                        self.load_samples.append(os.getloadavg()[0])
                        if self.left() <= 0 and not self.stop_requested:
                            print("[budget] deadline reached: the run in flight checkpoints and stops", flush=True)
                            self.stop_requested = True
                        if self.stop_requested:
                            self._stop_child()
            finally:
                self.child = None
        return rc, time.time() - t0

    def run(self, spec: RunSpec, est: Estimator) -> Optional[dict]:
        args = self.args
        settings = settings_of(spec, args)
        state = run_state(spec, args)
        out = results_dir(args) / f"{spec.name}.json"
        if state["state"] == "done":
            return read_json(out)
        logs = results_dir(args) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{spec.name}.log"
        directory = ROOT / run_dir(spec, args)
        commands, walls = {}, {}
        study_file = ROOT / study_path(spec, args)
        notes = read_json(study_file, {}) or {}
        alive = notes.get("pid")
        if alive and _alive(alive):
            raise RuntimeError(f"{spec.name}: an lrft process (pid {alive}) still trains in {directory}; "
                               "wait for it to checkpoint and exit, or stop it, then rerun")
        attempts = notes.get("attempts", []) if state["state"] != "new" else []
        if spec.stage != "base" and state["state"] in ("new", "resume"):
            resume = state["state"] == "resume"
            cmd = train_command(spec, args, resume)
            print(f"[{'resume' if resume else 'start'}] {spec.name}"
                  + (f" from step {state['step']}" if resume else "")
                  + f" (lr {spec.lr:g}; ~{est.seconds(spec, state) / 60:.0f} min; {time.strftime('%H:%M:%S')})", flush=True)
            attempt = {"mode": "resume" if resume else "fresh", "from_step": state["step"],
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "exit": None}
            study_file.parent.mkdir(parents=True, exist_ok=True)
            attempts.append(attempt)  # exit stays null if this script dies before the attempt ends
            # next to the run folder, not in it (--overwrite empties the folder); the pid keeps a second
            # invocation from training the same folder meanwhile
            rc, wall = self.sh(cmd, log, on_start=lambda proc: write_json(
                study_file, {"settings": settings, "attempts": attempts, "pid": proc.pid}))
            attempt.update(exit=rc, wall_s=round(wall, 1))
            if self.load_samples:  # did this run have the CPU to itself? (speeds compare only if so)
                attempt["cpu_load"] = round(sum(self.load_samples) / len(self.load_samples), 2)
            write_json(study_file, {"settings": settings, "attempts": attempts})
            if rc == 130 or (rc != 0 and self.stop_requested):
                print(f"[stopped] {spec.name}: checkpoint at step {run_state(spec, args)['step']}; "
                      "rerun to continue it", flush=True)
                raise Stop
            if rc != 0:
                tail = log.read_text()[-2000:]
                if "error: loss is" in tail:  # TrainingDiverged: a result, not a failure (lr too high)
                    record = self._record(spec, settings, {"train": " ".join(cmd[2:])}, {}, attempts, directory)
                    found = re.findall(r"error: (loss is [^;]*)", tail)
                    record["diverged"] = found[-1] if found else "non-finite loss"
                    write_json(out, record)
                    print(f"[diverged] {spec.name}: recorded as a diverged run", flush=True)
                    return record
                raise RuntimeError(f"{spec.name}: lrft train exited {rc}; see {log}")
        elif state["state"] == "trained":
            print(f"[eval] {spec.name}: trained, evaluating ({time.strftime('%H:%M:%S')})", flush=True)
        if spec.stage == "base":
            print(f"[start] {spec.name} ({time.strftime('%H:%M:%S')})", flush=True)
        if spec.stage != "base":  # as a fresh run; an attempt that resumed used --resume instead
            commands["train"] = " ".join(train_command(spec, args, False)[2:])
        cmd = loss_command(spec, args)
        commands["heldout_loss"] = " ".join(cmd[2:])
        rc, walls["heldout_loss"] = self.sh(cmd, log)
        if self.stop_requested:
            raise Stop
        if rc != 0:
            raise RuntimeError(f"{spec.name}: lrft eval exited {rc}; see {log}")
        inspect = {}
        if spec.inspect:
            for tol in (None, RANK_TOL):
                key = "default" if tol is None else f"tol{tol:g}"
                cmd = inspect_command(spec, args, tol)
                commands[f"inspect_{key}"] = " ".join(cmd[2:])
                rc, walls[f"inspect_{key}"] = self.sh(cmd, log)
                if self.stop_requested:
                    raise Stop
                if rc != 0:
                    raise RuntimeError(f"{spec.name}: lrft inspect-rank exited {rc}; see {log}")
                payload = read_json(directory / f"inspect-{key}.json")
                inspect[key] = {"rank_tolerance": payload.get("rank_tolerance"), "summary": payload["summary"],
                                "layers": [{k: row.get(k) for k in ("name", "shape", "rank_bound", "rank",
                                                                     "effective_rank", "orth_loss", "orth_loss_A",
                                                                     "orth_loss_B", "sigma_max")}
                                           for row in payload["layers"]] if tol is None else None}
        record = self._record(spec, settings, commands, walls, attempts, directory)
        record["heldout_loss"] = read_json(ROOT / cmd_output(commands["heldout_loss"]))
        if inspect:
            record["inspect"] = inspect
        write_json(out, record)
        if not args.keep_checkpoints and (directory / "checkpoints").is_dir():  # the run is done: ~80 MB freed
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        print(f"[done] {spec.name}: held-out ({spec.split}) loss {held(record):.4f} ({time.strftime('%H:%M:%S')})",
              flush=True)
        return record

    def _record(self, spec, settings, commands, walls, attempts, directory) -> dict:
        record = {"name": spec.name, "stage": spec.stage, "method": spec.method, "seed": spec.seed,
                  "label": spec.label, "lr": spec.lr, "scaling": spec.scaling, "settings": settings,
                  "threads": self.args.threads, "machine": machine(), "commands": commands, "wall_s": dict(walls)}
        if spec.stage != "base":
            record["attempts"] = attempts
            record["wall_s"]["train"] = round(sum(a.get("wall_s", 0) for a in attempts), 1)
            run = read_json(directory / "run.json", {})
            record["run"] = run
            record["metrics"] = study.read_metrics(directory / "metrics.jsonl") if (directory / "metrics.jsonl").exists() else []
            config = read_json(directory / "adapter" / "adapter_config.json")
            if config:
                record["adapter_config"] = config
        record["wall_s"] = {k: round(v, 1) for k, v in record["wall_s"].items()}
        return record


def cmd_output(command: str) -> str:
    return command.split("--output ")[1].split()[0]


def _die_with_parent() -> None:
    """Child side (Linux): SIGTERM when this script dies, so an orphaned lrft checkpoints and exits."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return "lrft" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True


def machine() -> str:
    from lrft.machine import machine_info

    info = machine_info()
    return (f"{info['cpu']} ({', '.join(info['cpu_flags']) or 'no AVX2'}), {info['cpu_cores']} CPU cores, "
            f"Python {platform.python_version()}")


# --- plan ------------------------------------------------------------------------------------------------


def plan_rows(args, sizes: dict, records: dict, est: Estimator) -> tuple[list[tuple], dict[str, float]]:
    """(stage, spec, state, seconds, fits) per run in execution order, and the seconds per stage."""
    rows, per_stage = [], {}
    spent = 0.0
    budget = 60 * args.budget_minutes if args.budget_minutes else float("inf")
    for stage, specs in all_specs(args, sizes, records).items():
        for spec in specs:
            state = run_state(spec, args)
            seconds = est.seconds(spec, state)
            fits = spent + seconds <= budget
            if fits or args.fill:
                spent += seconds
            rows.append((stage, spec, state, seconds, fits))
            per_stage[stage] = per_stage.get(stage, 0.0) + seconds
    return rows, per_stage


def print_plan(args, sizes: dict, records: dict) -> None:
    est = Estimator(args, records)
    print(f"matched trainable parameters (LoRA r = {LORA_R}: {sizes['lora']['params']:,}; tolerance "
          f"{100 * PARAM_TOL:g} %):")
    for key, s in sizes.items():
        size = ", ".join(f"{k.split('.')[-1]}={fmt_value(v)}" for k, v in s["sets"].items())
        print(f"  {key:22s} {size:44s} {s['params']:>10,}  {100 * s['rel']:+.2f} %")
    print("\nstep-time estimates (seconds per training example; step = batch_size examples):")
    for key, (value, source) in est.per_example.items():
        print(f"  {key:22s} {value:6.2f} s/example = {value * args.batch_size:6.1f} s/step  [{source}]")
    if any(source.startswith("pilot") for _, source in est.per_example.values()):
        print(f"  (pilot step times: 20-step runs at micro-batch 4 on a CPU shared with other jobs, at the thread "
              f"count above, not necessarily --threads {args.threads}; this study's own runs replace them as they "
              "land, or run --measure first)")
    print(f"  start-up per training process {est.overhead:.0f} s; held-out loss {est.eval_start:.0f} s + "
          f"{est.per_record:.2f} s/record; inspect-rank {est.inspect:.0f} s per call when not yet measured (2 per final/reg run)\n")
    rows, per_stage = plan_rows(args, sizes, records, est)
    print(f"{'stage':6s} {'run':44s} {'lr':>8s} {'a/r':>5s} {'steps':>9s} {'state':>16s} {'est. min':>9s}")
    for stage, spec, state, seconds, fits in rows:
        status = {"done": "done", "trained": "trained, eval", "resume": f"resume @{state['step']}",
                  "new": "new"}[state["state"]]
        if spec.lr is None and spec.stage not in ("base",) and state["state"] != "done":
            status += ", lr pending"
        mark = "" if fits else "  (beyond budget)"
        lr = "–" if spec.lr is None else f"{spec.lr:g}"
        print(f"{stage:6s} {spec.name:44s} {lr:>8s} {fmt_value(spec.scaling) if spec.scaling else '–':>5s} "
              f"{spec.steps:>9d} {status:>16s} {seconds / 60:9.1f}{mark}")
    total = sum(per_stage.values())
    print()
    for stage, seconds in per_stage.items():
        n = sum(1 for r in rows if r[0] == stage)
        todo = sum(1 for r in rows if r[0] == stage and r[2]["state"] != "done")
        print(f"stage {stage:6s}: {n} runs, {todo} to do, ~{seconds / 3600:.1f} h wall = "
              f"~{args.threads * seconds / 3600:.1f} CPU-h at {args.threads} thread(s)")
    print("(once a method's sweep points are done, the row holding its best point, if that point is at the "
          f"row's edge, gets up to {MAX_EXTEND} more points beyond it, one at a time; they appear here then)")
    print(f"total: ~{total / 3600:.1f} h wall, ~{args.threads * total / 3600:.1f} CPU-h at {args.threads} thread(s), "
          "one run at a time")
    if args.budget_minutes:
        fit = [r for r in rows if r[4] and r[2]["state"] != "done"]
        print(f"within --budget-minutes {args.budget_minutes:g}: {len(fit)} runs would run to completion "
              "(runs whose lr waits for a sweep are counted but start only once their sweep is done)")


# --- measure ---------------------------------------------------------------------------------------------


def measure(args, sizes: dict) -> None:
    """Time ``--measure-steps`` training steps of every method at 1 and 2 threads (centre lr); writes
    RESULTS/step-times.json, which the estimates use when this study has no runs of a method yet."""
    path = results_dir(args) / "step-times.json"
    data = read_json(path, {}) or {"batch_size": args.batch_size, "steps": args.measure_steps, "methods": {}}
    if data.get("batch_size") != args.batch_size:
        data = {"batch_size": args.batch_size, "steps": args.measure_steps, "methods": {}}
    logs = results_dir(args) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for key in args.methods:
        m = METHODS[key]
        scaling = RANDLORA_SCALINGS[-1] if m.scalings else None
        for threads in (1, 2):
            spec = RunSpec(f"measure-{key}-t{threads}", "measure", key, args.seeds[0], args.measure_steps, "select",
                           m.label, centre(m.lrs), scaling, method_sets(key, sizes, scaling))
            cmd = train_command(spec, argparse.Namespace(**{**vars(args), "save_steps": None}), resume=False)
            env = study.child_env(threads)
            t0 = time.time()
            with open(logs / f"{spec.name}.log", "w") as fh:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"[FAILED] measure {key} at {threads} thread(s): see {logs / (spec.name + '.log')}", flush=True)
                continue
            metrics = study.read_metrics(ROOT / run_dir(spec, args) / "metrics.jsonl")
            entry = {"step_time_s": step_seconds(metrics), "all_step_times_s": [x["step_time_s"] for x in metrics],
                     "wall_s": round(time.time() - t0, 1), "machine": machine()}
            data["methods"].setdefault(key, {})[str(threads)] = entry
            write_json(path, data)
            print(f"[measure] {key} at {threads} thread(s): {entry['step_time_s']:.1f} s/step "
                  f"(batch {args.batch_size})", flush=True)


# --- rendering -------------------------------------------------------------------------------------------


def mean_se(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:  # the seeds column says so
        return f"{values[0]:.{digits}f}"
    se = statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):.{digits}f} ± {se:.{digits}f}"


def t_within(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with ``df`` degrees of freedom (Abramowitz & Stegun 26.7.3-4: a finite
    series in cos θ, θ = atan(t / √df), exact for integer df)."""
    theta = math.atan(t / math.sqrt(df))
    odd = df % 2 == 1
    term, total = (math.cos(theta) if odd else 1.0), 0.0
    for j in range((df - 1) // 2 if odd else df // 2):
        if j:  # odd df: 1, 2/3, 2·4/(3·5), ... times cos^(2j+1); even df: 1, 1/2, 1·3/(2·4), ... times cos^2j
            term *= math.cos(theta) ** 2 * ((2 * j) / (2 * j + 1) if odd else (2 * j - 1) / (2 * j))
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total) if odd else math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| ≤ t) = ``confidence`` (df degrees of freedom), by bisection."""
    low, high = 0.0, 1e7
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_within(mid, df) < confidence else (low, mid)
    return (low + high) / 2


def t_half_width(values: list[float], comparisons: int = 1) -> float:
    """Half the width of the 95 % confidence interval of the mean (Student t, n − 1 df; n ≥ 2). With
    ``comparisons``, Bonferroni's adjustment for that many intervals read together: each at 1 − 0.05 /
    comparisons (two seeds, six comparisons: t = 76.4)."""
    return t_quantile(1 - 0.05 / comparisons, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def t_interval(values: list[float], digits: int = 3, comparisons: int = 1) -> str:
    """The interval of ``t_half_width`` and whether it excludes 0: with two seeds t is 12.7, so only a
    difference far larger than its seed-to-seed spread counts."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return "–"
    half, mean = t_half_width(values, comparisons), statistics.mean(values)
    verdict = "excludes 0" if abs(mean) > half else "includes 0"
    return f"[{mean - half:+.{digits}f}, {mean + half:+.{digits}f}] ({verdict})"


def summary_of(record: dict, key: str = "default") -> dict:
    return ((record.get("inspect") or {}).get(key) or {}).get("summary", {}).get("overall", {})


def render(args, sizes: dict, records: dict) -> None:
    """docs/long-runs.md (and its loss plot) from the result files, one function per section."""
    doc = ROOT / args.doc
    doc.parent.mkdir(parents=True, exist_ok=True)
    specs = all_specs(argparse.Namespace(**{**vars(args), "only": None, "stages": ["sweep", "final", "reg"]}),
                      sizes, records)
    out = (page_head(args) + status_section(args, sizes, records, specs) + setting_section(args, records)
           + sizes_section(sizes, records) + sweep_section(args, records, specs["sweep"])
           + final_section(records, doc.parent) + table5_section(sizes, records) + commands_section(records))
    text = "\n".join(out)
    readings = ROOT / "experiments" / "long-readings.md"
    if readings.exists():
        reading = re.sub(r"<!--.*?-->\s*", "", readings.read_text(), flags=re.S)  # the note to its editors
        text += "\n## Reading\n\n" + study.fill_facts(reading, long_facts(records, sizes))
    doc.write_text(text)
    print(f"rendered {doc}", flush=True)


def page_head(args) -> list[str]:
    return [
        "# Long runs: SmolLM2 at a length where methods separate\n",
        f"Generated by `experiments/long_runs.py` from `{args.results}/*.json` (on the branch `study-results`: "
        "[studies.md](studies.md)); every number below is read from those files (nothing typed by hand). The runs "
        "are issue 20's part 3: LoRA, RandLoRA (dense, and sparse with `keep_rank`), RM-LoRA in both masking modes "
        "and LoRA² at matched trainable parameters, each at its own learning rate from a short sweep, two seeds; "
        "RM-LoRA's regulariser weight in both norms; the RM-LoRA paper's Table 5 analogue. "
        "[docs/results.md](results.md) is the 20-step pilot.\n",
        "```\n.venv/bin/python experiments/long_runs.py --plan                # every run, its state, estimated time\n"
        ".venv/bin/python experiments/long_runs.py --budget-minutes 240  # run what fits in 4 h; rerun to continue\n"
        ".venv/bin/python experiments/long_runs.py --render-only         # rebuild this page\n```\n"
        "Result files are written as each run lands; an interrupted run continues from its last checkpoint "
        f"(every {args.save_steps} steps) with `lrft train ... --resume` when the script is rerun.\n",
    ]


def status_section(args, sizes: dict, records: dict, specs: dict[str, list[RunSpec]]) -> list[str]:
    out = ["## Status\n"]
    rows = []
    for stage, stage_specs in specs.items():
        missing = [s.name for s in stage_specs if s.name not in records]
        rows.append([stage, f"{len(stage_specs) - len(missing)} of {len(stage_specs)}",
                     ", ".join(f"`{m}`" for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
                     or "–"])
    out.append(study.table(["stage", "runs done", "not yet run"], rows) + "\n")
    if any(s.name not in records for stage in specs.values() for s in stage):
        out.append("Cells of runs not yet done read \"–\"; the study is incomplete until every stage is.\n")
    # the page estimates for the CPU the study last ran on (meta.json), not the one rendering it: a page is
    # a function of the result files
    est = Estimator(args, records, cpu_label(read_json(results_dir(args) / "meta.json") or {"machine": machine()}))
    plan = plan_rows(argparse.Namespace(**{**vars(args), "only": None, "stages": ["sweep", "final", "reg"],
                                           "budget_minutes": None}), sizes, records, est)[0]
    rows = []
    for stage in ("sweep", "final", "reg"):
        stage_rows = [r for r in plan if r[0] == stage]
        spent = sum(x["wall_s"].get("train", 0) + sum(v for k, v in x["wall_s"].items() if k != "train")
                    for x in records.values() if x["stage"] == stage or (stage == "final" and x["stage"] == "base"))
        rows.append([stage, str(len(stage_rows)), f"{spent / 3600:.1f}", f"{sum(r[3] for r in stage_rows) / 3600:.1f}"])
    threads = sorted({r.get("threads") for r in records.values() if r.get("threads")}) or [args.threads]
    at_once = ("one or two runs at a time (*CPU shared*, see Setting)"
               if any(shared_cpu(r) for r in records.values() if r["stage"] != "base") else "one run at a time")
    out.append(f"**CPU budget.** Wall hours of the runs ({'/'.join(map(str, threads))} torch thread(s) each, {at_once}; "
               "CPU-hours are the wall hours times the threads): "
               "spent so far, from the result files, and still to go, estimated as `--plan` does from measured step "
               "times (per method, with where it was measured: "
               + "; ".join(f"{METHODS[k].label} {v * args.batch_size:.1f} s/step from {src}" for k, (v, src) in
                           est.per_example.items())
               + f"), {est.overhead:.0f} s of start-up per training process and the measured cost of `lrft eval --loss` "
                 "and `lrft inspect-rank`. The CPU was shared with other jobs, so these are rough.\n")
    out.append(study.table(["stage", "runs", "hours spent", "hours to go (estimate)"], rows) + "\n")
    return out


def recorded(records: dict, key: str, default, where=lambda r: r["stage"] != "base"):
    """A setting of the first result file that ``where`` accepts; ``default`` before any."""
    return next((r["settings"][key] for r in records.values() if where(r)), default)


def setting_section(args, records: dict) -> list[str]:
    any_rec = next((r for r in records.values() if r.get("run")), None)
    steps_final = recorded(records, "steps", args.steps, lambda r: r["stage"] == "final")
    steps_sweep = recorded(records, "steps", args.sweep_steps, lambda r: r["stage"] == "sweep")
    batch = recorded(records, "batch_size", args.batch_size)
    n_sel = recorded(records, "heldout_n", heldout_n(args, "select"), lambda r: r["settings"].get("split") == "select")
    n_test = recorded(records, "heldout_n", heldout_n(args, "test"), lambda r: r["settings"].get("split") == "test")
    seeds = sorted({r["seed"] for r in records.values() if r["stage"] == "final"}) or args.seeds
    versions = (any_rec or {}).get("run", {}).get("versions", {})
    trained = [r for r in records.values() if r["stage"] != "base"]
    rows = [
        ["model", "`smollm2-135m-instruct`, 4-bit nf4, double quantization, float32 compute; targets q, k, v, up, "
                  "down of all 30 layers (150 modules)"],
        ["lrft", f"{any_rec['run'].get('lrft_version')}; torch {versions.get('torch', '?')}, "
                 f"bitsandbytes {versions.get('bitsandbytes', '?')}" if any_rec else "– (no run yet)"],
        ["machine", ("; ".join(f"{m} ({n} runs)" for m, n in Counter(r.get("machine") for r in records.values()
                                                                     if r.get("machine")).items()) or machine())
                    + "; torch threads per run: "
                    + (", ".join(f"{t} ({n} runs)" for t, n in sorted(Counter(r["threads"] for r in trained if r.get("threads")).items()))
                       or str(args.threads))
                    + "; runs at 1 thread ran two at a time (two invocations on disjoint runs); a run counts as "
                      "*CPU shared* when the machine's 1-minute load average, sampled through its training, "
                      "exceeded its thread count + 0.5, and step times compare only within one CPU type, thread "
                      "count and sharing"],
        ["training", f"`{TRAIN}`, cutoff 256, AdamW, linear decay after 10 % warm-up, batch {batch} "
                     f"(micro-batch {MICRO_BATCH}); sweep runs {steps_sweep} steps, final and reg runs {steps_final} "
                     f"steps ({steps_final * batch} examples); the loss is taken on every token of a record, its "
                     "prompt included (the recipes' `train_on_inputs: true`, as in the published runs)"],
        ["held-out loss", f"`lrft eval --loss` (mean token loss, prompt tokens included as in training) on two "
                          f"disjoint splits of `{HELDOUT_SOURCE}` (disjoint from the training file): selection "
                          f"= records 0, 4, 8, … (first {n_sel}), used only to pick the learning rate; test = the odd "
                          f"records (first {n_test}), reported below"],
        ["seeds", f"{', '.join(map(str, seeds))} (training data order, dropout and adapter init / bases); the sweep "
                  f"uses seed {args.seeds[0]} only; ± is the standard error of the mean over seeds, and the "
                  "paired column takes each seed's difference to LoRA at the same seed (same data order)"],
        ["rank tolerance", f"`rank` is lrft's numerical rank (σ > max(m, n)·eps·σ_max, float32 eps); "
                           f"`rank@{RANK_TOL:g}` counts σ > {RANK_TOL:g}·σ_max (the paper states none)"],
    ]
    if trained:
        wall = sum(r["wall_s"].get("train", 0) for r in trained)
        evals = sum(v for r in records.values() for k, v in r["wall_s"].items() if k != "train")
        rows.append(["wall time so far", f"{wall / 3600:.1f} h training + {evals / 3600:.1f} h evaluation and "
                                         f"inspect-rank over {len(records)} result files"])
    return ["## Setting\n", study.table(["", ""], rows) + "\n"]


def sizes_section(sizes: dict, records: dict) -> list[str]:
    rows = []
    for key, s in sizes.items():
        measured = {r["run"].get("trainable_parameters") for r in records.values()
                    if r.get("method") == key and r["stage"] in ("sweep", "final") and r.get("run")}
        size = ", ".join(f"{k.split('.')[-1]} = {fmt_value(v)}" for k, v in s["sets"].items())
        rows.append([METHODS[key].label, size, f"{s['params']:,}", f"{100 * s['rel']:+.2f} %",
                     ", ".join(f"{m:,}" for m in sorted(x for x in measured if x)) or "–"])
    return [
        "## Matched trainable parameters\n",
        f"LoRA r = {LORA_R} on the 150 targets is the budget; every other method takes the size whose count, from "
        f"lrft's own `num_trainable`, is closest (tolerance {100 * PARAM_TOL:g} %). `measured` is `run.json`'s "
        "count of the finished runs. LoRA² counts its R prunable values at the start (pruning masks them, the "
        "parameters stay).\n",
        study.table(["method", "size", "trainable (computed)", "vs LoRA", "measured"], rows) + "\n",
    ]


def sweep_cells(records: dict, sweep: list[RunSpec], key: str) -> list[str]:
    """One method's row of the sweep table: its points with their selection loss (the chosen one in bold), and
    the choice."""
    chosen = selection(records, sweep, key)
    cells = []
    for s in (s for s in sweep if s.method == key):
        rec = records.get(s.name)
        value = "–" if rec is None else ("diverged" if rec.get("diverged") else f"{held(rec):.4f}")
        tag = f"lr {s.lr:g}" + ("" if s.scaling is None else f", a/r {s.scaling:g}")
        if chosen and chosen.get("run") == s.name:
            value = f"**{value}**"
        cells.append(f"{tag}: {value}")
    note = "pending" if chosen is None else ("all diverged" if chosen.get("all_diverged") else
                                             f"lr {chosen['lr']:g}" + ("" if chosen["scaling"] is None else
                                                                       f", a/r {chosen['scaling']:g}")
                                             + (" (grid edge)" if chosen["edge"] else ""))
    return [METHODS[key].label, "<br>".join(cells), note]


def sweep_section(args, records: dict, sweep: list[RunSpec]) -> list[str]:
    steps_sweep = recorded(records, "steps", args.sweep_steps, lambda r: r["stage"] == "sweep")
    steps_final = recorded(records, "steps", args.steps, lambda r: r["stage"] == "final")
    rows = []
    for key, m in METHODS.items():
        if m.lr_from:
            rows.append([m.label, f"no sweep of its own: the final runs take the choice of "
                         f"{METHODS[m.lr_from].label}, so that only the sharing of A differs", "–"])
        elif any(s.method == key for s in sweep):
            rows.append(sweep_cells(records, sweep, key))
    return [
        "## Learning-rate sweep\n",
        f"Held-out loss on the selection split after {steps_sweep} steps (seed {args.seeds[0]}); the chosen point "
        "is in bold. Once every point of a method is done, its best point (the lowest loss over all its rows; a "
        "row is one scaling) is checked: if it sits at an edge of its own row, that row alone gets the next "
        f"value of the ladder {', '.join(f'{x:g}' for x in LR_LADDER)} beyond that edge, up to {MAX_EXTEND} "
        "values beyond the row's initial grid per direction, and the check repeats; other rows are not extended, "
        "whatever their own best. A choice still at an edge after that is flagged (the optimum may lie outside "
        "the grid). RandLoRA sweeps its scaling alpha/r with the lr. The choice is made at "
        f"{steps_sweep} steps and used for {steps_final}: a short sweep favours fast progress, so for the long "
        "runs it is, if anything, on the high side; every method gets the same treatment, which is what the "
        "comparison needs.\n",
        study.table(["method", "held-out loss (selection split) per point", "chosen"], rows) + "\n",
    ]


def compared(records: dict) -> list[str]:
    """The methods whose final runs are paired with LoRA's: the family of comparisons Bonferroni adjusts for."""
    lora = final_records(records, "lora")
    return [key for key in METHODS if key != "lora" and paired(final_records(records, key), lora)]


def final_row(records: dict, key: str, comparisons: int) -> list[str]:
    recs = final_records(records, key)
    if not recs:
        return [METHODS[key].label] + ["–"] * 11
    diffs = paired(recs, final_records(records, "lora")) if key != "lora" else []
    d = [summary_of(r) for r in recs]
    return [
        METHODS[key].label,
        f"{recs[0]['lr']:g}" + ("" if recs[0].get("scaling") is None else f" (a/r {recs[0]['scaling']:g})"),
        str(len(recs)),
        mean_se([held(r) for r in recs], 4) + (f" ({sum(1 for r in recs if r.get('diverged'))} diverged)"
                                               if any(r.get("diverged") for r in recs) else ""),
        mean_se(diffs, 4) if diffs else "–",
        t_interval(diffs, 4) if diffs else "–",
        t_interval(diffs, 4, comparisons) if diffs else "–",
        mean_se([study.mean_last(r["metrics"], "loss") for r in recs], 3),
        mean_se([x.get("mean_rank") for x in d], 1),
        mean_se([x.get("mean_effective_rank") for x in d], 1),
        step_time_cell(recs),
        mean_se(step_ratios(records, key), 2) if key != "lora" else "1",
    ]


def final_section(records: dict, docdir: Path) -> list[str]:
    out = ["## Held-out loss after the long runs\n"]
    if base := records.get("base-test"):
        out.append(f"The untrained 4-bit base model has a test-split loss of {held(base):.4f}.\n")
    m = len(compared(records))
    rows = [final_row(records, key, m) for key in METHODS]
    out.append("Δ vs LoRA is each seed's test loss minus LoRA's at the same seed (same data order), mean ± standard "
               f"error; the 95 % interval uses Student's t with n − 1 degrees of freedom ({t_quantile(0.95, 1):.1f} "
               "for two seeds), so a "
               "difference *excludes 0* only when it is large against its spread between seeds. The "
               f"Bonferroni interval reads the {m} comparisons with LoRA as one family: each is a "
               f"{100 * (1 - 0.05 / max(m, 1)):.2f} % interval (t = {t_quantile(1 - 0.05 / max(m, 1), 1):.1f} for "
               "two seeds), so that all of them together cover their true differences with 95 % probability. "
               "Negative: lower loss than LoRA. Losses are means over every token of a record, prompt included.\n")
    out.append(study.table(["method", "lr", "seeds", "held-out loss (test)", "Δ vs LoRA (paired)", "95 % interval of Δ",
                            f"Bonferroni 95 % interval ({m} comparisons)", "train loss (last 10)", "rank of ΔW",
                            "erank", "step time (s)", "step time / LoRA's"], rows) + "\n")
    out.append("Step times are medians per run, grouped by the CPU they ran on (the runs moved between machines with "
               "and without AVX-512, and some trained two at a time: *CPU shared*); `step time / LoRA's` pairs each "
               "run with LoRA's at the same seed on the same CPU, thread count and sharing, the only comparison of "
               "speed these runs support.\n")
    if plot_curves(records, docdir / "long-runs-loss.png"):
        out.append("![training loss of the final runs](long-runs-loss.png)\n")
    return out


def table5_rows(sizes: dict, records: dict) -> list[tuple[str, list[dict]]]:
    """(label, runs by seed) of Table 5's analogue: LoRA, GM-LoRA, R-LoRA, RM-LoRA in both masking modes, then
    the regulariser-weight variants."""
    reg_labels = {f"reg-{name}": label for name, label, _ in reg_variants(sizes["rmlora-exact"]["sets"]["adapter.r"])}
    rows = [(METHODS["lora"].label, final_records(records, "lora"))]
    rows += [(reg_labels[key], reg_records(records, key)) for key in ("reg-gmlora", "reg-rlora")]
    rows += [(METHODS[key].label + f" (squared orth_reg {ORTH_REG:g})", final_records(records, key))
             for key in ("rmlora-exact", "rmlora-grad_only")]
    rows += [(label, reg_records(records, key)) for key, label in reg_labels.items()
             if key not in ("reg-gmlora", "reg-rlora")]
    return rows


def width_floor(record: dict) -> Optional[float]:
    """The mean over layers of out − rank: the part of ‖ΔWΔWᵀ − I‖² that the layer's width and ΔW's rank fix
    (each zero singular value of the out × out ΔWΔWᵀ adds 1), whatever the update's singular values."""
    layers = ((record.get("inspect") or {}).get("default") or {}).get("layers") or []
    return statistics.mean(layer["shape"][0] - layer["rank"] for layer in layers) if layers else None


def above_floor(record: dict) -> Optional[float]:
    """The mean over layers of ‖ΔWΔWᵀ − I‖² − (out − rank) = Σ (σᵢ² − 1)²: how far ΔW's singular values are
    from 1, the part that the regulariser and the masking can change."""
    floor, orth = width_floor(record), summary_of(record).get("mean_orth_loss")
    return None if floor is None or orth is None else orth - floor


def table5_section(sizes: dict, records: dict) -> list[str]:
    rows = []
    for label, recs in table5_rows(sizes, records):
        d, t = [summary_of(r) for r in recs], [summary_of(r, f"tol{RANK_TOL:g}") for r in recs]
        reg_term = [study.mean_last(r["metrics"], "extra_loss") if any("extra_loss" in m for m in r["metrics"]) else None
                    for r in recs]
        rows.append([label, str(len(recs)) if recs else "–", mean_se([held(r) for r in recs], 4),
                     mean_se([x.get("mean_rank") for x in d], 1), mean_se([x.get("mean_rank") for x in t], 1),
                     mean_se([x.get("mean_effective_rank") for x in d], 2), mean_se([x.get("mean_orth_loss") for x in d], 1),
                     mean_se([above_floor(r) for r in recs], 1),
                     mean_se([x.get("mean_orth_loss_A") for x in d], 2), mean_se([x.get("mean_orth_loss_B") for x in d], 2),
                     mean_se(reg_term, 3)])
    floors = [f for _, recs in table5_rows(sizes, records) for r in recs if (f := width_floor(r)) is not None]
    floor = f"{statistics.mean(floors):.1f}" if floors else "–"
    # the rows where the width term is not most of the figure (mean over seeds)
    above = [label for label, recs in table5_rows(sizes, records) if recs and all(width_floor(r) for r in recs)
             and statistics.mean(map(width_floor, recs)) < statistics.mean(map(above_floor, recs))]
    return [
        "## RM-LoRA: masking modes, regulariser weight, Table 5 analogue\n",
        "RM-LoRA paper, Table 5 (ViT-B/16's CIFAR-100 head there; the 150 projections of SmolLM2 here): LoRA, "
        "GM-LoRA (masking only), R-LoRA (regulariser only) and RM-LoRA (both), plus RM-LoRA in the authors' "
        "`grad_only` masking and with the regulariser weight swept in both norms (`squared`: eq. 10 as printed, "
        "summed over layers; `frobenius`: the authors' code, unsquared and averaged). `exact` masking is lrft's "
        "extension of Algorithm 1, not the paper's: masked entries keep their AdamW moments frozen too, with "
        "per-direction bias correction (docs/adapters.md); the authors' code masks the gradient only "
        "(`grad_only`). All RM-LoRA-family runs use RM-LoRA (exact)'s chosen lr, except grad_only, which has its "
        "own. Means over the 150 layers from `lrft inspect-rank`. `‖ΔWΔWᵀ−I‖²` (out × out) is Σᵢ(σᵢ² − 1)² over "
        "ΔW's non-zero singular values plus out − rank, one for each zero eigenvalue of ΔWΔWᵀ: with rank 16 that "
        f"second part is {floor} on average over these layers, the same for every rank-16 run, and most of the "
        f"figure in every row but {', '.join(above) or 'none'}; `above out − rank` is the first part, the one the "
        "techniques can move. "
        "`‖AAᵀ−I‖²` and `‖BᵀB−I‖²` are the regulariser's own terms on the unscaled factors.\n",
        study.table(["method", "seeds", "held-out loss (test)", "rank", f"rank@{RANK_TOL:g}", "erank", "‖ΔWΔWᵀ−I‖²",
                     "above out − rank", "‖AAᵀ−I‖²", "‖BᵀB−I‖²", "reg. term (last 10)"], rows) + "\n",
    ]


def commands_section(records: dict) -> list[str]:
    out = ["## Commands\n",
           "Each run is `lrft train` on a shipped recipe with `--set` overrides (a rerun of an interrupted run adds "
           "`--resume` in place of `--overwrite`), then `lrft eval --loss`, and for final and reg runs `lrft "
           "inspect-rank` twice. One run per stage, from its result file:\n"]
    examples = [r for stage in ("sweep", "final", "reg", "base")
                if (r := next((x for x in records.values() if x["stage"] == stage), None))]
    if not examples:
        return out + ["No run has finished yet.\n"]
    out.append("```")
    for rec in examples:
        out.append(f"# {rec['name']}")
        out += list(rec["commands"].values())
    return out + ["```\n"]


def final_records(records: dict, key: str) -> list[dict]:
    """The final runs of one method, by seed."""
    return sorted((r for r in records.values() if r["stage"] == "final" and r["method"] == key), key=lambda r: r["seed"])


def reg_records(records: dict, name: str) -> list[dict]:
    """The reg runs of one variant (``reg-gmlora``), by seed."""
    return sorted((r for r in records.values() if r["stage"] == "reg" and r["name"].rsplit("-s", 1)[0] == name),
                  key=lambda r: r["seed"])


def cpu_label(record: dict) -> str:
    machine = record.get("machine") or ""
    return "AVX-512" if "avx512f" in machine else "AVX2" if "avx2" in machine else "CPU not recorded"


def shared_cpu(record: dict) -> bool:
    """Whether the run trained beside other work: the machine's 1-minute load average, sampled every 2 s and
    averaged over its attempts (weighted by their wall time), above its thread count + 0.5. Before the load
    was recorded, the runs at 1 thread ran two at a time and those at 2 threads one at a time."""
    timed = [(a["cpu_load"], a.get("wall_s") or 0) for a in record.get("attempts", []) if "cpu_load" in a]
    if not timed or not (wall := sum(w for _, w in timed)):
        return record.get("threads") == 1
    return sum(load * w for load, w in timed) / wall > (record.get("threads") or 1) + 0.5


def speed_group(record: dict) -> tuple:
    """Step times compare only within one group: same CPU type, thread count and whether the CPU was shared."""
    return cpu_label(record), record.get("threads"), shared_cpu(record)


def step_time_cell(recs: list[dict]) -> str:
    """Median step time per run, as mean ± se within each speed group."""
    groups: dict[tuple, list] = {}
    for r in recs:
        groups.setdefault(speed_group(r), []).append(step_seconds(r["metrics"]))
    return "; ".join(f"{mean_se(times, 1)} ({cpu} @{threads} thr.{', CPU shared' if shared else ''})"
                     for (cpu, threads, shared), times in groups.items())


def step_ratios(records: dict, key: str) -> list[float]:
    """Each run's step time over LoRA's at the same seed, where both are in the same speed group."""
    lora = {r["seed"]: r for r in final_records(records, "lora")}
    ratios = []
    for r in final_records(records, key):
        ref = lora.get(r["seed"])
        if ref is None or speed_group(r) != speed_group(ref):
            continue
        if (own := step_seconds(r["metrics"])) and (theirs := step_seconds(ref["metrics"])):
            ratios.append(own / theirs)
    return ratios


def paired(recs: list[dict], against: list[dict]) -> list[float]:
    """Each run's test loss minus that of the ``against`` run at the same seed (same data order)."""
    by_seed = {r["seed"]: held(r) for r in against}
    return [held(r) - by_seed[r["seed"]] for r in recs if r["seed"] in by_seed]


def long_facts(records: dict, sizes: dict) -> dict[str, str]:
    """Every measured number experiments/long-readings.md quotes (``{{key}}``), from the result files, so
    that the readings move with the results: ``final_facts``, ``loss_facts``, ``reg_facts`` and
    ``table5_facts`` say which. A fact without runs is left out and renders "–"."""
    facts: dict[str, str] = {}
    facts["train_records"] = f"{sum(1 for line in (ROOT / TRAIN).read_text().splitlines() if line.strip()):,}"
    if final := [r for r in records.values() if r["stage"] == "final"]:
        settings = final[0]["settings"]
        facts["steps"], facts["examples"] = str(settings["steps"]), str(settings["steps"] * settings["batch_size"])
    if "base-test" in records:
        facts["base"] = f"{held(records['base-test']):.4f}"
    if reg := [r for r in records.values() if r["stage"] == "reg"]:
        facts["reg_seed"] = ", ".join(str(seed) for seed in sorted({r["seed"] for r in reg}))
    lora, lora2 = sizes["lora"]["sets"], sizes["lora2"]["sets"]
    facts.update(lora_r=str(lora["adapter.r"]), lora2_r=str(lora2["adapter.r"]), lora2_target_r=str(lora2["adapter.target_r"]))
    for key in METHODS:
        facts.update(final_facts(records, key))
    facts.update(loss_facts(records))
    facts.update(reg_facts(records, sizes))
    facts.update(table5_facts(sizes, records))
    return facts


def final_facts(records: dict, key: str) -> dict[str, str]:
    """One final method's facts (``-`` of its key read as ``_``): lr, seeds, held (mean ± se), rank, bound (the
    structure's rank bound), rank10 (rank@0.1), erank (erank2: two digits), orth, speed (step time over LoRA's
    on the same CPU), delta (paired to LoRA), ci (its 95 % interval) and bci (Bonferroni-adjusted)."""
    recs = final_records(records, key)
    if not recs:
        return {}
    short = key.replace("-", "_")
    d = [summary_of(r) for r in recs]
    facts = {
        f"lr_{short}": f"{recs[0]['lr']:g}", f"seeds_{short}": str(len(recs)),
        f"held_{short}": mean_se([held(r) for r in recs], 4),
        f"rank_{short}": mean_se([x.get("mean_rank") for x in d], 1),
        f"erank_{short}": mean_se([x.get("mean_effective_rank") for x in d], 1),
        f"erank2_{short}": mean_se([x.get("mean_effective_rank") for x in d], 2),
        f"rank10_{short}": mean_se([summary_of(r, f"tol{RANK_TOL:g}").get("mean_rank") for r in recs], 1),
        f"orth_{short}": mean_se([x.get("mean_orth_loss") for x in d], 1),
    }
    if bounds := [x["mean_rank_bound"] for x in d if "mean_rank_bound" in x]:  # structural: no ± shown
        facts[f"bound_{short}"] = f"{statistics.mean(bounds):.1f}"
    if key != "lora" and (ratios := step_ratios(records, key)):
        facts[f"speed_{short}"] = mean_se(ratios, 2)
    if key != "lora" and (diffs := paired(recs, final_records(records, "lora"))):
        facts.update({f"delta_{short}": mean_se(diffs, 4), f"ci_{short}": t_interval(diffs, 4),
                      f"bci_{short}": t_interval(diffs, 4, len(compared(records)))})
    return facts


def loss_facts(records: dict) -> dict[str, str]:
    """``order`` (methods by mean test loss) and ``held_range`` (the lowest and highest mean); ``t95``, the
    95 % t factor of LoRA's seeds; the family of comparisons with LoRA: ``comparisons``, each interval's
    Bonferroni ``bonferroni_level`` and ``bonferroni_t`` (two seeds), ``favour_lora`` (how many of the paired
    differences are positive, e.g. "12 of 12"), ``bci_excluding`` (the methods whose Bonferroni interval
    excludes 0); paired contrasts keep_vs_shared, grad_vs_exact, keep_vs_dense with their ci_."""
    facts: dict[str, str] = {}
    means = {key: statistics.mean(held(r) for r in recs) for key in METHODS if (recs := final_records(records, key))}
    if means:
        facts["order"] = " < ".join(METHODS[k].label for k in sorted(means, key=means.get))
        facts["held_range"] = f"{min(means.values()):.4f} to {max(means.values()):.4f}"
    if (seeds := len(final_records(records, "lora"))) > 1:
        facts["t95"] = f"{t_quantile(0.95, seeds - 1):.1f}"
    if keys := compared(records):
        diffs = [d for key in keys for d in paired(final_records(records, key), final_records(records, "lora"))]
        level = 1 - 0.05 / len(keys)
        facts.update({"comparisons": str(len(keys)), "bonferroni_level": f"{100 * level:.2f} %",
                      "bonferroni_t": f"{t_quantile(level, 1):.1f}",
                      "favour_lora": f"{sum(1 for d in diffs if d > 0)} of {len(diffs)}"})
        lora = final_records(records, "lora")
        excluding = [METHODS[key].label for key in keys if len(d := paired(final_records(records, key), lora)) > 1
                     and abs(statistics.mean(d)) > t_half_width(d, len(keys))]
        facts["bci_excluding"] = ", ".join(excluding) or "none"
    for name, (key, against) in {"keep_vs_shared": ("randlora-sparse-keep", "randlora-sparse-shared"),
                                 "grad_vs_exact": ("rmlora-grad_only", "rmlora-exact"),
                                 "keep_vs_dense": ("randlora-sparse-keep", "randlora")}.items():
        if diffs := paired(final_records(records, key), final_records(records, against)):
            facts[name], facts[f"ci_{name}"] = mean_se(diffs, 4), t_interval(diffs, 4)
    return facts


def reg_facts(records: dict, sizes: dict) -> dict[str, str]:
    """Per reg variant: reg_<name>_held / _erank / _rank10 / _orth / _vs_lora (test loss minus LoRA's final
    run at the same seed)."""
    facts: dict[str, str] = {}
    for name, _, _ in reg_variants(sizes["rmlora-exact"]["sets"]["adapter.r"]):
        recs = reg_records(records, f"reg-{name}")
        if not recs:
            continue
        short = "reg_" + re.sub(r"\W", "_", name)
        d, t = [summary_of(r) for r in recs], [summary_of(r, f"tol{RANK_TOL:g}") for r in recs]
        facts.update({f"{short}_held": mean_se([held(r) for r in recs], 4),
                      f"{short}_erank": mean_se([x.get("mean_effective_rank") for x in d], 2),
                      f"{short}_rank10": mean_se([x.get("mean_rank") for x in t], 1),
                      f"{short}_orth": mean_se([x.get("mean_orth_loss") for x in d], 1)})
        if diffs := paired(recs, final_records(records, "lora")):
            facts[f"{short}_vs_lora"] = mean_se(diffs, 4)
    return facts


def table5_facts(sizes: dict, records: dict) -> dict[str, str]:
    """Table 5's four rows (LoRA, GM-LoRA, R-LoRA, RM-LoRA exact) ordered by each measure, low to high, with
    their means over seeds: t5_order_rank10, t5_order_erank, t5_order_orth; ``orth_floor``: the mean over
    runs and layers of out − rank, the part of ‖ΔWΔWᵀ − I‖² that width and rank fix."""
    rows = {"LoRA": final_records(records, "lora"), "GM-LoRA": reg_records(records, "reg-gmlora"),
            "R-LoRA": reg_records(records, "reg-rlora"), "RM-LoRA": final_records(records, "rmlora-exact")}
    if not all(rows.values()):
        return {}
    measures = {"rank10": (lambda r: summary_of(r, f"tol{RANK_TOL:g}").get("mean_rank"), 1),
                "erank": (lambda r: summary_of(r).get("mean_effective_rank"), 2),
                "orth": (lambda r: summary_of(r).get("mean_orth_loss"), 1)}
    facts = {}
    for name, (value, digits) in measures.items():
        means = {label: statistics.mean(value(r) for r in recs) for label, recs in rows.items()}
        facts[f"t5_order_{name}"] = " < ".join(f"{label} {means[label]:.{digits}f}" for label in sorted(means, key=means.get))
    floors = [f for recs in rows.values() for r in recs if (f := width_floor(r)) is not None]
    if floors:
        facts["orth_floor"] = f"{statistics.mean(floors):.1f}"
    return facts


def plot_curves(records: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    finals = sorted((r for r in records.values() if r["stage"] == "final" and r.get("metrics")),
                    key=lambda r: (r["seed"], list(METHODS).index(r["method"])))
    if not finals:
        return False
    seed = finals[0]["seed"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for rec in (r for r in finals if r["seed"] == seed):
        steps = [m["step"] for m in rec["metrics"]]
        loss = [m["loss"] for m in rec["metrics"]]
        window = max(1, len(loss) // 10)
        smooth = [statistics.mean(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, label=f"{METHODS[rec['method']].label} (lr {rec['lr']:g})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training LM loss (moving mean, 10 % of the run)")
    ax.set_title(f"final runs, seed {seed}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print every run, its state and estimated time; run nothing")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-clock budget of this invocation: start a run only if its estimate fits; stop the run "
                        "in flight (checkpoint) at the deadline")
    p.add_argument("--fill", action="store_true", help="with --budget-minutes: also start a run that does not fit "
                   "(it is stopped at the deadline with a checkpoint and continues next time)")
    p.add_argument("--stages", default="sweep,final,reg", help="comma-separated: sweep, final, reg")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--only", default=None, help="regex: only runs whose name matches (e.g. 'final-lora-')")
    p.add_argument("--seeds", default="42,43", help="seeds of the final stage (the sweep uses the first)")
    p.add_argument("--reg-seeds", default=None, help="seeds of the reg stage (default: the first seed)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of final and reg runs")
    p.add_argument("--sweep-steps", type=int, default=None, help="optimizer steps of sweep runs (default min(40, --steps))")
    p.add_argument("--sweep-points", type=int, default=3, help="grid points per sweep axis (1: only the centre, for "
                   "smoke tests)")
    p.add_argument("--batch-size", type=int, default=4, help=f"examples per optimizer step (micro-batch {MICRO_BATCH})")
    p.add_argument("--limit", type=int, default=None, help=f"cap on held-out records per split (default {SELECT_N} "
                   f"selection, {TEST_N} test)")
    p.add_argument("--save-steps", type=int, default=25, help="checkpoint every N steps (the resume granularity)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--results", default="experiments/results/long")
    p.add_argument("--runs-dir", default="runs/long", help="where lrft writes the runs and checkpoints")
    p.add_argument("--doc", default="docs/long-runs.md")
    p.add_argument("--pilot-results", default="experiments/results", help="the pilot's result files (step times)")
    p.add_argument("--measure", action="store_true", help="time --measure-steps steps of each method at 1 and 2 "
                   "threads into RESULTS/step-times.json, then stop")
    p.add_argument("--measure-steps", type=int, default=4)
    p.add_argument("--keep-going", action="store_true", help="after a failed run, go on with the next")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep a run's checkpoints after its result "
                   "file is written (by default they are deleted; the adapter stays)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--no-render", action="store_true")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.reg_seeds = [int(s) for s in args.reg_seeds.split(",")] if args.reg_seeds else args.seeds[:1]
    args.sweep_steps = args.sweep_steps or min(40, args.steps)
    args.stages = [s for s in args.stages.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    for stage in args.stages:
        if stage not in ("sweep", "final", "reg"):
            p.error(f"--stages {stage}: choose from sweep, final, reg")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods {m}: choose from {', '.join(METHODS)}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    study.ensure(results_dir(args))  # every finished run, so that nothing is run again
    study.ensure(ROOT / args.pilot_results)
    sizes = matched_sizes()
    off = [k for k, s in sizes.items() if abs(s["rel"]) > PARAM_TOL]
    if off:
        sys.exit(f"parameter counts off by more than {100 * PARAM_TOL:g} %: {off}")
    if args.plan:
        print_plan(args, sizes, load_records(args))
        return
    if args.measure:
        measure(args, sizes)
        return
    failures = []
    results_dir(args).mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        write_splits(args)
        runner = Runner(args)
        t0 = time.time()
        try:
            for stage in args.stages:
                passed = set()  # runs waiting for a sweep, or failed: not tried again in this stage
                while True:
                    # rebuilt after every run: a finished sweep sets the lr of later stages, or extends its grid
                    records = load_records(args)
                    spec = next((s for s in all_specs(args, sizes, records).get(stage, []) if s.name not in passed
                                 and run_state(s, args)["state"] != "done"), None)
                    if spec is None:
                        break
                    state = run_state(spec, args)
                    if spec.stage != "base" and spec.lr is None:
                        print(f"[wait] {spec.name}: the {spec.waits_for} sweep is not complete", flush=True)
                        passed.add(spec.name)
                        continue
                    need = Estimator(args, records).seconds(spec, state)
                    if need > runner.left() and not args.fill:
                        print(f"[budget] {spec.name} needs ~{need / 60:.0f} min, {runner.left() / 60:.0f} min left: "
                              "stopping (rerun to continue; --plan shows what is left)", flush=True)
                        raise Stop
                    if runner.stop_requested or runner.left() <= 0:
                        raise Stop
                    try:
                        runner.run(spec, Estimator(args, records))
                    except Stop:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        failures.append((spec.name, str(exc)))
                        passed.add(spec.name)
                        print(f"[FAILED] {spec.name}: {exc}", flush=True)
                        if not args.keep_going:
                            raise Stop
        except Stop:
            pass
        meta_path = results_dir(args) / "meta.json"
        meta = read_json(meta_path, {}) or {}
        meta.update({"machine": machine(), "threads": args.threads, "last_invocation": " ".join(sys.argv),
                     "last_wall_s": round(time.time() - t0, 1)})
        write_json(meta_path, meta)
        print(f"finished in {(time.time() - t0) / 60:.1f} min; failures: {failures or 'none'}", flush=True)
    if not args.no_render:
        render(args, sizes, load_records(args))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
