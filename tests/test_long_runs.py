"""experiments/long_runs.py (issue 20, part 3) without training: matched parameter counts, recipes that lrft
accepts, the learning-rate choice, and a plan that lists the sweep, final and reg runs, resumes a checkpointed
run and skips finished ones."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import long_runs as lr  # noqa: E402

from lrft.recipe import load_recipe  # noqa: E402

pytestmark = pytest.mark.study


@pytest.fixture(scope="module")
def sizes():
    return lr.matched_sizes()


def make_args(tmp_path: Path, *extra: str):
    return lr.parse_args(["--results", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"), *extra])


def fake_record(spec, args, loss: float, **extra) -> dict:
    return {"name": spec.name, "stage": spec.stage, "method": spec.method, "seed": spec.seed, "label": spec.label,
            "lr": spec.lr, "scaling": spec.scaling, "settings": lr.settings_of(spec, args), "threads": 1,
            "commands": {}, "wall_s": {}, "metrics": [], "heldout_loss": {"loss": loss, "n": 2}, **extra}


def write(args, record: dict) -> None:
    path = lr.results_dir(args)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{record['name']}.json").write_text(json.dumps(record))


def bowl(spec) -> float:
    """A sweep loss whose minimum is the centre of the method's grid (so no row is extended)."""
    return 2.0 + abs(math.log(spec.lr / lr.centre(lr.METHODS[spec.method].lrs)))


def test_matched_parameter_counts(sizes):
    assert sizes["lora"]["params"] == 16 * 6912 * 30 == 3_317_760  # r (in + out) over q, k, v, up, down x 30
    for key, s in sizes.items():
        assert abs(s["rel"]) <= lr.PARAM_TOL, (key, s)
    assert sizes["randlora"]["sets"]["adapter.r"] == 10  # the paper's LoRA-16 ~ RandLoRA-10 pairing
    assert sizes["randlora-sparse-keep"]["params"] == sizes["randlora"]["params"]  # keep_rank: same count
    assert sizes["rmlora-exact"]["params"] == sizes["lora"]["params"]
    assert sizes["lora2"]["sets"]["adapter.k"] == 16
    # the counts lrft train reported for the same configurations in the pilot's run.json (results branch)
    lr.study.ensure(lr.study.RESULTS)
    pilot = {"lora-r16": "lora", "randlora-r10": "randlora", "lora2-k16-R16": "lora2", "rmlora-r16": "rmlora-exact"}
    for name, key in pilot.items():
        path = lr.study.RESULTS / f"{name}-s42.json"
        assert json.loads(path.read_text())["run"]["trainable_parameters"] == sizes[key]["params"], name


def test_every_planned_run_is_a_valid_recipe(tmp_path, sizes):
    args = make_args(tmp_path)
    sweep = lr.sweep_specs(args, sizes)
    for spec in sweep:  # complete every sweep so that the final and reg runs get their lr
        write(args, fake_record(spec, args, bowl(spec)))
    specs = lr.all_specs(args, sizes, lr.load_records(args))
    runs = [s for stage in specs.values() for s in stage if s.stage != "base"]
    assert len(runs) == 24 + 14 + 7  # the shared-A sparse ablation has final runs only
    for spec in runs:
        assert spec.lr is not None, spec.name
        cmd = lr.train_command(spec, args, resume=False)
        overrides = [cmd[i + 1] for i, part in enumerate(cmd) if part == "--set"]
        recipe = load_recipe(ROOT / cmd[cmd.index("train") + 1], overrides)
        assert recipe.training.max_steps == spec.steps and recipe.training.learning_rate == spec.lr
        assert recipe.training.save_steps == args.save_steps and recipe.data.path == lr.TRAIN
        if spec.method == "randlora-sparse-keep":
            assert recipe.adapter.basis == "sparse" and recipe.adapter.keep_rank
        if spec.method == "randlora-sparse-shared":
            assert recipe.adapter.basis == "sparse" and not recipe.adapter.keep_rank
            keep = next(s for s in runs if s.name == spec.name.replace("shared", "keep"))
            assert (spec.lr, spec.scaling) == (keep.lr, keep.scaling)
        if spec.method == "rmlora-grad_only":
            assert recipe.adapter.mask_mode == "grad_only"
        if spec.name.startswith("reg-rmlora-frobenius"):
            assert recipe.adapter.orth_reg_norm == "frobenius"
        if spec.name.startswith("reg-rlora"):
            assert recipe.adapter.mask_rank is None and not recipe.adapter.masking
        if spec.name.startswith("reg-gmlora"):
            assert recipe.adapter.orth_reg == 0 and recipe.adapter.masking
    # a part run (--methods) of the ablation alone reads keep_rank's choice from the other sweep's files
    part = make_args(tmp_path, "--methods", "randlora-sparse-shared", "--stages", "final")
    part_specs = lr.all_specs(part, sizes, lr.load_records(part))
    assert [s.name for s in part_specs["final"]] == ["base-test", "final-randlora-sparse-shared-s42",
                                                     "final-randlora-sparse-shared-s43"]
    assert all(s.lr is not None for s in part_specs["final"][1:])
    # both norms are swept, and the squared default is the final run (not repeated)
    reg = [s.name for s in specs["reg"]]
    assert sum("frobenius" in n for n in reg) == 3 and sum("squared" in n for n in reg) == 2


def test_selection_takes_the_lowest_finite_loss_and_flags_the_edge(tmp_path, sizes):
    args = make_args(tmp_path, "--methods", "lora,randlora")
    sweep = lr.sweep_specs(args, sizes)
    assert len([s for s in sweep if s.method == "randlora"]) == 3 * 2  # lr x scaling
    lora = [s for s in sweep if s.method == "lora"]
    assert lr.selection({}, sweep, "lora") is None  # nothing done: pending
    losses = {1e-4: 2.5, 3e-4: 2.4, 1e-3: None}  # the highest lr diverged
    for spec in lora:
        extra = {"diverged": "loss is nan at step 7"} if losses[spec.lr] is None else {}
        write(args, fake_record(spec, args, losses[spec.lr] or 0.0, **extra))
    chosen = lr.selection(lr.load_records(args), sweep, "lora")
    assert chosen["lr"] == 3e-4 and not chosen["edge"]
    write(args, fake_record(lora[0], args, 2.3))  # now lr 1e-4 wins, at the grid's edge
    chosen = lr.selection(lr.load_records(args), sweep, "lora")
    assert chosen["lr"] == 1e-4 and chosen["edge"]


def test_a_sweep_whose_best_lr_is_at_the_edge_is_extended_until_bracketed(tmp_path, sizes):
    args = make_args(tmp_path, "--methods", "lora,randlora")
    loss = {1e-4: 2.0, 3e-4: 1.8, 1e-3: 1.6, 3e-3: 1.5, 1e-2: 1.4, 3e-2: 1.3}  # falls all the way up
    for spec in lr.sweep_specs(args, sizes, lr.load_records(args)):
        if spec.method == "lora":
            write(args, fake_record(spec, args, loss[spec.lr]))
    names = lambda: [s.name for s in lr.sweep_specs(args, sizes, lr.load_records(args)) if s.method == "lora"]
    assert names()[-1] == "sweep-lora-lr3e-3-s42"  # 1e-3 won at the top edge: one more point above
    assert lr.selection(lr.load_records(args), lr.sweep_specs(args, sizes, lr.load_records(args)), "lora") is None
    for spec in lr.sweep_specs(args, sizes, lr.load_records(args)):
        if spec.method == "lora" and spec.name not in lr.load_records(args):
            write(args, fake_record(spec, args, loss[spec.lr]))
    assert names()[-1] == "sweep-lora-lr1e-2-s42"
    for spec in lr.sweep_specs(args, sizes, lr.load_records(args)):
        if spec.method == "lora" and spec.name not in lr.load_records(args):
            write(args, fake_record(spec, args, loss[spec.lr]))
    assert len(names()) == 3 + lr.MAX_EXTEND  # capped: still the best at the edge, and flagged
    chosen = lr.selection(lr.load_records(args), lr.sweep_specs(args, sizes, lr.load_records(args)), "lora")
    assert chosen["lr"] == 1e-2 and chosen["edge"]

    # RandLoRA: the row of the winning scaling is extended; an interior winner stops the extension
    randlora = {(1e-4, 2.0): 2.0, (3e-4, 2.0): 1.9, (1e-3, 2.0): 1.7,
                (1e-4, 20.0): 1.9, (3e-4, 20.0): 1.75, (1e-3, 20.0): 1.8, (3e-3, 2.0): 1.72}
    for spec in lr.sweep_specs(args, sizes, lr.load_records(args)):
        if spec.method == "randlora":
            write(args, fake_record(spec, args, randlora[spec.lr, spec.scaling]))
    sweep = lr.sweep_specs(args, sizes, lr.load_records(args))
    extra = [s for s in sweep if s.method == "randlora"][6:]
    assert [(s.lr, s.scaling) for s in extra] == [(3e-3, 2.0)]
    write(args, fake_record(extra[0], args, randlora[3e-3, 2.0]))  # worse than 1e-3: bracketed
    sweep = lr.sweep_specs(args, sizes, lr.load_records(args))
    assert len([s for s in sweep if s.method == "randlora"]) == 7
    chosen = lr.selection(lr.load_records(args), sweep, "randlora")
    assert (chosen["lr"], chosen["scaling"], chosen["edge"]) == (1e-3, 2.0, False)


def test_plan_lists_stages_resumes_and_skips(tmp_path, sizes, capsys):
    args = make_args(tmp_path, "--methods", "lora,rmlora-exact")
    records = lr.load_records(args)
    rows, per_stage = lr.plan_rows(args, sizes, records, lr.Estimator(args, records))
    names = [spec.name for _, spec, _, _, _ in rows]
    assert names[:3] == ["sweep-lora-lr1e-4-s42", "sweep-lora-lr3e-4-s42", "sweep-lora-lr1e-3-s42"]
    assert {"final-lora-s42", "final-lora-s43", "final-rmlora-exact-s43", "base-test", "reg-gmlora-s42"} <= set(names)
    assert all(seconds > 0 for *_, seconds, _ in rows) and set(per_stage) == {"sweep", "final", "reg"}
    assert all(spec.lr is None for _, spec, *_ in rows if spec.stage in ("final", "reg"))  # waits for the sweep

    sweep = lr.sweep_specs(args, sizes)
    for spec in sweep:
        write(args, fake_record(spec, args, bowl(spec)))
    records = lr.load_records(args)
    specs = lr.all_specs(args, sizes, records)
    final = {s.name: s for s in specs["final"]}
    assert final["final-lora-s42"].lr == 3e-4  # the sweep's choice reaches the final runs
    write(args, fake_record(final["final-lora-s42"], args, 2.0))
    # a run interrupted after step 50: a complete checkpoint and the runner's notes with the same settings
    spec = final["final-lora-s43"]
    checkpoint = Path(args.runs_dir) / spec.name / "checkpoints" / "step-50"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"")
    lr.study_path(spec, args).write_text(json.dumps({"settings": lr.settings_of(spec, args), "attempts": []}))
    records = lr.load_records(args)
    est = lr.Estimator(args, records)
    states = {spec.name: (state, seconds) for _, spec, state, seconds, _ in lr.plan_rows(args, sizes, records, est)[0]}
    assert states["sweep-lora-lr1e-4-s42"] == ({"state": "done", "step": args.sweep_steps}, 0.0)
    assert states["final-lora-s42"][0]["state"] == "done" and states["final-lora-s42"][1] == 0.0
    assert states["final-lora-s43"][0] == {"state": "resume", "step": 50}
    assert states["final-lora-s43"][1] < states["final-rmlora-exact-s43"][1]  # 150 steps left against 200
    # a changed setting (more steps) makes the finished run and the checkpoint stale
    longer = make_args(tmp_path, "--methods", "lora,rmlora-exact", "--steps", "300", "--sweep-steps", "40")
    spec300 = next(s for s in lr.all_specs(longer, sizes, records)["final"] if s.name == "final-lora-s43")
    assert lr.run_state(spec300, longer)["state"] == "new"

    lr.print_plan(args, sizes, records)
    out = capsys.readouterr().out
    assert "sweep-lora-lr1e-3-s42" in out and "resume @50" in out and "stage final" in out and "total:" in out


def test_budget_marks_runs_that_do_not_fit(tmp_path, sizes):
    args = make_args(tmp_path, "--methods", "lora", "--budget-minutes", "30")
    records = lr.load_records(args)
    rows, _ = lr.plan_rows(args, sizes, records, lr.Estimator(args, records))
    fits = [fit for *_, fit in rows]
    spent = 0.0
    for (_, _, _, seconds, fit) in rows:  # greedy in order: a run fits if everything before it that fit leaves room
        assert fit == (spent + seconds <= 30 * 60)
        spent += seconds if fit else 0.0
    assert any(fits) and not all(fits)


def test_t_interval_of_paired_differences():
    # two seeds: mean ± 12.706 · s/√2
    diffs = [-0.05, -0.052]
    half = 12.706 * (0.002 / math.sqrt(2)) / math.sqrt(2)
    assert lr.t_interval(diffs, 4) == f"[{-0.051 - half:+.4f}, {-0.051 + half:+.4f}] (excludes 0)"
    assert lr.t_interval([0.01, 0.03], 4).endswith("(includes 0)")
    assert lr.t_interval([0.01], 4) == "–"  # one seed: no interval


def test_student_t_quantiles_and_the_bonferroni_interval():
    # the printed table of two-sided 95 % and 99 % points, and large df near the normal's 1.96
    for df, t95, t99 in [(1, 12.706, 63.657), (2, 4.303, 9.925), (3, 3.182, 5.841), (4, 2.776, 4.604),
                         (9, 2.262, 3.250), (30, 2.042, 2.750)]:
        assert lr.t_quantile(0.95, df) == pytest.approx(t95, abs=1e-3)
        assert lr.t_quantile(0.99, df) == pytest.approx(t99, abs=1e-3)
    assert lr.t_quantile(0.95, 1000) == pytest.approx(1.962, abs=1e-3)
    # six comparisons read together: each interval at 1 − 0.05/6; with one df t = tan(π/2 · (1 − 0.05/6))
    bonferroni = math.tan(math.pi / 2 * (1 - 0.05 / 6))
    diffs = [0.028, 0.030]
    half = bonferroni * (0.002 / math.sqrt(2)) / math.sqrt(2)
    assert lr.t_interval(diffs, 4, comparisons=6) == f"[{0.029 - half:+.4f}, {0.029 + half:+.4f}] (includes 0)"
    assert lr.t_interval(diffs, 4).endswith("(excludes 0)")  # the same pair read alone


def test_reading_facts_pair_each_seed_with_lora_and_leave_missing_runs_out(sizes):
    def rec(name, stage, method, seed, loss):
        return {"name": name, "stage": stage, "method": method, "seed": seed, "lr": 3e-3, "metrics": [],
                "settings": {"steps": 200, "batch_size": 4},
                "heldout_loss": {"loss": loss},
                "inspect": {"default": {"summary": {"overall": {"mean_rank": 16.0, "mean_effective_rank": 9.0}}}}}
    losses = {("lora", 42): 1.00, ("lora", 43): 1.02, ("randlora", 42): 1.03, ("randlora", 43): 1.06,
              ("randlora-sparse-keep", 42): 1.04}
    records = {f"final-{m}-s{s}": rec(f"final-{m}-s{s}", "final", m, s, loss) for (m, s), loss in losses.items()}
    records["reg-gmlora-s42"] = rec("reg-gmlora-s42", "reg", "rmlora-exact", 42, 1.01)
    facts = lr.long_facts(records, sizes)
    assert facts["held_lora"] == "1.0100 ± 0.0100" and facts["seeds_randlora"] == "2"
    assert facts["delta_randlora"] == "0.0350 ± 0.0050"  # paired: 0.03 at seed 42, 0.04 at seed 43
    assert facts["ci_randlora"] == lr.t_interval([0.03, 0.04], 4)
    assert facts["delta_randlora_sparse_keep"] == "0.0400" and facts["ci_randlora_sparse_keep"] == "–"
    assert facts["order"].startswith("LoRA < ") and facts["reg_gmlora_held"] == "1.0100"
    assert facts["reg_gmlora_vs_lora"] == "0.0100"  # paired with LoRA's seed-42 final run (1.00)
    assert facts["examples"] == "800"
    assert "keep_vs_shared" not in facts  # no shared-A run: the reading shows "–"
    # the family of comparisons with LoRA: randlora (two seeds) and keep_rank (one), every difference positive
    assert facts["comparisons"] == "2" and facts["favour_lora"] == "3 of 3" and facts["t95"] == "12.7"
    assert facts["bci_randlora"] == lr.t_interval([0.03, 0.04], 4, comparisons=2)
    assert facts["bci_excluding"] == "none" and facts["held_range"] == "1.0100 to 1.0450"
    assert "bound_lora" not in facts and facts["lora_r"] == "16" and facts["lora2_target_r"] == "8"
    text = lr.study.fill_facts("Δ {{delta_randlora}}, {{keep_vs_shared}}", facts)
    assert text == "Δ 0.0350 ± 0.0050, –"


def test_the_width_term_of_the_orthogonality_loss_is_split_off():
    # out × out ΔWΔWᵀ: Σ (σ² − 1)² over the non-zero σ plus one per zero eigenvalue (out − rank)
    layers = [{"shape": [576, 576], "rank": 16}, {"shape": [192, 576], "rank": 16}]
    sigma_part = [3.0, 5.0]  # Σ (σ² − 1)² of each layer
    orth = statistics.mean(s + shape[0] - 16 for s, shape in zip(sigma_part, ([576], [192])))
    record = {"inspect": {"default": {"layers": layers, "summary": {"overall": {"mean_orth_loss": orth}}}}}
    assert lr.width_floor(record) == pytest.approx((560 + 176) / 2)
    assert lr.above_floor(record) == pytest.approx(4.0)
    assert lr.width_floor({}) is None and lr.above_floor({}) is None


def test_step_times_compare_only_on_the_same_cpu():
    def rec(method, seed, seconds, machine):
        return {"name": f"final-{method}-s{seed}", "stage": "final", "method": method, "seed": seed, "threads": 2,
                "machine": machine, "metrics": [{"step": i, "step_time_s": seconds} for i in range(6)]}
    fast, slow = "EPYC (avx2, fma, avx512f)", "EPYC (avx2, fma)"
    records = {r["name"]: r for r in [rec("lora", 42, 2.0, fast), rec("randlora", 42, 3.0, fast),
                                       rec("lora", 43, 4.0, slow), rec("randlora", 43, 6.4, slow),
                                       rec("lora2", 42, 5.0, slow)]}
    assert lr.step_ratios(records, "randlora") == pytest.approx([1.5, 1.6])
    assert lr.step_ratios(records, "lora2") == []  # LoRA's seed-42 run was on the other CPU
    assert lr.step_time_cell(lr.final_records(records, "randlora")) == "3.0 (AVX-512 @2 thr.); 6.4 (AVX2 @2 thr.)"


def test_runs_that_shared_the_cpu_compare_speed_only_with_each_other():
    def rec(method, seed, seconds, threads, loads):
        return {"name": f"final-{method}-s{seed}", "stage": "final", "method": method, "seed": seed,
                "threads": threads, "machine": "EPYC (avx2, fma)",
                "attempts": [{"wall_s": wall, "cpu_load": load} for wall, load in loads],
                "metrics": [{"step": i, "step_time_s": seconds} for i in range(6)]}
    alone = rec("lora", 43, 5.0, 2, [(1000.0, 2.1)])
    # resumed once: 100 s alone, then 900 s beside another run; the wall-weighted load is 1.9 > 1 + 0.5
    beside = rec("rmlora-grad_only", 43, 7.0, 1, [(100.0, 1.0), (900.0, 2.0)])
    assert not lr.shared_cpu(alone) and lr.shared_cpu(beside)
    assert not lr.shared_cpu(rec("lora", 42, 5.0, 1, [(600.0, 1.2)]))
    # no load recorded: the runs at 1 thread were the ones run two at a time
    assert lr.shared_cpu({"threads": 1}) and not lr.shared_cpu({"threads": 2, "attempts": [{"wall_s": 5.0}]})
    records = {r["name"]: r for r in (alone, beside)}
    assert lr.step_ratios(records, "rmlora-grad_only") == []
    assert lr.step_time_cell([beside]) == "7.0 (AVX2 @1 thr., CPU shared)"
    assert lr.step_time_cell([alone]) == "5.0 (AVX2 @2 thr.)"
