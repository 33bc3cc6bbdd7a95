import pytest
import torch
from pydantic import ValidationError

from adapter_reference import build_layer, naive_of
from budget_reference import check_importance_against_naive, train_toy
from lrft.adapters import get_adapter
from lrft.adapters.base import SharedTensors
from lrft.adapters.budget import BudgetSchedule, allocate
from lrft.errors import UserError


def test_adalora_defaults_and_gaussian_init():
    torch.manual_seed(0)
    layer = build_layer("adalora", "none", 256, 128, randomize=False, r=4)
    assert layer.scaling == 2.0  # alpha defaults to 2r; scaling = alpha / r
    assert abs(layer.lora_P.std().item() - 0.02) < 0.003 and abs(layer.lora_Q.std().item() - 0.02) < 0.003
    assert layer.rank_mask.dtype == torch.bool and bool(layer.rank_mask.all())
    assert "rank_mask" in layer.adapter_state_dict()


def test_adalora_builds_on_meta_device():
    spec = get_adapter("adalora")
    config = spec.config(type="adalora", r=4)
    layer = spec.layer(torch.nn.Linear(32, 16, bias=False, device="meta"), config, SharedTensors(0), "t")
    assert layer.lora_P.device.type == "meta" and "r=4" in repr(layer)


def test_adalora_orthogonal_regulariser_matches_naive():
    layer = build_layer("adalora", "none", 12, 10, r=3, orth_reg=0.3)
    P = layer.lora_P.detach().double().requires_grad_(True)
    Q = layer.lora_Q.detach().double().requires_grad_(True)
    eye = torch.eye(3, dtype=torch.float64)
    expected = 0.3 * (((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum())
    got = layer.extra_loss()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    got.backward()
    torch.testing.assert_close(layer.lora_P.grad.double(), P.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_Q.grad.double(), Q.grad, rtol=1e-4, atol=1e-6)
    assert build_layer("adalora", "none", 12, 10, r=3, orth_reg=0.0).extra_loss() is None


# --- the budget schedule (shared with LoRA²) -----------------------------------------------------


def test_budget_schedule_values_and_monotone():
    s = BudgetSchedule(init_budget=24, target_budget=8, tinit=10, final_start=90, delta_t=5)
    assert [s.budget(t) for t in (0, 9, 10)] == [24, 24, 24]
    assert s.budget(50) == 8 + 16 // 8  # midway: (1 - 1/2)³ of the way back from the target
    assert s.budget(30) == int(8 + 16 * 0.75**3)
    assert s.budget(40) == 11 and s.budget(89) == 8  # floor(8 + 16 · (1/80)³)
    assert s.budget(90) == 8 and s.budget(99) == 8
    budgets = [s.budget(t) for t in range(100)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert [s.action(t) for t in (0, 9, 10, 11, 15, 89, 90, 91, 99)] == [
        "none", "none", "mask", "none", "mask", "none", "freeze", "hold", "hold"
    ]
    assert s.updates_importance(90) and not s.updates_importance(91)


def test_budget_schedule_from_config_defaults_and_errors():
    config = get_adapter("adalora").config(type="adalora", r=12)
    s = BudgetSchedule.from_config(config, n_layers=5, total_steps=100)
    assert (s.init_budget, s.target_budget, s.tinit, s.final_start, s.delta_t) == (60, 40, 10, 70, 10)
    # tfinal = 0 still ends on the target budget: the last step is the final phase
    config = get_adapter("adalora").config(type="adalora", r=12, target_r=4, init_r=10, tinit=0, tfinal=0)
    s = BudgetSchedule.from_config(config, n_layers=2, total_steps=10)
    assert (s.init_budget, s.target_budget, s.final_start) == (20, 8, 9)
    with pytest.raises(UserError, match="tinit"):
        BudgetSchedule.from_config(config.model_copy(update={"tinit": 6, "tfinal": 5}), 2, 10)


def test_config_rejects_inconsistent_ranks():
    spec = get_adapter("adalora")
    with pytest.raises(ValidationError, match="target_r"):
        spec.config(type="adalora", r=4, target_r=6)
    with pytest.raises(ValidationError, match="init_r"):
        spec.config(type="adalora", r=4, init_r=6)
    with pytest.raises(ValidationError):
        spec.config(type="adalora", r=4, k=2)  # LoRA²'s option


def test_allocate_keeps_exactly_the_budget():
    scores = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.2, 0.2, 0.2, 0.8])}
    masks = allocate(scores, 3)
    assert masks["a"].tolist() == [True, False, True] and masks["b"].tolist() == [False, False, False, True]
    masks = allocate(scores, 5)  # a tie at 0.2: still exactly 5
    assert sum(int(m.sum()) for m in masks.values()) == 5


# --- importance and pruning in the training loop -------------------------------------------------


def test_adalora_importance_matches_naive_triplet_score():
    check_importance_against_naive("adalora", ("lora_P", "lora_Q"), r=3, beta1=0.8, beta2=0.7)


def test_adalora_prunes_to_target_budget_in_training_loop():
    active = {}
    frozen = {}

    def observe(step, controller):
        active[step] = sum(layer.active_rank() for layer in controller.layers.values())
        if step == controller.schedule.final_start:
            frozen.update({n: l.rank_mask.clone() for n, l in controller.layers.items()})

    model, layers, controller = train_toy(
        "adalora", total_steps=30, observe=observe, r=6, target_r=2, tinit=3, tfinal=10, delta_t=2, seed=1, orth_reg=0.1
    )
    schedule = controller.schedule
    assert schedule.final_start == 20
    for step in range(schedule.tinit, schedule.final_start + 1):
        if schedule.action(step) in ("mask", "freeze"):
            assert active[step] == schedule.budget(step)
    ranks = controller.summary()["ranks"]
    assert set(ranks) == set(layers)
    assert sum(ranks.values()) == 2 * len(layers)
    assert len(set(ranks.values())) > 1  # the budget is allocated model-wide, not per layer
    for name, layer in layers.items():
        assert torch.equal(layer.rank_mask, frozen[name])  # the final mask was held fixed
        assert torch.all(layer.lora_lambda[~layer.rank_mask] == 0)  # pruned entries are exactly zero
        assert torch.count_nonzero(layer.lora_lambda[layer.rank_mask]) == ranks[name]
        ref = naive_of(layer)
        torch.testing.assert_close(layer.delta_weight().double(), ref, atol=1e-6, rtol=1e-5)
        assert torch.linalg.matrix_rank(layer.delta_weight()).item() <= ranks[name]
    assert set(controller.state_dict()) == set(layers)


def test_adalora_saved_adapter_holds_final_ranks(tmp_path, tiny_model):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from lrft.adapter_folder import AdapterFolder, save_adapter
    from lrft.inject import inject_adapters

    config = get_adapter("adalora").config(type="adalora", r=4, target_r=2, target_modules=["q_proj", "v_proj"])
    layers = inject_adapters(tiny_model, config)
    controller = get_adapter("adalora").controller(layers, config, total_steps=4)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for l in layers.values() for p in l.parameters() if p.requires_grad], lr=1e-2)
    for step in range(4):
        loss = tiny_model(input_ids=ids, labels=ids).loss + controller.extra_loss()
        loss.backward()
        controller.before_optimizer_step(step, optimizer)
        optimizer.step()
        controller.after_optimizer_step(step, optimizer)
        optimizer.zero_grad()
    summary = controller.summary()
    assert sum(summary["ranks"].values()) == 2 * len(layers)
    save_adapter(tmp_path, layers, config, {"base_model": {}, "dtypes": {"load": "float32", "compute": "float32", "frozen": "float32"}}, extra={"summary": summary})
    assert AdapterFolder.read(tmp_path).record["summary"]["ranks"] == summary["ranks"]
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(tiny_llama_config()).eval()
    loaded = AdapterFolder.read(tmp_path).attach(fresh)
    for name, layer in layers.items():
        assert loaded[name].active_rank() == summary["ranks"][name]
        torch.testing.assert_close(loaded[name].delta_weight(), layer.delta_weight())
