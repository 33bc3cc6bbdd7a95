import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str):
    """A script of the repository (benchmarks/, experiments/) imported as module ``name``, registered in
    sys.modules (dataclasses look their module up there), its folder on sys.path as when it runs (the
    studies import experiments/study.py); appended, so that no script shadows a module."""
    import importlib.util
    import sys

    folder = str((ROOT / relative).parent)
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
SHARED = ROOT.parent / "shared"

# Tests never reach the network; the embedded model is converted once per test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """The tests of the studies in experiments/ (marker ``study``) run only when a -m expression names them
    (``make study-test``: -m study); ``make test`` and any other selection leave them out, so a clone of main
    without the results branch tests the product alone."""
    if "study" in (config.getoption("markexpr") or ""):
        return
    studies = [item for item in items if item.get_closest_marker("study")]
    if studies:
        config.hook.pytest_deselected(items=studies)
        items[:] = [item for item in items if not item.get_closest_marker("study")]


@pytest.fixture(scope="session", autouse=True)
def _lrft_cache(tmp_path_factory):
    # A persistent cache across sessions keeps the GGUF conversion (about 20 s) to once per machine.
    os.environ.setdefault("LRFT_CACHE", str(ROOT / ".pytest_cache" / "lrft"))
    yield


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture
def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def make_linear(kind: str, in_features: int, out_features: int, seed: int = 0, bias: bool = False):
    """A frozen linear of the given kind: 'none' (nn.Linear), 'nf4', 'fp4' or 'int8' (bitsandbytes)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    if kind == "none":
        return lin.requires_grad_(False)
    import bitsandbytes as bnb

    if kind in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32, quant_type=kind)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=kind)
    elif kind == "int8":
        q = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(kind)
    if bias:
        q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder with the real SmolLM2 tokenizer (vocab 49152),
    so end-to-end commands run in seconds."""
    from transformers import LlamaForCausalLM

    from lrft.model import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=49152, max_position_embeddings=512))
    model.save_pretrained(folder)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random 2-layer Llama with the embedded SmolLM2 tokenizer (hence its vocabulary size), its output
    head scaled up (random init gives logits near zero; larger ones make differences visible)."""
    from transformers import LlamaForCausalLM

    from lrft.model import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_base")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=49152, max_position_embeddings=256))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(folder)
    return folder


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens and an end-of-text token, no merges): any text, a vocabulary of 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def byte_base(tmp_path_factory):
    """tiny_base with a byte-level tokenizer: a vocabulary of 257 instead of 49152, so that the output head
    costs next to nothing and a training step, a merge or a PEFT load of the model takes milliseconds."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("byte_base")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=256))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lrft_main(args, capfd):
    """(exit code, stderr) of ``lrft ARGS`` run through the CLI's ``main`` in this process (no new Python)."""
    from lrft.cli import main

    capfd.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capfd.readouterr().err



def choice_task(folder, items) -> str:
    """An lm-eval task definition of the user's own (what ``lrft eval --include-path`` takes), multiple choice
    over ``items`` ({question, choices, gold}) in a local JSON-lines file; returns the folder."""
    import json

    folder.mkdir()
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: question\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n"
    )
    return str(folder)


@torch.no_grad()
def choice_logprob(model, tokenizer, question: str, choice: str) -> float:
    """Summed log-probability of " choice" after ``question`` (lm-eval's default target delimiter), from one
    forward of the whole text, in float64; the continuation is what follows the question's own tokens."""
    context = tokenizer(question)["input_ids"]
    whole = tokenizer(question + " " + choice)["input_ids"]
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context), len(whole)))
