"""The training loss: token cross-entropy computed only where a label is, through the output head in
chunks.

A causal LM's head turns every position's hidden state into vocabulary-wide logits, and a plain loss
keeps them (and their float32 copy and log-softmax) for the backward: tokens x vocabulary x 8 bytes or
more, 128k logits per token for LLaMA3. Most of those positions often carry no label (prompts under
``train_on_inputs: false``, padding, the last position). :class:`LossHead` stands in for the model's head
during training: while labels are set (:func:`summed_token_loss` sets them), it gathers the hidden
states at the labelled positions and runs the head and the cross-entropy over them a chunk at a time,
taking each chunk's gradient with respect to the hidden states in the same pass. So no more than one
chunk of logits exists at any moment, the backward has nothing to recompute, and positions without a
label cost nothing. It returns the summed loss where the model returns logits; with no labels set it is
the head itself (generation, evaluation).

The head is swapped only in architectures whose causal-LM forward returns the head's output as it is
(:data:`PLAIN_HEAD_MODELS`; ``tests/test_loss.py`` checks each on a tiny model): one that scales or caps
the logits after the head (Gemma 2's soft-capping, Cohere's logit scale) would apply that to the loss.
Those, and a head that is itself adapted or quantized, keep the full-logits loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .data import IGNORE_INDEX

# model_type values whose ForCausalLM.forward is `logits = self.lm_head(hidden_states)` with nothing after it
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"})

# float32 logits of one chunk: small beside a micro-batch's activations, large enough for an efficient matmul
CHUNK_BYTES = 64 * 2**20


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cross-entropy summed over a batch's target tokens (each position predicts the next token's
    label; -100 labels and padding count for nothing), in float32 (or the model's dtype when wider).
    Divide by the target-token count of whatever the mean is over (a micro-batch, a global batch, a
    validation split)."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    # the labels move left, not the logits: a slice of the logits would cost a copy forward and a
    # zero-filled vocabulary-wide gradient backward; the last position gets no label
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    head = loss_head(model)
    if head is not None:
        with head.scoring(labels):
            return model(**inputs, use_cache=False).logits  # the head returned the summed loss
    logits = model(**inputs, use_cache=False).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit logits upcast for the loss
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def position_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, seq), float32 or wider: each position's cross-entropy against the next token's label, 0 where
    there is none; for evaluation, which wants the loss per example. With a :class:`LossHead` the
    vocabulary-wide logits exist one chunk at a time here too."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    head = loss_head(model)
    if head is not None:
        with head.scoring(labels, per_position=True):
            return model(**inputs, use_cache=False).logits  # the head returned the losses
    logits = model(**inputs, use_cache=False).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")


class LossHead(nn.Module):
    """The model's output head, holding the same ``weight`` and ``bias`` (so tying and state-dict keys
    stay as they were), which returns the summed cross-entropy of the labelled positions instead of
    logits while :meth:`scoring` has set labels."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight
        self.register_parameter("bias", head.bias)
        self.labels: Optional[torch.Tensor] = None
        self.per_position = False

    @contextmanager
    def scoring(self, labels: torch.Tensor, per_position: bool = False):
        """labels (batch, seq): the target of each position's prediction, IGNORE_INDEX where none. The head
        returns their summed loss, or with ``per_position`` each position's loss (no gradient)."""
        self.labels, self.per_position = labels, per_position
        try:
            yield self
        finally:
            self.labels, self.per_position = None, False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return F.linear(hidden, self.weight, self.bias)
        labelled = self.labels != IGNORE_INDEX
        if self.per_position:
            losses = torch.zeros(self.labels.shape, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
            losses[labelled] = labelled_losses(hidden[labelled], self.labels[labelled], self.weight, self.bias)
            return losses
        return HeadCrossEntropy.apply(hidden[labelled], self.labels[labelled], self.weight, self.bias)


@torch.no_grad()
def labelled_losses(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """CE(hidden_i W^T + b, target_i) for each row i, chunk by chunk."""
    losses = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    rows = chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], rows):
        logits = F.linear(hidden[start : start + rows], weight, bias).to(losses.dtype)
        target = targets[start : start + rows, None]
        losses[start : start + rows] = (torch.logsumexp(logits, dim=-1, keepdim=True) - logits.gather(1, target))[:, 0]
    return losses


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i W^T + b, target_i) for a frozen head (W, b), chunk by chunk. The gradient with
    respect to the hidden states, (softmax - onehot) W per chunk, is taken in the forward, while the
    chunk's logits exist anyway; the backward only scales it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        rows = chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            chunk, target = hidden[start : start + rows], targets[start : start + rows, None]
            logits = F.linear(chunk, weight, bias).to(loss_dtype)
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (log_norm - logits.gather(1, target)).sum()
            if grad is not None:
                probs = logits.sub_(log_norm).exp_()  # the softmax, in the logits' storage
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                grad[start : start + rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def fits_loss_head(model) -> bool:
    """Whether a :class:`LossHead` computes ``model``'s loss exactly (see the module's docstring)."""
    head = model.get_output_embeddings()
    if isinstance(head, LossHead):
        return True
    plain = type(head) is nn.Linear and not head.weight.requires_grad
    return plain and getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS


def use_loss_head(model) -> bool:
    """Put a :class:`LossHead` in place of ``model``'s output head where that is exact; True when it did
    (or one is already there)."""
    if not fits_loss_head(model):
        return False
    if not isinstance(model.get_output_embeddings(), LossHead):
        model.set_output_embeddings(LossHead(model.get_output_embeddings()))
    return True


def chunk_rows(vocab: int) -> int:
    """Positions whose logits one chunk holds."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def loss_head(model) -> Optional[LossHead]:
    """The model's :class:`LossHead`, looked up through a DDP / FSDP wrapper; None when it has none."""
    inner = getattr(model, "module", model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return head if isinstance(head, LossHead) else None
