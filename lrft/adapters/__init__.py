"""Adapter registry: ``type`` in a recipe -> the module that implements it.

Each module defines ``Config`` (pydantic), ``Layer`` (an AdapterLayer) and optionally ``Controller``.
Adding an adapter is one file and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from .base import AdapterConfig, AdapterLayer, Controller

ADAPTERS: dict[str, str] = {
    "lora": "lrft.adapters.lora",
    "randlora": "lrft.adapters.randlora",
    "rmlora": "lrft.adapters.rmlora",
    "adalora": "lrft.adapters.adalora",
    "lora2": "lrft.adapters.lora2",
    "vera": "lrft.adapters.vera",
    "nola": "lrft.adapters.nola",
    "dora": "lrft.adapters.dora",
}


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    config: type[AdapterConfig]
    layer: type[AdapterLayer]
    controller: type[Controller]


def known_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(name: str) -> AdapterSpec:
    if name not in ADAPTERS:
        raise KeyError(name)
    module = importlib.import_module(ADAPTERS[name])
    controller: Optional[type[Controller]] = getattr(module, "Controller", None)
    return AdapterSpec(name, module.Config, module.Layer, controller or Controller)
