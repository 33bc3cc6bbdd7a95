"""``lrft train RECIPE --dry-run``: what a run would do, before any weight is loaded.

The model is built on the meta device from its ``config.json`` alone, the adapter is injected, and the plan
reports which modules get adapters, the trainable parameter count (and the paper's formula for it), and a
memory estimate of the base weights, the shared frozen tensors and the adapter with its AdamW state.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import get_adapter
from .data import check_data_source
from .errors import UserError
from .inject import count_trainable, find_targets, inject_adapters, trainable_parameters
from .model import build_meta_model, is_linear
from .recipe import Recipe


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Build the model on the meta device from its config alone and print what training would do."""
    plan, by_module = make_plan(recipe)
    print_plan(recipe, plan, by_module)
    return plan


def make_plan(recipe: Recipe) -> tuple[dict[str, Any], dict[str, list]]:
    """The plan (counts and memory estimate) and, per module suffix, [count, (in, out), trainable]."""
    # The plan is about the model and memory; a data file that is not there yet (e.g. the published
    # recipe's commonsense_170k.json) is a warning here and an error only when training starts.
    try:
        check_data_source(recipe.data.path)
        data_problem = None
    except UserError as exc:
        data_problem = str(exc)
    model = build_meta_model(recipe.model.name_or_path)
    total_base = sum(p.numel() for p in model.parameters())
    names = find_targets(model, recipe.adapter.target_modules)
    layers = inject_adapters(model, recipe.adapter, torch.float32, target_names=names)
    trainable = count_trainable(layers)
    spec = get_adapter(recipe.adapter.type)
    formula = sum(spec.layer.num_trainable(l.in_features, l.out_features, recipe.adapter) for l in layers.values())
    bits = recipe.quantization.bits
    # 4-bit: 0.5 byte per weight plus one fp32 absmax per 64-weight block (less with double quantization)
    base_bytes_per = {4: 0.5 + (4 / 64 if not recipe.quantization.double_quant else 1 / 64), 8: 1.0 + 4 / 4096}.get(bits, 2.0)
    # bitsandbytes quantizes every linear layer but the output head; the rest stays 16-bit
    quantizable = sum(
        m.in_features * m.out_features for n, m in model.named_modules() if is_linear(m) and not n.endswith("lm_head")
    ) if bits else 0
    base_mem = quantizable * base_bytes_per + (total_base - quantizable) * (2.0 if bits else base_bytes_per)
    shared_mem = sum(t.numel() * t.element_size() for t in model.lrft_shared.tensors().values())
    adapter_mem = trainable * 16  # fp32 weight + grad + two AdamW moments
    by_module: dict[str, list] = {}
    for name, layer in layers.items():
        entry = by_module.setdefault(name.rsplit(".", 1)[-1], [0, (layer.in_features, layer.out_features), 0])
        entry[0] += 1
        entry[2] += sum(p.numel() for p in trainable_parameters({name: layer}))
    plan = {
        "adapter": recipe.adapter.type,
        "adapted_modules": len(layers),
        "trainable_parameters": trainable,
        "formula_trainable_parameters": formula,
        "base_parameters": total_base,
        "trainable_percent": 100.0 * trainable / max(1, total_base),
        "estimated_memory_gb": {
            "base_weights": base_mem / 2**30,
            "shared_frozen_tensors": shared_mem / 2**30,
            "adapter_and_optimizer": adapter_mem / 2**30,
        },
        "data_problem": data_problem,
    }
    return plan, by_module


def print_plan(recipe: Recipe, plan: dict[str, Any], by_module: dict[str, list]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"plan: {recipe.adapter.type} on {recipe.model.name_or_path}")
    for col in ("module", "count", "in -> out", "trainable"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for kind, (count, (i, o), n) in by_module.items():
        table.add_row(kind, str(count), f"{i} -> {o}", f"{n:,}")
    console.print(table)
    console.print(f"adapted modules: {plan['adapted_modules']}")
    console.print(
        f"trainable parameters: {plan['trainable_parameters']:,} ({plan['trainable_percent']:.3f}% of {plan['base_parameters']:,})"
    )
    bits = recipe.quantization.bits
    quant = f"{bits}-bit" if bits else "unquantized"
    mem = plan["estimated_memory_gb"]
    console.print(
        f"estimated memory: base ({quant}) {mem['base_weights']:.2f} GB + frozen adapter tensors "
        f"{mem['shared_frozen_tensors']:.2f} GB + adapter & AdamW {mem['adapter_and_optimizer']:.2f} GB "
        f"(activations not included)"
    )
    if plan["data_problem"]:
        console.print(f"[yellow]warning:[/yellow] {plan['data_problem']} (training would stop here)", highlight=False)
