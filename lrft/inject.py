"""Find the target projections, wrap them in adapters, and save / load the adapters' state.

On disk an adapter is a folder with ``adapter_config.json`` (type, hyperparameters, adapted layers, base
model, quantization) and ``adapter.safetensors`` (each layer's trainable tensors, keyed
``<module name>.<tensor name>``). Frozen random tensors are not in the file: the config's seed
regenerates them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import __version__
from .adapters import get_adapter, known_types
from .adapters.base import AdapterConfig, AdapterLayer, SharedTensors
from .errors import UserError
from .io import save_tensors_atomic, write_json_atomic
from .model import is_linear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear(module)]


def _short_names(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Full names of the linear layers selected by suffixes (list) or a full-match regex (str).

    The output head is never adapted implicitly: with tied embeddings it would change the input
    embeddings too. Name ``lm_head`` explicitly to adapt it.
    """
    names = linear_names(model)
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise UserError(f"adapter.target_modules: invalid regex {target_modules!r} ({exc})") from None
        selected = [n for n in names if pattern.fullmatch(n)]
    else:
        wanted = set(target_modules)
        selected = [n for n in names if n in wanted or n.rsplit(".", 1)[-1] in wanted or any(n.endswith("." + w) for w in wanted)]
        unmatched = [w for w in target_modules if not any(n == w or n.endswith("." + w) for n in names)]
        if unmatched and selected:
            raise UserError(
                f"adapter.target_modules: {', '.join(unmatched)} match no linear layer; "
                f"this model's linear layers are: {', '.join(_short_names(names))}"
            )
    if not selected:
        raise UserError(
            f"adapter.target_modules {target_modules!r} match no linear layer; "
            f"this model's linear layers are: {', '.join(_short_names(names))}"
        )
    return selected


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapters(
    model: nn.Module,
    config: AdapterConfig,
    frozen_dtype: torch.dtype = torch.float32,
    target_names: Optional[list[str]] = None,
) -> dict[str, AdapterLayer]:
    """Wrap every target linear in ``config.type``'s layer; freeze everything else. Returns the layers
    by module name. Seed the RNGs before calling: initial values come from the global generator."""
    spec = get_adapter(config.type)
    names = target_names if target_names is not None else find_targets(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = {name: model.get_submodule(name) for name in names}
    shared = SharedTensors(config.seed, {n: (m.in_features, m.out_features) for n, m in targets.items()})
    layers: dict[str, AdapterLayer] = {}
    for name in names:
        base = model.get_submodule(name)
        smaller = min(base.in_features, base.out_features)
        if getattr(config, "r_must_fit", True) and config.r > smaller:
            raise UserError(
                f"adapter.r={config.r} is larger than {name}'s smaller dimension ({smaller}); "
                f"lower adapter.r or leave this module out of adapter.target_modules"
            )
        layer = spec.layer(base, config, shared, name, frozen_dtype)
        _set_module(model, name, layer)
        layers[name] = layer
    model.lrft_shared = shared  # keep the shared bases reachable for diagnostics and benchmarks
    return layers


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def trainable_parameters(layers: dict[str, AdapterLayer]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer.")]


def count_trainable(layers: dict[str, AdapterLayer]) -> int:
    return sum(p.numel() for p in trainable_parameters(layers))


def adapter_state_dict(layers: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, layer in layers.items() for key, value in layer.adapter_state_dict().items()}


def load_adapter_state_dict(layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> None:
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    for key, value in state.items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            raise UserError(f"adapter file holds {key}, which belongs to no adapted layer; the adapter does not match this model")
        grouped[owner][key[len(owner) + 1 :]] = value
    for name, layer in layers.items():
        try:
            layer.load_adapter_state_dict(grouped[name])
        except (KeyError, ValueError) as exc:
            raise UserError(f"adapter file does not match the model: {exc}") from exc


def save_adapter(
    directory: Path | str,
    layers: dict[str, AdapterLayer],
    config: AdapterConfig,
    base: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write adapter_config.json and adapter.safetensors into ``directory`` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(layers)
    save_tensors_atomic(directory / WEIGHTS_NAME, state, metadata={"format": "lrft", "type": config.type})
    payload = {
        "lrft_version": __version__,
        "adapter": config.model_dump(mode="json"),
        "layers": {name: [layer.in_features, layer.out_features] for name, layer in layers.items()},
        "trainable_parameters": count_trainable(layers),
        **base,
    }
    if extra:
        payload.update(extra)
    write_json_atomic(directory / CONFIG_NAME, payload)
    return directory


def read_adapter_config(directory: Path | str) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise UserError(f"adapter folder {directory} does not exist; pass RUN_DIR/adapter of a finished run")
    if not path.exists():
        raise UserError(f"{directory} has no {CONFIG_NAME}; pass the adapter/ folder of an lrft run")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the adapter folder is corrupt, re-save it") from None
    adapter = data.get("adapter", {})
    if adapter.get("type") not in known_types():
        raise UserError(f"{path}: unknown adapter type {adapter.get('type')!r}; known: {', '.join(known_types())}")
    return data


def adapter_config_from_dict(adapter: dict[str, Any]) -> AdapterConfig:
    return get_adapter(adapter["type"]).config.model_validate(adapter)


def read_adapter_weights(directory: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise UserError(f"{directory} has no {WEIGHTS_NAME}; the adapter folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise UserError(f"{path} is truncated or corrupt ({exc}); re-save the adapter or use a checkpoint") from None


def attach_adapter(model: nn.Module, directory: Path | str, frozen_dtype: torch.dtype = torch.float32) -> dict[str, AdapterLayer]:
    """Wrap ``model`` with the adapter saved in ``directory`` and load its weights."""
    data = read_adapter_config(directory)
    config = adapter_config_from_dict(data["adapter"])
    names = list(data["layers"])
    missing = [n for n in names if n not in dict(model.named_modules())]
    if missing:
        raise UserError(
            f"adapter in {directory} was trained on {data.get('base_model', {}).get('name_or_path', 'another model')}; "
            f"this model has no layer {missing[0]}; evaluate it with its own base model"
        )
    for name in names:
        module = model.get_submodule(name)
        want = data["layers"][name]
        if [module.in_features, module.out_features] != list(want):
            raise UserError(
                f"adapter layer {name} is {want[0]}->{want[1]} but the model's is "
                f"{module.in_features}->{module.out_features}; the adapter belongs to another base model"
            )
    layers = inject_adapters(model, config, frozen_dtype, target_names=names)
    state = read_adapter_weights(directory)
    load_adapter_state_dict(layers, state)
    for p in model.parameters():
        p.requires_grad_(False)
    return layers


def load_model_with_adapter(directory: Path | str, quantization: Optional[str] = None, device=None):
    """Base model (as recorded in the adapter's config) + the adapter, ready for inference.

    ``quantization`` overrides the recorded bits: "4", "8" or "none". Returns (model, tokenizer, layers, data).
    """
    from .model import frozen_dtype_of, load_base_model, load_tokenizer
    from .recipe import ModelSection, QuantizationSection

    data = read_adapter_config(directory)
    model_section = ModelSection(**data.get("base_model", {}))
    quant = QuantizationSection(**data.get("quantization", {}))
    if quantization is not None:
        quant.bits = None if str(quantization).lower() in ("none", "16", "32") else int(quantization)
    model = load_base_model(model_section, quant, device)
    tokenizer = load_tokenizer(model_section.name_or_path)
    layers = attach_adapter(model, directory, frozen_dtype_of(model, quant))
    model.eval()
    return model, tokenizer, layers, data
