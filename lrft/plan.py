"""``lrft train RECIPE --dry-run``: what a run would do, before any weight is loaded.

The model is built on the meta device from its ``config.json`` alone and the adapter is injected: the plan
reports which modules get adapters, the trainable parameter count (and the paper's formula for it) and
the weights-only memory (base weights, shared frozen tensors, adapter with its AdamW state). It then reads
the data (all of it, or ``DATA_SAMPLE`` records drawn at random when there are more) with the model's
tokenizer, as training would: token-length percentiles, the padding one epoch's micro-batches carry (or,
packed, how full the rows are), steps per epoch, and the run's peak memory with the activations of its
largest micro-batch, with and without gradient checkpointing. docs/memory.md gives the formula, its terms,
which constants are calibrated and which figures are measured where, and how it was checked. Data (or a
tokenizer) that cannot be read leaves a warning and the weights-only figures, as training would stop there.

The returned plan holds:

* ``adapter``, ``adapted_modules``, ``trainable_parameters``, ``formula_trainable_parameters``,
  ``base_parameters`` (tied embeddings counted once), ``trainable_percent``;
* ``estimated_memory_gb``: ``base_weights``, ``shared_frozen_tensors``, ``adapter_and_optimizer`` (GB);
* ``data_problem``: why the data could not be read, or None;
* ``data`` (None when unread): ``records`` (training records after ``max_samples`` and the validation
  split), ``tokenized`` (how many of them the figures come from; fewer than ``records`` when sampled),
  ``examples`` and ``rows`` (packed rows, None unpacked; both scaled up from a sample), ``token_lengths``
  ({p50, p90, p99, max} of the examples), ``padding_fraction`` (unpacked: padding / computed tokens over
  one epoch's micro-batches in DataOrder's order, ``group_by_length`` respected), ``packing_efficiency``
  (packed: real tokens / (rows x cutoff_len)), ``micro_batches`` (how many the padding is over),
  ``steps_per_epoch`` (ceil(examples or rows / batch_size)), ``planned_steps`` and ``largest_micro_batch``
  ([rows, width] with the most computed tokens among the planned steps');
* ``peak_memory`` (None when the data is unread): ``device`` ("cpu": the process's resident-set high-water
  mark, which metrics.jsonl records as peak_mem_mb; "cuda": torch.cuda.max_memory_allocated),
  ``gradient_checkpointing`` (the recipe's setting), ``without_checkpointing_mb``,
  ``with_checkpointing_mb`` and ``terms_mb`` ({"without_checkpointing": {term: MB}, "with_checkpointing":
  {...}}: the summands, named as in docs/memory.md).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .adapters import get_adapter
from .data import (
    DataOrder, RecordToExample, check_cutoff, check_data_source, load_training_data, micro_batches, pack, read_records,
)
from .errors import UserError
from .inject import count_trainable, find_targets, inject_adapters, trainable_parameters
from .activations import swiglu_mlps
from .loss import chunk_rows, fits_loss_head
from .model import Dtypes, build_meta_model, default_device, is_linear, load_tokenizer
from .recipe import Recipe

MB = 2**20
DATA_SAMPLE = 2_000  # records the dry run tokenizes at most (drawn at random when the data has more)

# The CPU estimate's calibrated constant (docs/memory.md: on what, and how well it transfers), with gradient
# checkpointing only: what a recomputed layer's backward holds beyond the formula's terms and the memory
# glibc's heap keeps between the trims of lrft.heap, in decoder layers' worth of saved activations. Without
# checkpointing the per-layer trims leave the heap next to nothing beyond the working set.
HEAP_LAYERS = 12.0
# Python lists of the tokenized data: an int object (28 B) and a list slot (8 B) per token id, a slot per
# label (labels share the ids' objects); packed rows add position ids and their int objects
TOKEN_LIST_BYTES = {False: 44, True: 80}


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Build the model on the meta device from its config alone, read the data, print what training would do."""
    plan, by_module = make_plan(recipe)
    print_plan(recipe, plan, by_module)
    return plan


def make_plan(recipe: Recipe) -> tuple[dict[str, Any], dict[str, list]]:
    """The plan (module docstring) and, per module suffix, [count, (in, out), trainable]."""
    model = build_meta_model(recipe.model.name_or_path)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # from_config on the meta device leaves the output head untied
    base = BaseWeights.of(recipe, model)
    names = find_targets(model, recipe.adapter.target_modules)
    layers = inject_adapters(model, recipe.adapter, torch.float32, target_names=names)
    plan, by_module = parameter_plan(recipe, model, layers, base)
    try:
        # a data file that is not there yet (e.g. the published recipe's commonsense_170k.json) is a warning
        # here and an error only when training starts
        check_data_source(recipe.data.path)
        tokenizer = load_tokenizer(recipe.model.name_or_path)
        runtime_mb = training_runtime_mb(recipe)
        figures = read_data(recipe, tokenizer)
    except UserError as exc:
        plan.update(data_problem=str(exc), data=None, peak_memory=None)
        return plan, by_module
    plan.update(data_problem=None, data=figures.as_plan())
    plan["peak_memory"] = peak_memory(recipe, model, layers, base, figures, runtime_mb)
    return plan, by_module


# --- parameters and weights -----------------------------------------------------------------------


@dataclass
class BaseWeights:
    """The frozen base's weights: all of them (tied embeddings once), those bitsandbytes quantizes, and
    bytes per quantized weight."""

    total: int
    quantized: int
    bytes_per: float  # per quantized weight (absmax included); 2.0 (16-bit) unquantized

    @classmethod
    def of(cls, recipe: Recipe, model) -> "BaseWeights":
        bits, double = recipe.quantization.bits, recipe.quantization.double_quant
        # 4-bit: 0.5 byte per weight plus one fp32 absmax per 64-weight block (less with double quantization)
        bytes_per = {4: 0.5 + (4 / 64 if not double else 1 / 64), 8: 1.0 + 4 / 4096}.get(bits, 2.0)
        # bitsandbytes quantizes every linear layer but the output head; the rest stays unquantized
        quantized = sum(
            m.in_features * m.out_features for n, m in model.named_modules() if is_linear(m) and not n.endswith("lm_head")
        ) if bits else 0
        return cls(sum(p.numel() for p in model.parameters()), quantized, bytes_per)

    def quantized_bytes(self) -> float:
        return self.quantized * self.bytes_per

    def weights_only_bytes(self, bits: Optional[int]) -> float:
        """The base in memory with its unquantized weights in 16 bits (the weights-only figure)."""
        return self.quantized_bytes() + (self.total - self.quantized) * (2.0 if bits else self.bytes_per)


def parameter_plan(recipe: Recipe, model, layers: dict, base: BaseWeights) -> tuple[dict[str, Any], dict[str, list]]:
    """Counts and the weights-only memory figures."""
    trainable = count_trainable(layers)
    spec = get_adapter(recipe.adapter.type)
    formula = sum(spec.layer.num_trainable(l.in_features, l.out_features, recipe.adapter) for l in layers.values())
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
        "base_parameters": base.total,
        "trainable_percent": 100.0 * trainable / max(1, base.total),
        "estimated_memory_gb": {
            "base_weights": base.weights_only_bytes(recipe.quantization.bits) / 2**30,
            "shared_frozen_tensors": shared_bytes(model) / 2**30,
            "adapter_and_optimizer": trainable * 16 / 2**30,  # fp32 weight + grad + two AdamW moments
        },
    }
    return plan, by_module


def shared_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.lrft_shared.tensors().values())


# --- the data ---------------------------------------------------------------------------------------


@dataclass
class DataFigures:
    """What the dry run learns from the data: the training units (examples, or packed rows) it tokenized,
    how many there are in all, and the micro-batches the planned steps form from them."""

    records: int  # training records (after max_samples and the validation split)
    tokenized: int  # records tokenized for these figures
    examples: int  # training examples in all (scaled up from the sample)
    rows: Optional[int]  # packed rows in all (scaled), None unpacked
    lengths: list[int]  # token lengths of the tokenized examples
    unit_lengths: list[int]  # token lengths of the units batches are made of (examples, or packed rows)
    steps_per_epoch: int
    planned_steps: int
    padding_fraction: Optional[float]
    packing_efficiency: Optional[float]
    micro_batch_count: int  # one epoch's micro-batches (the padding fraction is over these)
    largest: tuple[int, int]  # (rows, width) of the planned steps' micro-batch with the most computed tokens
    packed: bool

    def as_plan(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "tokenized": self.tokenized,
            "examples": self.examples,
            "rows": self.rows,
            "token_lengths": percentiles(self.lengths),
            "padding_fraction": self.padding_fraction,
            "packing_efficiency": self.packing_efficiency,
            "micro_batches": self.micro_batch_count,
            "steps_per_epoch": self.steps_per_epoch,
            "planned_steps": self.planned_steps,
            "largest_micro_batch": list(self.largest),
        }

    @property
    def total_tokens(self) -> int:
        """Tokens of all training examples (scaled up from the sample)."""
        return round(sum(self.lengths) * self.examples / max(1, len(self.lengths)))


def percentiles(lengths: list[int]) -> dict[str, int]:
    """Nearest-rank p50, p90, p99 and the maximum."""
    ordered = sorted(lengths)
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": ordered[-1]}


def read_data(recipe: Recipe, tokenizer) -> DataFigures:
    """Tokenize the training data as training does (all of it when it has at most DATA_SAMPLE records, else
    a seeded random sample of that many) and work out its batches."""
    section = recipe.data
    records = read_records(section.path)
    count = min(len(records), section.max_samples or len(records))
    train_records = max(0, count - section.val_size)
    if count <= DATA_SAMPLE:
        del records  # load_training_data reads them again, exactly as training will
        data = load_training_data(section, tokenizer, recipe.training.seed, recipe.model.name_or_path)
        lengths = example_lengths(data.train) if section.packing else token_lengths(data.train)
        return batch_figures(recipe, train_records, train_records, data.examples, lengths, token_lengths(data.train), 1.0)
    sample = sample_examples(recipe, tokenizer, records[:count])
    units = pack(sample, section.cutoff_len) if section.packing else sample
    scale = train_records / DATA_SAMPLE
    return batch_figures(recipe, train_records, DATA_SAMPLE, round(len(sample) * scale), token_lengths(sample), token_lengths(units), scale)


def sample_examples(recipe: Recipe, tokenizer, records: list) -> list[dict]:
    """DATA_SAMPLE records drawn at random (seeded), tokenized as training does; those without a target
    token are left out, as training skips them."""
    section = recipe.data
    check_cutoff(tokenizer, section.format, section.cutoff_len)
    tokenize = RecordToExample(section, tokenizer, recipe.model.name_or_path)
    examples = tokenize.many(records, sorted(random.Random(recipe.training.seed).sample(range(len(records)), DATA_SAMPLE)))
    if not examples:
        raise UserError(f"data {section.path}: none of {DATA_SAMPLE} records drawn has a token to learn from; check data.format")
    return examples


def token_lengths(units: list[dict]) -> list[int]:
    return [len(u["input_ids"]) for u in units]


def example_lengths(rows: list[dict]) -> list[int]:
    """The lengths of the examples inside packed rows (each example's position ids restart at 0)."""
    lengths = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        lengths += [b - a for a, b in zip(starts, starts[1:])]
    return lengths


def batch_figures(recipe: Recipe, records: int, tokenized: int, examples: int, lengths: list[int], unit_lengths: list[int], scale: float) -> DataFigures:
    """Steps, padding / packing and the largest micro-batch, over the micro-batches DataOrder forms."""
    from .checkpoint import planned_steps

    section, tcfg = recipe.data, recipe.training
    units = len(unit_lengths)
    total_units = round(units * scale)
    steps_per_epoch = math.ceil(total_units / tcfg.batch_size)
    planned = planned_steps(recipe.resolved(), total_units)
    order = DataOrder(units, tcfg.batch_size, tcfg.seed, section.shuffle, unit_lengths if section.group_by_length else None)
    epoch_steps = math.ceil(units / tcfg.batch_size)  # over the units read (the sample's epoch when sampled)
    # the largest micro-batch: over the planned steps (at most 20 epochs: later ones only reshuffle)
    steps = epoch_steps if scale != 1.0 else max(epoch_steps, min(planned, 20 * epoch_steps))
    shapes = micro_batch_shapes(order, unit_lengths, tcfg.micro_batch_size, steps, section.packing)
    epoch = shapes[: epoch_steps * (tcfg.batch_size // tcfg.micro_batch_size)]
    padded = sum(rows * width for rows, width, _ in epoch)
    real = sum(tokens for _, _, tokens in epoch)
    run = shapes[: planned * (tcfg.batch_size // tcfg.micro_batch_size)] if scale == 1.0 else shapes
    largest = max(((rows, width) for rows, width, _ in run), key=lambda s: (s[0] * s[1], s[1]))
    if scale != 1.0:  # a sample's batches are not the run's: take a full micro-batch of the longest unit
        largest = (1, tcfg.micro_batch_size * max(unit_lengths)) if section.packing else (tcfg.micro_batch_size, max(unit_lengths))
    return DataFigures(
        records=records, tokenized=tokenized, examples=examples, rows=total_units if section.packing else None,
        lengths=lengths, unit_lengths=unit_lengths, steps_per_epoch=steps_per_epoch, planned_steps=planned,
        padding_fraction=None if section.packing else 1.0 - real / padded,
        packing_efficiency=sum(unit_lengths) / (units * section.cutoff_len) if section.packing else None,
        micro_batch_count=len(epoch), largest=largest, packed=section.packing,
    )


def micro_batch_shapes(order: DataOrder, lengths: list[int], micro_batch_size: int, steps: int, packed: bool) -> list[tuple[int, int, int]]:
    """(rows, width, real tokens) of every micro-batch of the first ``steps`` optimizer steps (one process).
    Packed rows are trained concatenated into one row (see :func:`lrft.data.collate`)."""
    shapes = []
    for step in range(steps):
        for chunk in micro_batches(order.global_batch(step), micro_batch_size):
            sizes = [lengths[i] for i in chunk]
            shapes.append((1, sum(sizes), sum(sizes)) if packed else (len(sizes), max(sizes), sum(sizes)))
    return shapes


# --- peak memory: measured and looked-up inputs ---------------------------------------------------


def resident_mb() -> float:
    """This process's resident set now (Linux), else its high-water mark."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def training_runtime_mb(recipe: Recipe) -> float:
    """The resident size of a training process before it reads data or weights, measured: the dry run
    imports what training imports (its tokenizer is loaded already) and reads its own resident set. In a
    fresh ``lrft train --dry-run`` process that is what ``lrft train`` holds at the same point; in a
    long-lived process (a notebook, a test session) it is more."""
    import accelerate  # noqa: F401

    from . import train  # noqa: F401

    if recipe.quantization.bits:
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # noqa: BLE001 - training reports a broken bitsandbytes; the plan need not
            pass
    return resident_mb()


@contextmanager
def _autocast_off_on_meta():
    """Adapters that switch autocast off inside their forward (RandLoRA) cannot name the meta device."""
    real = torch.autocast
    torch.autocast = lambda device_type, *a, **k: nullcontext() if device_type == "meta" else real(device_type, *a, **k)
    try:
        yield
    finally:
        torch.autocast = real


# modules that read the same input: an input several of their adapters save is kept once
SHARED_INPUTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}


def adapter_activation_bytes(model, layers: dict, tokens: int) -> float:
    """Activations all adapter layers save for a micro-batch of ``tokens`` tokens, measured: one adapted
    module of each kind runs its forward on the meta device (no memory, no compute) under saved-tensor
    hooks that add up the storages autograd keeps, other than its own and the shared tensors; each kind
    counts once per adapted module. The first layer's attention input comes from the frozen embeddings and
    needs no gradient, so its q, k, v adapters are measured so (dropout then keeps no mask)."""
    kinds: dict[str, list] = {}
    for name, layer in layers.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((name, layer))
    shared = {t.untyped_storage()._cdata for t in model.lrft_shared.tensors().values()}
    total, inputs = 0.0, {}
    model.train()  # dropout saves its mask in training only
    for kind, members in kinds.items():
        layer = members[0][1]
        saved, saves_input = saved_by(layer, tokens, shared)
        total += saved * len(members)
        first = [l for n, l in members if ".layers.0." in f".{n}."]
        if first and SHARED_INPUTS.get(kind) == "attention":
            total += saved_by(first[0], tokens, shared, input_grad=False)[0] - saved
        if saves_input:
            group = SHARED_INPUTS.get(kind, kind)
            inputs[group] = max(inputs.get(group, 0.0), len(members) * tokens * layer.in_features * 4.0)
    return total + sum(inputs.values())


def saved_by(layer, tokens: int, exclude: set, input_grad: bool = True) -> tuple[float, bool]:
    """(bytes autograd saves in ``layer``'s forward other than its input, whether it saves its input)."""
    own = exclude | {t.untyped_storage()._cdata for t in list(layer.parameters()) + list(layer.buffers())}
    x = torch.empty(1, tokens, layer.in_features, device="meta", requires_grad=input_grad)
    seen: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage._cdata not in own:
            seen[storage._cdata] = storage.nbytes()
        return t

    with _autocast_off_on_meta(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(x)
    input_id = x.untyped_storage()._cdata
    return float(sum(n for k, n in seen.items() if k != input_id)), input_id in seen


# --- peak memory: the formula (docs/memory.md) ----------------------------------------------------


@dataclass
class Shapes:
    """What the activation terms need of the model and of the largest micro-batch."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rows: int
    width: int
    act_bytes: int  # bytes per activation element (the compute dtype)
    loss_head: bool  # the loss goes through lrft.loss.LossHead, a chunk of logits at a time
    mlp_kept: int  # intermediate-sized tensors an MLP keeps: 2 through lrft.activations.SwiGLU, else 3

    @classmethod
    def of(cls, model, largest: tuple[int, int], act_bytes: int) -> "Shapes":
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return cls(
            c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, kv_heads, head_dim, c.vocab_size,
            *largest, act_bytes, fits_loss_head(model), 2 if swiglu_mlps(model) else 3,
        )

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def block_bytes(s: Shapes) -> float:
    """Activations one decoder layer's base saves for the backward (Llama layout; frozen and quantized
    linears save none): both RMSNorm inputs; SDPA's query, key and value (grouped key and value heads
    once: training batches attend without a mask, so SDPA reads the shared heads itself) and output, and
    its float32 log-sum-exp; the MLP's gate and up outputs (and the activation's, unless lrft's SwiGLU
    recomputes it)."""
    attention = (2 * s.heads + 2 * s.kv_heads) * s.head_dim
    per_token = (2 * s.hidden + attention + s.mlp_kept * s.intermediate) * s.act_bytes + 4 * s.heads
    return per_token * s.tokens


def logits_bytes(s: Shapes) -> float:
    """The logits alive at once in the loss: the head's output, its float32 upcast (16-bit logits only) and
    the log-softmax (or log-sum-exp) temporary. Through the loss head, one chunk's worth, and the gradient
    of the labelled positions' hidden states it keeps for the backward (at most every position's)."""
    upcast = 4 if s.act_bytes < 4 else 0
    if not s.loss_head:
        return float(s.tokens * s.vocab * (s.act_bytes + upcast + 4))
    chunk = min(s.tokens, chunk_rows(s.vocab))
    return float(chunk * s.vocab * (s.act_bytes + upcast + 4) + s.tokens * s.hidden * s.act_bytes)


def activation_terms(s: Shapes, layer: float, checkpointing: bool, cpu: bool) -> dict[str, float]:
    """The micro-batch's terms (bytes): saved activations, the logits and, on the CPU with checkpointing, the
    heap glibc keeps. ``layer`` is one decoder layer's saved activations, adapters included. Checkpointing
    keeps each layer's input and the final norm's and recomputes one layer at a time; without it the final
    norm's input cancels the first layer's input norm, which keeps nothing (the frozen embeddings need no
    gradient)."""
    hidden = s.tokens * s.hidden * s.act_bytes
    saved = (s.layers + 1) * hidden + layer if checkpointing else s.layers * layer
    terms = {"saved_activations": saved, "logits": logits_bytes(s)}
    if cpu and checkpointing:
        terms["heap_retention"] = HEAP_LAYERS * layer
    return terms


def resident_terms(recipe: Recipe, model, base: BaseWeights, figures: DataFigures, runtime_mb: float, cpu: bool, load: torch.dtype) -> dict[str, float]:
    """The terms that do not depend on the micro-batch (bytes): runtime, data, weights, adapter and AdamW."""
    adapter = count_trainable_in(model) * 16 + shared_bytes(model)  # fp32 weight + grad + two AdamW moments
    unquantized = (base.total - base.quantized) * load.itemsize
    weights = {"base_weights": base.quantized_bytes() + unquantized, "adapter_and_optimizer": adapter}
    if not cpu:  # device memory holds the weights and the adapter; the host's runtime and data do not count
        return weights
    return {
        "runtime_and_tokenizer": runtime_mb * MB,
        "tokenized_data": TOKEN_LIST_BYTES[figures.packed] * figures.total_tokens,
        **weights,
    }


def count_trainable_in(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory(recipe: Recipe, model, layers: dict, base: BaseWeights, figures: DataFigures, runtime_mb: float) -> dict[str, Any]:
    """The peak with and without gradient checkpointing (the ``peak_memory`` entry of the plan)."""
    device = default_device()
    cpu = device.type != "cuda"
    dtypes = Dtypes.resolve(recipe.model, recipe.quantization, device)
    s = Shapes.of(model, figures.largest, dtypes.compute.itemsize)
    adapters = adapter_activation_bytes(model, layers, s.tokens) * (s.act_bytes / 4)  # measured in float32
    layer = block_bytes(s) + adapters / s.layers
    fixed = resident_terms(recipe, model, base, figures, runtime_mb, cpu, dtypes.load)
    terms = {}
    for key, checkpointing in (("without_checkpointing", False), ("with_checkpointing", True)):
        terms[key] = {name: value / MB for name, value in {**fixed, **activation_terms(s, layer, checkpointing, cpu)}.items()}
    return {
        "device": "cpu" if cpu else "cuda",
        "gradient_checkpointing": recipe.training.gradient_checkpointing,
        "without_checkpointing_mb": sum(terms["without_checkpointing"].values()),
        "with_checkpointing_mb": sum(terms["with_checkpointing"].values()),
        "terms_mb": terms,
    }


# --- printing ----------------------------------------------------------------------------------------


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
        f"weights: base ({quant}, unquantized weights in 16 bits) {mem['base_weights']:.2f} GB + frozen adapter tensors "
        f"{mem['shared_frozen_tensors']:.2f} GB + adapter & AdamW {mem['adapter_and_optimizer']:.2f} GB"
        + ("" if plan["peak_memory"] else " (activations not included)")
    )
    if plan["data"]:
        print_data(console, recipe, plan["data"])
    if plan["peak_memory"]:
        print_memory(console, plan["peak_memory"])
    if plan["data_problem"]:
        console.print(f"[yellow]warning:[/yellow] {plan['data_problem']} (training would stop here)", highlight=False)


def print_data(console, recipe: Recipe, data: dict[str, Any]) -> None:
    tcfg = recipe.training
    source = "all tokenized" if data["tokenized"] >= data["records"] else f"figures from {data['tokenized']:,} sampled at random"
    console.print(f"data: {data['examples']:,} training examples from {data['records']:,} records ({source})", highlight=False)
    lengths = data["token_lengths"]
    console.print(f"token lengths: p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']}", highlight=False)
    if data["rows"] is not None:
        console.print(
            f"packing: {data['rows']:,} rows of {recipe.data.cutoff_len} tokens, efficiency {100 * data['packing_efficiency']:.1f}% "
            "(real tokens / (rows x cutoff_len))", highlight=False,
        )
    else:
        grouped = ", grouped by length" if recipe.data.group_by_length else ""
        console.print(
            f"padding: {100 * data['padding_fraction']:.1f}% of the tokens computed, over one epoch's "
            f"{data['micro_batches']:,} micro-batches of {tcfg.micro_batch_size}{grouped}", highlight=False,
        )
    unit = "rows" if data["rows"] is not None else "examples"
    rows, width = data["largest_micro_batch"]
    console.print(
        f"steps per epoch: {data['steps_per_epoch']:,} (batches of {tcfg.batch_size} {unit}); planned steps: "
        f"{data['planned_steps']:,}; largest micro-batch: {rows} x {width} tokens", highlight=False,
    )


def print_memory(console, peak: dict[str, Any]) -> None:
    from rich.table import Table

    what = "process resident set, as metrics.jsonl's peak_mem_mb" if peak["device"] == "cpu" else "torch.cuda.max_memory_allocated"
    table = Table(title=f"estimated peak memory, {peak['device']} ({what}), MB")
    for col in ("term", "without checkpointing", "with checkpointing"):
        table.add_column(col, justify="right" if col != "term" else "left")
    off, on = peak["terms_mb"]["without_checkpointing"], peak["terms_mb"]["with_checkpointing"]
    for name in off:
        table.add_row(name.replace("_", " "), f"{off[name]:,.0f}", f"{on[name]:,.0f}")
    table.add_row("peak", f"{peak['without_checkpointing_mb']:,.0f}", f"{peak['with_checkpointing_mb']:,.0f}", style="bold")
    console.print(table)
    used = peak["with_checkpointing_mb"] if peak["gradient_checkpointing"] else peak["without_checkpointing_mb"]
    setting = "with" if peak["gradient_checkpointing"] else "without"
    console.print(
        f"estimated peak memory: {used / 1024:.2f} GB (the recipe trains {setting} gradient checkpointing); "
        f"{peak['without_checkpointing_mb'] / 1024:.2f} GB without, {peak['with_checkpointing_mb'] / 1024:.2f} GB with",
        highlight=False,
    )
