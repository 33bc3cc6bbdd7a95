"""``lrft merge``: fold an adapter into its base model, verify the result, or export it for PEFT.

Merging streams the base checkpoint tensor by tensor (``safetensors.safe_open``), so peak memory stays
near the adapter, a few copies of one weight matrix and one output shard (``max_shard_bytes``, 2 GiB by
default): a model larger than a shard is never held whole, in float32 or otherwise.
For each weight:

* ``--base dequantized`` (default) starts from exactly what the trained model multiplied by: the
  checkpoint tensor cast to the recorded load dtype and, for the linears bitsandbytes quantized, put
  through the same ``Params4bit`` / ``Int8Params`` quantization and dequantized again. Which linears are
  quantized (and with which block size, statistics compression and storage) is read off the model
  skeleton that transformers' own quantizer builds on the meta device, so it cannot drift from
  what ``load_base_model`` does.
* ``--base original`` starts from the checkpoint tensor itself. For a quantized adapter this adds the
  quantization error the adapter never saw, and the verification figures measure how much.

ΔW comes only from each adapter layer's ``delta_weight()``: the layer is rebuilt around a stand-in
base holding that one weight (quantized exactly as in training, so adapters whose ΔW depends on the
base, like DoRA's ``W' − W``, see the weight they were trained on), loaded with its saved tensors, asked
for ΔW and dropped. Random-basis adapters share one :class:`SharedTensors` across layers as in training.

The result (safetensors shards of at most ``max_shard_bytes`` with an index when there are several,
``config.json`` without ``quantization_config`` and with ``dtype`` set, tokenizer files, generation
config) loads with a plain ``AutoModelForCausalLM.from_pretrained(OUT_DIR)``. Tied embeddings stay tied
unless the output head itself was adapted.

``--requantize nf4|int8`` loads the merged weights with bitsandbytes and saves them pre-quantized (the
saved ``config.json`` then carries ``quantization_config``, so transformers loads it quantized), and the
verification reports the output change that re-quantizing causes.

Verification (default) runs fixed prompts through base + adapter (the quantized model as trained) and
through the saved output folder, and prints max |Δlogit| and the mean KL divergence. When the two are
meant to be the same function (``--base dequantized``, no re-quantization) a difference beyond the
tolerance for the dtype raises :class:`VerificationFailed` (exit code 1, distinct from the exit code 2
of bad input) and nothing is written. A non-finite merged tensor fails the same way, verification or not.

Everything is written into a temporary sibling folder renamed to ``OUT_DIR`` at the end
(:func:`lrft.io.atomic_dir`): a crash or a kill leaves no ``OUT_DIR``.

``--format peft`` writes the adapter itself in PEFT's layout instead (:mod:`lrft.peft_format`), and
``--format lora`` any adapter's ΔW truncated to a plain LoRA for serving engines (:mod:`lrft.lora_export`). The
adapter may be lrft's or PEFT's own (:class:`~lrft.adapter_folder.AdapterFolder` reads both).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from .adapter_folder import AdapterFolder
from .adapters.frozen_linear import dequantized_weight
from .errors import UserError
from .io import atomic_dir, save_tensors_atomic, write_json_atomic
from .model import DTYPES, bnb_config, check_bitsandbytes, default_device, dtype_name, load_tokenizer, resolve_model_path

if TYPE_CHECKING:
    from .lora_export import CheckOptions

BASES = ("dequantized", "original")
REQUANTIZE = ("none", "nf4", "int8")
FORMATS = ("hf", "peft", "lora")
DEFAULT_SHARD_BYTES = 2 * 1024**3

# Files of a model folder that describe how to use it rather than its weights; copied unchanged.
PASSTHROUGH_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)

VERIFY_PROMPTS = (
    "The capital of France is",
    "Question: Which is heavier, a kilogram of feathers or a kilogram of iron?\nAnswer:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
)
VERIFY_MAX_TOKENS = 64

# Allowed (max |Δlogit| relative to the largest reference |logit|, mean KL) between base + adapter and
# the merged model, keyed by the coarser of the two models' compute dtypes. Measured on SmolLM2-135M
# (4-bit base, LoRA r=16 on 150 layers with |ΔW| ≈ 2 % of |W|): float32 differs only by summation
# order (2e-6 relative, KL 1e-11); fp16 and bf16 round every merged weight once more and compute in
# that dtype, which compounds through the layers (fp16: 3e-3 relative, KL 3e-5; bf16: 4e-2, KL 3e-3).
# Doubling that adapter's ΔW (a plausible bug) gives 8e-2 relative and KL 3e-2: caught in float32 by
# orders of magnitude, in bf16 by the KL bound only; a merge meant to be checked tightly is float32.
TOLERANCES = {
    "float32": (1e-3, 1e-5),
    "float16": (5e-2, 5e-3),
    "bfloat16": (1e-1, 1e-2),
}


class VerificationFailed(UserError):
    """The merged model does not reproduce base + adapter, or holds non-finite values."""

    exit_code = 1


def _say(message: str) -> None:
    print(message, flush=True)


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- entry point ----------------------------------------------------------------------------------


def run_merge(
    adapter_dir: Path | str,
    output: Path | str,
    dtype: str = "auto",
    base: str = "dequantized",
    requantize: str = "none",
    verify: bool = True,
    fmt: str = "hf",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    check: Optional["CheckOptions"] = None,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into its base and write ``output``, or export the adapter: in PEFT's format
    (``peft``), or as a plain LoRA of ``rank`` / ``energy`` (``lora``, :mod:`lrft.lora_export`; ``check``
    compares it with the adapter through PEFT).

    Returns what was done and measured (also written to ``output/lrft_merge.json`` for merges,
    ``output/lrft_export.json`` for LoRA exports).
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    _check_options(dtype, base, requantize, fmt, max_shard_bytes)
    if fmt != "lora" and (rank is not None or energy is not None or check is not None):
        raise UserError("--rank, --energy and --check apply to --format lora; add --format lora or drop them")
    folder = AdapterFolder.read(adapter_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output} already exists and is not empty; remove it or choose another folder")
    if output.resolve() == adapter_dir.resolve():
        raise UserError("--output is the adapter folder itself; choose another folder")
    if fmt != "hf" and (base != "dequantized" or requantize != "none"):
        raise UserError(f"--base and --requantize apply to merged models, not --format {fmt}; drop them or use --format hf")
    if fmt == "peft":
        from .peft_format import export_peft

        return export_peft(folder, output)
    # auto: the dtype the base was loaded in for training (as recorded): the merged model then computes what
    # base + adapter computed, down to the greedy generations
    out_dtype = folder.dtypes.load if dtype == "auto" else DTYPES[dtype]
    if fmt == "lora":
        from .lora_export import RankRule, export_lora

        return export_lora(folder, output, RankRule(rank, energy), out_dtype, check)
    return _merge(folder, output, out_dtype, base, requantize, verify, max_shard_bytes)


def _check_options(dtype: str, base: str, requantize: str, fmt: str, max_shard_bytes: int) -> None:
    for option, value, allowed in (
        ("--dtype", dtype, ("auto", *DTYPES)),
        ("--base", base, BASES),
        ("--requantize", requantize, REQUANTIZE),
        ("--format", fmt, FORMATS),
    ):
        if value not in allowed:
            raise UserError(f"{option} {value!r} is not supported; use one of: {', '.join(allowed)}")
    if max_shard_bytes <= 0:
        raise UserError(f"shard size {max_shard_bytes} must be positive")


# --- the base checkpoint ----------------------------------------------------------------------------


def source_folder(name_or_path: str) -> Path:
    """The local folder holding the base model's safetensors (aliases / GGUF: the converted cache)."""
    resolved = resolve_model_path(name_or_path)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all mean "not available here"
        raise UserError(
            f"cannot get the weights of '{name_or_path}' ({type(exc).__name__}); download the model first or "
            f"point base_model.name_or_path in {name_or_path!r}'s adapter_config.json at a local folder"
        ) from exc


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise UserError(
            f"{folder} holds no .safetensors weights; merge reads safetensors only: re-save the base model "
            "with save_pretrained(..., safe_serialization=True)"
        )
    return found


def quantized_linears(config, folder: AdapterFolder) -> tuple[dict[str, nn.Module], nn.Module]:
    """The linears bitsandbytes quantizes when loading this model as in training, by module name (meta
    modules that carry the quantization settings), and the meta model itself."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    bits = folder.quantization.bits
    if bits is None:
        return {}, skeleton
    from transformers.quantizers import AutoHfQuantizer

    check_bitsandbytes(bits)
    quantizer = AutoHfQuantizer.from_config(bnb_config(folder.quantization, folder.dtypes.compute), pre_quantized=False)
    quantizer.preprocess_model(skeleton, device_map={"": "cpu"})
    found = {n: m for n, m in skeleton.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    return found, skeleton


def quantized_stand_in(weight: Tensor, like: nn.Module, device: torch.device) -> nn.Module:
    """A real bitsandbytes linear holding ``weight`` quantized with ``like``'s settings (as loading does)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    if type(like).__name__ == "Linear4bit":
        settings = like.weight
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=like.compute_dtype,
            compress_statistics=settings.compress_statistics, quant_type=settings.quant_type,
            quant_storage=settings.quant_storage, device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=settings.blocksize, compress_statistics=settings.compress_statistics,
            quant_type=settings.quant_type, quant_storage=settings.quant_storage,
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=False, has_fp16_weights=False, threshold=like.state.threshold, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return layer.to(device)


def plain_stand_in(weight: Tensor) -> nn.Module:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


# --- output shards ------------------------------------------------------------------------------------


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a single tensor larger than that
    gets a shard of its own) and, for several shards, the index transformers reads."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.written) + 1:05d}.partial"
        save_tensors_atomic(path, self.pending, metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Give the shards their final names (and write the index); returns the file names."""
        self.flush()
        count = len(self.written)
        if count == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (path, keys), name in zip(self.written, names):
            os.replace(path, self.folder / name)
            weight_map.update({key: name for key in keys})
        if count > 1:
            write_json_atomic(
                self.folder / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
            )
        return names


# --- merging --------------------------------------------------------------------------------


def delta_weight(folder: AdapterFolder, name: str, stand_in: nn.Module) -> Tensor:
    """ΔW of one layer, rebuilt around the weight it was trained on: each layer's own ``delta_weight()``."""
    with torch.no_grad():
        return folder.layer(name, stand_in).delta_weight().float()


@dataclass
class MergeStats:
    merged_layers: list[str] = field(default_factory=list)
    tensors: int = 0
    nonfinite: list[str] = field(default_factory=list)


def _merge(folder: AdapterFolder, output, out_dtype, base, requantize, verify, max_shard_bytes) -> dict[str, Any]:
    from transformers import AutoConfig

    started = time.time()
    device = default_device()
    if not folder.base_name:
        raise UserError(f"{folder.path}: its config names no base model; set base_model_name_or_path to the base model")
    checkpoint = source_folder(folder.base_name)
    config = AutoConfig.from_pretrained(checkpoint)
    bits = folder.quantization.bits
    if base == "original" and bits is not None:
        _warn(
            f"merging into the original weights of {folder.base_name}: this adds the {bits}-bit quantization "
            "error the adapter never saw (the verification below measures it); --base dequantized avoids it"
        )
    _say(
        f"merging {folder.config.type} adapter ({len(folder.layer_shapes)} layers) into {folder.base_name} "
        f"[{base} base{f', {bits}-bit' if bits is not None else ''}] -> {output} ({dtype_name(out_dtype)})"
    )
    report: dict[str, Any] = {
        "adapter": str(folder.path),
        "adapter_format": folder.format,
        "adapter_type": folder.config.type,
        "base_model": folder.base_name,
        "base": base,
        "quantization_bits": bits,
        "dtype": dtype_name(out_dtype),
        "requantize": requantize,
    }
    with atomic_dir(output) as tmp:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.merged-", dir=output.parent)) if requantize != "none" else tmp
        try:
            stats, untied = _write_merged_weights(checkpoint, config, folder, base, out_dtype, staging, max_shard_bytes, device)
            _write_model_files(checkpoint, config, out_dtype, staging, untied)
            if stats.nonfinite:
                raise VerificationFailed(
                    f"merged weights hold non-finite values ({', '.join(stats.nonfinite[:3])}); "
                    "merge in --dtype float32 or bfloat16 (float16 overflows for large weights)"
                )
            _say(f"merged {len(stats.merged_layers)} layers, {stats.tensors} tensors; all finite")
            if requantize != "none":
                _requantize(staging, tmp, requantize, out_dtype, max_shard_bytes)
        finally:
            if staging != tmp:
                shutil.rmtree(staging, ignore_errors=True)
        report["files"] = sorted(p.name for p in tmp.iterdir())
        if verify:
            strict = requantize == "none" and (base == "dequantized" or bits is None)
            report["verification"] = verify_merged(folder, tmp, out_dtype, requantize, strict, device)
        report["seconds"] = round(time.time() - started, 2)
        write_json_atomic(tmp / "lrft_merge.json", report)
    _say(f"wrote {output} in {report['seconds']:.1f} s")
    return report


def _write_merged_weights(checkpoint, config, folder: AdapterFolder, base, out_dtype, out_folder, max_shard_bytes, device):
    """Stream every checkpoint tensor into the output shards, adding ΔW to the adapted weights.

    Returns the statistics and whether the output head had to be untied from the input embeddings.
    """
    from safetensors import safe_open

    quantized, skeleton = quantized_linears(config, folder)
    shards = checkpoint_shards(checkpoint)
    head = _HeadPlan.of(config, skeleton, folder, shards, checkpoint)
    writer = ShardWriter(out_folder, max_shard_bytes)
    stats = MergeStats()

    def emit(key: str, file_tensor: Tensor) -> None:
        weight, adapted = merged_tensor(key, file_tensor, folder, base, quantized, device)
        if adapted:
            stats.merged_layers.append(key.removesuffix(".weight"))
        result = weight.to(out_dtype)
        # NaN and inf survive a float64 sum, which is cheaper than an elementwise isfinite mask
        if not math.isfinite(float(result.sum(dtype=torch.float64))):
            stats.nonfinite.append(key)
        writer.add(key, result)
        stats.tensors += 1

    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if not tensor.is_floating_point():
                    writer.add(key, tensor)  # integer buffers (rare) are not weights
                    continue
                emit(key, tensor)
                if head.from_embeddings and key == head.embed_key:
                    emit(head.key, tensor)
                del tensor
    writer.finish()
    gc.collect()
    return stats, head.untie


def merged_tensor(key: str, file_tensor: Tensor, folder: AdapterFolder, base: str, quantized: dict, device) -> tuple[Tensor, bool]:
    """One checkpoint tensor as the merged model holds it (float32), and whether ΔW was added to it."""
    module_name = key.removesuffix(".weight")
    is_weight = key.endswith(".weight")
    is_adapted = is_weight and module_name in folder.layer_shapes
    stand_in = None
    if base == "dequantized" or is_adapted:
        # what the trained model held: the load dtype, quantized and dequantized where bnb quantized it
        trained = file_tensor.to(device=device, dtype=folder.dtypes.load)
        if is_weight and module_name in quantized:
            stand_in = quantized_stand_in(trained, quantized[module_name], device)
        elif is_adapted:
            stand_in = plain_stand_in(trained)
    if base == "dequantized":
        weight = dequantized_weight(stand_in, torch.float32) if stand_in is not None else trained.float()
    else:
        weight = file_tensor.to(device=device, dtype=torch.float32)
    if is_adapted:
        weight = weight + delta_weight(folder, module_name, stand_in)
    return weight, is_adapted


@dataclass
class _HeadPlan:
    """A tied output head has no tensor of its own in most checkpoints; if it is adapted, it becomes input
    embeddings + ΔW (emitted under ``key`` when ``from_embeddings``) and the output config unties it."""

    untie: bool
    from_embeddings: bool
    key: Optional[str]
    embed_key: Optional[str]

    @classmethod
    def of(cls, config, skeleton, folder: AdapterFolder, shards, checkpoint) -> "_HeadPlan":
        from safetensors import safe_open

        output_embeddings = skeleton.get_output_embeddings()
        input_embeddings = skeleton.get_input_embeddings()
        module_names = {id(m): n for n, m in skeleton.named_modules()}
        head_name = module_names.get(id(output_embeddings)) if output_embeddings is not None else None
        embed_key = f"{module_names.get(id(input_embeddings))}.weight" if input_embeddings is not None else None
        tied_head = bool(getattr(config, "tie_word_embeddings", False)) and head_name is not None
        keys_in_checkpoint: set[str] = set()
        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                keys_in_checkpoint.update(handle.keys())
        # an adapted head differs from the embeddings, so the output must not tie them back together
        untie = tied_head and head_name in folder.layer_shapes
        head_key = f"{head_name}.weight" if head_name else None
        from_embeddings = untie and head_key not in keys_in_checkpoint
        adapted = {f"{name}.weight": name for name in folder.layer_shapes}
        missing = [key for key in adapted if key not in keys_in_checkpoint and not (from_embeddings and key == head_key)]
        if missing:
            raise UserError(
                f"the checkpoint in {checkpoint} has no tensor {missing[0]} for adapted layer {adapted[missing[0]]}; "
                "merge needs checkpoint tensor names that match the model's module names"
            )
        return cls(untie, from_embeddings, head_key, embed_key)


def _write_model_files(folder: Path, config, out_dtype: torch.dtype, out_folder: Path, untied: bool) -> None:
    payload = config.to_dict()
    payload.pop("quantization_config", None)
    if untied:
        payload["tie_word_embeddings"] = False
    # transformers 5 reads "dtype", 4.x "torch_dtype"; both keep the merged model's dtype on load
    payload["torch_dtype"] = payload["dtype"] = str(out_dtype).removeprefix("torch.")
    write_json_atomic(out_folder / "config.json", payload)
    for name in PASSTHROUGH_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out_folder / name)


def _requantize(merged: Path, out_folder: Path, requantize: str, out_dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Load the merged weights quantized with bitsandbytes and save them pre-quantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_bitsandbytes(4 if requantize == "nf4" else 8)
    if requantize == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=out_dtype
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    device = default_device()
    model = AutoModelForCausalLM.from_pretrained(
        merged, dtype=out_dtype, quantization_config=quantization, device_map={"": device}, low_cpu_mem_usage=True
    )
    model.save_pretrained(out_folder, safe_serialization=True, max_shard_size=max_shard_bytes)
    del model
    gc.collect()
    for name in PASSTHROUGH_FILES:
        if (merged / name).is_file() and not (out_folder / name).exists():
            shutil.copyfile(merged / name, out_folder / name)
    _say(f"re-quantized the merged weights to {requantize} (config.json carries quantization_config)")


# --- verification -----------------------------------------------------------------------------------


def verify_prompt_ids(tokenizer) -> list[Tensor]:
    return [
        tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids[:, :VERIFY_MAX_TOKENS]
        for prompt in VERIFY_PROMPTS
    ]


@torch.no_grad()
def prompt_logits(model, prompts: list[Tensor], device: torch.device) -> list[Tensor]:
    return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in prompts]


def compare_logits(reference: list[Tensor], merged: list[Tensor]) -> dict[str, float]:
    """max |Δlogit|, the largest reference |logit|, and mean KL(reference ‖ merged) per position."""
    max_abs, scale, kl_sum, positions = 0.0, 0.0, 0.0, 0
    for ref, got in zip(reference, merged):
        max_abs = max(max_abs, float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
        log_p = torch.log_softmax(ref.double(), dim=-1)
        log_q = torch.log_softmax(got.double(), dim=-1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        positions += ref.shape[0]
    return {"max_abs_logit_diff": max_abs, "max_abs_logit": scale, "mean_kl": kl_sum / max(positions, 1)}


def _reference_tolerance(folder: AdapterFolder, out_dtype: torch.dtype) -> tuple[str, tuple[float, float]]:
    dtypes = {dtype_name(out_dtype), dtype_name(folder.dtypes.compute)}
    key = next(k for k in ("bfloat16", "float16", "float32") if k in dtypes)
    return key, TOLERANCES[key]


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every bitsandbytes linear (adapter bases included) by an ``nn.Linear`` holding its
    dequantized weight in ``dtype``; returns how many were replaced.

    This is the computation a merged model can reproduce: the quantized weights exactly, multiplied
    densely. 4-bit layers compute this way in training anyway; LLM.int8 layers also quantize the
    activations, which no merged model can (on SmolLM2-135M that alone moves the logits by up to 14 %
    of their range, mean KL 0.04).
    """
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ not in ("Linear4bit", "Linear8bitLt"):
                continue
            bias = getattr(child, "bias", None)
            dense = nn.Linear(child.in_features, child.out_features, bias=bias is not None, device="meta", dtype=dtype)
            dense.weight = nn.Parameter(dequantized_weight(child, dtype), requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
            setattr(parent, child_name, dense)
            replaced += 1
    return replaced


def _verdict(figures: dict[str, float]) -> str:
    return f"max |Δlogit| = {figures['max_abs_logit_diff']:.3g}, mean KL = {figures['mean_kl']:.3g}"


def verify_merged(
    folder: AdapterFolder,
    merged_dir: Path,
    out_dtype: torch.dtype,
    requantize: str,
    strict: bool,
    device: torch.device,
) -> dict[str, Any]:
    """Compare base + adapter with the merged model on fixed prompts.

    Base + adapter is the adapter's own model (loaded and quantized by transformers as in training,
    the adapter layers' own forward), run twice: through bitsandbytes' kernels as in training ("as_run"),
    and with its quantized weights dequantized into dense linears (:func:`dequantize_linears`), which
    is what the merge must reproduce and what ``strict`` checks: a difference beyond the tolerance
    raises :class:`VerificationFailed`; without ``strict`` the difference is reported as a warning.
    """
    from transformers import AutoModelForCausalLM

    reference_model, _ = folder.load_model(device)
    tokenizer = load_tokenizer(folder.base_name)
    prompts = verify_prompt_ids(tokenizer)
    as_run = prompt_logits(reference_model, prompts, device)
    quantized = dequantize_linears(reference_model, folder.dtypes.compute)
    reference = prompt_logits(reference_model, prompts, device) if quantized else as_run
    del reference_model
    gc.collect()

    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=out_dtype, device_map={"": device})
    merged_model.eval()
    merged = prompt_logits(merged_model, prompts, device)
    del merged_model
    gc.collect()

    figures: dict[str, Any] = compare_logits(reference, merged)
    finite = all(bool(torch.isfinite(m).all()) for m in merged)
    key, (rel_tol, kl_tol) = _reference_tolerance(folder, out_dtype)
    abs_tol = rel_tol * max(1.0, figures["max_abs_logit"])
    within = finite and figures["max_abs_logit_diff"] <= abs_tol and figures["mean_kl"] <= kl_tol
    figures.update(
        {"finite": finite, "tolerance_max_abs": abs_tol, "tolerance_mean_kl": kl_tol, "tolerance_for": key,
         "strict": strict, "passed": within or (finite and not strict), "prompts": len(prompts)}
    )
    if quantized:
        figures["as_run"] = compare_logits(as_run, merged)
    _say(f"verification ({len(prompts)} prompts, logits up to {figures['max_abs_logit']:.3g}): merged vs base + adapter: {_verdict(figures)}")
    if quantized:
        _say(f"  (vs base + adapter through bitsandbytes' {folder.quantization.bits}-bit kernels: {_verdict(figures['as_run'])})")
    if not finite:
        raise VerificationFailed("the merged model produces non-finite logits; merge in --dtype float32 or bfloat16")
    if strict and not within:
        raise VerificationFailed(
            f"merged model differs from base + adapter beyond the {key} tolerance (max |Δlogit| "
            f"{figures['max_abs_logit_diff']:.3g} > {abs_tol:.3g} or mean KL {figures['mean_kl']:.3g} > {kl_tol:.3g}); "
            "nothing was written: retry with --dtype float32, or pass --no-verify to keep the result anyway"
        )
    if not strict:
        cause = f"re-quantizing to {requantize}" if requantize != "none" else "merging into the original (unquantized) weights"
        _warn(f"{cause} changes the outputs: {_verdict(figures)}")
    else:
        _say(f"verification passed ({key} tolerance: max |Δlogit| <= {abs_tol:.3g}, mean KL <= {kl_tol:.3g})")
    return figures
