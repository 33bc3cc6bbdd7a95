import json
import math

import pytest
import torch
from pydantic import ValidationError

from adapter_reference import NAIVE, build_layer, check_all, naive_of
from conftest import make_linear
from lrft.adapters import get_adapter, randlora
from lrft.adapter_folder import AdapterFolder, save_adapter
from lrft.adapters.base import SharedTensors
from lrft.adapters.randlora import expected_sparse_rank, forming_is_cheaper
from lrft.errors import UserError

FLOAT32 = {"load": "float32", "compute": "float32", "frozen": "float32"}

SPEC = get_adapter("randlora")


def build_sharing(shared, in_f, out_f, **options):
    """A RandLoRA layer drawing its bases from ``shared`` (trainables left at their initial values)."""
    return SPEC.layer(make_linear("none", in_f, out_f), SPEC.config(type="randlora", **options), shared, "test")


@pytest.mark.parametrize("basis", ["normal", "binary", "sparse"])  # uniform: the contract's
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_randlora_each_basis_matches_naive_reference(basis, shape):
    extra = {"sparsity": 4} if basis == "sparse" else {}
    check_all(build_layer("randlora", "none", *shape, r=8, basis=basis, **extra))


@pytest.mark.parametrize("shape", [(16, 64), (64, 16)])
def test_sparse_rows_of_unequal_length_and_empty_rows(shape):
    """The gradient of M is taken row by row of A, padded to the longest row: rows of every length,
    an empty one included, give the reference forward and gradients."""
    for seed in range(200):
        layer = build_layer("randlora", "none", *shape, r=8, basis="sparse", sparsity=8, seed=seed)
        row_lengths = torch.count_nonzero(layer.bases.dense_A(), dim=1)
        if row_lengths.min() == 0 and row_lengths.max() > 1:
            break
    else:
        pytest.fail("no seed gave an empty row of A")
    assert layer.bases.A_columns.shape == (8, int(row_lengths.max()))
    check_all(layer)


@pytest.mark.parametrize("shape", [(64, 64), (64, 80), (80, 64)])
def test_formed_weight_path_matches_reference(shape):
    """Many tokens on a near-square layer take the formed-ΔW path; forward and gradients stay exact."""
    layer = build_layer("randlora", "none", *shape, r=8)
    tokens = 512
    assert forming_is_cheaper(tokens, max(shape), min(shape), layer.num_terms * 8, backward=True)
    x = torch.randn(tokens, shape[0], requires_grad=True)
    out = layer.delta(x)
    lambdas = layer.lambdas.detach().double().requires_grad_(True)
    gammas = layer.gammas.detach().double().requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)
    ref = x_ref @ NAIVE["randlora"](layer, {"lambdas": lambdas, "gammas": gammas}).T
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out * weights.float()).sum().backward()
    (ref * weights).sum().backward()
    for got, want in [(x.grad, x_ref.grad), (layer.lambdas.grad, lambdas.grad), (layer.gammas.grad, gammas.grad)]:
        torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_cost_rule():
    # LLaMA-3-8B shapes, n·r ≈ d: training forms ΔW only for square layers with many tokens
    assert not forming_is_cheaper(512, 4096, 4096, 4110, backward=True)
    assert forming_is_cheaper(8192, 4096, 4096, 4110, backward=True)
    assert not forming_is_cheaper(65536, 14336, 4096, 4110, backward=True)  # up/down: never
    # forward only (evaluation): once the tokens outnumber D
    assert not forming_is_cheaper(4000, 14336, 4096, 4110, backward=False)
    assert forming_is_cheaper(16384, 14336, 4096, 4110, backward=False)


@pytest.mark.parametrize("options", [{}, {"basis": "sparse", "sparsity": 4, "keep_rank": True}])
def test_forward_saves_no_scaled_basis(options):
    """The autograd graph keeps x, Λ and Γ, never an n·r×d tensor (M) nor a D×d one (ΔW)."""
    for shape in [(96, 160), (160, 96)]:
        layer = build_layer("randlora", "none", *shape, r=8, **options)
        stacked_basis_size = layer.num_terms * layer.basis_rank * layer.small_features
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        x = torch.randn(4, shape[0], requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            delta = layer.delta(x)
        delta.sum().backward()
        assert saved and max(saved) < stacked_basis_size, saved


def test_state_holds_only_the_scalings():
    layer = build_layer("randlora", "none", 40, 24, r=5)
    state = layer.adapter_state_dict()
    assert set(state) == {"lambdas", "gammas"}  # bases are regenerated from the seed, never saved
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in layer.parameters() if p.requires_grad)


def test_llama3_8b_published_parameter_count():
    """RandLoRA r=30 on q, k, v, up, down of LLaMA-3-8B's 32 layers: 56,626,112 trainable parameters."""
    config = SPEC.config(type="randlora", r=30)
    shapes = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "up": (4096, 14336), "down": (14336, 4096)}
    per_block = sum(SPEC.layer.num_trainable(i, o, config) for i, o in shapes.values())
    assert 32 * per_block == 56_626_112
    # and the real module agrees, built on the meta device (construction only, no memory)
    with torch.device("meta"):
        down = torch.nn.Linear(14336, 4096, bias=False)
    layer = SPEC.layer(down, config, SharedTensors(0), "down_proj")
    assert sum(p.numel() for p in (layer.lambdas, layer.gammas)) == SPEC.layer.num_trainable(14336, 4096, config)
    assert layer.lambdas.device.type == "meta" and layer.bases.B.device.type == "meta"


@pytest.mark.parametrize("basis", ["uniform", "normal", "binary", "sparse"])
def test_update_is_full_rank_unlike_lora(basis):
    """With trained (random) scalings ΔW has rank min(D, d), where LoRA with the same r stays at <= r.

    Ranks are taken of float64 products of the layers' own tensors: float32 round-off alone would make
    any matrix look full rank at float64 tolerances.
    """
    extra = {"sparsity": 3} if basis == "sparse" else {}
    for shape in [(40, 72), (72, 40)]:
        layer = build_layer("randlora", "none", *shape, r=8, basis=basis, **extra)
        delta = naive_of(layer)
        torch.testing.assert_close(layer.delta_weight().double(), delta, atol=1e-5, rtol=1e-5)
        assert torch.linalg.matrix_rank(delta).item() == 40
    lora_delta = naive_of(build_layer("lora", "none", 40, 72, r=8))
    assert torch.linalg.matrix_rank(lora_delta).item() <= 8


def test_documented_defaults():
    layer = build_layer("randlora", "none", 48, 80, r=8, alpha=None, randomize=False)
    assert layer.scaling == 20.0  # default alpha = 20 r
    assert torch.all(layer.gammas == 1 / 48)
    # Λ gets a gradient on the first step (Γ ≠ 0), so training moves ΔW
    layer(torch.randn(3, 48)).pow(2).sum().backward()
    assert layer.lambdas.grad.abs().sum() > 0


@pytest.mark.parametrize("basis", ["uniform", "sparse"])
def test_layers_of_equal_shape_share_one_basis(basis):
    shared = SharedTensors(0)
    first = build_sharing(shared, 48, 80, r=8, basis=basis)
    second = build_sharing(shared, 48, 80, r=8, basis=basis)
    transposed = build_sharing(shared, 80, 48, r=8, basis=basis)
    for other in (second, transposed):
        assert other.bases.B is first.bases.B
        if basis == "sparse":
            assert other.bases.A_tiled is first.bases.A_tiled and other.bases.B_t is first.bases.B_t
        else:
            assert other.bases.A is first.bases.A
    wider = build_sharing(shared, 48, 96, r=8, basis=basis)
    assert wider.bases.B is not first.bases.B
    if basis == "uniform":  # same d and r: one A for every layer width
        assert wider.bases.A is first.bases.A
    # same seed in another SharedTensors: the same values (reloading regenerates them)
    again = build_layer("randlora", "none", 48, 80, r=8, basis=basis)
    assert torch.equal(again.bases.dense_B(), first.bases.dense_B())


def test_bases_are_stored_in_frozen_dtype():
    layer = build_layer("randlora", "none", 48, 80, frozen_dtype=torch.bfloat16, r=8)
    assert layer.bases.A.dtype == layer.bases.B.dtype == torch.bfloat16
    assert layer.lambdas.dtype == layer.gammas.dtype == torch.float32
    sparse = build_layer("randlora", "none", 48, 80, frozen_dtype=torch.bfloat16, r=8, basis="sparse", sparsity=4)
    assert sparse.bases.B.dtype == torch.bfloat16 and sparse.bases.B.layout == torch.sparse_csr


def test_basis_distributions_are_unit_variance():
    for basis in ["uniform", "normal", "binary"]:
        B = build_layer("randlora", "none", 128, 512, r=16, basis=basis).bases.B
        assert abs(B.mean().item()) < 0.02 and abs(B.std().item() - 1) < 0.02, basis
    assert set(build_layer("randlora", "none", 64, 128, r=8, basis="binary").bases.B.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("sparsity", [3, 16])
def test_sparse_basis_density_and_storage(sparsity):
    layer = build_layer("randlora", "none", 256, 1024, r=16, basis="sparse", sparsity=sparsity)
    B = layer.bases.B
    assert B.layout == torch.sparse_csr and B.col_indices().dtype == torch.int32
    density = B.values().numel() / B.shape.numel()
    assert abs(density - 2 / sparsity) < 0.05 * (2 / sparsity)
    values = B.values()
    assert torch.allclose(values.abs(), torch.full_like(values, math.sqrt(sparsity / 2)))
    assert abs((values > 0).float().mean().item() - 0.5) < 0.02  # +1 and -1 equally likely
    dense_A = layer.bases.dense_A()
    assert abs(torch.count_nonzero(dense_A).item() / dense_A.numel() - 2 / sparsity) < 0.1 * (2 / sparsity)


def test_sparsity_defaults_to_sqrt_of_the_larger_dimension():
    assert build_layer("randlora", "none", 64, 144, r=8, basis="sparse").sparsity == 12.0


def test_config_validation():
    with pytest.raises(ValidationError):
        SPEC.config(type="randlora", basis="uniform", sparsity=4)
    with pytest.raises(ValidationError):
        SPEC.config(type="randlora", basis="sparse", sparsity=1.5)
    with pytest.raises(ValidationError):
        SPEC.config(type="randlora", basis="ternary")
    with pytest.raises(UserError, match="sparsity"):
        build_layer("randlora", "none", 64, 144, r=8, basis="sparse", sparsity=13)  # sqrt(144) = 12
    with pytest.raises(ValidationError, match="keep_rank applies only to basis: sparse"):
        SPEC.config(type="randlora", basis="uniform", keep_rank=True)


def test_sparse_shared_basis_under_autocast_bfloat16():
    """The contract runs the dense bases and sparse ones with keep_rank under autocast; the sparse shared A
    (rows gathered by column index) has its own path."""
    layer = build_layer("randlora", "int8", 128, 64, frozen_dtype=torch.bfloat16, r=8, basis="sparse")
    x = torch.randn(2, 5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    expected = layer.base_layer(x.detach()).float() + x.detach() @ layer.delta_weight().T
    torch.testing.assert_close(out.float(), expected, atol=0.02 * expected.abs().max().item(), rtol=0)
    out.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lambdas.grad.dtype == torch.float32
    assert layer.lambdas.grad.abs().sum() > 0 and layer.gammas.grad.abs().sum() > 0


# --- keep_rank: one sparse A_j per term -----------------------------------------------------------------

def float64_delta(layer):
    """ΔW = scaling · B·[Λ_j A_j Γ_j]_j (ΔW transposed when in > out) in float64 from the layer's own
    tensors, vectorised (the naive loop of adapter_reference takes seconds at 576×1536)."""
    bases = layer.bases
    n, r, d = layer.num_terms, layer.basis_rank, layer.small_features
    A = bases.dense_A_stack().double().view(n, r, d)
    M = (A * layer.lambdas.detach().double()[:, :, None] * layer.gammas.detach().double()[:, None, :]).view(n * r, d)
    delta = bases.dense_B().double() @ M * layer.scaling
    return delta if layer.input_is_small else delta.T


def test_keep_rank_restores_full_rank_of_sparse_bases():
    """SmolLM2's 576→1536 shape at r = 10, s = sqrt(1536): one shared sparse A leaves about 59 % of the
    input directions unread (expected rank d·(1 − (1 − 2/s)^r) ≈ 235 of 576; measured 223), and ΔW's
    numerical rank, with the trainable diagonals randomised, stays there; one A_j per term reaches d."""
    ranks = {}
    for keep_rank in (False, True):
        layer = build_layer("randlora", "none", 576, 1536, r=10, basis="sparse", keep_rank=keep_rank)
        assert layer.sparsity == pytest.approx(math.sqrt(1536))
        delta = float64_delta(layer)
        torch.testing.assert_close(layer.delta_weight().double(), delta, atol=1e-5 * delta.abs().max().item(), rtol=0)
        ranks[keep_rank] = torch.linalg.matrix_rank(delta).item()
        reached = int((layer.bases.dense_A_stack().abs().sum(0) > 0).sum())  # columns some A_j reads
        assert ranks[keep_rank] <= reached
        assert layer.rank_ceiling() == reached  # what inspect-rank reports as rank_bound (B reaches every row)
    expected = expected_sparse_rank(576, 10, math.sqrt(1536))
    assert 200 < expected < 270 and abs(ranks[False] - expected) < 40
    assert ranks[False] < 0.5 * 576
    assert ranks[True] == 576


def test_keep_rank_bases_are_per_term_and_shared_between_layers():
    shared = SharedTensors(0)
    first = build_sharing(shared, 48, 80, r=8, basis="sparse", sparsity=4, keep_rank=True)
    again = build_sharing(shared, 80, 48, r=8, basis="sparse", sparsity=4, keep_rank=True)
    assert again.bases.A_tiled is first.bases.A_tiled and again.bases.B is first.bases.B
    plain = build_sharing(shared, 48, 80, r=8, basis="sparse", sparsity=4)
    assert plain.bases.A_tiled is not first.bases.A_tiled and plain.bases.B is first.bases.B  # B is the same draw
    stack = first.bases.dense_A_stack().view(first.num_terms, 8, 48)
    assert not torch.equal(stack[0], stack[1])  # every term has its own A_j
    density = torch.count_nonzero(stack).item() / stack.numel()
    assert abs(density - 2 / 4) < 0.1 * (2 / 4)
    assert first.bases.A_columns is None  # no padded rows: the gradient of M is a sampled product
    with pytest.raises(ValueError, match="dense_A_stack"):
        first.bases.dense_A()
    assert "keep_rank" in repr(first)


def test_low_expected_rank_warns_once_with_the_fix(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(randlora, "_WARNED", set())
    build_layer("randlora", "none", 576, 1536, r=10, basis="sparse", randomize=False)
    build_layer("randlora", "none", 1536, 576, r=10, basis="sparse", randomize=False)  # same d, r, s: once
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "expected rank is 235 (41% of d)" in err and "adapter.keep_rank: true" in err
    assert "adapter.sparsity <= 9.7" in err and "adapter.r >= 44" in err
    # the fixes it names silence it
    build_layer("randlora", "none", 576, 1536, r=10, basis="sparse", keep_rank=True, randomize=False)
    build_layer("randlora", "none", 576, 1536, r=10, basis="sparse", sparsity=9.7, randomize=False)
    build_layer("randlora", "none", 576, 1536, r=44, basis="sparse", randomize=False)
    assert expected_sparse_rank(576, 10, 9.7) >= 0.9 * 576 and expected_sparse_rank(576, 44, math.sqrt(1536)) >= 0.9 * 576
    assert "warning:" not in capsys.readouterr().err

    # an adapter folder rebuilding trained layers (merge, eval, inspect-rank) does not repeat the advice
    monkeypatch.setattr(randlora, "_WARNED", set())
    layer = build_layer("randlora", "none", 576, 1536, r=10, basis="sparse", randomize=False)
    capsys.readouterr()
    monkeypatch.setattr(randlora, "_WARNED", set())
    folder = tmp_path / "adapter"
    save_adapter(folder, {"model.layers.0.mlp.up_proj": layer}, layer.config,
                 {"base_model": {"name_or_path": "none"}, "quantization": {"bits": None}, "dtypes": FLOAT32})
    loaded = AdapterFolder.read(folder)
    loaded.check_tensors()
    torch.testing.assert_close(loaded.layer("model.layers.0.mlp.up_proj").delta_weight(), layer.delta_weight())
    assert "warning:" not in capsys.readouterr().err


def test_keep_rank_adapter_trains_and_inspect_rank_reports_full_rank(tiny_model_dir, tmp_path):
    """`lrft train` a few steps of sparse RandLoRA (s = sqrt(D), r = 4) on the tiny 4-bit Llama, then
    `lrft inspect-rank`: with keep_rank every layer's ΔW has rank min(in, out); with one shared A the
    unread input directions stay unread after training."""
    from typer.testing import CliRunner

    from lrft.cli import app

    ranks = {}
    for keep_rank in (True, False):
        run = tmp_path / f"keep_rank-{keep_rank}"
        result = CliRunner().invoke(app, [
            "train", "recipes/smollm2-commonsense-randlora.yaml", "--set", f"model.name_or_path={tiny_model_dir}",
            "--set", "adapter.r=4", "--set", "adapter.basis=sparse", "--set", f"adapter.keep_rank={str(keep_rank).lower()}",
            "--set", "data.cutoff_len=64", "--set", "data.val_size=4", "--set", "training.batch_size=4",
            "--set", "training.warmup_steps=0", "--set", "training.learning_rate=1e-2", "--max-steps", "3",
            "--output-dir", str(run),
        ])
        assert result.exit_code == 0, result.output
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["adapter"]["keep_rank"] is keep_rank
        result = CliRunner().invoke(app, ["inspect-rank", str(run / "adapter"), "--json", str(run / "rank.json")])
        assert result.exit_code == 0, result.output
        rows = json.loads((run / "rank.json").read_text())["layers"]
        assert len(rows) == 2 * 5
        ranks[keep_rank] = {row["name"]: (row["rank"], row["rank_bound"]) for row in rows}
    assert all(rank == bound == 32 or rank == bound == 64 for rank, bound in ranks[True].values())
    # one shared A: the bound is the directions it reaches, below min(in, out), and training fills it
    assert all(rank == bound < ranks[True][name][1] for name, (rank, bound) in ranks[False].items())
