"""An adapter on disk and the base model it was trained on: :class:`AdapterFolder`.

An lrft adapter folder holds ``adapter_config.json``

* ``adapter``: the adapter's config (type and options, as in the recipe);
* ``layers``: adapted module name -> [in_features, out_features];
* ``base_model`` and ``quantization``: the recipe's sections, their "auto" dtypes written as resolved;
* ``dtypes``: what training resolved, ``{"load", "compute", "frozen"}`` (see :class:`lrft.model.Dtypes`);
* ``trainable_parameters``, ``lrft_version`` and, at the end of a run, the controller's ``summary``;

and ``adapter.safetensors``: each layer's trainable tensors and persistent buffers, keyed
``<module name>.<tensor name>``. Frozen random tensors are not saved: the config's seed regenerates them,
in the recorded ``frozen`` dtype, so a reload on any machine rebuilds the bases training used. Folders
written before the dtypes were recorded say "auto"; they resolve it on the machine that reads them,
with one warning.

:meth:`AdapterFolder.read` validates everything before anything is built (a damaged folder is one line
naming the file and the problem), and also reads PEFT adapter folders (:mod:`lrft.peft_format`), so
every command that takes an adapter takes both. The folder then rebuilds any layer around a base of
the caller's choosing (:meth:`~AdapterFolder.layer`: a shape-only stand-in for inspect-rank, a
re-quantized weight for merge) or attaches itself to a loaded model (:meth:`~AdapterFolder.attach`,
:meth:`~AdapterFolder.load_model`: eval and merge verification).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import __version__
from .adapters import AdapterSpec, get_adapter, known_types
from .adapters.base import AdapterConfig, AdapterLayer, SharedTensors, rebuilding_trained_layers
from .errors import UserError
from .inject import adapter_state_dict, count_trainable, replace_module, split_by_layer
from .io import read_safetensors, save_tensors_atomic, write_json_atomic
from .model import DTYPES, Dtypes, default_device, dtype_name
from .peft_format import PEFT_WEIGHTS_NAME, peft_folder_fields

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
REQUIRED_KEYS = ("adapter", "layers", "base_model")


class ShapeOnlyLinear(nn.Module):
    """Stands in for a frozen linear when only ΔW is wanted: ``in_features`` / ``out_features`` and an empty
    ``weight`` on ``device`` (which places the adapter's tensors there). It cannot run a forward."""

    def __init__(self, in_features: int, out_features: int, device: str | torch.device = "cpu"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(0, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("ShapeOnlyLinear has no weight; it only stands in for ΔW computations")


# --- writing -------------------------------------------------------------------------------------------


def base_record(model, quantization, dtypes: Dtypes) -> dict[str, Any]:
    """What an adapter folder records about its base: the recipe's sections with "auto" resolved."""
    return {
        "base_model": model.model_copy(update={"dtype": dtype_name(dtypes.load)}).model_dump(mode="json"),
        "quantization": quantization.model_copy(update={"compute_dtype": dtype_name(dtypes.compute)}).model_dump(mode="json"),
        "dtypes": dtypes.as_json(),
    }


def save_adapter(
    directory: Path | str,
    layers: dict[str, AdapterLayer],
    config: AdapterConfig,
    base: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write adapter_config.json and adapter.safetensors into ``directory`` (each atomically); ``base`` is
    :func:`base_record`'s."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(directory / WEIGHTS_NAME, adapter_state_dict(layers), metadata={"format": "lrft", "type": config.type})
    payload = {
        "lrft_version": __version__,
        "adapter": config.model_dump(mode="json"),
        "layers": {name: [layer.in_features, layer.out_features] for name, layer in layers.items()},
        "trainable_parameters": count_trainable(layers),
        **base,
        **(extra or {}),
    }
    write_json_atomic(directory / CONFIG_NAME, payload)
    return directory


# --- reading -------------------------------------------------------------------------------------------

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}; {fix}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the adapter folder is damaged: re-save it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; the adapter folder is damaged: re-save it")
    return data


@dataclass
class AdapterFolder:
    """An adapter on disk (lrft's or PEFT's format) and the base it was trained on, validated."""

    path: Path
    format: str  # "lrft" or "peft"
    config: AdapterConfig  # model-wide; ``layer_configs`` may differ per layer (PEFT's rank and alpha patterns)
    layer_shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    tensors: dict[str, dict[str, Tensor]]  # module name -> the layer's own state (lrft keys)
    model: Any  # ModelSection, dtype resolved
    quantization: Any  # QuantizationSection, compute_dtype resolved
    dtypes: Dtypes
    record: dict[str, Any] = field(default_factory=dict)  # the folder's config file as read
    layer_configs: dict[str, AdapterConfig] = field(default_factory=dict)
    frozen_tensors: dict[str, Tensor] = field(default_factory=dict)  # shared tensors read from the file
    notes: list[str] = field(default_factory=list)

    # --- reading ---------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: Path | str) -> "AdapterFolder":
        path = Path(path)
        fix = "pass an lrft adapter folder (RUN_DIR/adapter) or a PEFT adapter folder"
        if not path.is_dir():
            raise UserError(f"adapter folder {path} does not exist; {fix}")
        data = read_json_object(path / CONFIG_NAME, fix)
        if "peft_type" in data:
            folder = cls(path=path, format="peft", **peft_folder_fields(path, data))
        else:
            folder = cls._read_lrft(path, data)
        folder.check_tensors()
        return folder

    @classmethod
    def _read_lrft(cls, path: Path, data: dict[str, Any]) -> "AdapterFolder":
        from pydantic import ValidationError

        from .recipe import ModelSection, QuantizationSection

        config_path = path / CONFIG_NAME
        damaged = "the adapter folder is damaged: re-save it or use a checkpoint's adapter"
        missing = [key for key in REQUIRED_KEYS if not isinstance(data.get(key), dict)]
        if missing:
            raise UserError(f"{config_path}: no {missing[0]} object; {damaged}")
        adapter_type = data["adapter"].get("type")
        if adapter_type not in known_types():
            raise UserError(f"{config_path}: unknown adapter type {adapter_type!r} (known: {', '.join(known_types())}); {damaged}")
        shapes = {}
        for name, shape in data["layers"].items():
            if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
                raise UserError(f"{config_path}: layers.{name} is {shape!r}, not [in_features, out_features]; {damaged}")
            shapes[name] = (shape[0], shape[1])
        if not shapes:
            raise UserError(f"{config_path}: layers is empty; {damaged}")
        try:
            config = get_adapter(adapter_type).config.model_validate(data["adapter"])
            model = ModelSection(**data["base_model"])
            quantization = QuantizationSection(**data.get("quantization", {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"])
            section = {"ModelSection": "base_model", "QuantizationSection": "quantization"}.get(exc.title, "adapter")
            raise UserError(f"{config_path}: {section}.{where}: {err['msg']}; {damaged}") from None
        if "dtypes" in data:
            try:
                dtypes = Dtypes.from_json(data["dtypes"])
            except (KeyError, TypeError):
                allowed = ", ".join(DTYPES)
                raise UserError(f"{config_path}: dtypes must map load, compute and frozen to one of {allowed}; {damaged}") from None
        else:
            dtypes = Dtypes.resolve(model, quantization, default_device())
            if model.dtype == "auto" or (quantization.bits == 4 and quantization.compute_dtype == "auto"):
                name = dtype_name(dtypes.frozen)
                _warn_once(
                    str(path.resolve()),
                    f"{config_path} records no resolved dtypes (written by lrft < 0.2): its 'auto' dtypes resolve to "
                    f"{name} on this machine; if it was trained elsewhere in another dtype, add "
                    '"dtypes": {"load": ..., "compute": ..., "frozen": ...} with the dtypes of that run (its run.json)',
                )
        model = model.model_copy(update={"dtype": dtype_name(dtypes.load)})
        quantization = quantization.model_copy(update={"compute_dtype": dtype_name(dtypes.compute)})
        weights = read_safetensors(path / WEIGHTS_NAME, f"the adapter folder is incomplete: {damaged}")
        grouped, orphans = split_by_layer(weights, shapes)
        if orphans:
            raise UserError(f"{path / WEIGHTS_NAME}: tensor {orphans[0]} belongs to no layer in {CONFIG_NAME}; {damaged}")
        return cls(path, "lrft", config, shapes, grouped, model, quantization, dtypes, record=data)

    def check_tensors(self) -> None:
        """Every layer's tensors have the names and shapes its class creates (built on the meta device)."""
        shared = SharedTensors(self.config.seed, self.layer_shapes)
        where = self.path / (WEIGHTS_NAME if self.format == "lrft" else PEFT_WEIGHTS_NAME)
        for name, (in_features, out_features) in self.layer_shapes.items():
            stand_in = ShapeOnlyLinear(in_features, out_features, device="meta")
            try:
                with rebuilding_trained_layers():
                    layer = self.spec.layer(stand_in, self.config_for(name), shared, name, self.dtypes.frozen)
            except (UserError, ValueError) as exc:
                raise UserError(f"{self.path / CONFIG_NAME}: layer {name} cannot be built ({exc}); the adapter folder is damaged") from None
            expected = {key: tuple(value.shape) for key, value in layer.adapter_state_dict().items()}
            found = self.tensors.get(name, {})
            absent = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            if absent or extra:
                what = f"has no tensor {name}.{absent[0]}" if absent else f"holds an unexpected tensor {name}.{extra[0]}"
                raise UserError(f"{where} {what} for a {self.config.type} layer; the adapter folder is damaged: re-save it")
            for key, shape in expected.items():
                if tuple(found[key].shape) != shape:
                    raise UserError(
                        f"{where}: {name}.{key} has shape {tuple(found[key].shape)}, but a {self.config.type} layer of "
                        f"{in_features}->{out_features} with this config has {shape}; the adapter folder is damaged"
                    )

    # --- what it is ------------------------------------------------------------------------------
    @property
    def spec(self) -> AdapterSpec:
        return get_adapter(self.config.type)

    @property
    def base_name(self) -> str:
        return self.model.name_or_path

    def config_for(self, name: str) -> AdapterConfig:
        return self.layer_configs.get(name, self.config)

    @cached_property
    def shared(self) -> SharedTensors:
        """One set of shared frozen tensors for every layer rebuilt from this folder, as in training."""
        return SharedTensors(self.config.seed, self.layer_shapes, self.frozen_tensors)

    # --- rebuilding --------------------------------------------------------------------------------
    def layer(self, name: str, base_layer: Optional[nn.Module] = None) -> AdapterLayer:
        """The trained layer ``name`` around ``base_layer`` (default: a shape-only stand-in on the CPU, for
        adapters whose ΔW does not depend on the base weight), loaded, in eval mode."""
        in_features, out_features = self.layer_shapes[name]
        if base_layer is None:
            if self.spec.layer.needs_base_weight:
                raise ValueError(f"{self.config.type} layers need their real base weight; pass base_layer")
            base_layer = ShapeOnlyLinear(in_features, out_features)
        if (base_layer.in_features, base_layer.out_features) != (in_features, out_features):
            raise UserError(
                f"adapter layer {name} is {in_features}->{out_features} but the base's is "
                f"{base_layer.in_features}->{base_layer.out_features}; the adapter belongs to another base model"
            )
        with rebuilding_trained_layers():
            layer = self.spec.layer(base_layer, self.config_for(name), self.shared, name, self.dtypes.frozen)
        layer.load_adapter_state_dict({k: v.to(layer.device) for k, v in self.tensors[name].items()})
        return layer.eval()

    def layers_for_delta(self) -> tuple[dict[str, AdapterLayer], Optional[str]]:
        """Every layer, rebuilt to be asked for its ΔW (on the CPU), and a note when that needed the base model.

        Around shape-only stand-ins, with no base weights read; a type whose ΔW depends on the base weight
        (``needs_base_weight``: DoRA) is attached to its base model loaded as recorded (quantization
        included: ΔW relative to the weight it was trained on; a PEFT adapter's base loads unquantized)."""
        if not self.spec.layer.needs_base_weight:
            return {name: self.layer(name) for name in self.layer_shapes}, None
        _, layers = self.load_model(torch.device("cpu"))
        return layers, f"{self.config.type}: ΔW depends on the base weight; loaded the base model as recorded in the adapter"

    def attach(self, model: nn.Module) -> dict[str, AdapterLayer]:
        """Wrap ``model``'s adapted linears with this adapter's trained layers (frozen, eval mode)."""
        modules = dict(model.named_modules())
        for name, (in_features, out_features) in self.layer_shapes.items():
            module = modules.get(name)
            if module is None or not hasattr(module, "in_features"):
                raise UserError(
                    f"adapter in {self.path} was trained on {self.base_name}; this model has no linear layer {name}; "
                    "use the adapter with its own base model"
                )
            if (module.in_features, module.out_features) != (in_features, out_features):
                raise UserError(
                    f"adapter layer {name} is {in_features}->{out_features} but the model's is "
                    f"{module.in_features}->{module.out_features}; the adapter belongs to another base model"
                )
        layers = {}
        for name in self.layer_shapes:
            layers[name] = self.layer(name, modules[name])
            replace_module(model, name, layers[name])
        for p in model.parameters():
            p.requires_grad_(False)
        return layers

    def load_model(self, device: Optional[torch.device] = None, bits: Any = "recorded"):
        """The base model as trained (``bits`` 4, 8 or None overrides the recorded quantization) with this
        adapter attached, in eval mode; returns (model, layers)."""
        from .model import load_base_model

        if not self.base_name:
            raise UserError(f"{self.path}: its config names no base model; set base_model_name_or_path to the base model")
        quantization = self.quantization if bits == "recorded" else self.quantization.model_copy(update={"bits": bits})
        model = load_base_model(self.model, quantization, device)
        layers = self.attach(model)
        model.eval()
        return model, layers
