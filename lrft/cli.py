"""The ``lrft`` command line: parse arguments, then call one function per command.

Every command turns a :class:`~lrft.errors.UserError` into one line on stderr and exit code 2;
``--debug`` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from .errors import TrainingDiverged, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune LLMs on frozen 4/8-bit bases with research-grade adapters; merge them; measure what they learned.",
)

_DEBUG = False
KEEP_QUANTIZED = "run the adapter as trained instead of folding ΔW in once (slower: its training-time path on every token)"


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)"),
    set_: List[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set training.max_steps=3 (repeatable)"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="shortcut for --set output_dir=DIR"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="shortcut for --set training.max_steps=N"),
    dry_run: bool = typer.Option(False, "--dry-run", help="build the model on the meta device and print the plan"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint in the output dir"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing non-empty output dir"),
    extend_schedule: bool = typer.Option(
        False, "--extend-schedule",
        help="with --resume: accept a larger training.max_steps / epochs; the learning-rate schedule is recomputed "
        "for the new length (recorded in run.json)",
    ),
) -> None:
    """Train an adapter from a recipe."""
    from .recipe import load_recipe

    overrides = list(set_)
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    if max_steps is not None:
        overrides.append(f"training.max_steps={max_steps}")
    spec = load_recipe(recipe, overrides)
    if dry_run:
        from .plan import dry_run as run_dry

        run_dry(spec)
        return
    from .train import train as run_train

    run_train(spec, resume=resume, overwrite=overwrite, extend_schedule=extend_schedule)


class EvalMode(str, Enum):
    generate = "generate"
    loglik = "loglik"


@app.command("eval")
def eval_(
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="RUN_DIR/adapter: evaluate base + adapter"),
    model: Optional[str] = typer.Option(None, "--model", help="a model folder, hub id, .gguf or alias (e.g. a merged model)"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="folder of <task>.json(l) or <task>/test.json; with --loss, a training-format file; "
        "with --harness, the folder lrft's own lrft_ tasks read"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated task names (default: every task found)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="first N examples per task (per file with --loss)"),
    mode: EvalMode = typer.Option(EvalMode.generate, "--mode", help="generate = the published protocol; loglik = label likelihood (cheaper; its own numbers)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    output: Optional[Path] = typer.Option(None, "--output", help="write results JSON here"),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="write one JSON line per example here (for --compare)"),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="4, 8 or none (default: the adapter's; none with --model)"),
    loss: bool = typer.Option(False, "--loss", help="report token loss / perplexity on --data, over every token and over the answer only"),
    keep_quantized: bool = typer.Option(False, "--keep-quantized", help=KEEP_QUANTIZED),
    harness: Optional[str] = typer.Option(
        None, "--harness", help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,hellaswag or lrft_commonsense); "
        "needs the harness extra"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="with --harness: a folder of your own lm-eval task files"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="with --harness: few-shot examples per prompt (default: each task's)"),
    apply_chat_template: bool = typer.Option(
        False, "--apply-chat-template", help="with --harness: render each prompt as a user turn with the model's chat template"),
    data_format: Optional[str] = typer.Option(None, "--format", help="with --loss: the data format (default: from the records' fields)"),
    cutoff_len: int = typer.Option(256, "--cutoff-len", help="with --loss: tokens kept per example, as data.cutoff_len"),
    compare: Optional[Tuple[Path, Path]] = typer.Option(
        None, "--compare", help="A.jsonl B.jsonl: paired bootstrap of two --predictions files of the same examples (loads no model)"),
) -> None:
    """Evaluate on the commonsense-8 benchmark, lm-eval tasks (--harness) or token loss (--loss); compare two runs (--compare)."""
    if compare is not None and compare[0] is not None:
        from .compare import run_compare

        if adapter is not None or model is not None or data is not None:
            raise UserError("--compare reads two --predictions files and loads no model; leave out --adapter, --model and --data")
        run_compare(compare[0], compare[1], output)
        return
    from .evaluate import run_eval

    run_eval(
        adapter=adapter, model=model, data=data, tasks=tasks, limit=limit, mode=mode.value, batch_size=batch_size,
        output=output, predictions=predictions, quantization=quantization, loss=loss, keep_quantized=keep_quantized,
        harness=harness, include_path=include_path, num_fewshot=num_fewshot, data_format=data_format, cutoff_len=cutoff_len,
        apply_chat_template=apply_chat_template,
    )


@app.command()
def generate(
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="ADAPTER_DIR: generate with base + adapter"),
    model: Optional[str] = typer.Option(None, "--model", help="a model folder, hub id, .gguf or alias (e.g. a merged model)"),
    prompt: List[str] = typer.Option([], "--prompt", help="a prompt (repeatable); streamed to the terminal when there is one"),
    input_path: Optional[Path] = typer.Option(None, "--input", help="JSON lines of {prompt} or {messages} records"),
    output: Optional[Path] = typer.Option(None, "--output", help="write one JSON line per prompt here"),
    chat: bool = typer.Option(False, "--chat", help="render each --prompt as a user turn with the chat template"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size", help="prompts per generate call with --input"),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="4, 8 or none (default: the adapter's; none with --model)"),
    keep_quantized: bool = typer.Option(False, "--keep-quantized", help=KEEP_QUANTIZED),
) -> None:
    """Generate text from prompts or conversations (greedy by default)."""
    from .inference import Sampling, load_for_inference, run_generate

    if bool(prompt) == (input_path is not None):
        raise UserError("give --prompt TEXT (repeatable) or --input FILE.jsonl, one of the two")
    if input_path is not None and not input_path.is_file():
        raise UserError(f"--input {input_path} does not exist; give a JSON-lines file of {{prompt}} or {{messages}} records")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    sampling.check()
    loaded = load_for_inference(adapter, model, quantization, keep_quantized)
    if loaded.note:
        print(loaded.note, file=sys.stderr)
    run_generate(loaded, prompt, input_path, output, sampling, batch_size, chat)


@app.command("chat")
def chat_(
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="ADAPTER_DIR: chat with base + adapter"),
    model: Optional[str] = typer.Option(None, "--model", help="a chat model folder, hub id, .gguf or alias (e.g. a merged model)"),
    system: Optional[str] = typer.Option(None, "--system", help="a system prompt"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="4, 8 or none (default: the adapter's; none with --model)"),
    keep_quantized: bool = typer.Option(False, "--keep-quantized", help=KEEP_QUANTIZED),
) -> None:
    """Chat in the terminal (or through a pipe): /reset, /system TEXT, /exit, Ctrl+D."""
    from .inference import Sampling, load_for_inference, require_chat_template, run_chat

    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    sampling.check()
    loaded = load_for_inference(adapter, model, quantization, keep_quantized)
    require_chat_template(loaded)
    if loaded.note:
        print(loaded.note, file=sys.stderr)
    run_chat(loaded, sampling, system)


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="one or more training run folders (RUN_DIR)"),
    output: Optional[Path] = typer.Option(
        None, "--output", help="the PNG (default: RUN_DIR/report.png for one run, ./report-compare.png for several)"
    ),
) -> None:
    """How runs went: a summary table and a picture of loss, validation loss, lr, tokens/s and memory."""
    from .report import run_report

    run_report(run_dirs, output=output)


@app.command()
def merge(
    adapter_dir: Path = typer.Argument(..., help="RUN_DIR/adapter"),
    output: Path = typer.Option(..., "--output", help="folder for the merged model (or PEFT adapter)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the dtype the base was trained in: float32 on CPU, bfloat16 on GPU), bfloat16, float16 or float32"),
    base: str = typer.Option("dequantized", "--base", help="dequantized (what the adapter saw) or original"),
    requantize: str = typer.Option("none", "--requantize", help="none, nf4 or int8"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the base+adapter vs merged comparison"),
    format_: str = typer.Option(
        "hf", "--format",
        help="hf (merged model), peft (the adapter in PEFT's format) or lora (ΔW truncated by SVD to a plain PEFT LoRA "
        "that serving engines load; needs --rank or --energy)",
    ),
    rank: Optional[int] = typer.Option(None, "--rank", help="--format lora: rank K of every layer (layers narrower keep all of ΔW)"),
    energy: Optional[float] = typer.Option(
        None, "--energy",
        help="--format lora: per layer the smallest rank keeping this share of ‖ΔW‖², rounded up to a rank vLLM "
        "accepts (with --rank K: at most K)",
    ),
    check: bool = typer.Option(
        False, "--check", help="--format lora: load the export with PEFT on the base as trained and report max |Δlogit| "
        "and the loglik accuracy change against the adapter (needs peft)",
    ),
    check_data: Optional[Path] = typer.Option(None, "--check-data", help="--check's commonsense dev data (default: the shipped dev subsets)"),
    check_limit: Optional[int] = typer.Option(None, "--check-limit", help="--check: first N examples per task (default 20)"),
) -> None:
    """Fold the adapter into the weights and write a plain Hugging Face model (or export the adapter)."""
    from .merge import run_merge

    checking = None
    if check:
        from .lora_export import CheckOptions

        given = {"data": check_data, "limit": check_limit}
        checking = CheckOptions(**{key: value for key, value in given.items() if value is not None})
    elif check_data is not None or check_limit is not None:
        raise UserError("--check-data and --check-limit apply with --check; add --check or drop them")
    run_merge(
        adapter_dir, output, dtype=dtype, base=base, requantize=requantize, verify=not no_verify, fmt=format_,
        rank=rank, energy=energy, check=checking,
    )


@app.command("inspect-rank")
def inspect_rank(
    adapter_dir: Path = typer.Argument(..., help="an lrft adapter folder or a PEFT adapter folder"),
    compare: List[Path] = typer.Option([], "--compare", help="more adapter folders to compare side by side"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write per-layer figures as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of singular-value spectra (needs matplotlib)"),
    tol: Optional[float] = typer.Option(None, "--tol", help="relative tolerance for the numerical rank"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    layers: Optional[str] = typer.Option(None, "--layers", help="regex selecting layer names"),
    per_layer: bool = typer.Option(False, "--per-layer", help="also print the per-layer and per-depth tables"),
) -> None:
    """Intrinsic rank, spectrum and orthogonality of trained adapters."""
    from .inspect_rank import run_inspect_rank

    run_inspect_rank(
        adapter_dir, compare=compare, json_out=json_out, plot=plot, tol=tol, device=device, layers=layers, per_layer=per_layer,
    )


def main(argv: Optional[list[str]] = None) -> None:
    global _DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in args
    if _DEBUG:
        args.remove("--debug")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv is None and args[:1] == ["train"]:  # the program itself, not a test calling main(argv)
        from .heap import restart_with_huge_pages

        restart_with_huge_pages()
    try:
        if args and args[0] in ("train", "eval", "merge", "inspect-rank", "generate", "chat"):
            from .model import quiet_libraries

            quiet_libraries()
        app(args=args, prog_name="lrft")
    except UserError as exc:
        if _DEBUG:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))  # merge's VerificationFailed exits 1
    except TrainingDiverged as exc:
        if _DEBUG:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
