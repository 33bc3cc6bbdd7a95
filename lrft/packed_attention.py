"""Attention for micro-batches laid out as one row of real tokens: no padding, no masked-out score.

Training collates each micro-batch, of examples or of packed rows, into one row of concatenated examples
whose position ids restart at 0 per example (the same layout FlashAttention's variable-length path reads
on CUDA; :func:`lrft.data.one_row`). SDPA with a 4D block-diagonal mask computes every (query, key) score
of a row and then discards those across examples, and a mask keeps SDPA off its fused kernels; on the CPU
that cost more than padding saved. Here each example's segment runs through SDPA on its own with
``is_causal=True``, which is exact (a token sees only earlier tokens of its own example) and uses the
fused kernel.

The function is registered with transformers' ``AttentionInterface`` under :data:`NAME` (its documented
way to add an attention implementation) together with SDPA's mask builder, so batches of several rows
(validation, evaluation, generation, left padding) get exactly SDPA.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch.nn import functional as F

NAME = "lrft_packed_sdpa"
# torch 2.5 added SDPA's enable_gqa; before it the key and value heads are repeated (a copy each layer keeps)
GQA_IN_SDPA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def segment_bounds(position_ids: torch.Tensor) -> Optional[list[int]]:
    """Start offsets of the examples in a one-row packed batch, plus its length; None when the row is a
    single example (position ids 0, 1, 2, ...) or the batch has several rows."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    row = position_ids[0]
    starts = (row[1:] != row[:-1] + 1).nonzero().flatten() + 1
    if starts.numel() == 0:
        return None
    return [0, *starts.tolist(), row.numel()]


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (1, heads, T, dim), key/value (1, kv_heads, T, dim) -> ((1, T, heads, dim), None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = segment_bounds(kwargs.get("position_ids"))
    if bounds is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    grouped = {}
    if key.shape[1] != query.shape[1]:  # grouped-query attention: SDPA reads the shared heads itself
        if GQA_IN_SDPA:
            grouped["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    # split, not slices: the backward of a split is one concatenation, that of each slice a zero-filled
    # full-length gradient
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, **grouped)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`NAME` a valid ``attn_implementation`` (idempotent) and return it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_row_attention(model, compute_dtype: torch.dtype = torch.float32) -> str:
    """Switch a model that attends with SDPA to the one-row attention, and return the implementation the
    collator should lay batches out for: FlashAttention-2's variable-length kernel on CUDA where
    ``flash_attn`` is installed and the compute dtype is 16-bit (its only dtypes), :data:`NAME` otherwise;
    ``flash_attention_2`` and ``eager`` models are kept as they are."""
    current = model.config._attn_implementation
    if current != "sdpa":
        return current
    device = next(model.parameters()).device
    if device.type == "cuda" and compute_dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn"):
        model.set_attn_implementation("flash_attention_2")
        return "flash_attention_2"
    model.set_attn_implementation(register())
    return NAME
