"""Live metrics where people look: TensorBoard, Weights & Biases and MLflow through accelerate's trackers
(``training.report_to``). The main process logs every record it writes to metrics.jsonl (numbers only),
at the same step; TensorBoard's event files go to RUN_DIR/tensorboard/lrft (``tensorboard --logdir
RUN_DIR/tensorboard``), W&B runs in offline mode when its server cannot be reached (``wandb sync`` later).
Each tracker is an optional extra: ``pip install 'lrft[tensorboard]'`` (or wandb, mlflow)."""

from __future__ import annotations

import os
import socket
from typing import Any

from .errors import UserError

PROJECT = "lrft"


def check_trackers(names: list[str]) -> list[str]:
    """The trackers to hand to accelerate; a named one that is not installed is a one-line error."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    for name in names:
        if not available[name]():
            raise UserError(f"training.report_to: {name} is not installed; install it with `pip install 'lrft[{name}]'`")
    if "wandb" in names and "WANDB_MODE" not in os.environ and not _reachable("api.wandb.ai", 443):
        os.environ["WANDB_MODE"] = "offline"  # no network: log locally, `wandb sync` uploads later
    return list(dict.fromkeys(names))


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved recipe as flat dotted keys with scalar values (what TensorBoard's hparams accept)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def start_trackers(accelerator, recipe, run_name: str) -> None:
    if recipe.training.report_to:
        accelerator.init_trackers(
            PROJECT, config=flat_config(recipe.resolved()),
            init_kwargs={"wandb": {"name": run_name, "dir": recipe.output_dir}, "mlflow": {"run_name": run_name}},
        )


def log_metrics(accelerator, record: dict[str, Any]) -> None:
    """Every number of a metrics record but the step, at that step (accelerate logs from the main process)."""
    if accelerator.trackers:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log(values, step=record["step"])
