"""lrft.heap: with gradient checkpointing the heap is trimmed after every decoder layer's forward and nothing
else changes; ``lrft train`` restarts itself once with glibc's heap in transparent huge pages."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_llama_config
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


PROBE = "import os; from lrft.heap import restart_with_huge_pages; print(os.environ.get('GLIBC_TUNABLES')); restart_with_huge_pages()"


def huge_pages_available() -> bool:
    try:
        return heap._malloc_trim() is not None and "[never]" not in heap.THP_MODE.read_text()
    except OSError:
        return False


@pytest.mark.skipif(not huge_pages_available(), reason="needs glibc and transparent huge pages")
def test_restart_once_with_huge_pages_keeping_other_tunables():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"]


def test_a_named_hugetlb_setting_is_kept(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("restarted although the user chose"))
    heap.restart_with_huge_pages()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


def test_no_glibc_no_restart(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("restarted without glibc"))
    heap.restart_with_huge_pages()
    assert "GLIBC_TUNABLES" not in os.environ
