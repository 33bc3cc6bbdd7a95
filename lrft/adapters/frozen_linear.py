"""The frozen linear an adapter wraps (``nn.Linear``, bitsandbytes ``Linear4bit`` or ``Linear8bitLt``): the
dense weight it actually multiplies by. DoRA's norm, merge and inference folding read it here: the adapters
need nothing from the model loader (:mod:`lrft.model`), whose dependencies point the other way."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _dequantize_cpu_packed_4bit(data: Tensor, quant_state) -> Tensor:
    """A 4-bit weight in bitsandbytes' AVX512-BF16 CPU layout, as float32, leaving the layer untouched.

    On such CPUs bitsandbytes repacks a Linear4bit's weight in place at its first inference call (eval
    mode, no grad), with the block scales rounded to bfloat16 and stored transposed; the standard
    dequantization then reads garbage. bitsandbytes' own inverse unpacks the codes (given a shallow copy
    of the state, whose fields it reassigns); the scales are the bfloat16 ones the kernel now multiplies by.
    """
    import copy

    import bitsandbytes.functional as bnbf

    state = copy.copy(quant_state)
    state.original_nested = False  # the scales are replaced below: skip re-quantizing them
    codes, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    state.absmax = quant_state.absmax.T.reshape(-1).float()  # (in / blocksize, out) -> row-major blocks
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(codes, state)


def dequantized_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out, in) weight a plain or bitsandbytes linear actually multiplies by, as a dense tensor."""
    weight = base.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed_4bit(weight.data, weight.quant_state).to(dtype)
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if kind == "Int8Params" and weight.dtype == torch.int8:
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
        return (weight.data.float() * scb.float().unsqueeze(1) / 127.0).to(dtype)
    return weight.detach().to(dtype)
