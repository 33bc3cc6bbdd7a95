"""``lrft inspect-rank``: the spectrum of every adapted layer's ΔW, and what it says about rank and
orthogonality.

Per layer, from the singular values σ_1 ≥ σ_2 ≥ … of ΔW (shape m × n = out × in):

* ``rank_bound``: what the parameterisation allows: min(m, n, k) for a product B·A with inner
  dimension k (LoRA r, VeRA r, …), min(m, n) for full-rank adapters (RandLoRA, DoRA).
* ``rank``: the numerical rank, the number of σ_i above ``max(m, n) · eps · σ_max`` (the rule of
  ``numpy.linalg.matrix_rank``) with eps that of float32, the dtype ΔW is defined in (``delta_weight()`` and
  ``factors()`` return float32; adapters store float32 or less). The spectrum itself is computed in float64
  on the CPU and float32 on CUDA; with the float32 eps the default gives the same ranks on both, and the
  float32 rounding of stored factors (relative 1e-7) does not count as rank. ``--tol t`` replaces the rule
  by ``t · σ_max``.
* ``effective_rank``: exp of the Shannon entropy of p_i = σ_i / Σσ (Roy & Vetterli, 2007).
* ``stable_rank``: ‖ΔW‖²_F / ‖ΔW‖²₂ = Σσ² / σ_max².
* ``sigma_max``, ``fro_norm``; ``top_r_energy``: Σ_{i≤R} σ_i² / Σσ² with R the adapter's ``r`` (with
  ``--compare``, the smallest ``r`` among the adapters, so that the column compares like with like).
* ``orth_loss``: ‖ΔWΔWᵀ − I‖²_F as in Table 5 of the RM-LoRA paper. ΔWΔWᵀ is m × m (out × out) with
  eigenvalues σ_i² (i ≤ min(m, n)) and m − min(m, n) zeros, so
  ``‖ΔWΔWᵀ − I‖²_F = Σ_{i≤k} (σ_i² − 1)² + (m − k)`` for any k singular values that include every non-zero
  one (each zero one adds (0 − 1)² = 1). It is at least m − rank: a low-rank update of a wide layer is far
  from orthogonal whatever its factors; the figures compare adapters of the same layer shapes. (Table 5's
  values, e.g. 48.8 for R = 80 on DeBERTa's 768-wide layers, lie below that bound, so the paper must have
  normalised or restricted the matrix in a way it does not state; this is the definition as written.)
* ``orth_loss_A`` = ‖AAᵀ − I‖²_F and ``orth_loss_B`` = ‖BᵀB − I‖²_F of the unscaled factors the paper's
  regulariser acts on (RM-LoRA eq. 10; AdaLoRA / LoRA² P and Q), for adapters that have them
  (``AdapterLayer.orthogonality_factors()``).

Cost: no layer gets a full SVD when its structure allows less. A product ΔW = B·A with inner dimension
k < min(m, n) gives its k singular values from thin QRs B = Q_B R_B and Aᵀ = Q_A R_A and the SVD of the
k × k core R_B R_Aᵀ (ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ): O((m + n) k²). Full-rank ΔW (RandLoRA, DoRA) is formed and
reduced in float64 on the CPU through the eigenvalues of its Gram matrix on the smaller side (one matrix
product and a symmetric eigensolve, several times faster than an SVD), kept only when every eigenvalue is
large enough for the Gram matrix's rounding (k · eps · λ_max) to leave it six correct digits; otherwise
that layer gets singular values from an SVD. On CUDA it is an SVD in float32. Layers of equal shape are
batched. On the CPU the small per-layer work runs on one thread (see ``_one_thread``).

Adapters are read without their base model: the lrft adapter folder records each layer's shape, so every
layer is rebuilt around a stand-in base that has only ``in_features`` / ``out_features`` and ΔW comes from
the layer class's own ``factors()`` / ``delta_weight()``. Adapters whose ΔW depends on the base weight
(DoRA: ΔW = m ⊙ (W + BA) / ‖W + BA‖ − W; a layer class says so with ``needs_base_weight = True``, and
type ``dora`` is assumed to) are attached to their base model as recorded in the adapter, as
``load_model_with_adapter`` does (quantization included: ΔW relative to the weight they were trained on).

PEFT adapter folders (``adapter_config.json`` with ``peft_type`` and ``adapter_model.safetensors``) are
read for LoRA (rsLoRA, ``alpha_pattern``), DoRA, AdaLoRA, VeRA and RandLoRA, with ΔW from PEFT's formulas:

* LoRA: (α / r) · B A (α / √r with rsLoRA);
* DoRA: diag(m / ‖W + s·BA‖_row) (W + s·BA) − W, with W read from the base model's safetensors
  (``base_model_name_or_path``; unquantized weights);
* AdaLoRA: B (A ⊙ E) · α / (init_r + 1e-5) (α = lora_alpha, or init_r when it is 0);
* VeRA: (λ_b ⊙ B[:m]) (λ_d ⊙ A[:, :n]) with the shared projections saved in the file;
* RandLoRA: (α / r) · B̃ Ã with B̃ = B[:D, :N].flatten(1), Ã = (Λ ⊙ A[:, :N, :d] ⊙ Γ).flatten(0, 1), D, d the
  larger / smaller side and N the number of bases, transposed when the input is the larger side.

VeRA and RandLoRA share projections sized for the largest layer and sliced per layer; the file does not
record layer shapes, so they come from the base model's config (a meta-device model, no weights). PEFT
adapters saved with ``save_projection=False`` are refused: their projections are not in the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import UserError
from .io import write_bytes_atomic, write_json_atomic

# ΔW is defined in float32 (see the module docstring): the default rank rule uses its eps.
RANK_EPS = torch.finfo(torch.float32).eps
# A Gram-matrix eigenvalue is kept when its rounding error, about k·eps·λ_max, is below this fraction of it.
GRAM_RELATIVE_ACCURACY = 1e-6
# Most bytes one batch of stacked matrices may take in the computation dtype.
BATCH_BYTES = 512 * 2**20

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_TYPES = ("LORA", "ADALORA", "VERA", "RANDLORA")


# --- what an adapted layer's ΔW is made of ---------------------------------------------------------


@dataclass
class InspectedLayer:
    """One adapted layer, ΔW available three ways (all float32, scaling included)."""

    name: str
    out_features: int
    in_features: int
    factors: Callable[[], Optional[tuple[Tensor, Tensor]]]  # (B, A) with ΔW = B @ A, or None
    delta_weight: Callable[[torch.device], Tensor]  # dense ΔW (out, in), formed on the given device
    orthogonality_factors: Callable[[], Optional[tuple[Tensor, Tensor]]] = lambda: None  # unscaled (B, A)


@dataclass
class InspectedAdapter:
    path: Path
    format: str  # "lrft" or "peft"
    type: str
    r: int  # nominal rank (LoRA family) or basis rank (random-basis family)
    layers: list[InspectedLayer]
    notes: list[str] = field(default_factory=list)


class ShapeOnlyLinear(nn.Module):
    """Stands in for a frozen linear when only ΔW is wanted: ``in_features`` / ``out_features`` and an empty
    CPU ``weight`` (which places the adapter's tensors on the CPU). It cannot run a forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("ShapeOnlyLinear has no weight; it only stands in for ΔW computations")


def _from_adapter_layer(name: str, layer: nn.Module) -> InspectedLayer:
    def delta_weight(device: torch.device) -> Tensor:
        layer.to(device)
        return layer.delta_weight().float()

    return InspectedLayer(
        name=name,
        out_features=layer.out_features,
        in_features=layer.in_features,
        factors=layer.factors,
        delta_weight=delta_weight,
        orthogonality_factors=layer.orthogonality_factors,
    )


def _needs_base_weight(adapter_type: str, layer_class: type) -> bool:
    """Adapters whose ΔW depends on the frozen weight (DoRA's column norms) cannot use the stand-in base."""
    return bool(getattr(layer_class, "needs_base_weight", adapter_type == "dora"))


def _frozen_dtype(data: dict[str, Any], device: torch.device) -> torch.dtype:
    """The dtype frozen random tensors had in training on ``device`` (as merge resolves it)."""
    from .model import resolve_dtype
    from .recipe import ModelSection, QuantizationSection

    model = ModelSection(**data.get("base_model", {}))
    quant = QuantizationSection(**data.get("quantization", {}))
    return resolve_dtype(quant.compute_dtype if quant.bits == 4 else model.dtype, device)


def _attach_to_recorded_base(directory: Path, data: dict[str, Any]) -> dict[str, nn.Module]:
    """The adapter attached to its base model as recorded (``load_model_with_adapter`` without the tokenizer),
    on the CPU: ΔW is then relative to the (quantized) weight it was trained on."""
    from .inject import attach_adapter
    from .model import frozen_dtype_of, load_base_model
    from .recipe import ModelSection, QuantizationSection

    quant = QuantizationSection(**data.get("quantization", {}))
    model = load_base_model(ModelSection(**data.get("base_model", {})), quant, torch.device("cpu"))
    return attach_adapter(model, directory, frozen_dtype_of(model, quant))


def load_lrft_adapter(directory: Path, device: torch.device) -> InspectedAdapter:
    from .adapters import get_adapter
    from .adapters.base import SharedTensors
    from .inject import adapter_config_from_dict, load_adapter_state_dict, read_adapter_config, read_adapter_weights

    data = read_adapter_config(directory)
    config = adapter_config_from_dict(data["adapter"])
    spec = get_adapter(config.type)
    notes = []
    if _needs_base_weight(config.type, spec.layer):
        layers = _attach_to_recorded_base(directory, data)
        notes.append(f"{config.type}: ΔW depends on the base weight; loaded the base model as recorded in the adapter")
    else:
        shared = SharedTensors(config.seed, data["layers"])
        frozen_dtype = _frozen_dtype(data, device)
        layers = {}
        for name, (in_features, out_features) in data["layers"].items():
            layers[name] = spec.layer(ShapeOnlyLinear(in_features, out_features), config, shared, name, frozen_dtype)
        load_adapter_state_dict(layers, read_adapter_weights(directory))
    for layer in layers.values():
        layer.eval()
    inspected = [_from_adapter_layer(name, layer) for name, layer in layers.items()]
    return InspectedAdapter(Path(directory), "lrft", config.type, config.r, inspected, notes)


# --- PEFT adapter folders -----------------------------------------------------------------------------


def _peft_alpha(name: str, config: dict[str, Any]) -> float:
    """``lora_alpha``, or the first ``alpha_pattern`` key that names the module (PEFT's suffix match)."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return float(config["lora_alpha"])


def _group_peft_tensors(weights: dict[str, Tensor], suffixes: Sequence[str]):
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


def _peft_layer_shapes(config: dict[str, Any], names: Iterable[str], why: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the named modules from the base model's config, on the meta device."""
    from .model import build_meta_model

    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{why}; this adapter's adapter_config.json has no base_model_name_or_path: set it to the base model's "
            "folder or hub id"
        )
    model = build_meta_model(base)
    shapes = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(
                f"{base} has no module {name}; set base_model_name_or_path to the adapter's own base model"
            ) from None
        if hasattr(module, "in_features"):
            shapes[name] = (module.in_features, module.out_features)
        else:  # transformers' Conv1D (GPT-2) stores its weight as (in, out)
            shapes[name] = tuple(module.weight.shape)
    return shapes


def _peft_base_weights(config: dict[str, Any], names: Iterable[str]) -> dict[str, Tensor]:
    """The base model's weights of the named modules, read from its safetensors (nothing else is loaded)."""
    from safetensors import safe_open

    from .merge import checkpoint_shards, source_folder

    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(
            "DoRA's ΔW depends on the base weights and this adapter's adapter_config.json has no "
            "base_model_name_or_path; set it to the base model's folder or hub id"
        )
    wanted = {f"{name}.weight": name for name in names}
    found: dict[str, Tensor] = {}
    for shard in checkpoint_shards(source_folder(base)):
        with safe_open(str(shard), framework="pt") as handle:
            for key in set(handle.keys()) & set(wanted):
                found[wanted[key]] = handle.get_tensor(key).float()
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise UserError(
            f"{base} holds no weight for {missing[0]}; set base_model_name_or_path to the adapter's own base model"
        )
    return found


def _product_layer(name, out_features, in_features, left: Tensor, right: Tensor, orth=None) -> InspectedLayer:
    """A layer whose ΔW = left @ right (float32)."""
    left, right = left.float(), right.float()
    return InspectedLayer(
        name, out_features, in_features,
        factors=lambda: (left, right),
        delta_weight=lambda device: left.to(device) @ right.to(device),
        orthogonality_factors=lambda: orth,
    )


def _peft_lora_layers(modules, config, folder) -> list[InspectedLayer]:
    dora = [name for name, t in modules.items() if "lora_magnitude_vector" in t or "lora_magnitude_vector.weight" in t]
    base_weights = _peft_base_weights(config, dora) if dora else {}
    layers = []
    for name, tensors in modules.items():
        if "lora_A.weight" not in tensors or "lora_B.weight" not in tensors:
            raise UserError(f"{folder}: layer {name} lacks lora_A or lora_B; the PEFT adapter file is incomplete")
        A, B = tensors["lora_A.weight"].float(), tensors["lora_B.weight"].float()
        rank = A.shape[0]
        alpha = _peft_alpha(name, config)
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out_features, in_features = B.shape[0], A.shape[1]
        if name not in base_weights:
            layers.append(_product_layer(name, out_features, in_features, B * scaling, A, orth=(B, A)))
            continue
        magnitude = tensors.get("lora_magnitude_vector", tensors.get("lora_magnitude_vector.weight")).float()
        weight = base_weights[name]
        if weight.shape != (out_features, in_features):
            weight = weight.T  # fan_in_fan_out (Conv1D) bases store (in, out)

        def dora_delta(device, A=A, B=B, scaling=scaling, weight=weight, magnitude=magnitude):
            weight = weight.to(device)
            adapted = weight + (B.to(device) @ A.to(device)) * scaling
            column_scale = magnitude.to(device) / adapted.norm(dim=1)
            return column_scale.unsqueeze(1) * adapted - weight

        layers.append(InspectedLayer(name, out_features, in_features, lambda: None, dora_delta, lambda o=(B, A): o))
    return layers


def _peft_adalora_layers(modules, config, folder) -> list[InspectedLayer]:
    init_r = int(config.get("init_r") or config["r"])
    alpha = float(config.get("lora_alpha") or 0)
    # PEFT's scaling is lora_alpha (init_r when 0) over the rank the layers were created with, init_r
    scaling = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)
    layers = []
    for name, tensors in modules.items():
        if not {"lora_A", "lora_B", "lora_E"} <= set(tensors):
            raise UserError(
                f"{folder}: layer {name} lacks lora_A, lora_B or lora_E; the PEFT adapter file is incomplete"
            )
        A, B, E = (tensors[k].float() for k in ("lora_A", "lora_B", "lora_E"))
        layers.append(_product_layer(name, B.shape[0], A.shape[1], B * scaling, A * E, orth=(B, A)))
    return layers


def _shared_projection(model_level, modules, key: str, folder, peft_type: str) -> Tensor:
    tensor = model_level.get(f"base_model.{key}")
    if tensor is None:  # some versions keep a copy under every layer instead
        tensor = next((t[key] for t in modules.values() if key in t), None)
    if tensor is None:
        raise UserError(
            f"{folder}: this PEFT {peft_type} adapter was saved without its random projections "
            "(save_projection=False); re-save it with save_projection=True"
        )
    return tensor.float()


def _peft_vera_layers(modules, model_level, config, folder) -> list[InspectedLayer]:
    vera_A = _shared_projection(model_level, modules, "vera_A", folder, "VeRA")
    vera_B = _shared_projection(model_level, modules, "vera_B", folder, "VeRA")
    shapes = _peft_layer_shapes(config, modules, "VeRA slices shared projections by layer shape")
    layers = []
    for name, tensors in modules.items():
        in_features, out_features = shapes[name]
        left = tensors["vera_lambda_b"].float().unsqueeze(1) * vera_B[:out_features]
        right = tensors["vera_lambda_d"].float().unsqueeze(1) * vera_A[:, :in_features]
        layers.append(_product_layer(name, out_features, in_features, left, right))
    return layers


def _peft_randlora_layers(modules, model_level, config, folder) -> list[InspectedLayer]:
    basis_A = _shared_projection(model_level, modules, "randlora_A", folder, "RandLoRA")  # (r, ·, d_max)
    basis_B = _shared_projection(model_level, modules, "randlora_B", folder, "RandLoRA")  # (D_max, N_max, r)
    shapes = _peft_layer_shapes(config, modules, "RandLoRA slices shared bases by layer shape")
    scaling = float(config["randlora_alpha"]) / int(config["r"])
    layers = []
    for name, tensors in modules.items():
        in_features, out_features = shapes[name]
        gammas, lambdas = tensors["randlora_gamma"].float(), tensors["randlora_lambda"].float()  # (N, d), (r, N)
        num_bases, small = gammas.shape
        large = max(in_features, out_features)

        def delta_weight(device, gammas=gammas, lambdas=lambdas, num_bases=num_bases, small=small, large=large,
                         input_is_small=in_features == small):
            scaled_A = lambdas.to(device).unsqueeze(2) * basis_A[:, :num_bases, :small].to(device) * gammas.to(device)
            flat_B = basis_B[:large, :num_bases, :].to(device).flatten(1)
            product = (flat_B @ scaled_A.flatten(0, 1)) * scaling  # (D, d)
            return product if input_is_small else product.T.contiguous()

        layers.append(InspectedLayer(name, out_features, in_features, lambda: None, delta_weight))
    return layers


def load_peft_adapter(directory: Path, config: dict[str, Any]) -> InspectedAdapter:
    from safetensors.torch import load_file

    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PEFT_TYPES:
        raise UserError(
            f"{directory}: PEFT adapter type {config.get('peft_type')!r} is not supported by inspect-rank; "
            "supported: LoRA (and DoRA), AdaLoRA, VeRA, RandLoRA"
        )
    path = directory / PEFT_WEIGHTS_NAME
    if not path.exists():
        raise UserError(
            f"{directory} has no {PEFT_WEIGHTS_NAME}; inspect-rank reads safetensors only: re-save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    try:
        weights = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise UserError(f"{path} is truncated or corrupt ({exc}); re-save the adapter") from None
    suffixes = {
        "LORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector.weight", "lora_magnitude_vector"),
        "ADALORA": ("lora_A", "lora_B", "lora_E"),
        "VERA": ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"),
        "RANDLORA": ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
    }[peft_type]
    modules, model_level, skipped = _group_peft_tensors(weights, suffixes)
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} tensors that are not {peft_type} layer adapters (e.g. {skipped[0]})")
    if peft_type == "LORA":
        layers = _peft_lora_layers(modules, config, directory)
        kind = "dora" if config.get("use_dora") else "lora"
        rank = int(config["r"])
    elif peft_type == "ADALORA":
        layers, kind = _peft_adalora_layers(modules, config, directory), "adalora"
        rank = int(config.get("init_r") or config["r"])
    else:
        # the per-layer tensors of these two are the trainable scalings; projections are shared
        modules = {n: t for n, t in modules.items() if any(k.startswith(("vera_lambda", "randlora_lambda")) for k in t)}
        if peft_type == "VERA":
            layers, kind = _peft_vera_layers(modules, model_level, config, directory), "vera"
        else:
            layers, kind = _peft_randlora_layers(modules, model_level, config, directory), "randlora"
        rank = int(config["r"])
    if not layers:
        raise UserError(f"{directory}: the PEFT adapter file holds no {peft_type} layer tensors")
    return InspectedAdapter(directory, "peft", f"peft-{kind}", rank, layers, notes)


def load_adapter(directory: Path | str, device: torch.device = torch.device("cpu")) -> InspectedAdapter:
    """An lrft or PEFT adapter folder, as layers whose ΔW can be formed or factored."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    fix = "pass an lrft adapter folder (RUN_DIR/adapter) or a PEFT adapter folder"
    if not directory.is_dir():
        raise UserError(f"adapter folder {directory} does not exist; {fix}")
    if not config_path.exists():
        raise UserError(f"{directory} has no adapter_config.json; {fix}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}); the adapter folder is corrupt, re-save it") from None
    if isinstance(config, dict) and "peft_type" in config:
        return load_peft_adapter(directory, config)
    return load_lrft_adapter(directory, device)


# --- spectra -----------------------------------------------------------------------------------------


def factored_singular_values(left: Tensor, right: Tensor) -> Tensor:
    """Singular values of ``left @ right`` (batched: (b, m, k) @ (b, k, n)), descending, without forming it:
    left = Q_l R_l and rightᵀ = Q_r R_r, so left @ right = Q_l (R_l R_rᵀ) Q_rᵀ has the singular values of
    the small core R_l R_rᵀ."""
    _, r_left = torch.linalg.qr(left, mode="r")
    _, r_right = torch.linalg.qr(right.mT, mode="r")
    return torch.linalg.svdvals(r_left @ r_right.mT)


def dense_singular_values(weights: Tensor, use_gram: bool = True) -> tuple[Tensor, list[str]]:
    """Singular values of each matrix in ``weights`` (b, m, n), descending, and how each was obtained.

    With ``use_gram``, from the eigenvalues of the Gram matrix on the smaller side; a matrix any of whose
    eigenvalues lies within the Gram matrix's rounding error (see GRAM_RELATIVE_ACCURACY) gets an SVD.
    """
    if not use_gram:
        return torch.linalg.svdvals(weights), ["svd"] * weights.shape[0]
    tall = weights.shape[-2] >= weights.shape[-1]
    gram = weights.mT @ weights if tall else weights @ weights.mT
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)  # descending
    size = gram.shape[-1]
    floor = size * torch.finfo(weights.dtype).eps * eigenvalues[:, :1] / GRAM_RELATIVE_ACCURACY
    reliable = ((eigenvalues >= floor) | (eigenvalues[:, :1] == 0)).all(dim=1)
    sigma = eigenvalues.sqrt()
    methods = ["gram" if ok else "svd" for ok in reliable.tolist()]
    redo = (~reliable).nonzero().flatten()
    if redo.numel():
        sigma[redo] = torch.linalg.svdvals(weights[redo])
    return sigma, methods


@dataclass
class LayerSpectrum:
    name: str
    out_features: int
    in_features: int
    rank_bound: int
    sigma: Tensor  # float64, CPU, descending
    method: str  # factored | gram | svd
    orth_loss_A: Optional[float] = None
    orth_loss_B: Optional[float] = None


@contextlib.contextmanager
def _one_thread(enabled: bool = True):
    """Run small per-layer CPU work (loading, thin QRs, k×k products, copies) on one thread: it gains little
    from more, and MKL's OpenMP threads slow it down twenty-fold when the cores are shared with other work."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compute_settings(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cuda" else torch.float64


def _gram_residual(gram: Tensor) -> float:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return float(((gram - eye) ** 2).sum())


def _orthogonality(layer: InspectedLayer) -> tuple[Optional[float], Optional[float]]:
    factors = layer.orthogonality_factors()
    if factors is None:
        return None, None
    B, A = (t.detach().to("cpu", torch.float64) for t in factors)
    return _gram_residual(A @ A.T), _gram_residual(B.T @ B)


def compute_spectra(
    layers: list[InspectedLayer],
    device: torch.device = torch.device("cpu"),
    dense: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> list[LayerSpectrum]:
    """Every layer's spectrum: low-rank products one at a time through their factors, full-rank ΔW formed
    and batched with the other layers of its shape (up to BATCH_BYTES).

    ``dense=True`` forms every ΔW even when it is a low-rank product (the tests compare both paths).
    ``progress(n)`` is called as n more layers are done.
    """
    dtype = _compute_settings(device)
    itemsize = torch.finfo(dtype).bits // 8
    results: list[Optional[LayerSpectrum]] = [None] * len(layers)
    pending: dict[tuple[int, int], list[int]] = defaultdict(list)  # layer shape -> indices waiting to be formed

    def record(index: int, sigma: Tensor, method: str, inner_dim: Optional[int]) -> None:
        layer = layers[index]
        bound = min(layer.out_features, layer.in_features, inner_dim or layer.out_features)
        orth_A, orth_B = _orthogonality(layer)
        results[index] = LayerSpectrum(
            layer.name, layer.out_features, layer.in_features, bound, sigma.cpu().double(), method, orth_A, orth_B
        )

    def form_and_reduce(shape: tuple[int, int]) -> None:
        indices = pending.pop(shape)
        with torch.no_grad():
            weights = torch.stack([layers[i].delta_weight(device).detach().to(dtype) for i in indices])
            sigma, methods = dense_singular_values(weights, use_gram=device.type == "cpu")
            del weights
        for row, index in enumerate(indices):
            record(index, sigma[row], methods[row], None)
        if progress:
            progress(len(indices))

    for index, layer in enumerate(layers):
        shape = (layer.out_features, layer.in_features)
        with torch.no_grad(), _one_thread(device.type == "cpu"):
            factors = None if dense else layer.factors()
            if factors is not None and factors[0].shape[-1] < min(shape):
                B, A = (t.detach().to(device, dtype) for t in factors)
                record(index, factored_singular_values(B, A), "factored", B.shape[-1])
                if progress:
                    progress(1)
                continue
        pending[shape].append(index)
        if len(pending[shape]) * shape[0] * shape[1] * itemsize * 2 >= BATCH_BYTES:  # ΔW and its Gram product
            form_and_reduce(shape)
    for shape in list(pending):
        form_and_reduce(shape)
    return results  # type: ignore[return-value]


# --- figures ------------------------------------------------------------------------------------------


def rank_threshold(sigma_max: float, out_features: int, in_features: int, tol: Optional[float]) -> float:
    if tol is not None:
        return tol * sigma_max
    return max(out_features, in_features) * RANK_EPS * sigma_max


def orthogonality_loss(sigma: Tensor, out_features: int) -> float:
    """‖ΔWΔWᵀ − I_out‖²_F from singular values that include every non-zero one (module docstring)."""
    sigma = sigma.double()
    return float(((sigma**2 - 1.0) ** 2).sum()) + (out_features - sigma.numel())


def spectrum_figures(spectrum: LayerSpectrum, top_r: int, tol: Optional[float]) -> dict[str, Any]:
    sigma = spectrum.sigma.double()
    m, n = spectrum.out_features, spectrum.in_features
    sigma_max = float(sigma[0]) if sigma.numel() else 0.0
    threshold = rank_threshold(sigma_max, m, n, tol)
    energy = sigma**2
    total_energy = float(energy.sum())
    if sigma_max > 0:
        p = sigma[sigma > 0] / sigma.sum()
        effective_rank = math.exp(float(-(p * p.log()).sum()))
        stable_rank = total_energy / sigma_max**2
        top_r_energy = float(energy[:top_r].sum()) / total_energy
    else:  # ΔW = 0 (an untrained LoRA): no direction at all
        effective_rank, stable_rank, top_r_energy = 0.0, 0.0, None
    figures = {
        "name": spectrum.name,
        "module_type": module_type(spectrum.name),
        "depth": layer_depth(spectrum.name),
        "shape": [m, n],
        "rank_bound": spectrum.rank_bound,
        "rank": int((sigma > threshold).sum()) if sigma_max > 0 else 0,
        "rank_threshold": threshold,
        "effective_rank": effective_rank,
        "stable_rank": stable_rank,
        "sigma_max": sigma_max,
        "fro_norm": math.sqrt(total_energy),
        "top_r_energy": top_r_energy,
        "orth_loss": orthogonality_loss(sigma, m),
        "method": spectrum.method,
    }
    if spectrum.orth_loss_A is not None:
        figures["orth_loss_A"] = spectrum.orth_loss_A
        figures["orth_loss_B"] = spectrum.orth_loss_B
    return figures


_DEPTH = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def module_type(name: str) -> str:
    """q, k, v, o, gate, up, down for the usual ``*_proj`` names; the last name component otherwise."""
    last = name.rsplit(".", 1)[-1]
    return last[: -len("_proj")] if last.endswith("_proj") else last


def layer_depth(name: str) -> Optional[int]:
    """The block index in names like ``model.layers.12.self_attn.q_proj``."""
    found = _DEPTH.search(name)
    return int(found.group(1)) if found else None


SUMMARY_FIELDS = (
    "rank_bound", "rank", "effective_rank", "stable_rank", "sigma_max", "fro_norm", "top_r_energy",
    "orth_loss", "orth_loss_A", "orth_loss_B",
)


def _mean_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"layers": len(rows)}
    for key in SUMMARY_FIELDS:
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            summary[f"mean_{key}"] = sum(values) / len(values)
    return summary


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_module: dict[str, list] = defaultdict(list)
    by_depth: dict[str, list] = defaultdict(list)
    for row in rows:
        by_module[row["module_type"]].append(row)
        by_depth["-" if row["depth"] is None else str(row["depth"])].append(row)
    depth_order = sorted(by_depth, key=lambda d: (d == "-", int(d) if d != "-" else 0))
    return {
        "overall": _mean_figures(rows),
        "by_module": {key: _mean_figures(by_module[key]) for key in _module_order(by_module)},
        "by_depth": {key: _mean_figures(by_depth[key]) for key in depth_order},
    }


_USUAL_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]


def _module_order(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: (_USUAL_ORDER.index(k) if k in _USUAL_ORDER else len(_USUAL_ORDER), k))


# --- the command ----------------------------------------------------------------------------------------


@dataclass
class AdapterReport:
    adapter: InspectedAdapter
    spectra: list[LayerSpectrum]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    def as_json(self, top_r: int, tol: Optional[float], device: torch.device) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter.path),
            "format": self.adapter.format,
            "adapter_type": self.adapter.type,
            "r": self.adapter.r,
            "top_r": top_r,
            "rank_tolerance": (
                {"rule": "tol * sigma_max", "tol": tol} if tol is not None
                else {"rule": "max(m, n) * eps * sigma_max", "eps": RANK_EPS, "eps_dtype": "float32"}
            ),
            "computation": {"device": str(device), "dtype": str(_compute_settings(device)).removeprefix("torch.")},
            "notes": self.adapter.notes,
            "layers": self.rows,
            "summary": self.summary,
        }


def _resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu or cuda") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not supported; use cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available here; use --device cpu")
    return resolved


def _select_layers(adapter: InspectedAdapter, pattern: Optional[re.Pattern]) -> None:
    """Keep the layers whose full name the regex matches anywhere (``re.search``: ``q_proj`` works)."""
    if pattern is None:
        return
    kept = [layer for layer in adapter.layers if pattern.search(layer.name)]
    if not kept:
        examples = ", ".join(layer.name for layer in adapter.layers[:3])
        raise UserError(
            f"--layers {pattern.pattern!r} matches no layer of {adapter.path} (layers look like {examples}); fix the regex"
        )
    adapter.layers = kept


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def inspect_adapters(
    adapter_dirs: Sequence[Path | str],
    tol: Optional[float] = None,
    device: str = "cpu",
    layers: Optional[str] = None,
    dense: bool = False,
    show_progress: bool = True,
) -> tuple[list[AdapterReport], int]:
    """Load and measure every adapter; returns the reports and the R of the top-R energy column."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if tol is not None and not 0 < tol < 1:
        raise UserError(f"--tol {tol:g} is not a relative tolerance; give a number between 0 and 1, e.g. 1e-6")
    torch_device = _resolve_device(device)
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as exc:
        raise UserError(f"--layers {layers!r} is not a valid regex ({exc}); fix the pattern") from None
    with _one_thread():  # building layers and copying their tensors in: small, memory-bound steps
        adapters = [load_adapter(path, torch_device) for path in adapter_dirs]
    for adapter in adapters:
        _select_layers(adapter, pattern)
    top_r = min(adapter.r for adapter in adapters)
    total = sum(len(adapter.layers) for adapter in adapters)
    console = _console(stderr=True)
    reports = []
    with Progress(
        TextColumn("[bold]inspect-rank[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not show_progress,
    ) as bar:
        task = bar.add_task("layers", total=total)
        for adapter in adapters:
            bar.update(task, description=adapter.path.name)
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            spectra = compute_spectra(adapter.layers, torch_device, dense=dense, progress=advance)
            rows = [spectrum_figures(spectrum, top_r, tol) for spectrum in spectra]
            reports.append(AdapterReport(adapter, spectra, rows, summarize(rows)))
    return reports, top_r


def run_inspect_rank(
    adapter_dir: Path | str,
    compare: Sequence[Path | str] = (),
    json_out: Optional[Path | str] = None,
    plot: Optional[Path | str] = None,
    tol: Optional[float] = None,
    device: str = "cpu",
    layers: Optional[str] = None,
) -> dict[str, Any]:
    """The ``inspect-rank`` command: tables on stdout, optionally JSON and a PNG. Returns the JSON payload."""
    if plot is not None:
        _require_matplotlib()
    reports, top_r = inspect_adapters([adapter_dir, *compare], tol=tol, device=device, layers=layers)
    torch_device = _resolve_device(device)
    payload = reports[0].as_json(top_r, tol, torch_device)
    if len(reports) > 1:
        payload["compare"] = [report.as_json(top_r, tol, torch_device) for report in reports[1:]]
    print_tables(reports, top_r)
    if json_out is not None:
        write_json_atomic(json_out, payload)
    if plot is not None:
        plot_spectra(reports, plot)
    return payload


# --- output ----------------------------------------------------------------------------------------------


def _labels(reports: Sequence[AdapterReport]) -> list[str]:
    names = [report.adapter.path.name or str(report.adapter.path) for report in reports]
    if len(set(names)) < len(names):
        names = [str(report.adapter.path) for report in reports]
    return names


def _format(value: Any, key: str) -> str:
    if value is None:
        return "—"
    if key in ("rank", "rank_bound", "layers"):
        return f"{value:.1f}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"
    if key in ("effective_rank", "stable_rank"):
        return f"{value:.1f}"
    if key == "top_r_energy":
        return f"{value:.3f}"
    return f"{value:.4g}"


_COLUMNS = [
    ("rank", "rank"),
    ("effective_rank", "erank"),
    ("stable_rank", "srank"),
    ("sigma_max", "σmax"),
    ("fro_norm", "‖ΔW‖F"),
    ("top_r_energy", "topR"),
    ("orth_loss", "orth"),
    ("orth_loss_A", "orthA"),
    ("orth_loss_B", "orthB"),
]
_LEGEND = (
    "rank: numerical rank; erank: effective rank; srank: stable rank; topR: share of ‖ΔW‖²F in the top R σ; "
    "orth: ‖ΔWΔWᵀ−I‖²F; orthA: ‖AAᵀ−I‖²F; orthB: ‖BᵀB−I‖²F"
)


def _common_prefix(names: Sequence[str]) -> str:
    """The longest dotted prefix shared by all names (``model.layers.``), shown once in the table title."""
    if len(names) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        shared.append(pieces[0])
    shared = shared[: min(len(p) for p in parts) - 1]
    return ".".join(shared) + "." if shared else ""


def _columns_for(reports: Sequence[AdapterReport]) -> list[tuple[str, str]]:
    present = {key for report in reports for row in report.rows for key in row}
    return [(key, title) for key, title in _COLUMNS if key in present]


def print_tables(reports: Sequence[AdapterReport], top_r: int) -> None:
    from rich.table import Table

    console = _console()
    if not console.is_terminal:  # a file or a pipe: keep rows whole rather than folding them to 80 columns
        from rich.console import Console

        console = Console(width=400)
    labels = _labels(reports)
    columns = _columns_for(reports)
    several = len(reports) > 1
    for report, label in zip(reports, labels):
        notes = "; ".join(report.adapter.notes)
        console.print(
            f"[bold]{label}[/]: {report.adapter.type} ({report.adapter.format}), r = {report.adapter.r}, "
            f"{len(report.rows)} layers" + (f" [dim]({notes})[/]" if notes else "")
        )

    def header(table: Table) -> None:
        for label in labels:
            for _, title in columns:
                table.add_column(f"{label}\n{title}" if several else title, justify="right")

    by_name = [{row["name"]: row for row in report.rows} for report in reports]
    names = list(dict.fromkeys(name for rows in by_name for name in rows))
    prefix = _common_prefix(names)
    layers_table = Table(title=f"ΔW per layer{f' ({prefix}…)' if prefix else ''}, R = {top_r}", caption=_LEGEND)
    layers_table.add_column("layer", overflow="fold")
    layers_table.add_column("shape", justify="right")
    layers_table.add_column("bound", justify="right")
    header(layers_table)
    for name in names:
        first = next(rows[name] for rows in by_name if name in rows)
        bounds = "/".join(dict.fromkeys(str(rows[name]["rank_bound"]) for rows in by_name if name in rows))
        cells = [name[len(prefix):], f"{first['shape'][0]}×{first['shape'][1]}", bounds]
        for rows in by_name:
            row = rows.get(name, {})
            cells += [_format(row.get(key), key) for key, _ in columns]
        layers_table.add_row(*cells)
    console.print(layers_table)

    for section, title in (("by_module", "module type"), ("by_depth", "depth")):
        table = Table(title=f"mean per {title}")
        table.add_column(title)
        table.add_column("layers", justify="right")
        header(table)
        groups = list(dict.fromkeys(key for report in reports for key in report.summary[section]))
        for group in groups:
            counts = "/".join(dict.fromkeys(str(r.summary[section].get(group, {}).get("layers", 0)) for r in reports))
            cells = [group, counts]
            for report in reports:
                stats = report.summary[section].get(group, {})
                cells += [_format(stats.get(f"mean_{key}"), key) for key, _ in columns]
            table.add_row(*cells)
        console.print(table)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(
            "--plot needs matplotlib; install it with `pip install matplotlib` (or `pip install 'lrft[plot]'`)"
        ) from None


def plot_spectra(reports: Sequence[AdapterReport], path: Path | str) -> None:
    """One panel per module type: the singular values of ΔW (mean over that type's layers, log scale),
    one line per adapter."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    labels = _labels(reports)
    types = _module_order({module_type(s.name) for report in reports for s in report.spectra})
    columns = min(4, len(types))
    rows = math.ceil(len(types) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, kind in zip(axes, types):
        for report, label in zip(reports, labels):
            spectra = [s.sigma for s in report.spectra if module_type(s.name) == kind]
            if not spectra:
                continue
            length = max(s.numel() for s in spectra)
            padded = torch.zeros(len(spectra), length, dtype=torch.float64)
            for i, s in enumerate(spectra):
                padded[i, : s.numel()] = s
            mean = padded.mean(0)
            positive = mean > 0
            index = torch.arange(1, length + 1)[positive]
            ax.plot(index.numpy(), mean[positive].numpy(), label=label, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title(kind)
        ax.set_xlabel("index i")
        ax.set_ylabel("σ_i of ΔW (mean over layers)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(types):]:
        ax.set_visible(False)
    if reports:
        axes[0].legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_bytes_atomic(path, buffer.getvalue())
