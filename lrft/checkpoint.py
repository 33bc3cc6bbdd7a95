"""Checkpoints and the random state: what ``--resume`` needs to continue a run bit-identically, and the
rules for which recipe changes a resume accepts.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-N/`` with ``adapter/`` (an adapter folder) and
``trainer_state.pt`` (optimizer, scheduler, controller and per-process RNG states, the step, the resolved
recipe), written to a temporary name and renamed, so a folder with ``trainer_state.pt`` is complete.

What a resume may change (docs/resume.md): keys that do not touch the trajectory (logging, validation
and checkpoint cadence, ``save_total_limit``, gradient checkpointing, ``skip_nonfinite``, the end-of-run
``eval`` section). Everything else in ``training`` and every key of ``model``, ``quantization``, ``adapter``
and ``data`` would re-map the data order, the schedule or the model, so examples would repeat or be
skipped: refused, with the changed keys named. A longer ``max_steps`` / ``epochs`` is accepted only with
``--extend-schedule``, which recomputes the learning-rate (and rank-budget) schedule for the new length.
"""

from __future__ import annotations

import math
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .adapter_folder import WEIGHTS_NAME, save_adapter
from .distributed import is_sharded, load_optimizer_state, optimizer_state, whole_adapter
from .errors import UserError
from .io import atomic_dir, read_safetensors
from .recipe import Recipe

# Keys a resume may change: none of them alters which examples a step sees, the schedule or the model.
FREE_KEYS = (
    "output_dir",
    "eval",
    "training.logging_steps",
    "training.eval_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.gradient_checkpointing",
    "training.skip_nonfinite",
    "training.report_to",
    "training.num_workers",  # a key of lrft < 0.2 recipes that did nothing; found in their checkpoints
)
SCHEDULE_KEYS = ("training.max_steps", "training.epochs")


# --- random state -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- finding, writing, reading ------------------------------------------------------------------------


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first."""
    root = output_dir / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = re.fullmatch(r"step-(\d+)", path.name)
            if match and (path / "trainer_state.pt").exists():
                found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run, extra: Optional[dict[str, Any]] = None) -> None:
    """Every process calls this (gathers are collectives); the main process writes."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    # each process's own RNG state: their dropout streams differ, and resume restores each one
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    optimizer = optimizer_state(run.model, run.base_optimizer, accelerator)
    with whole_adapter(run.model, accelerator):
        if accelerator.is_main_process:
            with atomic_dir(run.output_dir / "checkpoints" / f"step-{run.step}") as tmp:
                save_adapter(tmp / "adapter", run.layers, run.recipe.adapter, run.base_record)
                torch.save(
                    {
                        "step": run.step,
                        "total_steps": run.total_steps,
                        "optimizer": optimizer,
                        "optimizer_format": "fsdp" if is_sharded(accelerator) else "torch",
                        "scheduler": run.scheduler.state_dict(),
                        "controller": run.controller.state_dict(),
                        "rng_per_process": rngs,
                        "recipe": run.recipe.resolved(),
                        "schedule_extended": run.info.get("schedule_extended"),
                        **(extra or {}),
                    },
                    tmp / "trainer_state.pt",
                )
            for _, old in checkpoints(run.output_dir)[: -run.recipe.training.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()  # the checkpoint is complete before any process goes on (or stops)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, with its adapter tensors under ``adapter``."""
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it to resume from the one before") from None
    state["adapter"] = read_safetensors(
        path / "adapter" / WEIGHTS_NAME, f"the checkpoint is incomplete: delete {path} to resume from the one before"
    )
    state["path"] = path
    return state


# --- what a resume may change -------------------------------------------------------------------------


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


def planned_steps(recipe_data: dict[str, Any], num_examples: int) -> int:
    """The optimizer steps a (resolved) recipe plans over ``num_examples`` training examples."""
    training = recipe_data["training"]
    return training["max_steps"] or max(1, math.ceil(training["epochs"] * num_examples / training["batch_size"]))


def check_resume(state: dict[str, Any], recipe: Recipe, num_examples: int, extend_schedule: bool) -> Optional[dict[str, int]]:
    """Refuse a resume whose recipe changes the run's trajectory (module docstring). Returns the schedule
    extension when ``--extend-schedule`` lengthens the run, else None."""
    old, new = state["recipe"], recipe.resolved()
    free = lambda key: any(key == k or key.startswith(k + ".") for k in FREE_KEYS)  # noqa: E731
    changed = [key for key in _changed_keys(old, new) if not free(key)]
    if not changed:
        if extend_schedule:
            raise UserError("--extend-schedule: the recipe plans no more steps than the checkpoint's run; raise training.max_steps or training.epochs")
        return None
    fixed = [key for key in changed if key not in SCHEDULE_KEYS]
    if fixed:
        raise UserError(
            f"cannot resume: the recipe changed {', '.join(changed)} since the checkpoint, which would change the "
            "data order, the schedule or the model; restore those keys or start a new run with --output-dir"
        )
    before = int(state.get("total_steps") or planned_steps(old, num_examples))
    after = planned_steps(new, num_examples)
    if not extend_schedule:
        raise UserError(
            f"cannot resume: {', '.join(changed)} changed the run's length ({before} -> {after} steps); pass "
            "--extend-schedule to train longer with the learning-rate schedule recomputed, or restore it"
        )
    if after <= before:
        raise UserError(
            f"cannot resume: {', '.join(changed)} gives {after} steps, not more than the {before} the run planned; "
            "--extend-schedule only lengthens a run"
        )
    return {"at_step": int(state["step"]), "from_total_steps": before, "to_total_steps": after}


def restore_checkpoint(run, state: dict[str, Any]) -> None:
    """Optimizer, schedule, controller and RNG state from a checkpoint (the adapter's weights are loaded
    before wrapping, in ``setup``)."""
    accelerator = run.accelerator
    fsdp_format = state.get("optimizer_format") == "fsdp"
    if fsdp_format != is_sharded(accelerator):
        raise UserError(
            "cannot resume: the checkpoint's optimizer state was saved "
            + ("under FSDP over several processes; resume it the same way" if fsdp_format else "unsharded; resume it without FSDP over several processes")
        )
    load_optimizer_state(run.model, run.base_optimizer, state["optimizer"], accelerator)
    run.scheduler.load_state_dict(state["scheduler"])
    run.controller.load_state_dict(state["controller"])
    rngs = state.get("rng_per_process") or [state["rng"]]
    rank = accelerator.process_index
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    else:  # more processes than when the checkpoint was written: a fresh stream of this process's own
        seed_everything(run.recipe.training.seed + 1_000_003 * rank + int(state["step"]))
    run.step = int(state["step"])
