"""The contract every registered adapter type keeps, checked over the registry (a new type is checked
without touching this file; it needs a naive reference in adapter_reference.NAIVE and its parameter
count in adapter_reference.PARAMETERS). Each type runs with its ``CONTRACT_OPTIONS``, and again with every
option set of ``CONTRACT_VARIANTS`` (options that change how the type builds ΔW, such as RandLoRA's sparse
``keep_rank``):

* the trainable parameter count is the paper's formula (adapter_reference.PARAMETERS), as ``num_trainable`` says;
* ΔW = 0 at initialisation, so training starts from the base model;
* the forward is x·(W + ΔW)ᵀ with ΔW from the naive float64 formula, ``delta_weight()`` is that ΔW, and
  the gradients are autograd's of the naive formula, on plain and quantized bases;
* a saved adapter reloads bit-identically (layer by layer and attached to a model), merges through
  ``delta_weight()`` into a model that reproduces base + adapter, and inspect-rank reports its ΔW.
"""

import json

import pytest
import torch

from adapter_reference import NAIVE, PARAMETERS, build_layer, check_all, contract_cases, naive_figures, naive_of, randomize_trainables
from lrft.adapters import get_adapter, known_types

TYPES = known_types()
# every type with its CONTRACT_OPTIONS, and the option variants of adapter_reference.CONTRACT_VARIANTS
CASES = contract_cases(TYPES)
BASES = ["none", "nf4", "fp4", "int8"]
# LLM.int8 quantizes the activations too, so its kernel is not x·Wᵀ; adapters whose output rescales the
# base output (DoRA) cannot equal x·(W + ΔW)ᵀ on it and are checked against the kernel in their own file
FORWARD_CASES = [
    pytest.param(*case.values, base, id=f"{case.id}-{base}") for case in CASES for base in BASES
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


@pytest.mark.parametrize("kind, options, base", FORWARD_CASES)
@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
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


# --- on disk: reload, merge, inspect --------------------------------------------------------------------

TARGETS = ["q_proj", "down_proj"]


def load(folder, bits):
    from lrft.model import load_base_model
    from lrft.recipe import ModelSection, QuantizationSection

    model_section = ModelSection(name_or_path=str(folder), dtype="float32")
    quant = QuantizationSection(bits=bits, compute_dtype="float32")
    return load_base_model(model_section, quant, torch.device("cpu")), model_section, quant


@pytest.fixture(scope="module", params=[pytest.param(case.values, id=case.id) for case in CASES])
def saved(request, tiny_base, tmp_path_factory):
    """An adapter of each type (and variant) on the 4-bit tiny base, trainables randomized, saved; with its
    in-memory layers and model for comparison."""
    from lrft.adapter_folder import base_record, save_adapter
    from lrft.inject import inject_adapters
    from lrft.model import Dtypes

    kind, options = request.param
    model, model_section, quant = load(tiny_base, 4)
    config = get_adapter(kind).config(type=kind, target_modules=TARGETS, **options)
    torch.manual_seed(1)
    layers = inject_adapters(model, config)
    for layer in layers.values():
        randomize_trainables(layer, scale=0.05)
    folder = tmp_path_factory.mktemp("contract") / kind
    save_adapter(folder, layers, config, base_record(model_section, quant, Dtypes.resolve(model_section, quant, torch.device("cpu"))))
    return folder, model.eval(), layers


def test_reloads_bit_identically(saved, tiny_base):
    from lrft.adapter_folder import AdapterFolder

    folder_path, model, layers = saved
    folder = AdapterFolder.read(folder_path)
    assert set(folder.layer_shapes) == set(layers)
    fresh, _, _ = load(tiny_base, 4)
    reloaded = folder.attach(fresh)
    with torch.no_grad():
        for name, layer in layers.items():
            assert torch.equal(reloaded[name].delta_weight(), layer.delta_weight()), name
            if not layer.needs_base_weight:  # rebuilt around a shape-only stand-in
                assert torch.equal(folder.layer(name).delta_weight(), layer.delta_weight()), name
        ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
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
    kept as trained when it does not) against the adapter's training-time path, on the 4-bit base: the
    tolerance of merge verification in float32."""
    from lrft import inference
    from lrft.merge import TOLERANCES, compare_logits

    folder_path, _, layers = saved
    if memory == "scarce":  # room for nothing dense: each layer is factored or kept
        monkeypatch.setattr(inference, "available_bytes", lambda device: 2)
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    folded = inference.load_for_inference(folder_path, None)
    kept = inference.load_for_inference(folder_path, None, keep_quantized=True)
    if memory == "ample":
        assert folded.note == f"ΔW folded for inference: {len(layers)} layers merged into dense float32 weights (+0 MB)"
    else:
        assert "merged" not in folded.note
        narrow = [n for n, layer in layers.items() if not layer.needs_base_weight and layer.factors() is not None
                  and layer.factors()[0].shape[1] <= inference.FACTORED_SHARE * min(layer.in_features, layer.out_features)]
        assert (f"{len(narrow)} layers as fixed low-rank factors" in folded.note) == bool(narrow)
    with torch.no_grad():
        figures = compare_logits(list(kept.model(input_ids=ids).logits.float()), list(folded.model(input_ids=ids).logits.float()))
    rel, kl = TOLERANCES["float32"]
    assert figures["max_abs_logit_diff"] <= rel * max(1.0, figures["max_abs_logit"]) and figures["mean_kl"] <= kl
