"""The MLP of LLaMA-style models, keeping less for the backward than transformers' own module.

``down(silu(gate(x)) * up(x))`` keeps three intermediate-sized tensors per token for the backward: the
gate projection's output (for the SiLU), the SiLU's output and the up projection's output (for the
product). They are the largest part of what a decoder layer keeps. :class:`SwiGLU` stands in for the
model's MLP during training, with the same projections under the same names (so adapters, state dicts
and checkpoints see no difference), and keeps only the gate and up outputs: the SiLU is recomputed in the
backward, one elementwise pass.

It replaces only the MLP classes whose forward is exactly that expression (:data:`SWIGLU_MLPS`;
``tests/test_activations.py`` checks each against the original on a tiny model).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "SmolLM3MLP"})


class SiluTimes(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up (not the SiLU's output) for the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


class SwiGLU(nn.Module):
    """A LLaMA-style MLP's projections, run through :class:`SiluTimes`."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(SiluTimes.apply(self.gate_proj(x), self.up_proj(x)))


def swiglu_mlps(model: nn.Module) -> list[str]:
    """Names of the MLPs :class:`SwiGLU` can stand in for (SiLU activation, the plain forward)."""
    return [
        name for name, module in model.named_modules()
        if type(module).__name__ in SWIGLU_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu"
    ]


def use_swiglu(model: nn.Module) -> int:
    """Put a :class:`SwiGLU` in place of every MLP it can stand in for; how many."""
    names = swiglu_mlps(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SwiGLU(model.get_submodule(name)))
    return len(names)
