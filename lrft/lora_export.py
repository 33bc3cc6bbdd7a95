"""``lrft merge --format lora``: any adapter's ΔW as a plain LoRA, the one adapter form serving engines load.

Every layer's ΔW, as the adapter defines it (float32), is decomposed in float64 on the CPU:

* through its factors when it has some (``AdapterLayer.factors()``, ΔW = L·R with inner dimension k: LoRA,
  RM-LoRA, AdaLoRA, LoRA², VeRA, NoLA, and RandLoRA's B·M with k = n·r): thin QRs of L and Rᵀ and an SVD of
  their min(m, k) × min(n, k) core (:func:`lrft.diagnostics.factored_svd`); the m × n matrix is never formed;
* formed and decomposed by a dense SVD where ΔW is no fixed product (DoRA, whose magnitude rescales every
  row of W + BA: ΔW relative to the base weight it was trained on, dequantized when that was quantized).

How many singular values each layer keeps (:class:`RankRule`):

* ``--rank K``: min(K, the singular values its structure has, min(out, in, k)), so a layer whose ΔW has
  rank ≤ K (LoRA or RM-LoRA with r ≤ K, NoLA, LoRA²) is exported exactly. Every layer is then padded with
  zeros to the largest of these ranks: one rank in the whole folder, so every engine computes the same
  ΔW (llama.cpp divides lora_alpha by each tensor's own rank, vLLM by the config's r). A K above min(out, in)
  of every adapted layer is refused; a layer narrower than K keeps its full ΔW.
* ``--energy E``: per layer the smallest rank keeping at least E of ‖ΔW‖²_F, rounded up to the next rank
  vLLM accepts (:data:`VLLM_RANKS`), at most what its structure has, and at most K with ``--rank K`` (512,
  vLLM's largest, otherwise: a layer that needs more keeps less than E, with a warning). The ranks differ
  between layers, which ``rank_pattern`` records (:func:`lrft.peft_format.plain_lora`).

B = U_k √S_k and A = √S_k V_kᵀ share the singular values evenly, so neither factor is much larger than the
other when an engine stores them in 16 bits; lora_alpha = r makes the scaling 1. The folder holds PEFT's
``adapter_config.json`` and ``adapter_model.safetensors`` (``PeftModel.from_pretrained`` loads it without lrft),
``lrft_export.json`` (ranks, the share of ‖ΔW‖² kept per layer and per module type, the base model and the
quantization the adapter was trained on, ``--check``'s figures) and a ``README.md`` saying the same.
ΔW does not depend on the base (DoRA aside), so the export serves on the base checkpoint in any precision;
the adapter learned it on the base it was trained on, quantized or not, which is the one ``--check`` uses.

``--check`` loads the export with PEFT on that base, quantized as in training, and compares it with the
adapter itself (lrft's layers): max |Δlogit| and mean KL on the fixed prompts of merge's verification, and
label-likelihood accuracy on the commonsense dev data, with the number of predictions that changed.
"""

from __future__ import annotations

import gc
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from . import __version__
from .adapter_folder import AdapterFolder
from .diagnostics import factored_svd, module_order, module_type
from .errors import UserError
from .io import atomic_dir, write_json_atomic, write_text_atomic
from .model import default_device, dtype_name, load_base_model, load_tokenizer

# the ranks vLLM accepts for --max-lora-rank (an adapter's rank may be anything up to it)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_CHECK_DATA = Path(__file__).resolve().parent / "samples" / "commonsense" / "dev"
DEFAULT_CHECK_LIMIT = 20
METADATA_NAME = "lrft_export.json"


def _say(message: str) -> None:
    print(message, flush=True)


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- how many singular values a layer keeps ---------------------------------------------------------------


def energy_rank(sigma: Tensor, energy: float) -> int:
    """The smallest k whose first k singular values hold at least ``energy`` of Σσ² (1 for a zero ΔW)."""
    squares = sigma.double() ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    shares = squares.cumsum(0) / total
    # a share equal to the target up to rounding counts as reaching it
    return min(int((shares < energy - 1e-12).sum()) + 1, sigma.numel())


def vllm_rank_at_least(rank: int) -> Optional[int]:
    """The smallest rank vLLM accepts that is at least ``rank``; None above 512."""
    return next((allowed for allowed in VLLM_RANKS if allowed >= rank), None)


@dataclass(frozen=True)
class RankRule:
    """``--rank K``, ``--energy E``, or both (E per layer, at most K)."""

    rank: Optional[int] = None
    energy: Optional[float] = None

    def check(self, layer_shapes: dict[str, tuple[int, int]]) -> None:
        if self.rank is None and self.energy is None:
            raise UserError("--format lora needs --rank K or --energy E (e.g. --rank 16, or --energy 0.9)")
        if self.rank is not None and self.rank < 1:
            raise UserError(f"--rank {self.rank} must be at least 1")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UserError(f"--energy {self.energy:g} is a share of ‖ΔW‖²; give a number in (0, 1], e.g. 0.9")
        widest = max(min(shape) for shape in layer_shapes.values())
        if self.rank is not None and self.rank > widest:
            raise UserError(
                f"--rank {self.rank} is above min(out, in) of every adapted layer (at most {widest}); "
                f"choose --rank {widest} or less"
            )

    def layer_rank(self, sigma: Tensor) -> int:
        """The rank of one layer whose ΔW has the singular values ``sigma`` (all its structure has)."""
        available = sigma.numel()
        if self.energy is None:
            return min(self.rank, available)
        cap = self.rank if self.rank is not None else VLLM_RANKS[-1]
        needed = energy_rank(sigma, self.energy)
        return min(vllm_rank_at_least(needed) or needed, available, cap)

    def describe(self) -> str:
        if self.energy is None:
            return f"rank {self.rank}"
        return f"energy {self.energy:g}" + (f", rank at most {self.rank}" if self.rank is not None else "")


# --- one layer ---------------------------------------------------------------------------------------------


@dataclass
class ExportedLayer:
    """One layer's truncated ΔW = B·A (float32, ΔW's own precision) and every singular value ΔW has (float64)."""

    name: str
    B: Tensor  # (out, k)
    A: Tensor  # (k, in)
    sigma: Tensor  # descending, as many as the layer's structure allows
    method: str  # factored | dense

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def energy(self) -> float:
        return float((self.sigma**2).sum())

    @property
    def kept(self) -> float:
        return float((self.sigma[: self.rank] ** 2).sum())

    def padded(self, rank: int) -> tuple[Tensor, Tensor]:
        """(B, A) with zero columns / rows added up to ``rank``: the same ΔW at the folder's one rank."""
        extra = rank - self.rank
        return torch.nn.functional.pad(self.B, (0, extra)), torch.nn.functional.pad(self.A, (0, 0, 0, extra))


def decompose(layer) -> tuple[Tensor, Tensor, Tensor, str]:
    """Thin SVD (U, S, Vh) of one adapter layer's ΔW, float64 on the CPU, and how it was obtained."""
    with torch.no_grad():
        factors = layer.factors()
        if factors is not None:
            left, right = (t.detach().to("cpu", torch.float64) for t in factors)
            return (*factored_svd(left, right), "factored")
        dense = layer.delta_weight().detach().to("cpu", torch.float64)
    return (*torch.linalg.svd(dense, full_matrices=False), "dense")


def truncate(name: str, layer, rule: RankRule) -> ExportedLayer:
    U, sigma, Vh, method = decompose(layer)
    rank = rule.layer_rank(sigma)
    root = sigma[:rank].sqrt()
    B, A = U[:, :rank] * root, root.unsqueeze(1) * Vh[:rank]
    return ExportedLayer(name, B.float(), A.float(), sigma, method)


def _share(kept: float, total: float) -> float:
    return kept / total if total > 0 else 1.0


def energy_by_module(layers: list[ExportedLayer]) -> dict[str, dict[str, Any]]:
    """Per module type (q, k, v, …, and ``all``): layers, the ranks they got, and the share of Σ‖ΔW‖² kept."""
    groups: dict[str, list[ExportedLayer]] = defaultdict(list)
    for layer in layers:
        groups[module_type(layer.name)].append(layer)
    summary = {}
    for kind, members in [*((k, groups[k]) for k in module_order(groups)), ("all", layers)]:
        ranks = [layer.rank for layer in members]
        summary[kind] = {
            "layers": len(members), "rank_min": min(ranks), "rank_max": max(ranks),
            "energy_kept": _share(sum(layer.kept for layer in members), sum(layer.energy for layer in members)),
        }
    return summary


def _rank_text(entry: dict[str, Any]) -> str:
    low, high = entry["rank_min"], entry["rank_max"]
    return str(high) if low == high else f"{low}-{high}"


def energy_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The per-module-type table, as Markdown rows (printed and written to the README)."""
    rows = ["| module | layers | rank kept | share of ‖ΔW‖² kept |", "|---|---:|---:|---:|"]
    for kind, entry in summary.items():
        rows.append(f"| {kind} | {entry['layers']} | {_rank_text(entry)} | {entry['energy_kept']:.4f} |")
    return rows


# --- the command -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckOptions:
    data: Path = DEFAULT_CHECK_DATA
    limit: Optional[int] = DEFAULT_CHECK_LIMIT

    def validate(self) -> None:
        """Fail on bad --check options before any work: peft installed, data readable, limit positive."""
        from .evaluate import find_task_files, select_tasks

        try:
            import peft  # noqa: F401
        except ImportError:
            raise UserError("--check loads the export with PEFT, which is not installed: pip install peft (or drop --check)") from None
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--check-limit {self.limit} must be at least 1")
        select_tasks(find_task_files(self.data), None, self.data)


def serving_factors(layers: list[ExportedLayer], rule: RankRule, dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
    """Each layer's (B, A) as written: at one rank for --rank (zero-padded), at its own for --energy."""
    if rule.energy is None:
        top = max(layer.rank for layer in layers)
        return {layer.name: tuple(t.to(dtype) for t in layer.padded(top)) for layer in layers}
    return {layer.name: (layer.B.to(dtype), layer.A.to(dtype)) for layer in layers}


def export_lora(folder: AdapterFolder, output: Path, rule: RankRule, dtype: torch.dtype,
                check: Optional[CheckOptions] = None, reference: Optional["Measured"] = None) -> dict[str, Any]:
    """Write ``folder``'s ΔW as a plain PEFT LoRA into ``output`` (module docstring); returns lrft_export.json.
    ``reference``: the adapter already measured for ``check`` (several exports of one adapter)."""
    from .peft_format import plain_lora, write_peft_files

    rule.check(folder.layer_shapes)
    if check is not None:
        check.validate()
    started = time.time()
    _say(f"exporting {folder.config.type} adapter ({len(folder.layer_shapes)} layers) as a LoRA, {rule.describe()} -> {output}")
    layers, note = folder.layers_for_delta()
    if note:
        _say(note)
    exported = [truncate(name, layers[name], rule) for name in folder.layer_shapes]
    del layers
    decomposed_in = time.time() - started
    _warn_capped(exported, rule)
    peft_config, tensors = plain_lora(folder, serving_factors(exported, rule, dtype))
    report = _report(folder, exported, rule, dtype, peft_config)
    report["decomposition_seconds"] = round(decomposed_in, 2)
    for row in energy_table(report["energy_by_module"]):
        _say(row)
    with atomic_dir(output) as tmp:
        write_peft_files(tmp, peft_config, tensors)
        report["file_bytes"] = sum(path.stat().st_size for path in tmp.iterdir())
        if check is not None:
            report["check"] = check_export(folder, tmp, check, reference)
        report["seconds"] = round(time.time() - started, 2)
        write_json_atomic(tmp / METADATA_NAME, report)
        write_text_atomic(tmp / "README.md", model_card(report))
    served = report["vllm_max_lora_rank"]
    where = f"vLLM --max-lora-rank {served}" if served else "rank above 512: vLLM cannot load it"
    _say(f"wrote {output}: LoRA r={report['r']} ({report['file_bytes'] / 2**20:.1f} MB, {where}) in {report['seconds']:.1f} s")
    return report


def _warn_capped(layers: list[ExportedLayer], rule: RankRule) -> None:
    if rule.energy is None:
        return
    short = [layer for layer in layers if _share(layer.kept, layer.energy) < rule.energy - 1e-12]
    if short:
        cap = rule.rank if rule.rank is not None else VLLM_RANKS[-1]
        worst = min(short, key=lambda layer: _share(layer.kept, layer.energy))
        _warn(
            f"{len(short)} layers need more than rank {cap} to keep {rule.energy:g} of ‖ΔW‖² and keep less "
            f"(least: {worst.name}, {_share(worst.kept, worst.energy):.3f})"
        )


def _report(folder: AdapterFolder, layers: list[ExportedLayer], rule: RankRule, dtype, peft_config) -> dict[str, Any]:
    top = peft_config["r"]
    methods = [layer.method for layer in layers]
    return {
        "format": "lora",
        "lrft_version": __version__,
        "adapter": str(folder.path),
        "adapter_format": folder.format,
        "adapter_type": folder.config.type,
        "base_model": peft_config["base_model_name_or_path"],
        "trained_on": {"quantization_bits": folder.quantization.bits, "dtypes": folder.dtypes.as_json()},
        "rank_rule": {"rank": rule.rank, "energy": rule.energy},
        "dtype": dtype_name(dtype),
        "r": top,
        "rank_pattern": bool(peft_config["rank_pattern"]),
        "vllm_max_lora_rank": vllm_rank_at_least(top),
        "exact_layers": sum(layer.rank >= layer.sigma.numel() for layer in layers),
        "decomposition": {how: methods.count(how) for how in ("factored", "dense") if how in methods},
        "energy_by_module": energy_by_module(layers),
        "layers": {
            layer.name: {"rank": layer.rank, "singular_values": layer.sigma.numel(),
                         "energy_kept": _share(layer.kept, layer.energy), "method": layer.method}
            for layer in layers
        },
    }


# --- --check ------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """What --check measures of one model: logits on the fixed prompts, mean label-likelihood accuracy, and
    one prediction record per example."""

    logits: list[Tensor]
    accuracy: float
    rows: list[dict]

    @classmethod
    def of(cls, model, tokenizer, options: CheckOptions, device) -> "Measured":
        from .evaluate import evaluate_model
        from .merge import prompt_logits, verify_prompt_ids

        logits = prompt_logits(model, verify_prompt_ids(tokenizer), device)
        rows: list[dict] = []
        results = evaluate_model(model, tokenizer, options.data, limit=options.limit, mode="loglik", predictions=rows)
        return cls(logits, results["mean_accuracy"], rows)


def measure_adapter(folder: AdapterFolder, options: CheckOptions) -> Measured:
    """The adapter itself (lrft's layers) on its base as trained."""
    bits = folder.quantization.bits
    _say(f"check on {folder.base_name}" + (f", {bits}-bit as trained" if bits else "") + ": the adapter (lrft) ...")
    device = default_device()
    model, _ = folder.load_model(device)
    measured = Measured.of(model, load_tokenizer(folder.base_name), options, device)
    del model
    gc.collect()
    return measured


def check_export(folder: AdapterFolder, export_dir: Path, options: CheckOptions,
                 reference: Optional[Measured] = None) -> dict[str, Any]:
    """The export loaded by PEFT against the adapter (``reference``, measured here unless given), both on the
    base as trained (module docstring)."""
    from peft import PeftModel

    reference = reference or measure_adapter(folder, options)
    _say("check: the export (PEFT) ...")
    device = default_device()
    model = PeftModel.from_pretrained(load_base_model(folder.model, folder.quantization, device), str(export_dir)).eval()
    exported = Measured.of(model, load_tokenizer(folder.base_name), options, device)
    del model
    gc.collect()
    result = {
        "base_model": folder.base_name, "quantization_bits": folder.quantization.bits, "device": str(device),
        "data": str(options.data), "limit": options.limit, **compare_measured(reference, exported),
    }
    _say(
        f"check: max |Δlogit| = {result['max_abs_logit_diff']:.4g} (logits up to {result['max_abs_logit']:.3g}), "
        f"mean KL = {result['mean_kl']:.3g}; loglik accuracy {reference.accuracy:.4f} -> {exported.accuracy:.4f} "
        f"({result['accuracy_change']:+.4f}), {result['predictions_changed']} of {result['examples']} predictions changed"
    )
    return result


def compare_measured(reference: Measured, other: Measured) -> dict[str, Any]:
    """--check's figures of ``other`` against ``reference`` (the adapter)."""
    from .merge import compare_logits

    changed = sum(a["prediction"] != b["prediction"] for a, b in zip(reference.rows, other.rows))
    return {
        "prompts": len(reference.logits), **compare_logits(reference.logits, other.logits),
        "examples": len(reference.rows), "accuracy_adapter": reference.accuracy, "accuracy_export": other.accuracy,
        "accuracy_change": other.accuracy - reference.accuracy, "predictions_changed": changed,
    }


# --- README.md ------------------------------------------------------------------------------------------------


def model_card(report: dict[str, Any]) -> str:
    """The export's README.md: what it is, how to load it, what it keeps of ΔW, and --check's figures."""
    bits = report["trained_on"]["quantization_bits"]
    rank_note = ", per-layer ranks in `rank_pattern` / `alpha_pattern`" if report["rank_pattern"] else ""
    served = report["vllm_max_lora_rank"]
    lines = [
        "---", f"base_model: {json.dumps(report['base_model'])}", "library_name: peft", "tags: [lora, lrft]", "---", "",
        f"# LoRA export of a {report['adapter_type']} adapter", "",
        f"Written by `lrft merge --format lora` (lrft {report['lrft_version']}) from `{report['adapter']}`: every "
        f"adapted layer's ΔW truncated by SVD ({RankRule(**report['rank_rule']).describe()}) to a plain LoRA, "
        f"r = {report['r']}, lora_alpha = r (scaling 1){rank_note}, stored in {report['dtype']}. The adapter was "
        f"trained on `{report['base_model']}`" + (f" quantized to {bits} bits." if bits else "."), "",
        "PEFT: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), THIS_FOLDER)`. "
        + (f"vLLM: `--enable-lora --max-lora-rank {served}`." if served else "Its rank is above 512: vLLM cannot load it."),
        "", "## Share of ‖ΔW‖² kept", "", *energy_table(report["energy_by_module"]), "",
        f"{report['exact_layers']} of {len(report['layers'])} layers exported exactly (every singular value kept). "
        "Per layer: lrft_export.json.",
    ]
    check = report.get("check")
    if check:
        lines += [
            "", "## Check (`--check`): this export through PEFT against the adapter through lrft", "",
            f"On `{check['base_model']}`" + (f" ({check['quantization_bits']}-bit, as trained)" if check["quantization_bits"] else "")
            + f", {check['device']}:", "",
            "| figure | value |", "|---|---:|",
            f"| max \\|Δlogit\\| ({check['prompts']} prompts; largest \\|logit\\| {check['max_abs_logit']:.3g}) | {check['max_abs_logit_diff']:.4g} |",
            f"| mean KL | {check['mean_kl']:.3g} |",
            f"| loglik accuracy, adapter | {check['accuracy_adapter']:.4f} |",
            f"| loglik accuracy, export | {check['accuracy_export']:.4f} |",
            f"| change | {check['accuracy_change']:+.4f} |",
            f"| predictions changed | {check['predictions_changed']} of {check['examples']} |",
        ]
    return "\n".join(lines) + "\n"
