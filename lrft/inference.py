"""Inference: a base + adapter (or a plain / merged model) ready to generate or score, with ΔW folded in
once, and the text generation ``lrft generate`` and ``lrft chat`` share.

Folding. At inference ΔW is fixed, so paying the adapter's training-time path on every token (RandLoRA's
n·r-wide products, NoLA's basis combinations, DoRA's norms) is waste. :func:`fold` rebuilds every adapted
layer once, chosen by the memory it needs:

* **merged** (preferred): one dense linear holding the dequantized base weight + ΔW in the compute dtype
  (what ``lrft merge`` writes): one matmul, no adapter work, in × out × bytes per layer. Used for every
  layer when all of them fit in half the memory available (checked before anything is allocated).
  Decision: merged layers ran at the base model's speed (0.94-1.00x on the CPU) where fixed low-rank
  factors beside the 4-bit base cost 7-13 % (benchmarks/results/inference-cpu-factored-first.json).
* **factored**, when the dense copies do not fit: adapters whose ΔW is a product B·A with a narrow inner
  dimension k (LoRA, RM-LoRA, AdaLoRA, LoRA², NoLA) keep the quantized base as trained and add x·Aᵀ·Bᵀ
  with the factors computed once: k·(in + out) extra multiply-adds per token, a few MB; the other layers
  are merged if they alone fit, or else kept as trained.

The choice and its memory are printed. ``keep_quantized`` keeps the adapter as trained (training-time
path on every token: slower; say so). Folded layers compute what the adapter does, to float rounding: the
merged ones exactly what a merged model computes (merge verification's tolerance), the factored ones the
training path's own arithmetic.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

import torch
from torch import Tensor, nn

from .errors import UserError
from .inject import replace_module
from .adapters.frozen_linear import dequantized_weight
from .model import dtype_name

# a layer is folded as factors when its inner dimension is at most this share of min(in, out)
FACTORED_SHARE = 0.25


class FactoredDelta(nn.Module):
    """base(x) + (x·Aᵀ)·Bᵀ with fixed factors (ΔW = B·A, scaling included), the base kept as trained."""

    def __init__(self, base_layer: nn.Module, B: Tensor, A: Tensor, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = A.shape[1], B.shape[0]
        self.register_buffer("B", B.detach().to(dtype), persistent=False)
        self.register_buffer("A", A.detach().to(dtype), persistent=False)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        delta = nn.functional.linear(nn.functional.linear(x.to(self.A.dtype), self.A), self.B)
        return result + delta.to(result.dtype)


def _merged_linear(layer, dtype: torch.dtype) -> nn.Linear:
    base = layer.base_layer
    bias = getattr(base, "bias", None)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta", dtype=dtype)
    with torch.no_grad():
        weight = dequantized_weight(base, torch.float32) + layer.delta_weight().float()
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return dense


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def fold(model: nn.Module, layers: dict, compute_dtype: torch.dtype) -> str:
    """Replace each adapter layer by its folded form (module docstring); returns what was done, in words."""
    itemsize = torch.finfo(compute_dtype).bits // 8
    budget = available_bytes(_device_of(model)) // 2

    def dense_bytes(names) -> int:
        return sum(layers[n].in_features * layers[n].out_features * itemsize for n in names)

    plan = {name: "merged" for name in layers}
    if dense_bytes(layers) > budget:
        for name, layer in layers.items():
            factors = None if layer.needs_base_weight else layer.factors()
            if factors is not None and factors[0].shape[1] <= FACTORED_SHARE * min(layer.in_features, layer.out_features):
                plan[name] = "factored"
        wide = [n for n, how in plan.items() if how == "merged"]
        if dense_bytes(wide) > budget:
            plan.update({n: "kept" for n in wide})
    factored_bytes = 0
    with torch.no_grad():
        for name, how in plan.items():
            layer = layers[name]
            if how == "factored":
                B, A = layer.factors()
                replace_module(model, name, FactoredDelta(layer.base_layer, B, A, compute_dtype))
                factored_bytes += (B.numel() + A.numel()) * itemsize
            elif how == "merged":
                replace_module(model, name, _merged_linear(layer, compute_dtype))
    count = {how: sum(h == how for h in plan.values()) for how in ("merged", "factored", "kept")}
    parts = []
    if count["merged"]:
        merged_mb = dense_bytes([n for n, how in plan.items() if how == "merged"]) / 2**20
        parts.append(f"{count['merged']} layers merged into dense {dtype_name(compute_dtype)} weights (+{merged_mb:,.0f} MB)")
    if count["factored"]:
        parts.append(f"{count['factored']} layers as fixed low-rank factors (+{factored_bytes / 2**20:,.1f} MB)")
    if count["kept"]:
        parts.append(
            f"{count['kept']} layers kept as trained (merging them would need {dense_bytes([n for n, h in plan.items() if h == 'kept']) / 2**20:,.0f} MB, "
            "more than half the memory available: the adapter's training-time path runs on every token)"
        )
    if not count["merged"] and not count["factored"]:
        return "adapter kept as trained: " + parts[0]
    return "ΔW folded for inference: " + "; ".join(parts)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Loaded:
    """A model ready for inference and what it is."""

    model: nn.Module
    tokenizer: Any
    name: str  # the base model (with --adapter) or the model
    bits: Optional[int]
    note: str  # how the adapter is applied, for the user


def load_for_inference(
    adapter: Optional[Path], model: Optional[str], quantization: Optional[str] = None, keep_quantized: bool = False,
    device: Optional[torch.device] = None,
) -> Loaded:
    """``--adapter`` (an lrft or PEFT adapter folder, on its base as trained unless ``quantization`` says
    4, 8 or none) or ``--model`` (a folder, hub id, .gguf or alias; unquantized unless ``quantization``)."""
    from .model import load_base_model, load_tokenizer
    from .recipe import ModelSection, QuantizationSection

    if (adapter is None) == (model is None):
        raise UserError("give exactly one of --adapter ADAPTER_DIR (base + adapter) or --model MODEL (a plain or merged model)")
    bits_override = parse_bits(quantization)
    if adapter is not None:
        from .adapter_folder import AdapterFolder

        folder = AdapterFolder.read(adapter)
        bits = folder.quantization.bits if bits_override == "recorded" else bits_override
        lm, layers = folder.load_model(device, bits=bits)
        tokenizer = load_tokenizer(folder.base_name)
        if keep_quantized:
            note = "adapter kept as trained (--keep-quantized): its training-time path runs on every token"
        else:
            note = fold(lm, layers, folder.dtypes.compute if bits == 4 else folder.dtypes.load)
        return Loaded(lm, tokenizer, folder.base_name, bits, note)
    bits = None if bits_override == "recorded" else bits_override
    lm = load_base_model(ModelSection(name_or_path=model), QuantizationSection(bits=bits), device)
    return Loaded(lm, load_tokenizer(model), model, bits, "")


def parse_bits(quantization: Optional[str]):
    """``--quantization``: "recorded" when absent, else 4, 8 or None."""
    if quantization is None:
        return "recorded"
    value = str(quantization).strip().lower()
    if value not in ("4", "8", "none"):
        raise UserError(f"--quantization {quantization!r} is not valid; use 4, 8 or none")
    return None if value == "none" else int(value)


# --- generation --------------------------------------------------------------------------------------


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1]")

    def kwargs(self, tokenizer) -> dict[str, Any]:
        sample = self.temperature > 0
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sample,
            "temperature": self.temperature if sample else None,
            "top_p": self.top_p if sample else None,
            "top_k": None,
            "pad_token_id": tokenizer.pad_token_id,
        }


class _Echo:
    """A streamer: decoded text as it is generated, written to ``out`` and kept."""

    def __init__(self, tokenizer, out: TextIO, prompt_length: int):
        self.tokenizer, self.out, self.skip = tokenizer, out, prompt_length
        self.ids: list[int] = []
        self.printed = 0

    def put(self, value: Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:  # the first call is the prompt
            self.skip = 0
            return
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an incomplete multi-byte character waits for the next token
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


@torch.no_grad()
def generate_stream(loaded: Loaded, prompt_ids: list[int], sampling: Sampling, out: TextIO) -> str:
    """Generate from one prompt, streaming the text to ``out``; returns the text."""
    device = _device_of(loaded.model)
    ids = torch.tensor([prompt_ids], device=device)
    streamer = _Echo(loaded.tokenizer, out, prompt_length=len(prompt_ids))
    torch.manual_seed(sampling.seed)
    loaded.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **sampling.kwargs(loaded.tokenizer)
    )
    return streamer.text


@torch.no_grad()
def generate_batch(loaded: Loaded, prompts: list[list[int]], sampling: Sampling, batch_size: int = 8) -> list[str]:
    """Generate for many prompts, left-padded in batches of similar length; texts in the prompts' order."""
    tokenizer, device = loaded.tokenizer, _device_of(loaded.model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    torch.manual_seed(sampling.seed)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        output = loaded.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **sampling.kwargs(tokenizer))
        for row, i in enumerate(chunk):
            texts[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True)
    return texts


def read_prompts(path: Path) -> list[dict]:
    """``--input``: JSON lines of ``{prompt}``, ``{messages}`` or ``{conversations}`` records."""
    from .data import RecordError, conversation
    from .io import read_json_lines

    records = []
    for number, record in read_json_lines(path, f"--input {path}", "one JSON record per line"):
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            records.append({"prompt": record["prompt"]})
            continue
        try:
            records.append({"messages": conversation(record)})
        except RecordError:
            raise UserError(
                f"--input {path}, line {number}: no text field prompt and no messages / conversations; give one per line"
            ) from None
    if not records:
        raise UserError(f"--input {path} holds no records; one JSON record per line")
    return records


def prompt_ids(loaded: Loaded, record: dict) -> list[int]:
    """Token ids of a prompt: plain text as the tokenizer encodes it, messages through the chat template with
    the generation prompt (the rendering training used)."""
    from .data import render_chat

    if "messages" in record:
        require_chat_template(loaded)
        return render_chat(loaded.tokenizer, record["messages"], add_generation_prompt=True)
    return loaded.tokenizer(record["prompt"])["input_ids"]


def require_chat_template(loaded: Loaded) -> None:
    if not getattr(loaded.tokenizer, "chat_template", None):
        raise UserError(f"{loaded.name} has no chat template; use plain prompts (lrft generate --prompt) or a chat model")


# --- the commands -------------------------------------------------------------------------------------


def run_generate(
    loaded: Loaded, prompts: Iterable[str], input_path: Optional[Path], output: Optional[Path], sampling: Sampling,
    batch_size: int = 8, chat: bool = False, out: Optional[TextIO] = None,
) -> list[dict]:
    from .io import write_text_atomic

    out = out or sys.stdout
    prompts = list(prompts)
    if input_path is not None:
        records = read_prompts(input_path)
    else:
        records = [{"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p} for p in prompts]
    ids = [prompt_ids(loaded, r) for r in records]
    if len(records) == 1 and output is None:
        texts = [generate_stream(loaded, ids[0], sampling, out)]
    else:
        texts = generate_batch(loaded, ids, sampling, batch_size)
        if output is None:
            for text in texts:
                out.write(json.dumps({"completion": text}) + "\n")
    rows = [dict(record, completion=text) for record, text in zip(records, texts)]
    if output is not None:
        write_text_atomic(output, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} completions written to {output}", file=sys.stderr)
    return rows


HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit or Ctrl+D"


def run_chat(
    loaded: Loaded, sampling: Sampling, system: Optional[str] = None, stdin: Optional[TextIO] = None, out: Optional[TextIO] = None
) -> list[dict]:
    """The interactive session: one line per user turn; returns the conversation."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    require_chat_template(loaded)
    interactive = stdin.isatty()
    out.write(f"chatting with {loaded.name}{' + adapter' if loaded.note else ''}; {HELP}\n")
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line:  # Ctrl+D or the end of a pipe
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip()
            messages = [{"role": "system", "content": system}] if system else []
            out.write("(system prompt set; conversation reset)\n")
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}; {HELP})\n")
            continue
        messages.append({"role": "user", "content": text})
        out.write("assistant> ")
        out.flush()
        reply = generate_stream(loaded, prompt_ids(loaded, {"messages": messages}), sampling, out)
        messages.append({"role": "assistant", "content": reply})
    return messages
