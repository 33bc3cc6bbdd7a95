"""The loss through :class:`lrft.loss.LossHead` against the plain full-logits cross-entropy, computed
here independently in float64: the same summed loss and the same gradients, for every architecture the
head is used with, whatever the chunking; and no vocabulary-wide tensor kept for the backward."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lrft import loss as loss_module
from lrft.data import IGNORE_INDEX, collate
from lrft.loss import LossHead, PLAIN_HEAD_MODELS, loss_head, summed_token_loss, use_loss_head

VOCAB = 96


def tiny_model(model_type: str, dtype=torch.float64):
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    # something to differentiate that sits below the head: the final norm and one MLP projection
    trained = [model.model.norm.weight, model.model.layers[1].mlp.down_proj.weight]
    for p in trained:
        p.requires_grad_(True)
    return model, trained


def batch_of(seed: int = 0) -> dict:
    """Three right-padded rows of different lengths; some positions without a label (a masked prompt)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, masked in ((11, 4), (7, 0), (9, 9 - 2)):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]})
    return collate(examples, pad_id=0)


def naive_loss(model, batch) -> torch.Tensor:
    """sum over labelled positions t of -log softmax(logits_t)[label_{t+1}], in float64."""
    logits = model(input_ids=batch["input_ids"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    return -logp[keep].gather(1, labels[keep][:, None]).sum()


@pytest.mark.parametrize("model_type", sorted(PLAIN_HEAD_MODELS))
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_loss_head_equals_full_logits_loss_and_its_gradient(model_type, chunk_rows, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_rows * 4 * VOCAB)
    model, trained = tiny_model(model_type)
    batch = batch_of()
    expected = naive_loss(model, batch)
    expected_grads = torch.autograd.grad(expected, trained)

    assert use_loss_head(model) and isinstance(loss_head(model), LossHead)
    got = summed_token_loss(model, batch)
    got_grads = torch.autograd.grad(got, trained)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    # scaled as the training loop scales it (the backward multiplies the gradient taken in the forward)
    scaled_grads = torch.autograd.grad(summed_token_loss(model, batch) * 0.25, trained)
    for g, e in zip(scaled_grads, expected_grads):
        torch.testing.assert_close(g, 0.25 * e, rtol=1e-9, atol=1e-12)


def test_loss_head_is_the_plain_head_without_labels_and_keeps_tying():
    model, _ = tiny_model("llama")
    ids = batch_of()["input_ids"]
    before = model(input_ids=ids).logits
    embeddings = model.get_input_embeddings().weight
    use_loss_head(model)
    assert model.get_output_embeddings().weight is embeddings
    assert "lm_head.weight" in dict(model.named_parameters(remove_duplicate=False))
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(summed_token_loss(model, batch_of()), naive_loss(model, batch_of()), rtol=1e-10, atol=1e-10)


def test_packed_row_and_float32_under_bf16_autocast():
    from lrft.packed_attention import use_row_attention

    model, trained = tiny_model("llama", torch.float32)
    use_row_attention(model)  # a row of two examples, as collate lays packed micro-batches out
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 20), generator=g)
    batch = {
        "input_ids": ids,
        "labels": torch.cat([torch.full((1, 1), IGNORE_INDEX), ids[:, 1:12], torch.full((1, 1), IGNORE_INDEX), ids[:, 13:]], 1),
        "position_ids": torch.cat([torch.arange(12), torch.arange(8)])[None],
    }
    plain = summed_token_loss(model, batch)
    plain_grads = torch.autograd.grad(plain, trained)
    use_loss_head(model)
    got = summed_token_loss(model, batch)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, trained), plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = summed_token_loss(model, batch)
    assert bf16.dtype == torch.float32 and abs(float(bf16) - float(plain)) / float(plain) < 2e-2


def test_no_vocabulary_wide_tensor_is_kept_for_the_backward(monkeypatch):
    """The plain loss keeps tokens x vocabulary logits for the backward; the loss head keeps at most
    the labelled positions' hidden-state gradient (tokens x hidden)."""
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 2 * 4 * VOCAB)
    model, _ = tiny_model("llama", torch.float32)
    batch = batch_of()

    def largest_saved_last_dim() -> int:
        sizes = []

        def pack(t):
            sizes.append(t.shape[-1] if t.dim() else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            summed_token_loss(model, batch)
        return max(sizes)

    assert largest_saved_last_dim() == VOCAB  # the full-logits loss
    use_loss_head(model)
    assert largest_saved_last_dim() < VOCAB


def test_heads_that_would_change_the_loss_are_left_alone():
    gemma, _ = tiny_model("gemma2")  # soft-caps the logits after the head
    assert not use_loss_head(gemma) and loss_head(gemma) is None
    llama, _ = tiny_model("llama")
    llama.lm_head.weight.requires_grad_(True)  # a trained head: its gradient is not taken
    assert not use_loss_head(llama)


def test_right_padded_rows_without_a_mask_give_each_example_its_own_loss_and_gradient():
    """collate sends no attention mask with right padding: the summed loss and its gradient of a padded
    batch are the sums over the examples run alone."""
    model, trained = tiny_model("llama")
    g = torch.Generator().manual_seed(2)
    examples = [{"input_ids": (ids := torch.randint(0, VOCAB, (n,), generator=g).tolist()), "labels": ids} for n in (12, 5, 8)]
    batch = collate(examples, pad_id=0)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (3, 12)
    together = summed_token_loss(model, batch)
    alone = sum(summed_token_loss(model, collate([e], pad_id=0)) for e in examples)
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(together, trained), torch.autograd.grad(alone, trained)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 1000])
def test_position_losses_are_each_positions_cross_entropy(with_head, chunk_rows, monkeypatch):
    """What ``lrft eval --loss`` sums per example: position t's loss against label t + 1, 0 where none, the
    same through the loss head (chunked) as through full logits."""
    from lrft.loss import position_losses

    monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_rows * 4 * VOCAB)
    model, _ = tiny_model("llama")
    if with_head:
        assert use_loss_head(model)
    batch = batch_of()
    got = position_losses(model, batch)
    with torch.no_grad():
        if with_head:
            model.set_output_embeddings(torch.nn.Linear(32, VOCAB, bias=False))
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.double(), dim=-1)
    labels = batch["labels"]
    expected = torch.zeros(labels.shape, dtype=torch.float64)
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[row, t + 1] != IGNORE_INDEX:
                expected[row, t] = -logp[row, t, labels[row, t + 1]]
    assert got.shape == labels.shape and not got.requires_grad
    torch.testing.assert_close(got.double(), expected, atol=1e-9, rtol=1e-9)
    assert float(got.sum()) == pytest.approx(float(naive_loss(model, batch)), rel=1e-9)
