"""The optimizer and the learning-rate schedule of a training run (``training.optimizer``,
``training.lr_scheduler``, ``training.warmup_steps``)."""

from __future__ import annotations

import math

import torch

from .errors import UserError
from .inject import trainable_parameters
from .model import check_bitsandbytes
from .recipe import Recipe


def setup_optimizer(recipe: Recipe, accelerator, layers: dict, total_steps: int):
    """AdamW (``training.optimizer``) over the adapter's parameters as the wrapped model holds them (FSDP
    replaces their storage), prepared so that fp16's gradient scaler unscales and skips overflowing steps;
    the schedule drives the plain optimizer (a prepared one would step once per process)."""
    tcfg = recipe.training
    params = trainable_parameters(layers)
    kind = optimizer_class(tcfg.optimizer, accelerator.device)
    base_optimizer = kind(params, lr=tcfg.learning_rate, betas=tcfg.adam_betas, weight_decay=tcfg.weight_decay)
    optimizer = accelerator.prepare(base_optimizer)
    return params, optimizer, base_optimizer, lr_schedule(base_optimizer, tcfg, total_steps)


def lr_schedule(optimizer: torch.optim.Optimizer, training, total_steps: int, step: int = 0):
    """``training.lr_scheduler`` after ``training.warmup_steps`` over ``total_steps``, at ``step`` (whose
    learning rate comes next): ``--extend-schedule`` rebuilds it for the new length at the step reached."""
    factor = lr_lambda(training.lr_scheduler, training.warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


def optimizer_class(name: str, device: torch.device):
    """The optimizer class of ``training.optimizer``: torch's AdamW or one of bitsandbytes' 8-bit ones."""
    if name == "adamw":
        return torch.optim.AdamW
    check_bitsandbytes(8)
    import bitsandbytes as bnb

    if name == "paged_adamw_8bit":
        if device.type != "cuda":
            raise UserError(
                "training.optimizer=paged_adamw_8bit pages optimizer state between GPU and CPU memory and needs CUDA; "
                "use adamw_8bit on this device"
            )
        return bnb.optim.PagedAdamW8bit
    return bnb.optim.AdamW8bit


def lr_lambda(kind: str, warmup: int, total: int):
    """The learning rate's factor at each step: a linear warmup, then constant, cosine or linear decay to 0."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f
