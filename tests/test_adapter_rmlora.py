import pytest
import torch

from adapter_reference import NAIVE, check_forward, check_gradients, naive_of, randomize_trainables
from conftest import make_linear
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors
from lrft.errors import UserError


def make_config(**cfg):
    return get_adapter("rmlora").config(type="rmlora", **cfg)


def build(kind, in_f, out_f, name="test", init_seed=0, **cfg):
    """A named layer; ``init_seed`` varies the base weight and the trainables between the layers of a model."""
    config = make_config(**cfg)
    base = make_linear(kind, in_f, out_f, seed=init_seed)
    layer = get_adapter("rmlora").layer(base, config, SharedTensors(config.seed), name)
    randomize_trainables(layer, seed=init_seed + 1)
    return layer


def build_model(kind="none", shapes=((64, 48), (48, 40)), **cfg):
    """Two chained layers (so x of the second needs a gradient) and their controller."""
    spec = get_adapter("rmlora")
    layers = {f"l{i}": build(kind, i_f, o_f, name=f"l{i}", init_seed=i, **cfg) for i, (i_f, o_f) in enumerate(shapes)}
    return layers, spec.controller(layers, next(iter(layers.values())).config, total_steps=100)


def run_model(layers, x):
    for layer in layers.values():
        x = layer(x)
    return x


def naive_reg(A, B, squared):
    A, B = A.double(), B.double()
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    a = ((A @ A.T - eye) ** 2).sum()
    b = ((B.T @ B - eye) ** 2).sum()
    return (a, b) if squared else (a.sqrt(), b.sqrt())


# --- directions selected: ΔW = scaling · B A unchanged, gradients masked ------------------------------


@pytest.mark.parametrize("kind", ["none", "nf4", "int8"])
def test_selected_directions_forward_and_gradients(kind):
    """With directions selected, the forward is unchanged, only selected rows of A / columns of B get a
    gradient (equal to the naive one), and the input gradient still flows through all directions."""
    layer = build(kind, 64, 96, r=6, alpha=12)
    selected = torch.tensor([1, 4])
    keep = torch.zeros(6, dtype=torch.float64)
    keep[selected] = 1.0

    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    layer.train()
    plain_out = layer(x)
    (plain_out**2).sum().backward()
    plain_x_grad = x.grad.clone()
    x.grad = None
    for p in (layer.lora_A, layer.lora_B):
        p.grad = None

    layer.select_directions(selected)
    masked_out = layer(x)
    torch.testing.assert_close(masked_out, plain_out, atol=1e-5, rtol=1e-5)
    (masked_out**2).sum().backward()
    torch.testing.assert_close(x.grad, plain_x_grad, atol=1e-5 * plain_x_grad.abs().max().item(), rtol=0)
    check_forward(layer, naive_of)  # eval mode: the plain path

    def masked_naive(p):
        A = p["lora_A"] * keep[:, None] + (p["lora_A"] * (1 - keep)[:, None]).detach()
        B = p["lora_B"] * keep[None, :] + (p["lora_B"] * (1 - keep)[None, :]).detach()
        return NAIVE["rmlora"](layer, {"lora_A": A, "lora_B": B})

    check_gradients(layer, masked_naive)
    masked = torch.tensor([0, 2, 3, 5])
    assert torch.count_nonzero(layer.lora_A.grad[masked]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, masked]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[selected]) > 0


def test_selected_directions_under_autocast_and_3d_input():
    layer = build("none", 64, 96, r=6)
    layer.train()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    plain = layer(x)
    layer.select_directions(torch.tensor([0, 3]))
    torch.testing.assert_close(layer(x), plain, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    torch.testing.assert_close(out.float(), plain, atol=0.1, rtol=0.05)
    out.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_A.grad[[1, 2, 4, 5]]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, [1, 2, 4, 5]]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[[0, 3]]) > 0


# --- config -----------------------------------------------------------------------------------------


def test_config_defaults_and_variants():
    config = make_config(r=8)
    assert config.orth_reg == 0.001 and config.orth_reg_norm == "squared" and config.mask_mode == "exact"
    assert config.mask_rank == 4 and config.masking  # authors' r̂ = r/2
    assert make_config(r=1).mask_rank == 1 and not make_config(r=1).masking
    assert not make_config(r=8, mask_rank=None).masking  # R-LoRA
    assert not make_config(r=8, mask_rank=8).masking
    again = get_adapter("rmlora").config.model_validate(config.model_dump(mode="json"))
    assert again == config


@pytest.mark.parametrize("mask_rank", [0, 9])
def test_mask_rank_out_of_range_is_a_user_error(mask_rank):
    from lrft.recipe import validate_recipe

    with pytest.raises(UserError, match="mask_rank"):
        validate_recipe({"adapter": {"type": "rmlora", "r": 8, "mask_rank": mask_rank}, "data": {"path": "x.json"}})


# --- regulariser --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["squared", "frobenius"])
def test_regulariser_value_and_gradient_match_naive(norm):
    layers, controller = build_model(r=4, orth_reg=0.3, orth_reg_norm=norm)
    squared = norm == "squared"
    reg = controller.extra_loss()
    reg.backward()

    refs = {
        n: {k: getattr(l, k).detach().double().requires_grad_(True) for k in ("lora_A", "lora_B")}
        for n, l in layers.items()
    }
    terms = [t for r in refs.values() for t in naive_reg(r["lora_A"], r["lora_B"], squared)]
    expected = 0.3 * (sum(terms) if squared else sum(terms) / len(terms))  # frobenius: mean over the 2L factors
    expected.backward()
    torch.testing.assert_close(reg.double(), expected.detach(), rtol=1e-5, atol=0)
    for name, layer in layers.items():
        for key in ("lora_A", "lora_B"):
            want = refs[name][key].grad
            got = getattr(layer, key).grad.double()
            torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_regulariser_off_and_float32_under_autocast():
    _, controller = build_model(r=4, orth_reg=0.0)
    assert controller.extra_loss() is None
    layers, controller = build_model(r=4, orth_reg=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reg = controller.extra_loss()
    assert reg.dtype == torch.float32
    plain = controller.extra_loss()
    assert torch.equal(reg, plain)


# --- directions ---------------------------------------------------------------------------------------


def test_directions_are_reproducible_and_distinct():
    _, controller = build_model(r=8, mask_rank=3, seed=5)
    _, same = build_model(r=8, mask_rank=3, seed=5)
    _, other = build_model(r=8, mask_rank=3, seed=6)
    draws = [controller.directions(step, "l0") for step in range(20)]
    for step, d in enumerate(draws):
        assert d.numel() == 3 and d.unique().numel() == 3 and torch.equal(d, d.sort().values)
        assert 0 <= int(d.min()) and int(d.max()) < 8
        assert torch.equal(d, same.directions(step, "l0"))
    assert len({tuple(d.tolist()) for d in draws}) > 5  # a new draw every step
    assert any(not torch.equal(d, other.directions(s, "l0")) for s, d in enumerate(draws))
    assert any(not torch.equal(d, controller.directions(s, "l1")) for s, d in enumerate(draws))  # per layer


def test_no_masking_when_mask_rank_is_r():
    layers, controller = build_model(r=4, mask_rank=4)
    controller.start_step(0)
    assert all(layer.selected is None for layer in layers.values())


# --- the masked optimizer step ------------------------------------------------------------------------


def train_steps(layers, controller, optimizer, steps, start=0, on_step=None):
    """The training loop's hook order, on a regression loss through both layers."""
    gen = torch.Generator().manual_seed(11)
    first = next(iter(layers.values()))
    last = list(layers.values())[-1]
    for step in range(start, start + steps):
        x = torch.randn(7, first.in_features, generator=torch.Generator().manual_seed(100 + step))
        target = torch.randn(7, last.out_features, generator=gen)
        controller.start_step(step)
        loss = ((run_model(layers, x) - target) ** 2).mean()
        extra = controller.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        controller.before_optimizer_step(step, optimizer)
        before = snapshot(layers, optimizer)
        selected = {n: l.selected.clone() for n, l in layers.items()}
        optimizer.step()
        controller.after_optimizer_step(step, optimizer)
        if on_step is not None:
            on_step(step, before, selected)
        optimizer.zero_grad(set_to_none=True)


def snapshot(layers, optimizer):
    out = {}
    for name, layer in layers.items():
        for key in ("lora_A", "lora_B"):
            p = getattr(layer, key)
            state = optimizer.state.get(p, {})
            out[name, key] = {
                "param": p.detach().clone(),
                "grad": None if p.grad is None else p.grad.clone(),
                **{k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape},
            }
    return out


def slices(tensor, key, index):
    return tensor.index_select(0 if key == "lora_A" else 1, index)


def masked_index(r, selected):
    keep = torch.ones(r, dtype=torch.bool)
    keep[selected] = False
    return keep.nonzero().flatten()


@pytest.mark.parametrize("kind", ["none", "nf4"])
def test_exact_masking_freezes_masked_entries_and_their_adam_state(kind):
    r = 6
    layers, controller = build_model(kind, shapes=((64, 64), (64, 64)), r=r, mask_rank=2, orth_reg=0.05)
    params = [p for l in layers.values() for p in (l.lora_A, l.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    saw_live_momentum = []

    def check(step, before, selected):
        for (name, key), old in before.items():
            p = getattr(layers[name], key)
            masked = masked_index(r, selected[name])
            state = optimizer.state[p]
            assert torch.count_nonzero(slices(old["grad"], key, masked)) == 0
            assert torch.equal(slices(p.detach(), key, masked), slices(old["param"], key, masked))
            for k in ("exp_avg", "exp_avg_sq"):
                was = slices(old[k], key, masked) if k in old else torch.zeros_like(slices(p, key, masked))
                assert torch.equal(slices(state[k], key, masked), was), (step, name, key, k)
            if "exp_avg" in old:
                saw_live_momentum.append(bool(torch.count_nonzero(slices(old["exp_avg"], key, masked))))
            chosen = selected[name]
            moved = slices(p.detach(), key, chosen) != slices(old["param"], key, chosen)
            assert moved.float().mean() > 0.9

    train_steps(layers, controller, optimizer, steps=5, on_step=check)
    # masked entries had non-zero momentum that plain AdamW would have applied
    assert any(saw_live_momentum)
    counts = controller.direction_updates["l0"]
    assert int(counts.sum()) == 5 * 2


def test_exact_masking_matches_per_direction_adamw_reference():
    """Each direction follows AdamW with its own step count (bias correction), in float64."""
    r, lr, wd, betas, eps = 4, 1e-2, 0.1, (0.9, 0.999), 1e-8
    layers, controller = build_model(shapes=((64, 32),), r=r, mask_rank=2, orth_reg=0.05)
    layer = layers["l0"]
    A = layer.lora_A.detach().double().clone()
    B = layer.lora_B.detach().double().clone()
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    W = layer.base_layer.weight.detach().double()
    m = {"A": torch.zeros_like(A), "B": torch.zeros_like(B)}
    v = {"A": torch.zeros_like(A), "B": torch.zeros_like(B)}
    k = torch.zeros(r, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    steps = 6
    for step in range(steps):
        x = torch.randn(7, 64, generator=torch.Generator().manual_seed(100 + step)).double()
        target = torch.randn(7, 32, generator=gen).double()
        a, b = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        out = x @ (W + NAIVE["rmlora"](layer, {"lora_A": a, "lora_B": b})).T
        loss = ((out - target) ** 2).mean() + 0.05 * sum(naive_reg(a, b, squared=True))
        loss.backward()
        sel = controller.directions(step, "l0")
        k[sel] += 1
        for key, param, grad, dim in (("A", A, a.grad, 0), ("B", B, b.grad, 1)):
            g = grad.index_select(dim, sel)
            shape = (-1, 1) if dim == 0 else (1, -1)
            mm = m[key].index_select(dim, sel) * betas[0] + (1 - betas[0]) * g
            vv = v[key].index_select(dim, sel) * betas[1] + (1 - betas[1]) * g * g
            m[key].index_copy_(dim, sel, mm)
            v[key].index_copy_(dim, sel, vv)
            kk = k[sel].view(shape)
            m_hat = mm / (1 - betas[0] ** kk)
            v_hat = vv / (1 - betas[1] ** kk)
            new = param.index_select(dim, sel) * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
            param.index_copy_(dim, sel, new)

    train_steps(layers, controller, optimizer, steps=steps)
    torch.testing.assert_close(layer.lora_A.detach().double(), A, atol=2e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B.detach().double(), B, atol=2e-5, rtol=0)
    assert torch.equal(controller.direction_updates["l0"], k.long())


def test_exact_masking_with_sgd_momentum_restores_masked_entries():
    r = 4
    layers, controller = build_model(r=r, mask_rank=1, orth_reg=0.1)
    params = [p for l in layers.values() for p in (l.lora_A, l.lora_B)]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)

    def check(step, before, selected):
        for (name, key), old in before.items():
            p = getattr(layers[name], key)
            masked = masked_index(r, selected[name])
            assert torch.equal(slices(p.detach(), key, masked), slices(old["param"], key, masked))
            if "momentum_buffer" in old:
                buf = optimizer.state[p]["momentum_buffer"]
                assert torch.equal(slices(buf, key, masked), slices(old["momentum_buffer"], key, masked))

    train_steps(layers, controller, optimizer, steps=3, on_step=check)


def test_grad_only_zeroes_masked_gradients_and_lets_adamw_move_them():
    r = 4
    layers, controller = build_model(r=r, mask_rank=1, orth_reg=0.1, mask_mode="grad_only")
    params = [p for l in layers.values() for p in (l.lora_A, l.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    moved_masked = []

    def check(step, before, selected):
        for (name, key), old in before.items():
            p = getattr(layers[name], key)
            masked = masked_index(r, selected[name])
            # the regulariser's gradient reaches every direction; before_optimizer_step zeroed it
            assert torch.count_nonzero(slices(old["grad"], key, masked)) == 0
            moved_masked.append(not torch.equal(slices(p.detach(), key, masked), slices(old["param"], key, masked)))

    train_steps(layers, controller, optimizer, steps=3, on_step=check)
    assert all(moved_masked)  # weight decay (and later momentum) still apply, as in the authors' code
    assert int(controller.direction_updates["l0"].sum()) == 0


def test_regulariser_gradient_reaches_masked_directions_before_masking():
    layers, controller = build_model(r=4, mask_rank=1, orth_reg=1.0)
    controller.start_step(0)
    controller.extra_loss().backward()
    layer = layers["l0"]
    masked = masked_index(4, layer.selected)
    assert torch.count_nonzero(layer.lora_A.grad[masked]) > 0
    optimizer = torch.optim.AdamW([p for l in layers.values() for p in (l.lora_A, l.lora_B)])
    controller.before_optimizer_step(0, optimizer)
    assert torch.count_nonzero(layer.lora_A.grad[masked]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, masked]) == 0


def test_controller_refuses_the_state_of_other_layers():
    """Resuming restores the update counts (exactly: test_adapter_contract.py); counts for other layers or
    another r are a recipe that does not match the checkpoint, refused in one line."""
    _, controller = build_model(r=4, mask_rank=2)
    with pytest.raises(UserError, match="resume with the recipe"):
        controller.load_state_dict({"direction_updates": {"other": [0, 0, 0, 0]}})
    with pytest.raises(UserError, match="resume with the recipe"):
        controller.load_state_dict({"direction_updates": {"l0": [0, 0], "l1": [0, 0]}})


# --- cost ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_masked_step_costs_fewer_flops_than_lora(input_needs_grad):
    """Sec. 4.3: gradients of masked directions are never formed, so fwd+bwd is cheaper than LoRA's."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(mask_rank):
        layer = build("none", 96, 160, r=16, mask_rank=mask_rank, orth_reg=0.0)
        layer.train()
        if mask_rank is not None:
            layer.select_directions(torch.arange(mask_rank))
        x = torch.randn(64, 96, requires_grad=input_needs_grad)
        with FlopCounterMode(display=False) as counter:
            layer(x).square().sum().backward()
        return counter.get_total_flops()

    lora, masked = flops(None), flops(4)
    assert masked < lora
