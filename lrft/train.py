"""The training loop, top to bottom: ``setup`` (accelerator, output folder, data, model and adapter,
optimizer, the checkpoint to resume from), then for each optimizer step ``optimizer_step`` (micro-batches
with accumulation, the adapter's controller hooks, clipping, AdamW, the schedule) and ``after_step``
(metrics, validation, checkpoint, stop), and ``finish`` (the adapter, run.json, the optional evaluation).

Distributed runs (torchrun / accelerate launch, DDP or FSDP; :mod:`lrft.distributed`) use the same loop:
every process sees the same global batch order (``DataOrder``) and takes its own slice; the loss is
normalised by the number of target tokens in the whole global batch, so the gradient equals the
single-process one whatever the split. Only the main process writes files; see docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import __version__
from .adapter_folder import base_record, save_adapter
from .activations import use_swiglu
from .adapters import get_adapter
from .checkpoint import check_resume, checkpoints, planned_steps, read_checkpoint, restore_checkpoint, save_checkpoint, seed_everything
from .data import DataOrder, TokenizedData, collate, load_training_data, micro_batches, padded_tokens, target_tokens
from .distributed import agree, clip_grad_norm, fsdp_own_units, fsdp_requested_without_fsdp, is_fsdp, make_accelerator, whole_adapter
from .errors import TrainingDiverged, UserError
from .evaluate import mean_token_loss
from .heap import trim_after_each_layer, trim_heap
from .inject import count_trainable, inject_adapters, load_adapter_state_dict
from .io import atomic_dir, write_json_atomic, write_text_atomic
from .loss import summed_token_loss, use_loss_head
from .machine import library_versions, machine_info, peak_memory_mb
from .model import Dtypes, load_base_model, load_tokenizer
from .optim import lr_schedule, setup_optimizer
from .packed_attention import use_row_attention
from .recipe import Recipe, dump_recipe
from .trackers import log_metrics, start_trackers


@dataclass
class Run:
    """What a run holds from ``setup`` to ``finish``."""

    recipe: Recipe
    accelerator: Any
    console: Any
    output_dir: Path
    tokenizer: Any
    data: TokenizedData
    order: DataOrder
    total_steps: int
    model: Any  # as prepared by accelerate (DDP / FSDP wrapped when distributed)
    layers: dict  # module name -> AdapterLayer
    controller: Any
    params: list
    optimizer: Any  # accelerate's wrapper: fp16 loss scaling
    base_optimizer: torch.optim.Optimizer  # what the scheduler, the controller and checkpoints address
    scheduler: Any
    base_record: dict  # what adapter folders record about the base (lrft.adapter_folder.base_record)
    started: float  # time.time() at the start
    attention: str = "sdpa"  # the model's attention implementation: how packed rows are masked
    mask_dtype: torch.dtype = torch.float32  # of an additive (eager) attention mask
    info: dict = field(default_factory=dict)  # run.json
    step: int = 0
    best_val: Optional[float] = None
    skipped_nonfinite: int = 0

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


@dataclass
class StepResult:
    loss: Optional[float]  # None when the loss was not finite and the update was skipped
    extra_loss: float  # the controller's regularisers, per micro-batch mean
    grad_norm: Optional[float]
    lr: float
    tokens: int  # real (not padding) tokens of the global batch
    pad_fraction: float  # of the tokens the forward passes computed
    seconds: float


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, extend_schedule: bool = False) -> Path:
    run = setup(recipe, resume, overwrite, extend_schedule)
    with StopFlag() as stop, Progress(run) as progress:
        while run.step < run.total_steps:
            result = optimizer_step(run)
            stop_now = after_step(run, result, stop.requested)
            progress.update(run, result)
            if stop_now:
                run.console.print(
                    f"stopped at step {run.step}; checkpoint saved. Resume with: lrft train RECIPE --resume "
                    f"--output-dir {run.output_dir}"
                )
                run.accelerator.end_training()
                sys.exit(130)
    return finish(run)


# --- setup -------------------------------------------------------------------------------------------


def setup(recipe: Recipe, resume: bool, overwrite: bool, extend_schedule: bool) -> Run:
    from rich.console import Console

    if extend_schedule and not resume:
        raise UserError("--extend-schedule lengthens a run being resumed; add --resume")
    started = time.time()
    accelerator, mixed = make_accelerator(recipe)
    console = Console(quiet=not accelerator.is_main_process)  # one copy of every message and progress bar
    if fsdp_requested_without_fsdp(accelerator):
        console.print("[yellow]note:[/yellow] accelerate runs FSDP on GPUs only; these processes train with DDP")
    output_dir = Path(recipe.output_dir)
    resume_from = prepare_output_dir(output_dir, resume, overwrite, accelerator)
    start_trackers(accelerator, recipe, output_dir.name)

    # Data before the model: a bad data path should fail in a second, not after loading weights. Every
    # process tokenizes the whole set and follows the same global order: it needs the target-token count of
    # the whole global batch for the loss normalisation, and slices out its own examples.
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    data = load_training_data(recipe.data, tokenizer, recipe.training.seed, recipe.model.name_or_path)
    if data.skipped:
        console.print(
            f"[yellow]warning:[/yellow] {data.skipped} of {data.skipped + data.examples + len(data.val)} records have no "
            "token to learn from (masked or cut off at data.cutoff_len) and are skipped", highlight=False,
        )
    state = read_checkpoint(resume_from) if resume_from else None
    extension = check_resume(state, recipe, len(data.train), extend_schedule) if state else None
    total_steps = planned_steps(recipe.resolved(), len(data.train))

    dtypes = Dtypes.resolve(recipe.model, recipe.quantization, accelerator.device)
    model, layers, controller, n_trainable = setup_model(recipe, accelerator, dtypes, total_steps, state)
    params, optimizer, base_optimizer, scheduler = setup_optimizer(recipe, accelerator, layers, total_steps)
    lengths = [len(e["input_ids"]) for e in data.train] if recipe.data.group_by_length else None
    run = Run(
        recipe, accelerator, console, output_dir, tokenizer, data,
        DataOrder(len(data.train), recipe.training.batch_size, recipe.training.seed, recipe.data.shuffle, lengths),
        total_steps, model, layers, controller, params, optimizer, base_optimizer, scheduler,
        base_record(recipe.model, recipe.quantization, dtypes), started=started,
        attention=accelerator.unwrap_model(model).config._attn_implementation, mask_dtype=dtypes.load,
    )
    run.info = run_info(run, mixed, dtypes, n_trainable, state, extension)
    if state is not None:
        restore_checkpoint(run, state)
        if extension:  # the schedule for the new length, at the step reached (its lr is the next step's)
            run.scheduler = lr_schedule(base_optimizer, recipe.training, total_steps, run.step)
        console.print(f"resumed from {resume_from} at step {run.step}")
    start_records(run)
    return run


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, accelerator) -> Optional[Path]:
    """Refuse an output dir that would be clobbered, replace it (--overwrite) or find the checkpoint to
    resume from (returned). Every process looks before the main process deletes or creates anything."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file; choose a folder path")
    non_empty = output_dir.is_dir() and any(output_dir.iterdir())
    if non_empty and not (resume or overwrite):
        raise UserError(
            f"output dir {output_dir} is not empty; pass --resume to continue it, --overwrite to replace it, "
            "or --output-dir NEW_DIR"
        )
    resume_from = None
    if resume:
        found = checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume: no complete checkpoint in {output_dir}/checkpoints; start without --resume")
        resume_from = found[-1][1]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite and non_empty:
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return resume_from


def setup_model(recipe: Recipe, accelerator, dtypes: Dtypes, total_steps: int, state: Optional[dict]):
    """The frozen base with the adapter injected (and its checkpointed weights loaded), wrapped by accelerate;
    the adapter's layers, its controller and its trainable parameter count (taken before FSDP, which leaves
    each process a shard)."""
    tcfg, rank = recipe.training, accelerator.process_index
    model = load_base_model(recipe.model, recipe.quantization, accelerator.device)
    # Seeded right before the adapter is built, so its init is reproducible and identical on every process
    # (shared random bases are generated from adapter.seed, not broadcast).
    seed_everything(tcfg.seed)
    layers = inject_adapters(model, recipe.adapter, dtypes.frozen)
    if rank > 0:
        # From here on the global generators only drive dropout, whose masks should differ between the
        # processes' slices of a batch (process 0 keeps the single-process stream).
        seed_everything(tcfg.seed + 1_000_003 * rank)
    controller = get_adapter(recipe.adapter.type).controller(layers, recipe.adapter, total_steps)
    if tcfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers' new name; gradient_checkpointing_enable warns and goes in v6
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    use_row_attention(model, dtypes.compute)  # micro-batches as one row of real tokens (lrft.data.collate)
    use_swiglu(model)  # the MLPs keep two intermediate-sized tensors for the backward, not three
    use_loss_head(model)
    if accelerator.device.type == "cpu":
        trim_after_each_layer(model)  # and after each micro-batch (optimizer_step): lrft/heap.py
    if state is not None:  # before FSDP shards the adapter's tensors
        load_adapter_state_dict(layers, state["adapter"], source=str(state["path"] / "adapter" / "adapter.safetensors"))
    model.train()
    if is_fsdp(accelerator):
        accelerator.state.fsdp_plugin.set_auto_wrap_policy(model)
        fsdp_own_units(accelerator, layers)
    n_trainable = count_trainable(layers)
    return accelerator.prepare(model), layers, controller, n_trainable


def run_info(run: Run, mixed: str, dtypes: Dtypes, n_trainable: int, state: Optional[dict], extension: Optional[dict]) -> dict[str, Any]:
    """What run.json records from the start (``finish`` adds the end)."""
    acc = run.accelerator
    return {
        "lrft_version": __version__,
        "versions": library_versions(),
        "machine": machine_info(),
        "seed": run.recipe.training.seed,
        "recipe_hash": run.recipe.section_hash(),
        "device": str(acc.device),
        "processes": acc.num_processes,
        "distributed": str(acc.distributed_type.value),
        "mixed_precision": mixed,
        "dtypes": dtypes.as_json(),  # what "auto" resolved to on this device
        "trainable_parameters": n_trainable,
        "adapted_modules": len(run.layers),
        "train_examples": run.data.examples,
        "packed_rows": len(run.data.train) if run.recipe.data.packing else None,
        "skipped_records": run.data.skipped,
        "val_examples": len(run.data.val),
        "total_steps": run.total_steps,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from_step": int(state["step"]) if state else None,
        "schedule_extended": extension or (state or {}).get("schedule_extended"),
    }


def start_records(run: Run) -> None:
    """recipe.yaml, run.json and metrics.jsonl (kept up to the resumed step: later records are recomputed)."""
    if not run.is_main:
        return
    write_text_atomic(run.output_dir / "recipe.yaml", dump_recipe(run.recipe))
    write_json_atomic(run.output_dir / "run.json", run.info)
    kept = []
    if run.step and run.metrics_path.exists():
        kept = [line for line in run.metrics_path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= run.step]
    run.metrics_path.write_text("".join(line + "\n" for line in kept))
    run.console.print(
        f"{run.recipe.adapter.type}: {len(run.layers)} modules, {run.info['trainable_parameters']:,} trainable parameters; "
        f"{run.data.examples} examples{f' in {len(run.data.train)} packed rows' if run.recipe.data.packing else ''}, "
        f"{run.total_steps} steps of {run.recipe.training.batch_size} on {run.accelerator.device} x{run.accelerator.num_processes}"
    )


# --- one optimizer step ------------------------------------------------------------------------------


def optimizer_step(run: Run) -> StepResult:
    """The global batch's micro-batches with gradient accumulation, then the update. A non-finite loss
    raises TrainingDiverged, or with ``training.skip_nonfinite`` skips the parameter update alone: the
    controller's hooks (which then see no gradients), the schedule and the step's bookkeeping still run."""
    started = time.time()
    acc, tcfg = run.accelerator, run.recipe.training
    world, rank = acc.num_processes, acc.process_index
    run.controller.start_step(run.step)
    examples = [run.data.train[i] for i in run.order.global_batch(run.step)]
    per_rank = tcfg.batch_size // world
    local = examples[rank * per_rank : (rank + 1) * per_rank]  # this process's contiguous slice
    n_target = max(1, target_tokens(examples))  # of the whole global batch: no collective needed
    chunks = list(micro_batches(local, tcfg.micro_batch_size))
    loss_sum, extra_sum = torch.zeros((), device=acc.device), 0.0
    for i, chunk in enumerate(chunks):
        batch = collate(chunk, run.tokenizer.pad_token_id, run.attention, run.mask_dtype)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = i == len(chunks) - 1  # gradients are all-reduced once, after the last micro-batch
        with (nullcontext() if sync or world == 1 else acc.no_sync(run.model)), acc.autocast():
            token_loss = summed_token_loss(run.model, batch)
            # DDP and FSDP average gradients over processes; scaling by `world` turns that into the sum over
            # the global batch, divided by its target tokens: the single-process gradient.
            loss = token_loss * world / n_target
            extra = run.controller.extra_loss()
            if extra is not None:  # every process adds the whole regulariser (the average keeps it once)
                loss = loss + extra / len(chunks)
                extra_sum += float(extra.detach()) / len(chunks)
        acc.backward(loss)
        loss_sum += token_loss.detach()
        if acc.device.type == "cpu":
            trim_heap()  # the micro-batch's activations are free now (lrft/heap.py)
    if world > 1:
        loss_sum = acc.reduce(loss_sum, reduction="sum")  # the logged loss is the global one
    step_loss = float(loss_sum) / n_target
    finite = math.isfinite(step_loss)  # the same on every process: they all skip or all stop
    if not finite and not tcfg.skip_nonfinite:
        raise TrainingDiverged(
            f"loss is {step_loss} at step {run.step + 1}; lower training.learning_rate, use float32/bfloat16 instead "
            f"of float16, or set training.skip_nonfinite=true (last good checkpoint kept in {run.output_dir}/checkpoints)"
        )
    if finite:
        acc.unscale_gradients()  # fp16 only: the hooks and the clipping see the true gradients
    else:
        run.optimizer.zero_grad(set_to_none=True)
        run.skipped_nonfinite += 1
    run.controller.before_optimizer_step(run.step, run.base_optimizer)
    grad_norm = clip_grad_norm(run.model, run.params, tcfg.max_grad_norm, acc) if finite and tcfg.max_grad_norm else None
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
    run.controller.after_optimizer_step(run.step, run.base_optimizer)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    tokens = sum(len(e["input_ids"]) for e in examples)  # real tokens of the global batch, as the loss
    pad_fraction = 1.0 - tokens / padded_tokens(examples, world, tcfg.micro_batch_size, run.attention)
    return StepResult(step_loss if finite else None, extra_sum, grad_norm, lr, tokens, pad_fraction, time.time() - started)


# --- after a step ---------------------------------------------------------------------------------------


def after_step(run: Run, result: StepResult, stop_requested: bool) -> bool:
    """The step's metrics record, validation when due, a checkpoint when due; True when the run must stop
    (Ctrl+C / SIGTERM on any process)."""
    acc, tcfg, step = run.accelerator, run.recipe.training, run.step
    stop_now, peak_mb = agree(acc, stop_requested, peak_memory_mb(acc.device))
    record = {
        "step": step,
        "epoch": round(run.order.epoch_of(step), 4),
        "loss": result.loss,
        "lr": result.lr,
        "tokens_per_s": result.tokens / result.seconds,
        "pad_fraction": round(result.pad_fraction, 4),
        "step_time_s": result.seconds,
        "peak_mem_mb": peak_mb,  # the largest over processes
    }
    if result.grad_norm is not None:
        record["grad_norm"] = result.grad_norm
    if result.extra_loss:
        record["extra_loss"] = result.extra_loss
    if run.skipped_nonfinite:
        record["skipped_nonfinite"] = run.skipped_nonfinite
    if run.data.val and tcfg.eval_steps and (step % tcfg.eval_steps == 0 or step == run.total_steps):
        record["val_loss"] = validation_loss(run)
        run.best_val = record["val_loss"] if run.best_val is None else min(run.best_val, record["val_loss"])
    if run.is_main and (step % tcfg.logging_steps == 0 or step == run.total_steps or "val_loss" in record):
        with open(run.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log_metrics(acc, record)
    # the last step is checkpointed too, so that a finished run can be extended (--extend-schedule)
    if (tcfg.save_steps and (step % tcfg.save_steps == 0 or step == run.total_steps)) or stop_now:
        save_checkpoint(run)
    return stop_now


def validation_loss(run: Run) -> float:
    """Mean token loss on the validation split. Every process computes the whole split (it is small, and
    under FSDP every process must take part in every forward), so all of them get the same value."""
    tcfg = run.recipe.training
    loss, _ = mean_token_loss(
        run.model, run.data.val, tcfg.micro_batch_size, run.tokenizer.pad_token_id, run.accelerator.device,
        run.accelerator.autocast,
    )
    return loss


# --- finish --------------------------------------------------------------------------------------------


def finish(run: Run) -> Path:
    """Save the adapter, complete run.json, run the recipe's evaluation; returns the adapter folder."""
    acc, recipe = run.accelerator, run.recipe
    summary = run.controller.summary()
    with whole_adapter(run.model, acc):
        if run.is_main:
            with atomic_dir(run.output_dir / "adapter") as tmp:
                save_adapter(tmp, run.layers, recipe.adapter, run.base_record, extra={"summary": summary} if summary else None)
    # The adapter is on disk before any process returns; the evaluation then runs on the main process
    # alone (the others exit instead of waiting for it in a collective that could time out).
    acc.wait_for_everyone()
    if run.is_main:
        info = dict(run.info)
        info.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(time.time() - run.started, 2),
            final_step=run.step, skipped_nonfinite=run.skipped_nonfinite, best_val_loss=run.best_val,
        )
        if recipe.eval is not None:
            from .evaluate import evaluate_model, print_results

            run.model.eval()
            rows: list[dict] = []
            results = evaluate_model(
                acc.unwrap_model(run.model), run.tokenizer, recipe.eval.data, recipe.eval.tasks, recipe.eval.limit,
                recipe.eval.mode, recipe.eval.batch_size, rows,
            )
            write_json_atomic(run.output_dir / "eval.json", results)
            # every example's result, so that two runs compare paired: lrft eval --compare A B
            write_text_atomic(run.output_dir / "eval_predictions.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
            print_results(results, run.console)
            info["eval_mean_accuracy"] = results.get("mean_accuracy")
        write_json_atomic(run.output_dir / "run.json", info)
        run.console.print(f"adapter saved to {run.output_dir / 'adapter'}")
        picture = write_report(run.output_dir)
        run.console.print(
            (f"report: {picture}; " if picture else "")
            + f"next: lrft chat --adapter {run.output_dir / 'adapter'}  |  lrft report {run.output_dir}  |  "
            f"lrft merge {run.output_dir / 'adapter'} --output MERGED_DIR", highlight=False,
        )
    acc.end_training()
    return run.output_dir / "adapter"


# --- small helpers -----------------------------------------------------------------------------------


def write_report(run_dir: Path) -> Optional[Path]:
    """RUN_DIR/report.png (when matplotlib is installed); a picture that cannot be drawn never fails a run."""
    from .report import write_run_report

    try:
        return write_run_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run itself is done and saved
        print(f"warning: no report.png ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


class StopFlag:
    """Ctrl+C / SIGTERM: finish the current step, save a checkpoint, exit 130."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl+C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Progress:
    """The progress bar (main process only): step, loss, lr and tokens/s."""

    def __init__(self, run: Run):
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=run.console, disable=not run.is_main,
        )
        self.task = self.bar.add_task("train", total=run.total_steps, completed=run.step, info="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, run: Run, result: StepResult) -> None:
        loss = "skipped (non-finite)" if result.loss is None else f"{result.loss:.4f}"
        info = f"loss {loss}  lr {result.lr:.2e}  {result.tokens / result.seconds:.0f} tok/s"
        self.bar.update(self.task, completed=run.step, info=info)
