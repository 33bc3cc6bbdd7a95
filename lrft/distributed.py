"""What distributed runs need beyond the plain loop (docs/distributed.md): the accelerator, the set-ups
refused up front, FSDP's unit policy, whole-tensor views of a sharded adapter, optimizer-state gathers,
gradient clipping, and agreeing on when to stop.

Under torchrun / ``accelerate launch`` the accelerator joins the process group; the distribution (DDP,
FSDP) comes from the launcher's environment, never from the recipe. Every function here is a no-op or the
single-process operation when there is one process.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager

import torch

from .adapters import get_adapter
from .errors import UserError
from .model import DTYPES, resolve_dtype
from .recipe import Recipe


def make_accelerator(recipe: Recipe):
    """The accelerator for this process and the mixed precision it runs ("no", "bf16" or "fp16"), with the
    trackers of ``training.report_to`` (checked before any weight is loaded)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .trackers import check_trackers

    cuda = torch.cuda.is_available()
    mixed = recipe.training.mixed_precision
    if mixed == "auto":
        mixed = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    report_to = check_trackers(recipe.training.report_to)
    project = ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=f"{recipe.output_dir}/tensorboard")
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda, log_with=report_to or None, project_config=project)
    check_distributed(accelerator, recipe, mixed)
    world = accelerator.num_processes
    if recipe.training.batch_size % (recipe.training.micro_batch_size * world):
        raise UserError(
            f"training.batch_size ({recipe.training.batch_size}) must be a multiple of micro_batch_size x processes "
            f"({recipe.training.micro_batch_size} x {world})"
        )
    return accelerator, mixed


def fsdp_requested_without_fsdp(accelerator) -> bool:
    """accelerate was asked for FSDP (e.g. on CPUs) but runs DDP: worth a note to the user."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not is_fsdp(accelerator)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_sharded(accelerator) -> bool:
    """FSDP over several processes: each holds a shard of every tensor, so whole tensors need a gather.
    (With one process FSDP shards nothing and the adapter's tensors are whole.)"""
    return is_fsdp(accelerator) and accelerator.num_processes > 1


def check_distributed(accelerator, recipe: Recipe, mixed: str) -> None:
    """Refuse, before any weight is loaded, the set-ups that cannot work."""
    from accelerate.utils import DistributedType

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
    if kind == DistributedType.FSDP:
        _check_fsdp(accelerator, recipe, mixed)


def _check_fsdp(accelerator, recipe: Recipe, mixed: str) -> None:
    from .adapters.base import AdapterLayer, Controller

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
    if spec.layer.needs_base_weight:
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


def fsdp_own_units(accelerator, layers) -> None:
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
def whole_adapter(model, accelerator):
    """Inside, every process sees the adapter's whole tensors. Under FSDP over several processes that is an
    all-gather of the adapter units only (not of the base), so every process must enter it."""
    if not is_sharded(accelerator):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from .adapters.base import AdapterLayer

    with ExitStack() as stack:
        for unit in FSDP.fsdp_modules(model):
            if isinstance(unit.module, AdapterLayer):
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
        yield


def optimizer_state(model, optimizer, accelerator) -> dict:
    """The optimizer's state; under FSDP over several processes gathered whole on the main process
    (keyed by parameter name instead of index). Every process must call it."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True),
    ):
        return FSDP.optim_state_dict(model, optimizer)


def load_optimizer_state(model, optimizer, state: dict, accelerator) -> None:
    if not is_sharded(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False),
        FullOptimStateDictConfig(rank0_only=False),
    ):
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, state))


def clip_grad_norm(model, params, max_norm: float, accelerator) -> float:
    """The global gradient norm, clipped. Under FSDP each process holds a shard of every gradient, so the
    FSDP root computes the norm (a collective); under DDP the gradients are already all-reduced."""
    if is_fsdp(accelerator):
        return float(model.clip_grad_norm_(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def agree(accelerator, stop: bool, peak_mb: float) -> tuple[bool, float]:
    """A signal may reach only some processes: all of them must stop (and save) after the same step. Returns
    (any process asked to stop, the largest peak memory over processes)."""
    if accelerator.num_processes == 1:
        return stop, peak_mb
    agreed = torch.tensor([float(stop), peak_mb], device=accelerator.device, dtype=torch.float64)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    return bool(agreed[0] > 0), float(agreed[1])
