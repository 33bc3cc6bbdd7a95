"""lrft.heap: the heap is trimmed after every decoder layer's forward, and nothing else changes."""

import torch

from conftest import tiny_llama_config
from lrft import heap


def test_trim_after_each_decoder_layer(monkeypatch):
    from transformers import LlamaForCausalLM

    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).eval()
    ids = torch.randint(0, 128, (2, 7))
    expected = model(input_ids=ids).logits
    assert heap.trim_after_each_layer(model) == 3
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert calls == [0, 0, 0]


def test_no_glibc_no_trim(monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    model = LlamaForCausalLM(tiny_llama_config())
    assert heap.trim_after_each_layer(model) == 0
    heap.trim_heap()  # a no-op
