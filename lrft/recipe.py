"""The recipe: pydantic models of every section, YAML loading, ``--set`` overrides, did-you-mean errors.

A recipe has the sections ``model``, ``quantization``, ``adapter``, ``data``, ``training`` and ``output_dir``
(and optionally ``eval``). Unknown keys are errors with the closest valid key; the ``adapter`` section is
validated against the config class of its ``type`` (each adapter file defines its own options).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .adapters import get_adapter, known_types
from .adapters.base import AdapterConfig
from .data import FORMATS as DATA_FORMATS
from .errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name_or_path: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class QuantizationSection(Section):
    bits: Optional[Literal[4, 8]] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # FSDP shards the 4-bit weights only when their storage dtype matches the compute dtype.
    quant_storage: Optional[Literal["float32", "bfloat16", "float16"]] = None

    @field_validator("bits", mode="before")
    @classmethod
    def _none_strings(cls, v):
        if isinstance(v, str) and v.lower() in ("none", "null", "no", "off", "16", "32"):
            return None
        return v


class DataSection(Section):
    path: str = Field(..., description="a .json/.jsonl/.parquet file, a folder of them, or a hub dataset id")
    format: Literal[tuple(DATA_FORMATS)] = "commonsense"  # the registry's names (lrft/data.py)
    cutoff_len: int = Field(256, ge=8)
    train_on_inputs: bool = Field(True, description="loss on the prompt too (commonsense, alpaca: true as published; completion: false)")
    train_on: Literal["assistant", "last_assistant", "all"] = Field("assistant", description="messages: which tokens carry loss")
    chat_template: Optional[str] = Field(None, description="messages: a .jinja file or Jinja string instead of the tokenizer's")
    packing: bool = Field(False, description="pack examples into rows of cutoff_len tokens (rows are then the batch unit)")
    group_by_length: bool = Field(False, description="unpacked runs: micro-batches of similar lengths")
    val_size: int = Field(0, ge=0)
    shuffle: bool = True
    max_samples: Optional[int] = Field(None, gt=0)

    @model_validator(mode="after")
    def _options_fit_the_format(self):
        fmt = DATA_FORMATS[self.format]
        chat_only = [k for k in ("train_on", "chat_template") if k in self.model_fields_set]
        if not fmt.chat and chat_only:
            chat = " or ".join(name for name, f in DATA_FORMATS.items() if f.chat)
            raise ValueError(f"data.{chat_only[0]} applies to data.format: {chat} only; remove it or change the format")
        if fmt.chat and "train_on_inputs" in self.model_fields_set:
            raise ValueError(f"data.train_on_inputs does not apply to data.format: {self.format}; use data.train_on (assistant, last_assistant or all)")
        if "train_on_inputs" not in self.model_fields_set and self.train_on_inputs != fmt.train_on_inputs:
            self.train_on_inputs = fmt.train_on_inputs  # the format's default (completion: the completion only)
        if self.packing and self.group_by_length:
            raise ValueError("data.group_by_length applies to unpacked runs; packing already leaves no padding: drop one")
        return self


class TrainingSection(Section):
    seed: int = 42
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(16, gt=0, description="examples per optimizer step (all processes together)")
    micro_batch_size: int = Field(4, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes' 8-bit AdamW (paged: CUDA only), QLoRA's setting"
    )
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(100, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    logging_steps: int = Field(1, gt=0)
    eval_steps: Optional[int] = Field(None, gt=0)
    save_steps: Optional[int] = Field(None, gt=0)
    save_total_limit: int = Field(2, ge=1)
    skip_nonfinite: bool = False
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="live metrics through accelerate's trackers (main process only)"
    )

    @model_validator(mode="after")
    def _batch_divides(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"training.batch_size ({self.batch_size}) must be a multiple of training.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


class EvalSection(Section):
    data: str
    tasks: Optional[list[str]] = None
    limit: Optional[int] = Field(None, gt=0)
    mode: Literal["generate", "loglik"] = "loglik"
    batch_size: int = Field(8, gt=0)


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    adapter: SerializeAsAny[AdapterConfig]
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    eval: Optional[EvalSection] = None
    output_dir: str = "runs/default"

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self) -> str:
        """A short hash of the resolved recipe (run.json's recipe_hash)."""
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:16]


# --- loading and error reporting ----------------------------------------------------------------

_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSection,
    "quantization": QuantizationSection,
    "data": DataSection,
    "training": TrainingSection,
    "eval": EvalSection,
}


# Names other tools use for the same option: difflib alone would not find ``r`` from ``lora_rank``.
_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "basis_rank": "r",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "targets": "target_modules", "target": "target_modules",
    "lr": "learning_rate", "steps": "max_steps", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size", "gradient_accumulation_steps": "batch_size",
    "model_name": "name_or_path", "model": "name_or_path", "load_in_4bit": "bits", "load_in_8bit": "bits",
    "warmup": "warmup_steps", "cutoff": "cutoff_len", "max_length": "cutoff_len", "max_seq_len": "cutoff_len",
    "output": "output_dir", "out_dir": "output_dir",
}


def _fields_of(path: tuple, adapter_cls: Optional[type[BaseModel]]) -> list[str]:
    """The valid keys at ``path`` (for did-you-mean)."""
    if not path:
        return list(Recipe.model_fields)
    if path[0] == "adapter":
        return list((adapter_cls or AdapterConfig).model_fields)
    cls = _SECTIONS.get(path[0])
    return list(cls.model_fields) if cls else []


def _all_adapter_options() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for name in known_types():
        for field in get_adapter(name).config.model_fields:
            options.setdefault(field, []).append(name)
    return options


def _format_error(err: dict, adapter_cls: Optional[type[BaseModel]], adapter_type: Optional[str]) -> str:
    loc = tuple(str(x) for x in err["loc"])
    dotted = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        key = loc[-1]
        if loc[0] == "adapter" and len(loc) == 2:
            owners = _all_adapter_options().get(key)
            if owners:
                return (
                    f"{dotted}: option does not apply to adapter type '{adapter_type}' "
                    f"(it belongs to {', '.join(owners)}); remove it or change adapter.type"
                )
        valid = _fields_of(loc[:-1], adapter_cls)
        close = [_SYNONYMS[key]] if _SYNONYMS.get(key) in valid else difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        parent = ".".join(loc[:-1])
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{dotted}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{dotted}: required key is missing; add it to the recipe"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    if err["type"] == "literal_error" and isinstance(value, str):
        choices = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
        if close:
            shown += f"; did you mean {close[0]!r}?"
    return f"{dotted}: {msg}{shown}"


def _parse_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{source}: YAML syntax error{where}: {problem}; fix the recipe's syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping of sections (model, adapter, data, training, ...)")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``--set a.b=value``: the value is parsed as YAML (so 3 is an int, true a bool, [q,v] a list)
    and then typed by the schema."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.max_steps=3")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def validate_recipe(data: dict) -> Recipe:
    adapter_data = data.get("adapter")
    if adapter_data is None:
        adapter_data = {"type": "lora"}
    if not isinstance(adapter_data, dict):
        raise UserError("adapter: expected a mapping with at least `type`, e.g. adapter: {type: lora, r: 16}")
    adapter_type = adapter_data.get("type", "lora")
    if adapter_type not in known_types():
        close = difflib.get_close_matches(str(adapter_type), known_types(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"adapter.type: unknown adapter type {adapter_type!r}; {hint}known types: {', '.join(known_types())}")
    adapter_cls = get_adapter(adapter_type).config
    errors: list[str] = []
    adapter = None
    try:
        adapter = adapter_cls.model_validate({**adapter_data, "type": adapter_type})
    except ValidationError as exc:
        for err in exc.errors():
            err = dict(err)
            err["loc"] = ("adapter",) + tuple(err["loc"])
            errors.append(_format_error(err, adapter_cls, adapter_type))
    rest = {k: v for k, v in data.items() if k != "adapter"}
    try:
        recipe = Recipe.model_validate({**rest, "adapter": adapter or AdapterConfig(type=adapter_type)})
    except ValidationError as exc:
        errors.extend(_format_error(dict(e), adapter_cls, adapter_type) for e in exc.errors() if e["loc"][:1] != ("adapter",))
        recipe = None
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(errors[0] + more)
    recipe.adapter = adapter  # keep the concrete subclass (validate_assignment would coerce to the base)
    return recipe


def load_recipe(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise UserError(f"recipe {path} does not exist; pass the path of a YAML recipe (see recipes/)")
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder; pass the path of a YAML recipe file")
    data = _parse_yaml(path.read_text(), str(path))
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)
