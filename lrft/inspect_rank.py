"""``lrft inspect-rank``: reads lrft and PEFT adapter folders, measures every layer's ΔW with the maths of
:mod:`lrft.diagnostics`, prints tables, and writes JSON and a plot of the spectra.

Adapters are read without their base model where their ΔW allows it: an
:class:`~lrft.adapter_folder.AdapterFolder` (lrft's format or PEFT's, imported by :mod:`lrft.peft_format`)
records each layer's shape, so every layer is rebuilt around a shape-only stand-in and ΔW comes from the
layer class's own ``factors()`` / ``delta_weight()``. Layer classes whose ΔW depends on the base weight
(``needs_base_weight``: DoRA, ΔW = m ⊙ (W + BA) / ‖W + BA‖ − W) are attached to their base model as
recorded (quantization included: ΔW relative to the weight they were trained on; a PEFT adapter's base
loads unquantized). PEFT's VeRA and RandLoRA folders do not record the layers' input widths, which come
from the base model's config (a meta-device model, no weights); PEFT folders saved without their
projections (``save_projection=False``) are refused.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .adapter_folder import AdapterFolder
from .diagnostics import (
    RANK_EPS,
    InspectedLayer,
    LayerSpectrum,
    spectrum_dtype,
    module_order,
    one_thread,
    compute_spectra,
    module_type,
    spectrum_figures,
    summarize,
)
from .errors import UserError
from .io import write_bytes_atomic, write_json_atomic


# --- loading ---------------------------------------------------------------------------------------------


@dataclass
class InspectedAdapter:
    path: Path
    format: str  # "lrft" or "peft"
    type: str
    r: int  # nominal rank (LoRA family) or basis rank (random-basis family)
    layers: list[InspectedLayer]
    notes: list[str] = field(default_factory=list)


def _inspected(name: str, layer) -> InspectedLayer:
    def delta_weight(device: torch.device):
        layer.to(device)
        return layer.delta_weight().float()

    return InspectedLayer(
        name=name, out_features=layer.out_features, in_features=layer.in_features, factors=layer.factors,
        delta_weight=delta_weight, orthogonality_factors=layer.orthogonality_factors,
        rank_ceiling=layer.rank_ceiling,
    )


def load_adapter(directory: Path | str) -> InspectedAdapter:
    """An lrft or PEFT adapter folder, as layers whose ΔW can be formed or factored (on the CPU)."""
    folder = AdapterFolder.read(directory)
    layers, note = folder.layers_for_delta()
    notes = list(folder.notes) + ([note] if note else [])
    inspected = [_inspected(name, layer) for name, layer in layers.items()]
    kind = folder.config.type if folder.format == "lrft" else f"peft-{folder.config.type}"
    return InspectedAdapter(folder.path, folder.format, kind, folder.config.r, inspected, notes)


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
            "computation": {"device": str(device), "dtype": str(spectrum_dtype(device)).removeprefix("torch.")},
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
    with one_thread():  # building layers and copying their tensors in: small, memory-bound steps
        adapters = [load_adapter(path) for path in adapter_dirs]
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
    per_layer: bool = False,
) -> dict[str, Any]:
    """The ``inspect-rank`` command: tables on stdout, optionally JSON and a PNG. Returns the JSON payload."""
    if plot is not None:
        _require_matplotlib()
    reports, top_r = inspect_adapters([adapter_dir, *compare], tol=tol, device=device, layers=layers)
    torch_device = _resolve_device(device)
    payload = reports[0].as_json(top_r, tol, torch_device)
    if len(reports) > 1:
        payload["compare"] = [report.as_json(top_r, tol, torch_device) for report in reports[1:]]
    print_tables(reports, top_r, per_layer)
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
    ("rank_bound", "bound"),
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
    "bound: the most rank ΔW can have; rank: numerical rank; erank: effective rank; srank: stable rank; "
    "topR: share of ‖ΔW‖²F in the top R σ; orth: ‖ΔWΔWᵀ−I‖²F; orthA: ‖AAᵀ−I‖²F; orthB: ‖BᵀB−I‖²F"
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


def print_tables(reports: Sequence[AdapterReport], top_r: int, per_layer: bool = False) -> None:
    """The mean per module type; with ``per_layer`` also every layer and the mean per depth."""
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

    if per_layer:
        console.print(_layers_table(reports, top_r, columns, header))
    for section, title in (("by_module", "module type"), ("by_depth", "depth"))[: 2 if per_layer else 1]:
        table = Table(title=f"ΔW, mean per {title}, R = {top_r}", caption=_LEGEND if section == "by_module" else None)
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
    if not per_layer:
        console.print("[dim]every layer and the mean per depth: --per-layer (or --json FILE)[/]")


def _layers_table(reports, top_r, columns, header):
    from rich.table import Table

    by_name = [{row["name"]: row for row in report.rows} for report in reports]
    names = list(dict.fromkeys(name for rows in by_name for name in rows))
    prefix = _common_prefix(names)
    table = Table(title=f"ΔW per layer{f' ({prefix}…)' if prefix else ''}, R = {top_r}")
    table.add_column("layer", overflow="fold")
    table.add_column("shape", justify="right")
    header(table)
    for name in names:
        first = next(rows[name] for rows in by_name if name in rows)
        cells = [name[len(prefix):], f"{first['shape'][0]}×{first['shape'][1]}"]
        for rows in by_name:
            row = rows.get(name, {})
            cells += [_format(row.get(key), key) for key, _ in columns]
        table.add_row(*cells)
    return table


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
    types = module_order({module_type(s.name) for report in reports for s in report.spectra})
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
