"""Find the target projections, wrap them in adapter layers, and collect the adapters' state.

Reading and writing adapter folders is :mod:`lrft.adapter_folder`'s job; this module only knows a model
and its linear layers.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from .adapters import get_adapter
from .adapters.base import AdapterConfig, AdapterLayer, SharedTensors
from .errors import UserError
from .model import is_linear


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


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
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
    for name, base in targets.items():
        smaller = min(base.in_features, base.out_features)
        if spec.layer.r_must_fit and config.r > smaller:
            raise UserError(
                f"adapter.r={config.r} is larger than {name}'s smaller dimension ({smaller}); "
                f"lower adapter.r or leave this module out of adapter.target_modules"
            )
        layer = spec.layer(base, config, shared, name, frozen_dtype)
        replace_module(model, name, layer)
        layers[name] = layer
    model.lrft_shared = shared  # keep the shared bases reachable for diagnostics and benchmarks
    return layers


def trainable_parameters(layers: dict[str, AdapterLayer]) -> list[nn.Parameter]:
    return [p for layer in layers.values() for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer.")]


def count_trainable(layers: dict[str, AdapterLayer]) -> int:
    return sum(p.numel() for p in trainable_parameters(layers))


def adapter_state_dict(layers: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
    """Every layer's saved tensors, keyed ``<module name>.<tensor name>`` (the adapter file's keys)."""
    return {f"{name}.{key}": value for name, layer in layers.items() for key, value in layer.adapter_state_dict().items()}


def split_by_layer(state: dict[str, torch.Tensor], layer_names) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """``<module name>.<tensor name>`` keys grouped by layer, and the keys that belong to no layer."""
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layer_names}
    # the longest matching name wins, so that a layer named like a prefix of another cannot take its keys
    ordered = sorted(grouped, key=len, reverse=True)
    orphans = []
    for key, value in state.items():
        owner = next((n for n in ordered if key.startswith(n + ".")), None)
        if owner is None:
            orphans.append(key)
        else:
            grouped[owner][key[len(owner) + 1 :]] = value
    return grouped, orphans


def load_adapter_state_dict(layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor], source: str = "adapter state") -> None:
    """Load tensors keyed as :func:`adapter_state_dict` writes them (checkpoints; tests); ``source`` names
    where they come from in the one-line error of a mismatch."""
    grouped, orphans = split_by_layer(state, layers)
    if orphans:
        raise UserError(f"{source} holds {orphans[0]}, which belongs to no adapted layer; it does not match this model and adapter")
    for name, layer in layers.items():
        try:
            layer.load_adapter_state_dict(grouped[name])
        except (KeyError, ValueError) as exc:
            raise UserError(f"{source} does not match this model and adapter: {exc}") from None
