"""``lrft merge``: fold an adapter into its base model, verify the result, or export it for PEFT.

Merging streams the base checkpoint tensor by tensor (``safetensors.safe_open``), so peak memory stays
near one weight matrix, the adapter and one output shard; the whole model is never held in float32.
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

``--format peft`` writes the adapter itself in PEFT's layout instead (see :data:`PEFT_EXPORTERS`).
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
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .adapters import get_adapter
from .adapters.base import AdapterConfig, AdapterLayer, SharedTensors
from .errors import UserError
from .inject import adapter_config_from_dict, read_adapter_config, read_adapter_weights
from .io import atomic_dir, save_tensors_atomic, write_json_atomic
from .model import DTYPES, check_bitsandbytes, default_device, dequantized_weight, resolve_dtype, resolve_model_path

BASES = ("dequantized", "original")
REQUANTIZE = ("none", "nf4", "int8")
FORMATS = ("hf", "peft")
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
# the merged model, keyed by the coarser of the two models' compute dtypes. float32 differs only by
# summation order (~1e-6 relative); bf16/fp16 round every merged weight once more (~2^-8 / 2^-11
# relative), which compounds through the layers; int8 bases quantize the activations in their forward
# too, which the merged model does not. A wrong or missing ΔW is orders of magnitude above these.
TOLERANCES = {
    "float32": (1e-3, 1e-5),
    "float16": (5e-2, 5e-3),
    "bfloat16": (1e-1, 2e-2),
    "int8": (1e-1, 2e-2),
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
    dtype: str = "bfloat16",
    base: str = "dequantized",
    requantize: str = "none",
    verify: bool = True,
    fmt: str = "hf",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into its base and write ``output`` (or export the adapter for PEFT).

    Returns what was done and measured (also written to ``output/lrft_merge.json`` for merges).
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    _check_options(dtype, base, requantize, fmt, max_shard_bytes)
    data = read_adapter_config(adapter_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output} already exists and is not empty; remove it or choose another folder")
    if output.resolve() == adapter_dir.resolve():
        raise UserError("--output is the adapter folder itself; choose another folder")
    if fmt == "peft":
        if base != "dequantized" or requantize != "none":
            raise UserError("--base and --requantize apply to merged models, not --format peft; drop them or use --format hf")
        return export_peft(adapter_dir, output, data)
    return _merge(adapter_dir, output, data, DTYPES[dtype], base, requantize, verify, max_shard_bytes)


def _check_options(dtype: str, base: str, requantize: str, fmt: str, max_shard_bytes: int) -> None:
    for option, value, allowed in (
        ("--dtype", dtype, tuple(DTYPES)),
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


@dataclass
class BaseRecipe:
    """How the adapter's base model was loaded for training (from adapter_config.json)."""

    name_or_path: str
    load_dtype: torch.dtype
    bits: Optional[int]
    compute_dtype: torch.dtype
    quant: Any  # the QuantizationSection
    frozen_dtype: torch.dtype  # where adapter layers keep frozen random tensors (frozen_dtype_of)

    @classmethod
    def from_adapter(cls, data: dict[str, Any], device: torch.device) -> "BaseRecipe":
        from .recipe import ModelSection, QuantizationSection

        model = ModelSection(**data.get("base_model", {}))
        quant = QuantizationSection(**data.get("quantization", {}))
        load_dtype = resolve_dtype(model.dtype, device)
        compute = resolve_dtype(quant.compute_dtype, device) if quant.bits == 4 else load_dtype
        return cls(model.name_or_path, load_dtype, quant.bits, compute, quant, compute if quant.bits == 4 else load_dtype)


def quantized_linears(config, recipe: BaseRecipe) -> tuple[dict[str, nn.Module], nn.Module]:
    """The linears bitsandbytes quantizes when loading this model as in training, by module name (meta
    modules that carry the quantization settings), and the meta model itself."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    if recipe.bits is None:
        return {}, skeleton
    from transformers.quantizers import AutoHfQuantizer

    from .model import bnb_config

    check_bitsandbytes(recipe.bits)
    quantizer = AutoHfQuantizer.from_config(bnb_config(recipe.quant, recipe.compute_dtype), pre_quantized=False)
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


# --- the adapter, one layer at a time -----------------------------------------------------------------


class AdapterDeltas:
    """Builds each adapted layer's ΔW on demand from the saved tensors, one layer at a time."""

    def __init__(self, adapter_dir: Path, data: dict[str, Any], frozen_dtype: torch.dtype):
        self.config: AdapterConfig = adapter_config_from_dict(data["adapter"])
        self.spec = get_adapter(self.config.type)
        self.shapes = {name: tuple(shape) for name, shape in data["layers"].items()}
        self.frozen_dtype = frozen_dtype
        self.shared = SharedTensors(self.config.seed)
        self.state: dict[str, dict[str, Tensor]] = {name: {} for name in self.shapes}
        for key, value in read_adapter_weights(adapter_dir).items():
            owner = next((n for n in self.shapes if key.startswith(n + ".")), None)
            if owner is None:
                raise UserError(f"adapter file holds {key}, which belongs to no adapted layer; the adapter folder is inconsistent")
            self.state[owner][key[len(owner) + 1 :]] = value

    def delta_weight(self, name: str, base_layer: nn.Module) -> Tensor:
        in_features, out_features = self.shapes[name]
        if (base_layer.in_features, base_layer.out_features) != (in_features, out_features):
            raise UserError(
                f"adapter layer {name} is {in_features}->{out_features} but the checkpoint's weight is "
                f"{base_layer.in_features}->{base_layer.out_features}; the adapter belongs to another base model"
            )
        layer: AdapterLayer = self.spec.layer(base_layer, self.config, self.shared, name, self.frozen_dtype)
        try:
            layer.load_adapter_state_dict({k: v.to(layer.device) for k, v in self.state[name].items()})
        except (KeyError, ValueError) as exc:
            raise UserError(f"adapter file does not match its config: {exc}") from exc
        layer.eval()
        with torch.no_grad():
            return layer.delta_weight().float()


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


# --- merging --------------------------------------------------------------------------------------------


@dataclass
class MergeStats:
    merged_layers: list[str] = field(default_factory=list)
    tensors: int = 0
    nonfinite: list[str] = field(default_factory=list)
    max_abs_delta: float = 0.0


def _merge(adapter_dir, output, data, out_dtype, base, requantize, verify, max_shard_bytes) -> dict[str, Any]:
    from transformers import AutoConfig

    started = time.time()
    device = default_device()
    recipe = BaseRecipe.from_adapter(data, device)
    folder = source_folder(recipe.name_or_path)
    config = AutoConfig.from_pretrained(folder)
    dtype_name = str(out_dtype).removeprefix("torch.")
    quantized = recipe.bits is not None
    if base == "original" and quantized:
        _warn(
            f"merging into the original weights of {recipe.name_or_path}: this adds the {recipe.bits}-bit quantization "
            "error the adapter never saw (the verification below measures it); --base dequantized avoids it"
        )
    _say(
        f"merging {data['adapter']['type']} adapter ({len(data['layers'])} layers) into {recipe.name_or_path} "
        f"[{base} base{f', {recipe.bits}-bit' if quantized else ''}] -> {output} ({dtype_name})"
    )
    deltas = AdapterDeltas(adapter_dir, data, recipe.frozen_dtype)
    report: dict[str, Any] = {
        "adapter": str(adapter_dir),
        "adapter_type": data["adapter"]["type"],
        "base_model": recipe.name_or_path,
        "base": base,
        "quantization_bits": recipe.bits,
        "dtype": dtype_name,
        "requantize": requantize,
    }
    with atomic_dir(output) as tmp:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.merged-", dir=output.parent)) if requantize != "none" else tmp
        try:
            stats, untied = _write_merged_weights(folder, config, recipe, deltas, base, out_dtype, staging, max_shard_bytes, device)
            _write_model_files(folder, config, out_dtype, staging, untied)
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
            strict = requantize == "none" and (base == "dequantized" or not quantized)
            report["verification"] = verify_merged(adapter_dir, tmp, recipe, out_dtype, requantize, strict, device)
        report["seconds"] = round(time.time() - started, 2)
        write_json_atomic(tmp / "lrft_merge.json", report)
    _say(f"wrote {output} in {report['seconds']:.1f} s")
    return report


def _write_merged_weights(folder, config, recipe, deltas, base, out_dtype, out_folder, max_shard_bytes, device):
    """Stream every checkpoint tensor into the output shards, adding ΔW to the adapted weights.

    Returns the statistics and whether the output head had to be untied from the input embeddings.
    """
    from safetensors import safe_open

    quantized, skeleton = quantized_linears(config, recipe)
    adapted = {f"{name}.weight": name for name in deltas.shapes}
    # A tied output head has no tensor of its own in most checkpoints; if it is adapted, it becomes
    # input embeddings + ΔW and the output config unties it.
    output_embeddings = skeleton.get_output_embeddings()
    input_embeddings = skeleton.get_input_embeddings()
    module_names = {id(m): n for n, m in skeleton.named_modules()}
    head_name = module_names.get(id(output_embeddings)) if output_embeddings is not None else None
    embed_key = f"{module_names.get(id(input_embeddings))}.weight" if input_embeddings is not None else None
    tied_head = bool(getattr(config, "tie_word_embeddings", False)) and head_name is not None

    shards = checkpoint_shards(folder)
    keys_in_checkpoint: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            keys_in_checkpoint.update(handle.keys())
    untie = tied_head and head_name in deltas.shapes and f"{head_name}.weight" not in keys_in_checkpoint
    missing = [key for key in adapted if key not in keys_in_checkpoint and not (untie and key == f"{head_name}.weight")]
    if missing:
        raise UserError(
            f"the checkpoint in {folder} has no tensor {missing[0]} for adapted layer {adapted[missing[0]]}; "
            "merge needs checkpoint tensor names that match the model's module names"
        )

    writer = ShardWriter(out_folder, max_shard_bytes)
    stats = MergeStats()

    def emit(key: str, file_tensor: Tensor) -> None:
        module_name = key.removesuffix(".weight")
        stand_in = None
        if base == "dequantized" or module_name in deltas.shapes:
            trained = file_tensor.to(device=device, dtype=recipe.load_dtype)
            if module_name in quantized and key.endswith(".weight"):
                stand_in = quantized_stand_in(trained, quantized[module_name], device)
            elif module_name in deltas.shapes:
                stand_in = plain_stand_in(trained)
            trained_weight = dequantized_weight(stand_in, torch.float32) if stand_in is not None else trained.float()
        weight = trained_weight if base == "dequantized" else file_tensor.to(device=device, dtype=torch.float32)
        if module_name in deltas.shapes:
            delta = deltas.delta_weight(module_name, stand_in)
            weight = weight + delta
            stats.merged_layers.append(module_name)
            stats.max_abs_delta = max(stats.max_abs_delta, float(delta.abs().max()))
        result = weight.to(out_dtype)
        if result.is_floating_point() and not bool(torch.isfinite(result).all()):
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
                if untie and key == embed_key:
                    emit(f"{head_name}.weight", tensor)
                del tensor
    writer.finish()
    gc.collect()
    return stats, untie


def _write_model_files(folder: Path, config, out_dtype: torch.dtype, out_folder: Path, untied: bool) -> None:
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = out_dtype
    if untied:
        config.tie_word_embeddings = False
    payload = config.to_dict()
    payload.pop("quantization_config", None)
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


def _prompt_ids(tokenizer) -> list[Tensor]:
    return [
        tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids[:, :VERIFY_MAX_TOKENS]
        for prompt in VERIFY_PROMPTS
    ]


@torch.no_grad()
def _logits(model, prompts: list[Tensor], device: torch.device) -> list[Tensor]:
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


def _reference_tolerance(recipe: BaseRecipe, out_dtype: torch.dtype) -> tuple[str, tuple[float, float]]:
    if recipe.bits == 8:
        key = "int8"
    else:
        dtypes = {str(out_dtype).removeprefix("torch."), str(recipe.compute_dtype).removeprefix("torch.")}
        key = next(k for k in ("bfloat16", "float16", "float32") if k in dtypes)
    return key, TOLERANCES[key]


def verify_merged(
    adapter_dir: Path,
    merged_dir: Path,
    recipe: BaseRecipe,
    out_dtype: torch.dtype,
    requantize: str,
    strict: bool,
    device: torch.device,
) -> dict[str, Any]:
    """Compare base + adapter (as trained) with the merged model on fixed prompts.

    ``strict``: the two are meant to compute the same function, so a difference beyond the tolerance
    raises :class:`VerificationFailed`; otherwise the difference is reported as a warning.
    """
    from transformers import AutoModelForCausalLM

    from .inject import load_model_with_adapter

    reference_model, tokenizer, _, _ = load_model_with_adapter(adapter_dir, device=device)
    use_training_kernels(reference_model)
    prompts = _prompt_ids(tokenizer)
    reference = _logits(reference_model, prompts, device)
    del reference_model
    gc.collect()

    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=out_dtype, device_map={"": device})
    merged_model.eval()
    merged = _logits(merged_model, prompts, device)
    del merged_model
    gc.collect()

    figures = compare_logits(reference, merged)
    finite = all(bool(torch.isfinite(m).all()) for m in merged)
    key, (rel_tol, kl_tol) = _reference_tolerance(recipe, out_dtype)
    abs_tol = rel_tol * max(1.0, figures["max_abs_logit"])
    within = finite and figures["max_abs_logit_diff"] <= abs_tol and figures["mean_kl"] <= kl_tol
    figures.update(
        {"finite": finite, "tolerance_max_abs": abs_tol, "tolerance_mean_kl": kl_tol, "tolerance_for": key,
         "strict": strict, "passed": within or (finite and not strict), "prompts": len(prompts)}
    )
    line = (
        f"verification ({len(prompts)} prompts, base + adapter vs merged): max |Δlogit| = "
        f"{figures['max_abs_logit_diff']:.3g} (logits up to {figures['max_abs_logit']:.3g}), "
        f"mean KL = {figures['mean_kl']:.3g}"
    )
    _say(line)
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
        _warn(f"{cause} changes the outputs: max |Δlogit| {figures['max_abs_logit_diff']:.3g}, mean KL {figures['mean_kl']:.3g}")
    else:
        _say(f"verification passed ({key} tolerance: max |Δlogit| <= {abs_tol:.3g}, mean KL <= {kl_tol:.3g})")
    return figures


def use_training_kernels(model: nn.Module) -> None:
    """Make bitsandbytes 4-bit layers compute as in training (dequantize, then a matmul in the compute
    dtype). On CPUs with AVX512-BF16, bitsandbytes otherwise switches eval-mode inference to a repacked
    bfloat16 kernel whose rounding (~0.5 % of the output) would hide what the comparison measures."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False


# --- PEFT export --------------------------------------------------------------------------------------

PeftExporter = Callable[[AdapterConfig, dict[str, Any], dict[str, Tensor]], tuple[dict[str, Any], dict[str, Tensor]]]


def _peft_key(module_name: str, tensor: str) -> str:
    return f"base_model.model.{module_name}.{tensor}"


def _peft_common(config: AdapterConfig, data: dict[str, Any], peft_type: str) -> dict[str, Any]:
    base = data.get("base_model", {}).get("name_or_path")
    try:
        base_path = resolve_model_path(base) if base else None
    except UserError:
        base_path = base
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "inference_mode": True,
        # full module names: PEFT matches a list entry against a module name or its dotted suffix
        "target_modules": sorted(data["layers"]),
        "modules_to_save": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "r": config.r,
        "revision": None,
    }


def _layer_tensors(state: dict[str, Tensor], layers: dict[str, Any]) -> Iterator[tuple[str, dict[str, Tensor]]]:
    for name in layers:
        yield name, {key[len(name) + 1 :]: value for key, value in state.items() if key.startswith(name + ".")}


def _lora_to_peft(config, data, state):
    """LoRA: ΔW = (alpha / r) B A, which is PEFT's LoRA with lora_alpha = alpha. RM-LoRA exports the same
    way: its masks and regulariser act only during training; ΔW is B A scaled."""
    peft_config = _peft_common(config, data, "LORA")
    peft_config.update(
        {
            "lora_alpha": config.alpha if config.alpha is not None else config.default_alpha(),
            "lora_dropout": config.dropout,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
    )
    tensors = {}
    for name, own in _layer_tensors(state, data["layers"]):
        tensors[_peft_key(name, "lora_A.weight")] = own["lora_A"].float()
        tensors[_peft_key(name, "lora_B.weight")] = own["lora_B"].float()
    return peft_config, tensors


# adapter type -> exporter. Add a type once its lrft parameterisation maps exactly onto PEFT's.
PEFT_EXPORTERS: dict[str, PeftExporter] = {
    "lora": _lora_to_peft,
}

# adapter types PEFT has no counterpart for, with the reason
PEFT_UNSUPPORTED = {
    "lora2": "PEFT has no LoRA² (two orthogonal LoRA blocks)",
    "nola": "PEFT has no NoLA (random-basis mixtures of A and B)",
}


def export_peft(adapter_dir: Path, output: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format."""
    kind = data["adapter"]["type"]
    exporter = PEFT_EXPORTERS.get(kind)
    if exporter is None:
        why = PEFT_UNSUPPORTED.get(kind, f"lrft cannot express a {kind} adapter in PEFT's format")
        raise UserError(f"{why}; merge it into a full model with --format hf instead")
    config = adapter_config_from_dict(data["adapter"])
    state = read_adapter_weights(adapter_dir)
    peft_config, tensors = exporter(config, data, state)
    with atomic_dir(output) as tmp:
        save_tensors_atomic(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        write_json_atomic(tmp / "adapter_config.json", peft_config)
    _say(f"wrote {kind} adapter in PEFT format ({len(data['layers'])} layers, {len(tensors)} tensors) to {output}")
    return {"format": "peft", "adapter_type": kind, "peft_type": peft_config["peft_type"], "tensors": len(tensors)}
