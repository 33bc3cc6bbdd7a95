"""``lrft eval --harness``: lm-evaluation-harness over lrft's loaded models, offline.

Without lm-eval installed (``make test`` does not install it) only the one-line errors run; the rest needs
the ``harness`` extra (``pip install -e '.[harness]'``) and skips otherwise. The cross-check runs lm-eval's
multiple-choice scoring and lrft's loglik mode on the same items of the real embedded model; an adapter of
every registered type through the harness is in tests/test_adapter_contract.py."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import choice_logprob, choice_task, lrft_main

DEV = Path(__file__).resolve().parents[1] / "lrft" / "samples" / "commonsense" / "dev"
LRFT_TASK = {"boolq": "lrft_boolq", "piqa": "lrft_piqa", "social_i_qa": "lrft_social_i_qa", "hellaswag": "lrft_hellaswag",
             "winogrande": "lrft_winogrande", "ARC-Easy": "lrft_arc_easy", "ARC-Challenge": "lrft_arc_challenge",
             "openbookqa": "lrft_openbookqa"}


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    code, err = lrft_main(["eval", "--model", "no-such-model", "--harness", "arc_easy"], capfd)
    assert code == 2 and "pip install 'lrft[harness]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--harness", "lrft_boolq", "--loss", "--data", "x.jsonl"], "one at a time"),
        (["--include-path", "tasks", "--data", "dev"], "apply to --harness only"),
        (["--num-fewshot", "5", "--data", "dev"], "apply to --harness only"),
        (["--apply-chat-template", "--data", "dev"], "apply to --harness only"),
        (["--harness", "lrft_boolq", "--tasks", "boolq"], "--tasks names commonsense tasks"),
        (["--harness", " , "], "--harness is empty"),
        (["--harness", "lrft_boolq", "--num-fewshot", "-1"], "--num-fewshot -1"),
        (["--format", "alpaca", "--data", "dev"], "apply to --loss only"),
        ([], "--data is missing"),
    ],
)
def test_bad_harness_options_exit_2_before_loading(args, message, capfd):
    """lm-eval is not needed for these: they fail before it is imported."""
    code, err = lrft_main(["eval", "--model", "no-such-model", *args], capfd)
    assert code == 2 and message in err, err


def test_harness_refuses_several_processes(monkeypatch, capfd):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = lrft_main(["eval", "--model", "no-such-model", "--harness", "lrft_boolq"], capfd)
    assert code == 2 and "one process" in err


def test_summary_of_lm_eval_results():
    """lm-eval's results dictionary (its layout, written here): metrics without their "none" filter, a
    filtered one as metric/filter, "N/A" as None, a group marked and given its aggregate."""
    from lrft.harness import summarize

    raw = {
        "results": {
            "g": {"alias": "g", " ": " "},
            "t1": {"alias": "t1", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 1.0},
            "t2": {"alias": "t2", "acc,none": 0.25, "acc_stderr,none": "N/A"},
        },
        "groups": {"g": {"alias": "g", "acc,none": 0.375, "acc_stderr,none": 0.05}},
        "n-samples": {"t1": {"original": 9, "effective": 4}, "t2": {"original": 4, "effective": 4}},
        "group_subtasks": {"g": ["t1", "t2"], "t1": [], "t2": []},
    }
    summary = summarize(raw)
    assert summary["t1"] == {"n": 4, "metrics": {"acc": 0.5, "acc_stderr": 0.1, "exact_match/strict-match": 1.0}, "group": False}
    assert summary["t2"]["metrics"] == {"acc": 0.25, "acc_stderr": None}
    assert summary["g"] == {"n": 8, "metrics": {"acc": 0.375, "acc_stderr": 0.05}, "group": True}


# --- with lm-eval ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


def test_unknown_task_names_the_closest(lm_eval, capfd):
    code, err = lrft_main(["eval", "--model", "no-such-model", "--harness", "lrft_arc_esay"], capfd)
    assert code == 2 and "did you mean lrft_arc_easy" in err and len(err.strip().splitlines()) == 1


def test_include_path_must_be_a_folder(lm_eval, tmp_path, capfd):
    code, err = lrft_main(["eval", "--model", "m", "--harness", "x", "--include-path", str(tmp_path / "none")], capfd)
    assert code == 2 and "--include-path" in err


@pytest.fixture(scope="module")
def real_model():
    from lrft.inference import load_for_inference

    return load_for_inference(None, "smollm2-135m-instruct")


@pytest.mark.slow
def test_lm_eval_multiple_choice_scores_what_lrft_loglik_scores(lm_eval, real_model, tmp_path):
    """The cross-check: on the real base, lm-eval's multiple-choice log-likelihoods of lrft's commonsense
    tasks equal lrft's loglik scores choice by choice, so every item gets the same choice."""
    from lrft.evaluate import candidate_labels, loglik_batch, read_task_records
    from lrft.data import eval_prompt
    from lrft.harness import run_harness, task_manager

    n = 6
    names = list(LRFT_TASK.values())
    rows: list = []
    results = run_harness(real_model, names, task_manager(names, None, None), n, 8, None, rows)
    by_id = {r["id"]: r for r in rows}
    agree = 0
    for task, name in LRFT_TASK.items():
        records = read_task_records(DEV / f"{task}.jsonl", task)[:n]
        label_sets = [candidate_labels(task, r["instruction"]) for r in records]
        ours = loglik_batch(real_model.model, real_model.tokenizer, [eval_prompt(r["instruction"]) for r in records], label_sets)
        correct = 0
        for i, (record, labels, scores) in enumerate(zip(records, label_sets, ours)):
            theirs = by_id[f"{name}/{i}"]
            assert theirs["scores"] == pytest.approx(scores, abs=1e-3), (name, i)
            ours_choice = max(range(len(labels)), key=scores.__getitem__)
            agree += theirs["prediction"] == ours_choice
            correct += labels[ours_choice] == record["answer"]
            assert theirs["correct"] == (labels[ours_choice] == record["answer"])
        assert results["tasks"][name]["metrics"]["acc"] == pytest.approx(correct / n)
        assert results["tasks"][name]["n"] == n
    assert agree == n * len(LRFT_TASK)
    assert results["tasks"]["lrft_boolq"]["group"] is False


def test_own_task_files_and_the_results_files(lm_eval, tiny_model_dir, tmp_path):
    items = [{"question": f"Q{i}: is {i} even?", "choices": ["yes", "no"], "gold": i % 2} for i in range(5)]
    tasks = choice_task(tmp_path / "tasks", items)
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    code = lrft_main_ok(["eval", "--model", str(tiny_model_dir), "--harness", "tiny_choice", "--include-path", tasks,
                         "--output", str(out), "--predictions", str(preds), "--batch-size", "2"])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["mode"] == "harness" and results["model"] == str(tiny_model_dir)
    assert results["tasks"]["tiny_choice"]["n"] == 5
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"tiny_choice/{i}" for i in range(5)]
    assert [r["answer"] for r in rows] == [i % 2 for i in range(5)]
    assert results["tasks"]["tiny_choice"]["metrics"]["acc"] == pytest.approx(sum(r["correct"] for r in rows) / 5)
    # independent: the summed log-probability of " yes" / " no" after the question, on the model itself
    from lrft.model import load_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for item, row in zip(items, rows):
        expected = [choice_logprob(model, tokenizer, item["question"], choice) for choice in item["choices"]]
        assert row["scores"] == pytest.approx(expected, abs=1e-3)


def test_chat_template_renders_each_prompt_as_a_user_turn(lm_eval, tiny_model_dir, tmp_path):
    """--apply-chat-template: the context is the question as a user turn under the model's template with the
    assistant's turn opened, and each choice follows it directly (lm-eval drops the target delimiter); as
    everywhere in lm-eval, the context's trailing whitespace (the template's newline) is scored with the choice."""
    from lrft.model import load_tokenizer
    from transformers import AutoModelForCausalLM

    items = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "gold": i % 2} for i in range(3)]
    tasks = choice_task(tmp_path / "tasks", items)
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    assert lrft_main_ok(["eval", "--model", str(tiny_model_dir), "--harness", "tiny_choice", "--include-path", tasks,
                         "--apply-chat-template", "--output", str(out), "--predictions", str(preds)]) == 0
    assert json.loads(out.read_text())["harness"]["apply_chat_template"] is True
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for item, row in zip(items, rows):
        context = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}], tokenize=False,
                                                add_generation_prompt=True)
        context_ids = tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"]
        expected = []
        for choice in item["choices"]:
            whole = tokenizer(context + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            expected.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context_ids), len(whole))))
        assert row["scores"] == pytest.approx(expected, abs=1e-3)


def lrft_main_ok(args) -> int:
    from lrft.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def test_data_points_lrft_tasks_at_another_folder(lm_eval, tiny_model_dir, tmp_path):
    folder = tmp_path / "dev"
    folder.mkdir()
    (folder / "boolq.jsonl").write_text("".join((DEV / "boolq.jsonl").read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "r.json"
    assert lrft_main_ok(["eval", "--model", str(tiny_model_dir), "--harness", "lrft_boolq", "--data", str(folder),
                         "--output", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["lrft_boolq"]["n"] == 3


def test_a_hub_task_offline_is_one_line(lm_eval, tiny_model_dir, capfd, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = lrft_main(["eval", "--model", str(tiny_model_dir), "--harness", "arc_easy", "--limit", "2"], capfd)
    assert code == 2 and "could not be loaded" in err and len(err.strip().splitlines()) == 1, err
