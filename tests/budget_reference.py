"""Shared checks for the budget-pruned adapters (AdaLoRA, LoRA²): a fake training loop that drives the
Controller hooks exactly as the trainer does, and a naive (float64, element by element) importance score."""

from __future__ import annotations

import torch
from torch import nn

from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors


class Stack(nn.Module):
    """A few adapted linears in a row: enough layers for the budget to be shared unevenly."""

    def __init__(self, layers):
        super().__init__()
        self.blocks = nn.ModuleList(layers)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def build_stack(adapter_type, widths=(16, 16, 16, 16), seed=0, **cfg):
    spec = get_adapter(adapter_type)
    config = spec.config(type=adapter_type, **cfg)
    shared = SharedTensors(config.seed)
    torch.manual_seed(seed)
    layers = {
        f"blocks.{i}": spec.layer(make_linear("none", widths[i], widths[i + 1], seed=seed + i), config, shared, f"blocks.{i}")
        for i in range(len(widths) - 1)
    }
    return Stack(list(layers.values())), layers, config, spec


def train_toy(adapter_type, total_steps=30, micro_batches=2, observe=None, **cfg):
    """``total_steps`` AdamW steps on a toy regression with the trainer's hook order; ``observe(step,
    controller)`` runs after each step. Returns (model, layers, controller)."""
    model, layers, config, spec = build_stack(adapter_type, **cfg)
    controller = spec.controller(layers, config, total_steps)
    params = [p for layer in layers.values() for n, p in layer.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=g)
    target = torch.tanh(x @ torch.randn(16, 16, generator=g) * 0.3)
    for step in range(total_steps):
        controller.start_step(step)
        for chunk_x, chunk_t in zip(x.chunk(micro_batches), target.chunk(micro_batches)):
            loss = ((model(chunk_x) - chunk_t) ** 2).mean()
            extra = controller.extra_loss()
            if extra is not None:
                loss = loss + extra
            (loss / micro_batches).backward()
        controller.before_optimizer_step(step, optimizer)
        optimizer.step()
        controller.after_optimizer_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if observe is not None:
            observe(step, controller)
    return model, layers, controller


def naive_scores(history, beta1, beta2, left_axis_len, right_axis_len):
    """Rank-index scores from a list of per-step {"lambda", "left", "right"} -> (value, grad) pairs,
    computed element by element in float64 from AdaLoRA's recursions (EMAs start at 0)."""
    state = {}
    for snapshot in history:
        for key, (value, grad) in snapshot.items():
            value, grad = value.double(), grad.double()
            bar_i, bar_u = state.get(key, (torch.zeros_like(value), torch.zeros_like(value)))
            bar_i, bar_u = bar_i.clone(), bar_u.clone()
            for idx in range(value.numel()):
                sensitivity = abs(value.view(-1)[idx].item() * grad.view(-1)[idx].item())
                new_i = beta1 * bar_i.view(-1)[idx].item() + (1 - beta1) * sensitivity
                new_u = beta2 * bar_u.view(-1)[idx].item() + (1 - beta2) * abs(sensitivity - new_i)
                bar_i.view(-1)[idx] = new_i
                bar_u.view(-1)[idx] = new_u
            state[key] = (bar_i, bar_u)
    score = {key: bar_i * bar_u for key, (bar_i, bar_u) in state.items()}
    rank = score["lambda"].numel()
    result = torch.zeros(rank, dtype=torch.float64)
    for i in range(rank):
        left = sum(score["left"][j, i].item() for j in range(left_axis_len)) / left_axis_len
        right = sum(score["right"][i, j].item() for j in range(right_axis_len)) / right_axis_len
        result[i] = score["lambda"][i].item() + left + right
    return result


def check_importance_against_naive(adapter_type, factor_names, steps=3, **cfg):
    """Feed random gradients for a few steps; the controller's scores equal the naive computation."""
    _, layers, config, spec = build_stack(adapter_type, widths=(8, 6), **cfg)
    controller = spec.controller(layers, config, total_steps=100)
    layer = layers["blocks.0"]
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    left_name, right_name = factor_names
    tensors = {"lambda": layer.lora_lambda, "left": getattr(layer, left_name), "right": getattr(layer, right_name)}
    history = []
    for step in range(steps):
        for p in layer.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        history.append({k: (t.detach().clone(), t.grad.clone()) for k, t in tensors.items()})
        controller.before_optimizer_step(step, None)
        with torch.no_grad():  # move the parameters so that θ differs between steps
            for t in tensors.values():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    expected = naive_scores(
        history, config.beta1, config.beta2, tensors["left"].shape[0], tensors["right"].shape[1]
    )
    torch.testing.assert_close(controller.scores()["blocks.0"].double(), expected, rtol=1e-5, atol=1e-9)
    return controller
