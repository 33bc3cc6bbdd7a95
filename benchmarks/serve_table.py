"""docs/deploy.md's measured table: a trained adapter exported by ``lrft merge --format lora`` at several ranks,
each export checked as ``--check`` does (PEFT on the base as trained, against the adapter itself).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m lrft train recipes/demo.yaml --output-dir /tmp/serve-demo --overwrite
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/serve_table.py /tmp/serve-demo/adapter

writes benchmarks/results/serve-table.json and rewrites the table between its markers in docs/deploy.md
(``--table-only`` rewrites it from that file). The adapter itself is measured once and compared with every
export (what ``--check`` measures each time), and so is the base alone (rank 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # lrft from this checkout; the sibling scripts

from docs_section import write_section  # noqa: E402
from memory import machine  # noqa: E402

PAGE = ROOT / "docs" / "deploy.md"
RESULTS = ROOT / "benchmarks" / "results" / "serve-table.json"
BEGIN, END = "<!-- serve-table: begin (benchmarks/serve_table.py) -->", "<!-- serve-table: end -->"
RANKS = (8, 16, 64, 256)


def base_alone(folder, options, reference) -> dict:
    """The base model without the adapter, measured as an export would be: what the adapter adds at all."""
    from lrft.lora_export import Measured, compare_measured
    from lrft.model import default_device, load_base_model, load_tokenizer

    device = default_device()
    model = load_base_model(folder.model, folder.quantization, device)
    return compare_measured(reference, Measured.of(model, load_tokenizer(folder.base_name), options, device))


def measure(adapter: Path, ranks, limit: int) -> dict:
    from lrft.adapter_folder import AdapterFolder
    from lrft.lora_export import CheckOptions, RankRule, export_lora, measure_adapter

    folder = AdapterFolder.read(adapter)
    options = CheckOptions(limit=limit)
    reference = measure_adapter(folder, options)
    rows = {"0": {"check": base_alone(folder, options, reference), "file_bytes": 0}}
    with tempfile.TemporaryDirectory() as scratch:
        for rank in ranks:
            started = time.time()
            report = export_lora(folder, Path(scratch) / f"r{rank}", RankRule(rank=rank), folder.dtypes.load, options, reference)
            rows[str(rank)] = {**report, "wall_s": round(time.time() - started, 1)}
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "adapter": str(adapter),
        "adapter_config": json.loads((adapter / "adapter_config.json").read_text())["adapter"],
        "check_limit": limit, "accuracy_adapter": reference.accuracy, "rows": rows,
    }


def table(result: dict) -> str:
    m = result["machine"]
    config = result["adapter_config"]
    first = result["rows"][next(rank for rank in result["rows"] if rank != "0")]
    check = first["check"]
    lines = [
        f"Measured {result['date']} on {m['cpu']} ({m['cpu_cores']} cores, shared), torch {m['versions']['torch']}, "
        f"peft {m['versions']['peft']}; CPU flags: `{m['cpu_flags']}`.",
        "",
        f"Adapter: `{config['type']}` r = {config['r']}, alpha = {config['alpha']}, on {', '.join(config['target_modules'])} "
        f"of {check['base_model']} ({check['quantization_bits']}-bit nf4), as `recipes/demo.yaml` trains it. Check: "
        f"{check['examples']} commonsense dev examples ({check['limit']} per task, label likelihood; the adapter scores "
        f"{result['accuracy_adapter']:.4f}) and {check['prompts']} fixed prompts (logits up to {check['max_abs_logit']:.3g}), "
        "the export through PEFT against the adapter through lrft, both on the 4-bit base; rank 0 is the base "
        "alone, without any adapter. File: adapter_model.safetensors in "
        f"{first['dtype']} (bfloat16 halves it). Every layer is decomposed through its factors "
        f"({', '.join(f'{n} {how}' for how, n in first['decomposition'].items())}).",
        "",
        "| --rank | ‖ΔW‖² kept: q | v | down | all | max \\|Δlogit\\| | mean KL | accuracy change | predictions changed | file (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, row in result["rows"].items():
        shares = row.get("energy_by_module", {})
        check = row["check"]
        kept = " | ".join(f"{shares[k]['energy_kept']:.3f}" if k in shares else "0" for k in ("q", "v", "down", "all"))
        lines.append(
            f"| {rank} | {kept} | {check['max_abs_logit_diff']:.3g} | {check['mean_kl']:.3g} | "
            f"{check['accuracy_change']:+.4f} | {check['predictions_changed']} of {check['examples']} | "
            f"{row['file_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path, nargs="?", help="the demo run's adapter folder (RUN_DIR/adapter)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--limit", type=int, default=20, help="dev examples per task")
    parser.add_argument("--table-only", action="store_true", help=f"rewrite the table from {RESULTS.name}, measuring nothing")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads(RESULTS.read_text())
    else:
        result = measure(args.adapter, [int(r) for r in args.ranks.split(",")], args.limit)
        RESULTS.write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_section(BEGIN, END, "Measured: the demo RandLoRA adapter as a LoRA", table(result), page=PAGE)
    print(table(result))


if __name__ == "__main__":
    main()
