"""The contract every registered adapter type keeps, checked over the registry (a new type is checked
without touching this file; it needs a naive reference in adapter_reference.NAIVE and its parameter
count in adapter_reference.PARAMETERS). Each type runs with its ``CONTRACT_OPTIONS``, and again with every
option set of ``CONTRACT_VARIANTS`` (options that change how the type builds ΔW, such as RandLoRA's sparse
``keep_rank``):

* the trainable parameter count is the paper's formula (adapter_reference.PARAMETERS), as ``num_trainable`` says;
* ΔW = 0 at initialisation, so training starts from the base model;
* the forward is x·(W + ΔW)ᵀ with ΔW from the naive float64 formula, ``delta_weight()`` is that ΔW, and
  the gradients are autograd's of the naive formula, on plain and quantized bases;
* under CPU bfloat16 autocast the output and the gradients are the float32 ones within bfloat16's rounding,
  finite, in the dtypes training expects;
* a saved adapter reloads bit-identically (layer by layer and attached to a model), merges through
  ``delta_weight()`` into a model that reproduces base + adapter, and inspect-rank reports its ΔW;
* every type is either exported to PEFT's format (``lrft merge --format peft``), where PEFT's own
  ``PeftModel.from_pretrained`` gives lrft's logits and the export reads back with every layer's ΔW, or named
  in ``lrft.peft_format.UNSUPPORTED`` with the reason, which the export then gives;
* a run resumed from a checkpoint (lrft.checkpoint's files, read into a fresh model) ends bit-identical to
  the same run trained straight through: adapter tensors (masks included), controller state (AdaLoRA's and
  LoRA²'s importance, RM-LoRA's update counts) and optimizer state.

The checks on disk and in training run on ``byte_base`` (conftest.py), a tiny Llama with a byte-level
vocabulary of 257 instead of SmolLM2's 49152: the output head, most of the work of a tiny model with a real
tokenizer, then costs next to nothing.
"""

import json
import shutil

import pytest
import torch

from adapter_reference import (
    NAIVE, PARAMETERS, RESUME_OPTIONS, build_layer, check_all, contract_cases, deterministic, naive_figures, naive_of,
    randomize_trainables,
)
from conftest import choice_logprob, choice_task
from lrft.adapters import get_adapter, known_types

TYPES = known_types()
# every type with its CONTRACT_OPTIONS, and the option variants of adapter_reference.CONTRACT_VARIANTS
CASES = contract_cases(TYPES)
BASES = ["none", "nf4", "fp4", "int8"]
# Both orientations on the plain base (RandLoRA transposes ΔW when in > out), one on each quantized base (its
# kernel and its dequantization are what it adds). LLM.int8 quantizes the activations too, so its kernel is not
# x·Wᵀ; adapters whose output rescales the base output (DoRA) cannot equal x·(W + ΔW)ᵀ on it and are checked
# against the kernel in their own file.
FORWARD_CASES = [
    pytest.param(*case.values, base, shape, id=f"{case.id}-{base}-{shape[0]}x{shape[1]}")
    for case in CASES for base in BASES for shape in ([(64, 128), (128, 64)] if base == "none" else [(128, 64)])
    if not (base == "int8" and get_adapter(case.values[0]).layer.needs_base_weight)
]


def test_every_registered_type_has_a_reference():
    assert set(TYPES) <= set(NAIVE), f"add a naive float64 reference for {sorted(set(TYPES) - set(NAIVE))}"
    assert set(TYPES) <= set(PARAMETERS), f"add the paper's parameter count for {sorted(set(TYPES) - set(PARAMETERS))}"


@pytest.mark.parametrize("kind, options", CASES)
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_parameter_count_is_the_formula(kind, options, shape):
    layer = build_layer(kind, "none", *shape, randomize=False, **options)
    count = sum(p.numel() for name, p in layer.named_parameters() if p.requires_grad and not name.startswith("base_layer."))
    assert count == layer.num_trainable(*shape, layer.config) == PARAMETERS[kind](*shape, layer.config) > 0


@pytest.mark.parametrize("kind, options", CASES)
def test_starts_from_the_base_model(kind, options):
    layer = build_layer(kind, "none", 64, 48, randomize=False, **options)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), layer.base_layer(x))


@pytest.mark.parametrize("kind, options, base, shape", FORWARD_CASES)
def test_forward_delta_weight_and_gradients_match_the_naive_reference(kind, options, base, shape):
    check_all(build_layer(kind, base, *shape, **options))


@pytest.mark.parametrize("kind, options", CASES)
@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_factors_are_the_naive_delta_as_a_product(kind, options, shape):
    """factors() (the factored path of merge --format lora and inspect-rank) multiplies out to the naive ΔW;
    only a type whose ΔW depends on the base weight itself (DoRA) has none."""
    layer = build_layer(kind, "none", *shape, **options)
    with torch.no_grad():
        factors = layer.factors()
        expected = naive_of(layer)
    if layer.needs_base_weight:
        assert factors is None
        return
    left, right = factors
    assert left.dtype == right.dtype == torch.float32 and left.shape[1] == right.shape[0]
    torch.testing.assert_close(left.double() @ right.double(), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


# --- bfloat16 autocast ---------------------------------------------------------------------------------

# of the largest magnitude: a few roundings to bfloat16's 8-bit significand (2^-8 relative each), chained
# through up to five factors (LoRA²); the measured worst is 0.012
BF16_TOLERANCE = 6 * 2**-8


@pytest.mark.parametrize("kind, options", CASES)
@pytest.mark.parametrize("base", ["none", "nf4", "int8"])
@pytest.mark.parametrize("shape", [(128, 64), (64, 128)])
def test_bfloat16_autocast_is_the_float32_result_rounded(kind, options, base, shape):
    """Forward and backward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, frozen tensors stored in
    bfloat16 as a bfloat16 run stores them, against the same layer in float32: output and gradients (the
    trainables' and the input's) agree within bfloat16's rounding and are finite; the output has the frozen
    layer's autocast dtype, every gradient its tensor's dtype (float32)."""
    layer = deterministic(build_layer(kind, base, *shape, frozen_dtype=torch.bfloat16, **options))
    trainables = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(2, 5, shape[0], generator=torch.Generator().manual_seed(7))
    upstream = torch.randn(2, 5, shape[1], generator=torch.Generator().manual_seed(8))

    def forward_backward(autocast: bool):
        inputs = x.clone().requires_grad_(True)
        for p in trainables.values():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(inputs)
            base_dtype = layer.base_layer(inputs).dtype
        (out.float() * upstream).sum().backward()
        return out, base_dtype, {"input": inputs.grad, **{n: p.grad.clone() for n, p in trainables.items()}}

    exact, _, exact_grads = forward_backward(False)
    rounded, base_dtype, grads = forward_backward(True)
    assert rounded.dtype == base_dtype and torch.isfinite(rounded).all()
    torch.testing.assert_close(rounded.float(), exact, atol=BF16_TOLERANCE * float(exact.abs().max()), rtol=0)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        want = exact_grads[name]
        torch.testing.assert_close(grad, want, atol=BF16_TOLERANCE * float(want.abs().max()), rtol=0, msg=lambda m: f"{name}: {m}")


# --- on disk: reload, merge, inspect --------------------------------------------------------------------

TARGETS = ["q_proj", "down_proj"]
VOCAB = 257  # byte_base's


def load(folder, bits):
    from lrft.model import load_base_model
    from lrft.recipe import ModelSection, QuantizationSection

    model_section = ModelSection(name_or_path=str(folder), dtype="float32")
    quant = QuantizationSection(bits=bits, compute_dtype="float32")
    return load_base_model(model_section, quant, torch.device("cpu")), model_section, quant


def save_random_adapter(base_folder, bits, kind, options, targets, folder, scale=0.05):
    """An adapter of ``kind`` on the base loaded with ``bits``, trainables randomized (``scale``), saved in
    ``folder``; returns the model (eval mode) and its layers."""
    from lrft.adapter_folder import base_record, save_adapter
    from lrft.inject import inject_adapters
    from lrft.model import Dtypes

    model, model_section, quant = load(base_folder, bits)
    config = get_adapter(kind).config(type=kind, target_modules=targets, **options)
    torch.manual_seed(1)
    layers = inject_adapters(model, config)
    for layer in layers.values():
        randomize_trainables(layer, scale=scale)
    save_adapter(folder, layers, config, base_record(model_section, quant, Dtypes.resolve(model_section, quant, torch.device("cpu"))))
    return model.eval(), layers


def token_ids(rows: int):
    return torch.randint(0, VOCAB, (rows, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[pytest.param(case.values, id=case.id) for case in CASES])
def saved(request, byte_base, tmp_path_factory):
    """An adapter of each type (and variant) on the 4-bit tiny base, trainables randomized, saved; with its
    in-memory layers and model for comparison."""
    kind, options = request.param
    folder = tmp_path_factory.mktemp("contract") / kind
    model, layers = save_random_adapter(byte_base, 4, kind, options, TARGETS, folder)
    return folder, model, layers


def test_reloads_bit_identically(saved, byte_base):
    from lrft.adapter_folder import AdapterFolder

    folder_path, model, layers = saved
    folder = AdapterFolder.read(folder_path)
    assert set(folder.layer_shapes) == set(layers)
    fresh, _, _ = load(byte_base, 4)
    reloaded = folder.attach(fresh)
    with torch.no_grad():
        for name, layer in layers.items():
            assert torch.equal(reloaded[name].delta_weight(), layer.delta_weight()), name
            if not layer.needs_base_weight:  # rebuilt around a shape-only stand-in
                assert torch.equal(folder.layer(name).delta_weight(), layer.delta_weight()), name
        ids = token_ids(1)
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_merges_through_delta_weight(saved, tmp_path):
    """Merge knows no adapter type: whatever delta_weight() returns is folded in, and the merged model
    reproduces base + adapter on a 4-bit base."""
    from lrft.merge import run_merge

    folder_path, _, _ = saved
    report = run_merge(folder_path, tmp_path / "merged", dtype="float32")
    figures = report["verification"]
    assert figures["passed"] and figures["max_abs_logit_diff"] < 1e-4 * max(1.0, figures["max_abs_logit"])
    assert json.loads((tmp_path / "merged" / "lrft_merge.json").read_text())["adapter_type"] == saved[0].name


def test_inspect_rank_reports_the_layers_own_delta(saved):
    from lrft.inspect_rank import inspect_adapters

    folder_path, _, layers = saved
    (report,), top_r = inspect_adapters([folder_path], show_progress=False)
    assert len(report.rows) == len(layers)
    for row in report.rows:
        layer = layers[row["name"]]
        with torch.no_grad():  # through the factors where there are some: float32 rounding adds tiny σ to a formed ΔW
            factors = layer.factors()
            dW = factors[0].double() @ factors[1].double() if factors is not None else layer.delta_weight().double()
        for key, value in naive_figures(dW, top_r).items():
            if key == "rank":
                assert row[key] == value, (row["name"], key)
            else:
                assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (row["name"], key)
        assert row["rank"] <= row["rank_bound"] <= min(row["shape"])


@pytest.mark.parametrize("memory", ["ample", "scarce"])
def test_folded_for_inference_computes_what_the_adapter_does(saved, memory, monkeypatch):
    """ΔW folded once (lrft.inference.fold: merged into dense weights when memory allows, as fixed factors or
    kept as trained when it does not) against the adapter's training-time path (the model it was saved from),
    on the 4-bit base: the tolerance of merge verification in float32."""
    from lrft import inference
    from lrft.merge import TOLERANCES, compare_logits

    folder_path, trained, layers = saved
    if memory == "scarce":  # room for nothing dense: each layer is factored or kept
        monkeypatch.setattr(inference, "available_bytes", lambda device: 2)
    ids = token_ids(2)
    folded = inference.load_for_inference(folder_path, None)
    if memory == "ample":
        assert folded.note == f"ΔW folded for inference: {len(layers)} layers merged into dense float32 weights (+0 MB)"
    else:
        assert "merged" not in folded.note
        narrow = [n for n, layer in layers.items() if not layer.needs_base_weight and layer.factors() is not None
                  and layer.factors()[0].shape[1] <= inference.FACTORED_SHARE * min(layer.in_features, layer.out_features)]
        assert (f"{len(narrow)} layers as fixed low-rank factors" in folded.note) == bool(narrow)
    with torch.no_grad():
        figures = compare_logits(list(trained(input_ids=ids).logits.float()), list(folded.model(input_ids=ids).logits.float()))
    rel, kl = TOLERANCES["float32"]
    assert figures["max_abs_logit_diff"] <= rel * max(1.0, figures["max_abs_logit"]) and figures["mean_kl"] <= kl


@pytest.mark.parametrize("kind, options", CASES)
def test_harness_scores_what_the_adapter_scores(kind, options, byte_base, tmp_path):
    """``lrft eval --harness`` on the adapter folder: lm-eval's log-likelihood of each choice, over the adapter
    folded into its base, is what the adapter as trained (the model it was saved from) gives, and far from
    what the base alone gives. Needs the harness extra."""
    pytest.importorskip("lm_eval")
    from lrft.harness import run_harness, task_manager
    from lrft.inference import load_for_inference
    from lrft.model import load_tokenizer

    folder_path = tmp_path / kind
    trained, _ = save_random_adapter(byte_base, 4, kind, options, TARGETS, folder_path, scale=0.5)
    items = [{"question": f"{word} is", "choices": ["red", "blue", "green"], "gold": i % 3}
             for i, word in enumerate(["The sky", "Grass", "A rose"])]
    tasks = choice_task(tmp_path / "tasks", items)
    loaded = load_for_inference(folder_path, None)
    rows: list = []
    run_harness(loaded, ["tiny_choice"], task_manager(["tiny_choice"], tasks, None), None, 2, None, rows)
    tokenizer = load_tokenizer(str(loaded.name))
    base, _, _ = load(byte_base, 4)
    changed = 0.0
    for item, row in zip(items, rows):
        expected = [choice_logprob(trained, tokenizer, item["question"], choice) for choice in item["choices"]]
        assert row["scores"] == pytest.approx(expected, abs=2e-3), row["id"]
        plain = [choice_logprob(base, tokenizer, item["question"], choice) for choice in item["choices"]]
        changed = max(changed, max(abs(a - b) for a, b in zip(expected, plain)))
    assert changed > 0.02, changed  # ten times the tolerance: the adapter was applied


# --- PEFT's format: exported and read back, or named unsupported ------------------------------------------

# one layer shape (64 -> 32): an adapter with RandLoRA's default layout (one pair of bases per shape) exports
# only then; exports of several shapes are in test_peft_format.py
PEFT_TARGETS = ["k_proj", "v_proj"]
# options PEFT's counterpart of a type cannot express: the export refuses them, saying why
PEFT_REFUSES = {"keep_rank": "one random A shared by every term"}


def test_every_type_is_exported_to_peft_or_named_unsupported():
    from lrft.peft_format import EXPORTERS, UNSUPPORTED

    missing = sorted(set(TYPES) - set(EXPORTERS) - set(UNSUPPORTED))
    assert not missing, f"add an exporter to lrft.peft_format.EXPORTERS or the reason to UNSUPPORTED for {missing}"
    assert not set(EXPORTERS) & set(UNSUPPORTED) and all(UNSUPPORTED.values())


@pytest.mark.parametrize("kind, options", CASES)
def test_peft_export_loads_in_peft_and_reads_back(kind, options, byte_base, tmp_path):
    """``lrft merge --format peft`` of an adapter on the unquantized base (PEFT records no quantization):
    PEFT's ``PeftModel.from_pretrained`` computes lrft's logits, and lrft reads the export back with every
    layer's ΔW. A type PEFT lacks, or options it cannot express, are refused in one line naming the reason and
    the formats that work, and nothing is written."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lrft.adapter_folder import AdapterFolder
    from lrft.errors import UserError
    from lrft.merge import run_merge
    from lrft.peft_format import UNSUPPORTED

    model, layers = save_random_adapter(byte_base, None, kind, options, PEFT_TARGETS, tmp_path / "lrft")
    export = tmp_path / "peft"
    refusals = [UNSUPPORTED[kind]] if kind in UNSUPPORTED else [why for key, why in PEFT_REFUSES.items() if options.get(key)]
    if refusals:
        with pytest.raises(UserError) as refused:
            run_merge(tmp_path / "lrft", export, fmt="peft")
        message = str(refused.value)
        assert refusals[0] in message and "--format hf" in message and "\n" not in message
        assert not export.exists()
        return
    run_merge(tmp_path / "lrft", export, fmt="peft")
    ids = token_ids(2)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(byte_base, dtype=torch.float32), export).eval()
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))
    _, imported = AdapterFolder.read(export).load_model(torch.device("cpu"))
    assert set(imported) == set(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            torch.testing.assert_close(imported[name].delta_weight(), layer.delta_weight(), atol=1e-6, rtol=1e-5)


# --- exact resume ---------------------------------------------------------------------------------------

RESUME_STEPS, CHECKPOINT_STEP = 6, 3


def resume_recipe(base_folder, data, kind, options, output_dir):
    """6 steps of 2 examples (micro-batches of 1) on byte_base, dropout on (so the random state must be
    restored too), a checkpoint every 3 steps. Unquantized: the state a resume restores is the adapter's, and
    bitsandbytes' CPU kernels would take most of the time."""
    from lrft.recipe import validate_recipe

    return validate_recipe({
        "model": {"name_or_path": str(base_folder)},
        "quantization": {"bits": None},
        "adapter": {"type": kind, **options, **RESUME_OPTIONS.get(kind, {}), "dropout": 0.1, "target_modules": TARGETS},
        "data": {"path": str(data), "format": "completion", "cutoff_len": 48, "val_size": 0},
        "training": {"seed": 3, "batch_size": 2, "micro_batch_size": 1, "max_steps": RESUME_STEPS, "save_steps": CHECKPOINT_STEP,
                     "warmup_steps": 1, "learning_rate": 1e-2},
        "output_dir": str(output_dir),
    })


def train_to_the_end(recipe, resume: bool):
    """lrft.train's loop without ``finish`` (which only saves what is compared here): the run as it ends."""
    from lrft.train import after_step, optimizer_step, setup

    run = setup(recipe, resume, False, False)
    assert run.step == (CHECKPOINT_STEP if resume else 0)
    while run.step < run.total_steps:
        after_step(run, optimizer_step(run), False)
    return run


def state_of(run) -> dict:
    """What a run carries from step to step: adapter tensors (masks included), controller, optimizer."""
    return {
        "adapter": {name: layer.adapter_state_dict() for name, layer in run.layers.items()},
        "controller": run.controller.state_dict(),
        "summary": run.controller.summary(),
        "optimizer": run.base_optimizer.state_dict()["state"],
        "lr": run.scheduler.get_last_lr(),
    }


def assert_identical(got, expected, where="state"):
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_identical(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where


@pytest.mark.parametrize("kind, options", CASES)
def test_resume_from_a_checkpoint_is_exact(kind, options, byte_base, tmp_path):
    """6 steps straight through against 3 steps, lrft.checkpoint's checkpoint, a fresh setup from it and 3 more:
    bit-identical adapter tensors, controller state and optimizer state (both runs in this process, through
    lrft.train's own setup, optimizer_step and after_step)."""
    from lrft.checkpoint import read_checkpoint

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i} plus {2 * i} is", "completion": f" {3 * i}."}) + "\n" for i in range(12)))
    straight = state_of(train_to_the_end(resume_recipe(byte_base, data, kind, options, tmp_path / "straight"), resume=False))

    resumed_dir = tmp_path / "resumed"  # what a kill between the two checkpoints leaves
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / f"step-{RESUME_STEPS}")
    checkpoint = read_checkpoint(resumed_dir / "checkpoints" / f"step-{CHECKPOINT_STEP}")
    resumed = state_of(train_to_the_end(resume_recipe(byte_base, data, kind, options, resumed_dir), resume=True))

    assert_identical(resumed, straight)
    # the comparison is not of two untrained states: the steps after the checkpoint moved the adapter
    moved = [key for key, value in checkpoint["adapter"].items() if value.is_floating_point()
             and not torch.equal(value, straight["adapter"][key.rsplit(".", 1)[0]][key.rsplit(".", 1)[1]])]
    assert moved
