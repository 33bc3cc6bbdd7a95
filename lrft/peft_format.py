"""PEFT's adapter format, both directions.

PEFT keys a layer's tensors ``base_model.model.<module name>.<tensor>`` (adapter name left out) in
``adapter_model.safetensors`` beside an ``adapter_config.json`` that has ``peft_type``. Each type maps onto
an lrft type exactly, so that PEFT and lrft compute the same ΔW from the same file:

=========  ==========  ======================================================================================
PEFT       lrft        mapping
=========  ==========  ======================================================================================
LORA       lora        lora_A, lora_B; scaling lora_alpha / r (/ √r with rsLoRA), per layer with
                       ``alpha_pattern`` / ``rank_pattern``; lrft's alpha = scaling · r
LORA+DoRA  dora        plus lora_magnitude_vector = m; both normalise each output row of W + s·BA, detached
ADALORA    adalora     lora_B, lora_E, lora_A = P, Λ, Q; PEFT scales by (lora_alpha, or the layer's rank when
                       0) / (init_r + 1e-5) for every layer, pruned (resized by ``rank_pattern``) or not
VERA       vera        vera_lambda_b, vera_lambda_d; the shared projections vera_A (r × largest in) and
                       vera_B (largest out × r) are saved in the file (``save_projection``)
RANDLORA   randlora    randlora_lambda (r, n) = Λᵀ, randlora_gamma (n, d) = Γ; shared randlora_A (r, 1, d_max)
                       and randlora_B (D_max, N_max, r) sliced per layer, saved in the file
=========  ==========  ======================================================================================

RandLoRA: PEFT keeps one pair of bases for the whole model, sliced per layer, and pairs A's scaled rows with
B's columns in its own order (:func:`lrft.adapters.randlora.peft_column_order`). lrft's ``basis_layout: peft``
is that layout, so a PEFT RandLoRA imports as an lrft adapter with that layout and PEFT's saved pair, and an
lrft adapter with that layout exports whatever its layer shapes. An adapter with lrft's default layout (one
pair per layer shape) exports only when all its layers have one shape (that shape's pair, reordered, is PEFT's
pair), and never with ``keep_rank`` (one A per term, which PEFT's single A cannot hold).

Importing: :func:`peft_folder_fields` reads a PEFT folder into the fields of the
:class:`~lrft.adapter_folder.AdapterFolder` that ``AdapterFolder.read`` builds, its frozen tensors from the
file (``SharedTensors.provided``) rather than lrft's seed, so ``lrft eval``,
``lrft merge`` and ``lrft inspect-rank`` take a PEFT adapter as they take their own. PEFT records no
quantization: the base loads unquantized unless ``--quantization`` says otherwise. VeRA and RandLoRA files
do not record the layers' input widths, which come from the base model's config (no weights loaded).

Exporting: :func:`export_peft` writes a PEFT folder that ``PeftModel.from_pretrained`` loads on the same base;
:func:`plain_lora` is the LoRA folder of ``merge --format lora`` (:mod:`lrft.lora_export`), for any lrft type.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .adapters import get_adapter
from .errors import UserError
from .io import atomic_dir, read_safetensors, save_tensors_atomic, write_json_atomic

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_TYPES = ("LORA", "ADALORA", "VERA", "RANDLORA")
# each PEFT type's per-layer tensor names (the suffix of a key after the module name)
PEFT_SUFFIXES = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight", "lora_magnitude_vector"),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "VERA": ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"),
    "RANDLORA": ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
}


def _key(module_name: str, tensor: str) -> str:
    return f"{PEFT_PREFIX}{module_name}.{tensor}"


# --- import ---------------------------------------------------------------------------------------------


def _alpha_for(name: str, config: dict[str, Any]) -> float:
    """``lora_alpha``, or the first ``alpha_pattern`` key that names the module (PEFT's suffix match)."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return float(config["lora_alpha"])


def _group(weights: dict[str, Tensor], suffixes: Sequence[str]):
    """Per-module tensors keyed by suffix; model-level tensors (shared projections); keys left over."""
    modules: dict[str, dict[str, Tensor]] = {}
    model_level: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in weights.items():
        if not key.startswith(PEFT_PREFIX):
            model_level[key] = value
            continue
        rest = key[len(PEFT_PREFIX):]
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is None:
            skipped.append(key)
        else:
            modules.setdefault(rest[: -len(suffix) - 1], {})[suffix] = value
    return modules, model_level, skipped


def _layer_shapes(base: str, names: Iterable[str], why: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the named modules from the base model's config, on the meta device."""
    from .model import build_meta_model

    if not base:
        raise UserError(f"{why}; this adapter's adapter_config.json has no base_model_name_or_path: set it to the base model")
    model = build_meta_model(base)
    shapes = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{base} has no module {name}; set base_model_name_or_path to the adapter's own base model") from None
        if hasattr(module, "in_features"):
            shapes[name] = (module.in_features, module.out_features)
        else:  # transformers' Conv1D (GPT-2) stores its weight as (in, out)
            shapes[name] = tuple(module.weight.shape)
    return shapes


def _shared_projection(model_level, modules, key: str, path: Path, peft_type: str) -> Tensor:
    tensor = model_level.get(f"base_model.{key}")
    if tensor is None:  # some versions keep a copy under every layer instead
        tensor = next((t[key] for t in modules.values() if key in t), None)
    if tensor is None:
        raise UserError(
            f"{path}: this PEFT {peft_type} adapter was saved without its random projections "
            "(save_projection=False); re-save it with save_projection=True"
        )
    return tensor.float()


def _need(tensors: dict[str, Tensor], keys: Sequence[str], name: str, path: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise UserError(f"{path / PEFT_WEIGHTS_NAME}: layer {name} has no {missing[0]}; the PEFT adapter file is incomplete")


class _Imported:
    """What one PEFT type's reader produces: lrft layer configs, tensors, shapes and frozen tensors."""

    def __init__(self, adapter_type: str, options: dict[str, Any]):
        self.type = adapter_type
        self.options = options  # model-wide config options
        self.layer_options: dict[str, dict[str, Any]] = {}  # per-layer differences
        self.shapes: dict[str, tuple[int, int]] = {}
        self.tensors: dict[str, dict[str, Tensor]] = {}
        self.frozen: dict[str, Tensor] = {}
        self.notes: list[str] = []

    def add(self, name: str, shape: tuple[int, int], tensors: dict[str, Tensor], **options: Any) -> None:
        self.shapes[name] = shape
        self.tensors[name] = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        differing = {k: v for k, v in options.items() if self.options.get(k) != v}
        if differing:
            self.layer_options[name] = differing


def _import_lora(modules, model_level, config, path) -> _Imported:
    kind = "dora" if config.get("use_dora") else "lora"
    rank = int(config["r"])
    rslora = bool(config.get("use_rslora"))

    def alpha_for(scaling: float, r: int) -> float:  # lrft's alpha: scaling = alpha / r
        return scaling * r

    default_scaling = float(config["lora_alpha"]) / (math.sqrt(rank) if rslora else rank)
    result = _Imported(kind, {"r": rank, "alpha": alpha_for(default_scaling, rank)})
    for name, tensors in modules.items():
        _need(tensors, ("lora_A.weight", "lora_B.weight"), name, path)
        A, B = tensors["lora_A.weight"], tensors["lora_B.weight"]
        r = A.shape[0]
        alpha = _alpha_for(name, config)
        scaling = alpha / (math.sqrt(r) if rslora else r)
        own = {"lora_A": A, "lora_B": B}
        if kind == "dora":
            magnitude = tensors.get("lora_magnitude_vector", tensors.get("lora_magnitude_vector.weight"))
            if magnitude is None:
                raise UserError(f"{path / PEFT_WEIGHTS_NAME}: DoRA layer {name} has no lora_magnitude_vector; the file is incomplete")
            own["magnitude"] = magnitude.reshape(-1)
        result.add(name, (A.shape[1], B.shape[0]), own, r=r, alpha=alpha_for(scaling, r))
    return result


def _import_adalora(modules, model_level, config, path) -> _Imported:
    init_r = int(config.get("init_r") or config["r"])
    alpha = float(config.get("lora_alpha") or 0)
    # PEFT: scaling (lora_alpha, or the layer's rank when 0) over ranknum, which stays init_r when
    # rank_pattern resizes a layer ("the scaling is exactly as the previous")
    def scaling_for(r: int) -> float:
        return (alpha if alpha > 0 else r) / (init_r + 1e-5)

    result = _Imported("adalora", {"r": init_r, "alpha": scaling_for(init_r) * init_r})
    for name, tensors in modules.items():
        _need(tensors, ("lora_A", "lora_B", "lora_E"), name, path)
        A, B, E = tensors["lora_A"], tensors["lora_B"], tensors["lora_E"]
        r = A.shape[0]
        if r == 0:
            result.notes.append(f"{name}: pruned to rank 0 by AdaLoRA (ΔW = 0), left out")
            continue
        own = {"lora_P": B, "lora_lambda": E.reshape(-1), "lora_Q": A, "rank_mask": torch.ones(r, dtype=torch.bool)}
        result.add(name, (A.shape[1], B.shape[0]), own, r=r, alpha=scaling_for(r) * r)
    return result


def _import_vera(modules, model_level, config, path) -> _Imported:
    vera_A = _shared_projection(model_level, modules, "vera_A", path, "VeRA")
    vera_B = _shared_projection(model_level, modules, "vera_B", path, "VeRA")
    modules = {n: t for n, t in modules.items() if "vera_lambda_b" in t or "vera_lambda_d" in t}
    shapes = _layer_shapes(config.get("base_model_name_or_path"), modules, "VeRA slices its shared projections by layer shape")
    rank = int(config["r"])
    result = _Imported("vera", {"r": rank})
    for name, tensors in modules.items():
        _need(tensors, ("vera_lambda_b", "vera_lambda_d"), name, path)
        result.add(name, shapes[name], {"lambda_b": tensors["vera_lambda_b"], "lambda_d": tensors["vera_lambda_d"]})
    max_in = max(i for i, _ in result.shapes.values())
    max_out = max(o for _, o in result.shapes.values())
    # lrft's names for the model-wide bases (lrft.adapters.vera), sized by the largest target as PEFT's
    result.frozen = {f"vera.A.{rank}x{max_in}": vera_A, f"vera.B.{max_out}x{rank}": vera_B}
    return result


def _import_randlora(modules, model_level, config, path) -> _Imported:
    from .adapters.randlora import peft_layout_names

    basis_A = _shared_projection(model_level, modules, "randlora_A", path, "RandLoRA")  # (r, 1, d_max)
    basis_B = _shared_projection(model_level, modules, "randlora_B", path, "RandLoRA")  # (D_max, N_max, r)
    modules = {n: t for n, t in modules.items() if "randlora_lambda" in t or "randlora_gamma" in t}
    shapes = _layer_shapes(config.get("base_model_name_or_path"), modules, "RandLoRA slices its shared bases by layer shape")
    rank = int(config["r"])
    # lrft's basis_layout: peft slices the model-wide pair per layer exactly as PEFT does; the pair's values
    # come from the file, whatever distribution PEFT drew them from
    options = {"r": rank, "alpha": float(config["randlora_alpha"]), "basis": "uniform", "basis_layout": "peft"}
    result = _Imported("randlora", options)
    if config.get("sparse") or config.get("very_sparse"):
        result.notes.append("PEFT's sparse bases are applied as dense tensors (lrft's sparse kernels draw their own)")
    for name, tensors in modules.items():
        _need(tensors, ("randlora_lambda", "randlora_gamma"), name, path)
        in_features, out_features = shapes[name]
        small, large = min(shapes[name]), max(shapes[name])
        terms = math.ceil(small / rank)
        gammas = tensors["randlora_gamma"]
        if tuple(gammas.shape) != (terms, small):
            raise UserError(
                f"{path / PEFT_WEIGHTS_NAME}: {name}.randlora_gamma has shape {tuple(gammas.shape)}, expected "
                f"{(terms, small)} for a {in_features}->{out_features} layer at r={rank}; the file does not match its base"
            )
        result.add(name, shapes[name], {"lambdas": tensors["randlora_lambda"].T, "gammas": gammas})
    a_name, b_name = peft_layout_names(options["basis"])
    result.frozen = {a_name: basis_A[:, 0, :], b_name: basis_B}
    return result


_IMPORTERS: dict[str, Callable] = {
    "LORA": _import_lora,
    "ADALORA": _import_adalora,
    "VERA": _import_vera,
    "RANDLORA": _import_randlora,
}


def peft_folder_fields(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A PEFT adapter folder (``config``: its adapter_config.json) as the fields of an
    :class:`~lrft.adapter_folder.AdapterFolder` other than ``path`` and ``format`` (validated by its caller)."""
    from pydantic import ValidationError

    from .model import Dtypes, default_device, dtype_name
    from .recipe import ModelSection, QuantizationSection

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PEFT_TYPES:
        raise UserError(
            f"{path}: PEFT adapter type {config.get('peft_type')!r} is not supported; supported: LoRA (and DoRA), "
            "AdaLoRA, VeRA, RandLoRA"
        )
    weights = read_safetensors(
        path / PEFT_WEIGHTS_NAME, "lrft reads safetensors only: re-save the adapter with save_pretrained(..., safe_serialization=True)"
    )
    modules, model_level, skipped = _group(weights, PEFT_SUFFIXES[peft_type])
    try:
        imported = _IMPORTERS[peft_type](modules, model_level, config, path)
    except KeyError as exc:
        raise UserError(f"{path / 'adapter_config.json'} has no {exc.args[0]}; the PEFT adapter config is incomplete") from None
    if not imported.shapes:
        raise UserError(f"{path}: the PEFT adapter file holds no {peft_type} layer tensors")
    spec = get_adapter(imported.type)
    common = {"type": imported.type, "dropout": 0.0, "target_modules": sorted(imported.shapes), **imported.options}
    try:
        adapter_config = spec.config.model_validate(common)
        layer_configs = {
            name: spec.config.model_validate({**common, **options}) for name, options in imported.layer_options.items()
        }
    except ValidationError as exc:
        raise UserError(f"{path / 'adapter_config.json'}: {exc.errors()[0]['msg']}; lrft cannot express this PEFT adapter") from None
    notes = list(imported.notes)
    if skipped:
        notes.append(f"skipped {len(skipped)} tensors that are not {peft_type} layer adapters (e.g. {skipped[0]})")
    model = ModelSection(name_or_path=config.get("base_model_name_or_path") or "")
    quantization = QuantizationSection(bits=None)
    resolved = Dtypes.resolve(model, quantization, default_device())
    # PEFT keeps its projections in float32 and computes its adapters in their parameters' dtype
    dtypes = Dtypes(resolved.load, resolved.compute, torch.float32)
    return dict(
        config=adapter_config, layer_shapes=imported.shapes, tensors=imported.tensors,
        model=model.model_copy(update={"dtype": dtype_name(dtypes.load)}),
        quantization=quantization.model_copy(update={"compute_dtype": dtype_name(dtypes.compute)}),
        dtypes=dtypes, record=config, layer_configs=layer_configs, frozen_tensors=imported.frozen, notes=notes,
    )


# --- export ---------------------------------------------------------------------------------------------


def _common(folder, peft_type: str) -> dict[str, Any]:
    from .model import resolve_model_path

    base = folder.base_name
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
        "target_modules": sorted(folder.layer_shapes),
        "modules_to_save": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "revision": None,
    }


def _uniform_config(folder) -> None:
    if folder.layer_configs:
        raise UserError(
            f"{folder.path}: its layers have different ranks or scalings; lrft exports model-wide configs only: "
            "merge it into a full model with --format hf instead"
        )


def _lora_config(folder, r: int, alpha: float, dropout: float, rank_pattern=None, alpha_pattern=None) -> dict[str, Any]:
    peft_config = _common(folder, "LORA")
    peft_config.update({
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
    })
    return peft_config


def _lora_tensors(pairs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """PEFT's keys for each layer's (B, A)."""
    tensors = {}
    for name, (B, A) in pairs.items():
        tensors[_key(name, "lora_A.weight")] = A
        tensors[_key(name, "lora_B.weight")] = B
    return tensors


def _lora_to_peft(folder):
    """LoRA (and RM-LoRA, whose masks and regulariser act only in training): lora_alpha = scaling · r."""
    config = folder.config
    peft_config = _lora_config(folder, config.r, config.scaling * config.r, config.dropout)
    pairs = {name: (own["lora_B"].float(), own["lora_A"].float()) for name, own in folder.tensors.items()}
    return peft_config, _lora_tensors(pairs)


def plain_lora(folder, factors: dict[str, tuple[Tensor, Tensor]]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's config and tensors of a plain LoRA with ΔW = B·A for each layer's (B, A) (``merge --format lora``).

    lora_alpha = r, the largest rank: scaling 1. Serving engines read one scaling, lora_alpha / r (vLLM,
    SGLang), and each layer's rank from its tensors; PEFT reads a layer's own rank from ``rank_pattern``
    and divides its alpha by it, so a layer of another rank gets equal ``rank_pattern`` and ``alpha_pattern``
    entries (scaling 1 again), keyed by its full module name."""
    ranks = {name: B.shape[1] for name, (B, _) in factors.items()}
    top = max(ranks.values())
    pattern = {name: rank for name, rank in ranks.items() if rank != top}
    peft_config = _lora_config(folder, top, top, 0.0, rank_pattern=pattern, alpha_pattern=dict(pattern))
    return peft_config, _lora_tensors(factors)


def write_peft_files(directory: Path, peft_config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    save_tensors_atomic(directory / PEFT_WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json_atomic(directory / "adapter_config.json", peft_config)


def _dora_to_peft(folder):
    peft_config, tensors = _lora_to_peft(folder)
    peft_config["use_dora"] = True
    for name, own in folder.tensors.items():
        tensors[_key(name, "lora_magnitude_vector")] = own["magnitude"].float()
    return peft_config, tensors


def _vera_to_peft(folder):
    config = folder.config
    peft_config = _common(folder, "VERA")
    peft_config.update({
        "r": config.r, "vera_dropout": config.dropout, "d_initial": config.d_initial, "save_projection": True,
        "projection_prng_key": config.seed, "init_weights": True,
    })
    layer = folder.layer(next(iter(folder.layer_shapes)))
    tensors = {"base_model.vera_A": layer.shared_A.float().clone(), "base_model.vera_B": layer.shared_B.float().clone()}
    for name, own in folder.tensors.items():
        tensors[_key(name, "vera_lambda_b")] = own["lambda_b"].float()
        tensors[_key(name, "vera_lambda_d")] = own["lambda_d"].float()
    return peft_config, tensors


def _adalora_to_peft(folder):
    """P, Λ, Q are lora_B, lora_E, lora_A; lora_alpha absorbs PEFT's 1e-5. Pruned ranks stay in place with
    Λ = 0 (no rank_pattern), which computes the same ΔW."""
    config = folder.config
    peft_config = _common(folder, "ADALORA")
    peft_config.update({
        "init_r": config.r, "target_r": config.target_rank, "lora_alpha": config.scaling * (config.r + 1e-5),
        "lora_dropout": config.dropout, "init_lora_weights": True, "rank_pattern": None, "orth_reg_weight": config.orth_reg,
        # the budget schedule only matters for training; PEFT insists on a consistent one
        "tinit": 0, "tfinal": 0, "deltaT": 1, "total_step": 1,
    })
    tensors = {}
    for name, own in folder.tensors.items():
        singular_values = own["lora_lambda"].float() * own["rank_mask"].float()
        tensors[_key(name, "lora_A")] = own["lora_Q"].float()
        tensors[_key(name, "lora_B")] = own["lora_P"].float()
        tensors[_key(name, "lora_E")] = singular_values.unsqueeze(1)
    return peft_config, tensors


def _randlora_to_peft(folder):
    config = folder.config
    if config.keep_rank:
        raise UserError(
            "PEFT's RandLoRA has one random A shared by every term, but this adapter was trained with keep_rank: true "
            "(a separate sparse A per term); export it with --format lora --rank K, or merge it with --format hf"
        )
    shapes = sorted(set(folder.layer_shapes.values()))
    if len(shapes) > 1 and config.basis_layout != "peft":
        listed = ", ".join(f"{i}->{o}" for i, o in shapes)
        raise UserError(
            f"PEFT's RandLoRA slices one pair of random bases for every layer, but this adapter has bases per layer "
            f"shape and several shapes ({listed}); export it with --format lora --rank K (or merge it with --format hf), "
            "or train with adapter.basis_layout: peft"
        )
    peft_config = _common(folder, "RANDLORA")
    peft_config.update({
        "r": config.r, "randlora_alpha": config.scaling * config.r, "randlora_dropout": config.dropout,
        "save_projection": True, "projection_prng_key": config.seed, "sparse": False, "very_sparse": False,
        "init_weights": True,
    })
    layers = {name: folder.layer(name) for name in folder.layer_shapes}
    basis_a, basis_b = next(iter(layers.values())).bases.peft_bases()  # (r, d_max), (D_max, n_max, r)
    shared_pair = {"randlora_A": basis_a.float().unsqueeze(1), "randlora_B": basis_b.float()}
    tensors = {f"base_model.{key}": value.clone() for key, value in shared_pair.items()}
    for name, layer in layers.items():
        tensors[_key(name, "randlora_lambda")] = layer.lambdas.detach().float().T.contiguous()  # (r, n)
        tensors[_key(name, "randlora_gamma")] = layer.gammas.detach().float()  # (n, d)
        # as PEFT's own save: the pair again under every layer (PEFT reports the layer's keys missing
        # without them); safetensors wants separate storage
        tensors.update({_key(name, key): value.clone() for key, value in shared_pair.items()})
    return peft_config, tensors


# lrft type -> exporter; a type is listed once its parameterisation maps exactly onto PEFT's
EXPORTERS: dict[str, Callable] = {
    "lora": _lora_to_peft,
    "rmlora": _lora_to_peft,
    "dora": _dora_to_peft,
    "vera": _vera_to_peft,
    "adalora": _adalora_to_peft,
    "randlora": _randlora_to_peft,
}

# lrft types PEFT has no counterpart for, with the reason
UNSUPPORTED = {
    "lora2": "PEFT has no LoRA² (two LoRA blocks on orthogonal planes)",
    "nola": "PEFT has no NoLA (A and B as mixtures of random bases)",
}


def export_peft(folder, output: Path) -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format into ``output``."""
    kind = folder.config.type
    exporter = EXPORTERS.get(kind)
    if exporter is None:
        why = UNSUPPORTED.get(kind, f"lrft cannot express a {kind} adapter in PEFT's format")
        raise UserError(f"{why}; export it with --format lora --rank K, or merge it into a full model with --format hf")
    _uniform_config(folder)
    with torch.no_grad():
        peft_config, tensors = exporter(folder)
    with atomic_dir(output) as tmp:
        write_peft_files(tmp, peft_config, tensors)
    print(f"wrote {kind} adapter in PEFT format ({len(folder.layer_shapes)} layers, {len(tensors)} tensors) to {output}", flush=True)
    return {"format": "peft", "adapter_type": kind, "peft_type": peft_config["peft_type"], "tensors": len(tensors)}
