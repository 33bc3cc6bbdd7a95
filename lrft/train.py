"""The training loop, top to bottom: set up, then for each optimizer step: micro-batches with
accumulation, the adapter's controller hooks, clipping, AdamW, schedule, logging, validation, checkpoints.

Distributed runs (torchrun / accelerate launch, DDP or FSDP) use the same loop: every process sees the
same global batch order (``DataOrder``) and takes its own slice; the loss is normalised by the number of
target tokens in the whole global batch, so the gradient equals the single-process one whatever the split.
Only the main process writes files; see docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .adapters import get_adapter
from .data import DataOrder, check_data_source, collate, load_training_data, micro_batches, target_tokens
from .errors import TrainingDiverged, UserError
from .inject import count_trainable, find_targets, inject_adapters, load_adapter_state_dict, save_adapter, trainable_parameters
from .io import atomic_dir, write_json_atomic, write_text_atomic
from .model import build_meta_model, frozen_dtype_of, is_linear, load_base_model, load_tokenizer
from .recipe import Recipe, dump_recipe

# Sections whose change makes a checkpoint meaningless for the new recipe.
RESUME_SECTIONS = ("model", "quantization", "adapter", "data")


# --- small helpers ----------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"lrft": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "bitsandbytes", "accelerate", "datasets", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def base_info(recipe: Recipe) -> dict[str, Any]:
    """What an adapter folder records about the model it belongs to."""
    return {
        "base_model": recipe.model.model_dump(mode="json"),
        "quantization": recipe.quantization.model_dump(mode="json"),
    }


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / "trainer_state.pt").exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, path + ".")
        elif a != b:
            keys.append(path)
    return keys


class _StopFlag:
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


# --- dry run -----------------------------------------------------------------------------------------


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Build the model on the meta device from its config alone and print what training would do."""
    from rich.console import Console
    from rich.table import Table

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
    by_type: dict[str, list] = {}
    for name, layer in layers.items():
        kind = name.rsplit(".", 1)[-1]
        entry = by_type.setdefault(kind, [0, (layer.in_features, layer.out_features), 0])
        entry[0] += 1
        entry[2] += sum(p.numel() for p in trainable_parameters({name: layer}))
    console = Console()
    table = Table(title=f"plan: {recipe.adapter.type} on {recipe.model.name_or_path}")
    for col in ("module", "count", "in -> out", "trainable"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for kind, (count, (i, o), n) in by_type.items():
        table.add_row(kind, str(count), f"{i} -> {o}", f"{n:,}")
    console.print(table)
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
    }
    console.print(f"adapted modules: {len(layers)}")
    console.print(f"trainable parameters: {trainable:,} ({plan['trainable_percent']:.3f}% of {total_base:,})")
    quant = f"{bits}-bit" if bits else "unquantized"
    mem = plan["estimated_memory_gb"]
    console.print(
        f"estimated memory: base ({quant}) {mem['base_weights']:.2f} GB + frozen adapter tensors "
        f"{mem['shared_frozen_tensors']:.2f} GB + adapter & AdamW {mem['adapter_and_optimizer']:.2f} GB "
        f"(activations not included)"
    )
    plan["data_problem"] = data_problem
    if data_problem:
        console.print(f"[yellow]warning:[/yellow] {data_problem} (training would stop here)", highlight=False)
    return plan


# --- output folder ---------------------------------------------------------------------------------


def _check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse an output dir that would be clobbered; True when it holds files. Read-only, so that every
    process can check it before the main process deletes or creates anything."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output_dir {output_dir} is a file; choose a folder path")
    non_empty = output_dir.is_dir() and any(output_dir.iterdir())
    if non_empty and not (resume or overwrite):
        raise UserError(
            f"output dir {output_dir} is not empty; pass --resume to continue it, --overwrite to replace it, "
            "or --output-dir NEW_DIR"
        )
    return non_empty


# --- distributed runs (docs/distributed.md) ---------------------------------------------------------------


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _sharded(accelerator) -> bool:
    """FSDP over several processes: each holds a shard of every tensor, so whole tensors need a gather.
    (With one process FSDP shards nothing and the adapter's tensors are whole.)"""
    return _is_fsdp(accelerator) and accelerator.num_processes > 1


def _check_distributed(accelerator, recipe: Recipe, mixed: str) -> None:
    """Refuse, before any weight is loaded, the set-ups that cannot work."""
    from accelerate.utils import DistributedType

    from .adapters.base import AdapterLayer, Controller
    from .model import DTYPES, resolve_dtype

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise UserError(
            "DeepSpeed is not supported: ZeRO-3 cannot partition bitsandbytes' quantized weights, and ZeRO-1/2 "
            "would only shard the adapter's optimizer state, which is small already; launch with "
            "recipes/accelerate/ddp.yaml or recipes/accelerate/fsdp.yaml"
        )
    if kind not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        raise UserError(
            f"accelerate's {kind.value} mode is not supported; use DDP (recipes/accelerate/ddp.yaml) or FSDP "
            "(recipes/accelerate/fsdp.yaml)"
        )
    if kind != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    world = accelerator.num_processes
    if getattr(plugin, "fsdp_version", 1) != 1:
        raise UserError(
            "FSDP2 (fsdp_version: 2) is not supported: fully_shard turns each parameter into a DTensor, which "
            "drops the quantization state bitsandbytes keeps on its 4-bit weights; use fsdp_version: 1 as in "
            "recipes/accelerate/fsdp.yaml"
        )
    if not plugin.use_orig_params:
        raise UserError(
            "FSDP needs fsdp_use_orig_params: true: lrft's optimizer, checkpoints and adapter hooks address the "
            "adapter's own parameters, which FSDP otherwise replaces by flat buffers"
        )
    quant = recipe.quantization
    if quant.bits == 8:
        raise UserError(
            "FSDP cannot shard an 8-bit base: LLM.int8 weights keep their scales on the parameter object, which "
            "FSDP replaces when it flattens them, and mixed precision would cast the int8 values; use DDP "
            "(recipes/accelerate/ddp.yaml) or quantization.bits=4 with quantization.quant_storage"
        )
    if quant.bits == 4:
        compute = resolve_dtype(quant.compute_dtype, accelerator.device)
        # FSDP flattens each unit's tensors in their storage dtype and casts them to the mixed-precision
        # dtype for the forward: packed 4-bit codes survive only when that cast is the identity.
        flat = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, compute)
        storage = DTYPES.get(quant.quant_storage or "", torch.uint8)
        if not storage == compute == flat:
            name = str(flat).removeprefix("torch.")
            raise UserError(
                f"FSDP with a 4-bit base needs quantization.quant_storage and quantization.compute_dtype equal to "
                f"the dtype FSDP computes in ({name}); FSDP would otherwise cast the packed 4-bit weights and "
                f"corrupt them. Add --set quantization.quant_storage={name} --set quantization.compute_dtype={name}"
            )
    spec = get_adapter(recipe.adapter.type)
    if getattr(spec.layer, "needs_base_weight", False):
        raise UserError(
            f"adapter.type={recipe.adapter.type} cannot train under FSDP: it reads the frozen weight outside the "
            "base layer's forward, where FSDP holds a flat shard instead of bitsandbytes' weight; use DDP "
            "(recipes/accelerate/ddp.yaml)"
        )
    if world > 1:
        whole_tensors = spec.controller is not Controller or spec.layer.extra_loss is not AdapterLayer.extra_loss
        if whole_tensors:
            raise UserError(
                f"adapter.type={recipe.adapter.type} cannot train under FSDP over {world} processes: its "
                "regulariser, gradient masks or rank pruning read whole tensors outside the forward, where FSDP "
                "holds only a shard; use DDP (recipes/accelerate/ddp.yaml) or FSDP on one process"
            )
        if recipe.eval is not None:
            raise UserError(
                f"the recipe's eval section cannot run under FSDP over {world} processes (the evaluation runs the "
                "whole model on the main process); drop it with --set eval=null and run "
                "`lrft eval --adapter OUTPUT_DIR/adapter` after training"
            )


def _fsdp_own_units(accelerator, layers) -> None:
    """FSDP (version 1) flattens each wrapped unit into one tensor of one dtype and casts it for mixed
    precision. The adapter's float32 parameters and the frozen base (4-bit codes stored in the compute
    dtype) therefore must not share a unit: on top of the configured policy (decoder layers), every adapter
    layer and the frozen linear inside it become units of their own. Frozen-only units also keep
    accelerate from upcasting the packed 4-bit codes to float32 (it upcasts trainable units only)."""
    plugin = accelerator.state.fsdp_plugin
    configured = plugin.auto_wrap_policy  # a callable: the caller ran plugin.set_auto_wrap_policy(model)
    own = {id(m) for layer in layers.values() for m in (layer, layer.base_layer)}

    def policy(module, recurse, nonwrapped_numel):
        if recurse:
            return True
        return id(module) in own or bool(configured and configured(module=module, recurse=False, nonwrapped_numel=nonwrapped_numel))

    plugin.auto_wrap_policy = policy


@contextmanager
def _whole_adapter(model, accelerator):
    """Inside, every process sees the adapter's whole tensors. Under FSDP over several processes that is an
    all-gather of the adapter units only (not of the base), so every process must enter it."""
    if not _sharded(accelerator):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from .adapters.base import AdapterLayer

    with ExitStack() as stack:
        for unit in FSDP.fsdp_modules(model):
            if isinstance(unit.module, AdapterLayer):
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
        yield


def _optimizer_state(model, optimizer, accelerator) -> dict:
    """The optimizer's state; under FSDP over several processes gathered whole on the main process
    (keyed by parameter name instead of index). Every process must call it."""
    if not _sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True),
    ):
        return FSDP.optim_state_dict(model, optimizer)


def _load_optimizer_state(model, optimizer, state: dict, accelerator) -> None:
    if not _sharded(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False),
        FullOptimStateDictConfig(rank0_only=False),
    ):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state))


def _clip_grad_norm(model, params, max_norm: float, accelerator) -> float:
    """The global gradient norm, clipped. Under FSDP each process holds a shard of every gradient, so the
    FSDP root computes the norm (a collective); under DDP the gradients are already all-reduced."""
    if _is_fsdp(accelerator):
        return float(model.clip_grad_norm_(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


# --- the run -------------------------------------------------------------------------------------------


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    from accelerate import Accelerator
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    t_start = time.time()
    cfg, tcfg = recipe, recipe.training
    output_dir = Path(cfg.output_dir)
    resume_from = None
    if resume:
        found = _checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume: no complete checkpoint in {output_dir}/checkpoints; start without --resume")
        resume_from = found[-1][1]

    # --- accelerator and device. Under torchrun / accelerate launch this joins the process group; the
    # distribution (DDP, FSDP) comes from the launcher's environment, never from the recipe.
    cuda = torch.cuda.is_available()
    mixed = tcfg.mixed_precision
    if mixed == "auto":
        mixed = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    console = Console(quiet=not is_main)  # one copy of every message and progress bar
    _check_distributed(accelerator, recipe, mixed)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not _is_fsdp(accelerator):
        console.print("[yellow]note:[/yellow] accelerate runs FSDP on GPUs only; these processes train with DDP")
    if tcfg.batch_size % (tcfg.micro_batch_size * world):
        raise UserError(
            f"training.batch_size ({tcfg.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({tcfg.micro_batch_size} x {world})"
        )
    non_empty = _check_output_dir(output_dir, resume, overwrite)
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes anything
    if is_main:
        if overwrite and non_empty:
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # --- data (before the model: a bad data path should fail in a second, not after loading weights).
    # Every process tokenizes the whole set and follows the same global order: it needs the target-token
    # count of the whole global batch for the loss normalisation below, and slices out its own examples.
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = load_training_data(cfg.data, tokenizer, tcfg.seed)
    order = DataOrder(len(data.train), tcfg.batch_size, tcfg.seed, cfg.data.shuffle)
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * len(data.train) / tcfg.batch_size))

    # --- model and adapter; seeded right before the adapter is built so its init is reproducible (and
    # identical on every process: shared random bases are generated from adapter.seed, not broadcast)
    device = accelerator.device
    model = load_base_model(cfg.model, cfg.quantization, device)
    seed_everything(tcfg.seed)
    frozen_dtype = frozen_dtype_of(model, cfg.quantization)
    layers = inject_adapters(model, cfg.adapter, frozen_dtype)
    if rank > 0:
        # From here on the global generators only drive dropout, whose masks should differ between the
        # processes' slices of a batch (process 0 keeps the single-process stream).
        seed_everything(tcfg.seed + 1_000_003 * rank)
    spec = get_adapter(cfg.adapter.type)
    controller = spec.controller(layers, cfg.adapter, total_steps)
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    n_trainable = count_trainable(layers)  # before FSDP, which leaves each process a shard
    checkpoint = None
    if resume_from is not None:
        # every process reads the same checkpoint; the adapter's weights go in before FSDP shards them
        checkpoint = _read_checkpoint(resume_from, recipe)
        load_adapter_state_dict(layers, checkpoint["adapter"])
    model.train()
    if _is_fsdp(accelerator):
        accelerator.state.fsdp_plugin.set_auto_wrap_policy(model)
        _fsdp_own_units(accelerator, layers)
    model = accelerator.prepare(model)
    # The optimizer is built after wrapping, from the adapter's parameters as the wrapped model holds them
    # (FSDP replaces their storage), and prepared so that fp16's gradient scaler unscales and skips
    # overflowing steps. The scheduler drives the plain optimizer: a prepared one would step once per process.
    params = trainable_parameters(layers)
    base_optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, betas=tcfg.adam_betas, weight_decay=tcfg.weight_decay)
    optimizer = accelerator.prepare(base_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        base_optimizer, lr_lambda(tcfg.lr_scheduler, tcfg.warmup_steps, total_steps)
    )

    start_step = 0
    if checkpoint is not None:
        start_step = _restore_checkpoint(checkpoint, recipe, model, base_optimizer, scheduler, controller, accelerator)
        console.print(f"resumed from {resume_from} at step {start_step}")

    if is_main:
        write_text_atomic(output_dir / "recipe.yaml", dump_recipe(recipe))
    run_info = {
        "lrft_version": __version__,
        "versions": library_versions(),
        "seed": tcfg.seed,
        "recipe_hash": recipe.section_hash(),
        "device": str(device),
        "processes": world,
        "distributed": str(accelerator.distributed_type.value),
        "mixed_precision": mixed,
        # what model.dtype / quantization.compute_dtype "auto" resolved to on this device
        "base_dtype": str(next((p.dtype for p in model.parameters() if p.is_floating_point()), None)),
        "compute_dtype": str(frozen_dtype),
        "trainable_parameters": n_trainable,
        "adapted_modules": len(layers),
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "total_steps": total_steps,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from_step": start_step if resume_from else None,
    }
    if is_main:
        write_json_atomic(output_dir / "run.json", run_info)
        console.print(
            f"{cfg.adapter.type}: {len(layers)} modules, {n_trainable:,} trainable parameters; "
            f"{len(data.train)} examples, {total_steps} steps of {tcfg.batch_size} on {device} x{world}"
        )

    metrics_path = output_dir / "metrics.jsonl"
    if is_main and resume_from is None:
        metrics_path.write_text("")
    elif is_main:  # drop records past the checkpoint: they are recomputed
        kept = [l for l in metrics_path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= start_step]
        metrics_path.write_text("".join(k + "\n" for k in kept))

    per_rank = tcfg.batch_size // world
    pad_id = tokenizer.pad_token_id
    best_val = None
    skipped_nonfinite = 0
    step = start_step
    exit_code = 0
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, disable=not is_main,
    )
    with _StopFlag() as stop, progress:
        task = progress.add_task("train", total=total_steps, completed=start_step, info="")
        while step < total_steps:
            t0 = time.time()
            controller.start_step(step)
            batch_ids = order.global_batch(step)
            examples = [data.train[i] for i in batch_ids]
            local = examples[rank * per_rank : (rank + 1) * per_rank]  # this process's contiguous slice
            n_target = max(1, target_tokens(examples))  # of the whole global batch: no collective needed
            chunks = list(micro_batches(local, tcfg.micro_batch_size))
            loss_sum = torch.zeros((), device=device)
            extra_sum = 0.0
            for i, chunk in enumerate(chunks):
                batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
                sync = i == len(chunks) - 1  # gradients are all-reduced once, after the last micro-batch
                with (nullcontext() if sync or world == 1 else accelerator.no_sync(model)), accelerator.autocast():
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    logits = out.logits[:, :-1].float()
                    labels = batch["labels"][:, 1:]
                    token_loss = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
                    )
                    # DDP and FSDP average gradients over processes; scaling by `world` turns that into the
                    # sum over the global batch, divided by its target tokens: the single-process gradient.
                    loss = token_loss * world / n_target
                    extra = controller.extra_loss()
                    if extra is not None:
                        # every process adds the whole regulariser (the average over processes keeps it once)
                        loss = loss + extra / len(chunks)
                        extra_sum += float(extra.detach()) / len(chunks)
                accelerator.backward(loss)
                loss_sum += token_loss.detach()
            if world > 1:
                loss_sum = accelerator.reduce(loss_sum, reduction="sum")  # the logged loss is the global one
            step_loss = float(loss_sum) / n_target
            if not math.isfinite(step_loss):  # the same value on every process: they all skip or stop
                optimizer.zero_grad(set_to_none=True)
                if tcfg.skip_nonfinite:
                    skipped_nonfinite += 1
                    step += 1
                    scheduler.step()
                    progress.update(task, completed=step)
                    continue
                raise TrainingDiverged(
                    f"loss is {step_loss} at step {step + 1}; lower training.learning_rate, use float32/bfloat16 "
                    f"instead of float16, or set training.skip_nonfinite=true (last good checkpoint kept in {output_dir}/checkpoints)"
                )
            accelerator.unscale_gradients()  # fp16 only: the hooks and the clipping see the true gradients
            controller.before_optimizer_step(step, base_optimizer)
            grad_norm = None
            if tcfg.max_grad_norm:
                grad_norm = _clip_grad_norm(model, params, tcfg.max_grad_norm, accelerator)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            controller.after_optimizer_step(step, base_optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # A signal may reach only some processes: all of them must stop (and save) after the same step.
            stop_now, peak_mb = stop.requested, peak_memory_mb(device)
            if world > 1:
                agreed = torch.tensor([float(stop_now), peak_mb], device=device, dtype=torch.float64)
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
                stop_now, peak_mb = bool(agreed[0] > 0), float(agreed[1])

            elapsed = time.time() - t0
            tokens = sum(len(e["input_ids"]) for e in examples)  # the global batch's, as step_loss
            record = {
                "step": step,
                "epoch": round(order.epoch_of(step), 4),
                "loss": step_loss,
                "lr": lr,
                "tokens_per_s": tokens / elapsed,
                "step_time_s": elapsed,
                "peak_mem_mb": peak_mb,  # the largest over processes
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if extra_sum:
                record["extra_loss"] = extra_sum
            if skipped_nonfinite:
                record["skipped_nonfinite"] = skipped_nonfinite
            if data.val and tcfg.eval_steps and (step % tcfg.eval_steps == 0 or step == total_steps):
                record["val_loss"] = evaluate_loss(model, data.val, tcfg.micro_batch_size, pad_id, accelerator)
                best_val = record["val_loss"] if best_val is None else min(best_val, record["val_loss"])
            if is_main and (step % tcfg.logging_steps == 0 or step == total_steps or "val_loss" in record):
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            progress.update(
                task, completed=step, info=f"loss {step_loss:.4f}  lr {lr:.2e}  {record['tokens_per_s']:.0f} tok/s"
            )
            if (tcfg.save_steps and step % tcfg.save_steps == 0 and step < total_steps) or stop_now:
                _save_checkpoint(output_dir, step, recipe, layers, model, base_optimizer, scheduler, controller, accelerator)
            if stop_now:
                console.print(
                    f"stopped at step {step}; checkpoint saved. Resume with: lrft train RECIPE --resume "
                    f"--output-dir {output_dir}"
                )
                exit_code = 130
                break

    if exit_code:
        accelerator.end_training()
        sys.exit(exit_code)

    # --- final adapter, summary, optional evaluation
    summary = controller.summary()
    with _whole_adapter(model, accelerator):
        if is_main:
            with atomic_dir(output_dir / "adapter") as tmp:
                save_adapter(tmp, layers, cfg.adapter, base_info(recipe), extra={"summary": summary} if summary else None)
    # The adapter is on disk before any process returns; the evaluation then runs on the main process
    # alone (the others exit instead of waiting for it in a collective that could time out).
    accelerator.wait_for_everyone()
    if is_main:
        run_info.update(
            {
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - t_start, 2),
                "final_step": step,
                "skipped_nonfinite": skipped_nonfinite,
                "best_val_loss": best_val,
            }
        )
        if cfg.eval is not None:
            from .evaluate import evaluate_model, print_results

            model.eval()
            results = evaluate_model(
                accelerator.unwrap_model(model), tokenizer, cfg.eval.data, cfg.eval.tasks, cfg.eval.limit,
                cfg.eval.mode, cfg.eval.batch_size,
            )
            write_json_atomic(output_dir / "eval.json", results)
            print_results(results, console)
            run_info["eval_mean_accuracy"] = results.get("mean_accuracy")
        write_json_atomic(output_dir / "run.json", run_info)
        console.print(f"adapter saved to {output_dir / 'adapter'}")
    accelerator.end_training()
    return output_dir / "adapter"


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], micro_batch_size: int, pad_id: int, accelerator) -> float:
    """Mean token loss on the validation split. Every process computes the whole split (it is small, and
    under FSDP every process must take part in every forward), so all of them get the same value."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in micro_batches(examples, micro_batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id).items()}
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
        )
        count += int((labels != -100).sum())
    if was_training:
        model.train()
    return total / max(1, count)


# --- checkpoints -------------------------------------------------------------------------------------


def _save_checkpoint(output_dir: Path, step: int, recipe: Recipe, layers, model, optimizer, scheduler, controller, accelerator) -> None:
    """Every process calls this (gathers are collectives); the main process writes."""
    from accelerate.utils import gather_object

    # each process's own RNG state: their dropout streams differ, and resume restores each one
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    optimizer_state = _optimizer_state(model, optimizer, accelerator)
    with _whole_adapter(model, accelerator):
        if accelerator.is_main_process:
            final = output_dir / "checkpoints" / f"step-{step}"
            with atomic_dir(final) as tmp:
                save_adapter(tmp / "adapter", layers, recipe.adapter, base_info(recipe))
                torch.save(
                    {
                        "step": step,
                        "optimizer": optimizer_state,
                        "optimizer_format": "fsdp" if _sharded(accelerator) else "torch",
                        "scheduler": scheduler.state_dict(),
                        "controller": controller.state_dict(),
                        "rng": rngs[0],
                        "rng_per_process": rngs,
                        "recipe": recipe.resolved(),
                        "recipe_hash": recipe.section_hash(*RESUME_SECTIONS),
                    },
                    tmp / "trainer_state.pt",
                )
            for _, old in _checkpoints(output_dir)[: -recipe.training.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()  # the checkpoint is complete before any process goes on (or stops)


def _read_checkpoint(path: Path, recipe: Recipe) -> dict[str, Any]:
    """The trainer state and adapter weights of a checkpoint, after checking it belongs to this recipe."""
    from .inject import read_adapter_weights

    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it to resume from the one before") from None
    if state["recipe_hash"] != recipe.section_hash(*RESUME_SECTIONS):
        old = {k: state["recipe"].get(k) for k in RESUME_SECTIONS}
        new = {k: recipe.resolved().get(k) for k in RESUME_SECTIONS}
        changed = _changed_keys(old, new)
        raise UserError(
            f"cannot resume: the recipe changed {', '.join(changed)} since the checkpoint; "
            "restore those keys or start a new run with --output-dir"
        )
    state["adapter"] = read_adapter_weights(path / "adapter")
    return state


def _restore_checkpoint(state: dict, recipe: Recipe, model, optimizer, scheduler, controller, accelerator) -> int:
    """Optimizer, schedule, controller and RNG state from a checkpoint read by ``_read_checkpoint``."""
    fsdp_format = state.get("optimizer_format") == "fsdp"
    if fsdp_format != _sharded(accelerator):
        raise UserError(
            "cannot resume: the checkpoint's optimizer state was saved "
            + ("under FSDP over several processes; resume it the same way" if fsdp_format else "unsharded; resume it without FSDP over several processes")
        )
    _load_optimizer_state(model, optimizer, state["optimizer"], accelerator)
    scheduler.load_state_dict(state["scheduler"])
    controller.load_state_dict(state["controller"])
    rngs = state.get("rng_per_process") or [state["rng"]]
    rank = accelerator.process_index
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    else:  # more processes than when the checkpoint was written: a fresh stream of this process's own
        seed_everything(recipe.training.seed + 1_000_003 * rank + int(state["step"]))
    return int(state["step"])
