"""Commonsense evaluation: answer extraction, task discovery, batch invariance of both modes (tiny random
Llama with the real tokenizer), the JSON and predictions files, --adapter and --loss; marked slow, the real
embedded model in loglik mode."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lrft.cli import app
from lrft.errors import UserError
from lrft.evaluate import (
    KNOWN_TASKS,
    LOGLIK_PREFIX,
    TASK_LABELS,
    candidate_labels,
    evaluate_model,
    extract_answer,
    find_task_files,
    loglik_batch,
    read_task_records,
    response_text,
    run_eval,
    select_tasks,
)

DEV = Path(__file__).resolve().parents[1] / "lrft" / "samples" / "commonsense" / "dev"
TRAIN_SAMPLE = Path(__file__).resolve().parents[1] / "lrft" / "samples" / "commonsense" / "train_500.jsonl"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tiny model gains nothing from threads, and on a shared CPU their synchronisation costs 10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- extraction -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", KNOWN_TASKS)
def test_each_label_is_extracted_from_the_trained_answer(task):
    for label in TASK_LABELS[task]:
        assert extract_answer(task, f"the correct answer is {label}") == label
        assert extract_answer(task, label) == label


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("ARC-Easy", "the correct answer is answer10", "answer1"),  # no word boundaries
        ("openbookqa", "I think answer3, not answer2", "answer3"),  # the first match wins
        ("boolq", "it is untrue", "true"),
        ("boolq", "falsetrue", "false"),
        ("boolq", "True", None),  # case-sensitive
        ("piqa", "Solution1", None),
        ("piqa", "solution3 or solution2", "solution2"),
        ("social_i_qa", "answer5", "answer5"),  # the published regex searches answer1..5 for every multiple-choice task
        ("hellaswag", "ending5 then ending4", "ending4"),
        ("winogrande", "option 1", None),
        ("winogrande", "", None),
        ("ARC-Challenge", "no idea", None),
    ],
)
def test_extraction_follows_the_published_regexes(task, text, expected):
    assert extract_answer(task, text) == expected


def test_response_text_is_after_the_last_marker():
    assert response_text("prompt ### Response:\n   x ### Response:  the correct answer is true \n") == "the correct answer is true"
    assert response_text("no marker at all ") == "no marker at all"


def test_candidate_labels_come_from_the_answer_format():
    assert candidate_labels("ARC-Easy", "Q?\n\nAnswer format: answer1/answer2/answer3") == ("answer1", "answer2", "answer3")
    assert candidate_labels("boolq", "no format line") == ("true", "false")
    assert candidate_labels("winogrande", "Option1: a Option2: b Answer format: option1/option2") == ("option1", "option2")


# --- task files -----------------------------------------------------------------------------------


def _records(n, label="true"):
    return [{"instruction": f"question {i}\n\nAnswer format: true/false", "input": "", "output": f"the correct answer is {label}",
             "answer": label} for i in range(n)]


def test_task_files_in_every_layout(tmp_path):
    (tmp_path / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(3)))
    (tmp_path / "piqa.json").write_text(json.dumps(_records(2)))
    (tmp_path / "ARC-Easy").mkdir()
    (tmp_path / "ARC-Easy" / "test.json").write_text(json.dumps(_records(4)))
    (tmp_path / "notes.json").write_text("[]")
    found = find_task_files(tmp_path)
    assert list(found) == ["boolq", "piqa", "ARC-Easy"]  # the paper's order; unknown stems ignored
    assert [len(read_task_records(found[t], t)) for t in found] == [3, 2, 4]
    assert select_tasks(found, None, tmp_path) == ["boolq", "piqa", "ARC-Easy"]
    assert select_tasks(found, "piqa, boolq", tmp_path) == ["piqa", "boolq"]
    assert select_tasks(found, ["ARC-Easy"], tmp_path) == ["ARC-Easy"]
    with pytest.raises(UserError, match="did you mean ARC-Easy"):
        select_tasks(found, "arc-easy", tmp_path)
    with pytest.raises(UserError, match="tasks found there: boolq, piqa, ARC-Easy"):
        select_tasks(found, "hellaswag", tmp_path)
    assert list(find_task_files(tmp_path / "piqa.json")) == ["piqa"]


def test_folder_without_tasks_lists_the_known_names(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(UserError) as err:
        find_task_files(tmp_path)
    assert all(task in str(err.value) for task in KNOWN_TASKS) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        find_task_files(tmp_path / "missing")


def test_bad_records_are_user_errors(tmp_path):
    bad = tmp_path / "boolq.jsonl"
    bad.write_text('{"instruction": "q", "answer": "true"}\n{not json\n')
    with pytest.raises(UserError, match="line 2"):
        read_task_records(bad, "boolq")
    bad.write_text('{"question": "q", "answer": "true"}\n')
    with pytest.raises(UserError, match="instruction"):
        read_task_records(bad, "boolq")
    # without "answer" the label at the end of "output" is the gold answer
    bad.write_text('{"instruction": "q", "output": "the correct answer is false"}\n')
    assert read_task_records(bad, "boolq")[0]["answer"] == "false"


# --- the tiny model: batch invariance and correctness ---------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lrft.model import load_base_model, load_tokenizer
    from lrft.recipe import ModelSection, QuantizationSection

    model = load_base_model(ModelSection(name_or_path=str(tiny_model_dir)), QuantizationSection(bits=None), torch.device("cpu"))
    return model, load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Three tasks, a few records each, with prompts of different lengths (so batches are padded)."""
    folder = tmp_path_factory.mktemp("dev")
    for task, n in (("boolq", 4), ("piqa", 3), ("ARC-Challenge", 4)):
        lines = (DEV / f"{task}.jsonl").read_text().splitlines()[:n]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _by_id(rows):
    return {r["id"]: r for r in rows}


def test_generate_is_batch_invariant(tiny, mixed_data):
    model, tokenizer = tiny
    rows_1, rows_4 = [], []
    one = evaluate_model(model, tokenizer, mixed_data, None, None, "generate", 1, rows_1)
    four = evaluate_model(model, tokenizer, mixed_data, None, None, "generate", 4, rows_4)
    assert len(rows_1) == 11
    a, b = _by_id(rows_1), _by_id(rows_4)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["generation"] == b[key]["generation"], key
        assert a[key]["prediction"] == b[key]["prediction"], key
    assert {t: r["accuracy"] for t, r in one["tasks"].items()} == {t: r["accuracy"] for t, r in four["tasks"].items()}
    assert any(r["generation"] for r in rows_1)  # something was generated (a random model babbles)


def _naive_scores(model, tokenizer, prompt, labels):
    """Each label on its own, no padding, no cache: sum of the log-probs of the tokens that follow the
    prompt's tokens in the joint tokenization of prompt + continuation."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    scores = []
    for label in labels:
        full = tokenizer(prompt + LOGLIK_PREFIX + label)["input_ids"]
        start = next(i for i, (x, y) in enumerate(zip(prompt_ids + [None], full)) if x != y)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        scores.append(sum(float(logprobs[t - 1, full[t]]) for t in range(start, len(full))))
    return scores


def test_loglik_matches_naive_scoring_at_every_batch_size(tiny):
    model, tokenizer = tiny
    records = [json.loads(l) for l in (DEV / "hellaswag.jsonl").read_text().splitlines()[:3]]
    records += [json.loads(l) for l in (DEV / "boolq.jsonl").read_text().splitlines()[:2]]
    prompts = [f"Below {r['instruction']}\n### Response:\n" for r in records]
    # labels of several tokens and of different lengths exercise the shared-cache path
    label_sets = [("ending1", "ending2", "ending3", "ending4"), ("true", "false"), ("true", "false positive, surely", "maybe"),
                  ("answer1", "answer2"), ("solution2", "solution1 and more words")]
    expected = [_naive_scores(model, tokenizer, p, labels) for p, labels in zip(prompts, label_sets)]
    for batch_size in (1, 2, 5):
        got = []
        for lo in range(0, len(prompts), batch_size):
            got += loglik_batch(model, tokenizer, prompts[lo : lo + batch_size], label_sets[lo : lo + batch_size])
        for row, want in zip(got, expected):
            assert row == pytest.approx(want, abs=2e-4)
            assert max(range(len(row)), key=row.__getitem__) == max(range(len(want)), key=want.__getitem__)


def test_loglik_predictions_identical_at_batch_size_1_and_8(tiny, mixed_data):
    model, tokenizer = tiny
    rows_1, rows_8 = [], []
    evaluate_model(model, tokenizer, mixed_data, None, None, "loglik", 1, rows_1)
    evaluate_model(model, tokenizer, mixed_data, None, None, "loglik", 8, rows_8)
    a, b = _by_id(rows_1), _by_id(rows_8)
    for key in a:
        assert a[key]["prediction"] == b[key]["prediction"]
        assert a[key]["scores"] == pytest.approx(b[key]["scores"], abs=1e-4)
        assert a[key]["prediction"] in TASK_LABELS[a[key]["task"]]  # loglik never fails to parse


def test_results_json_and_predictions_file(tiny_model_dir, mixed_data, tmp_path):
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model_dir), "--data", str(mixed_data), "--mode", "loglik", "--limit", "2",
        "--tasks", "boolq,ARC-Challenge", "--output", str(out), "--predictions", str(preds), "--batch-size", "3",
    ])
    assert result.exit_code == 0, result.output
    assert "boolq" in result.output and "mean" in result.output
    data = json.loads(out.read_text())
    assert data["mode"] == "loglik" and data["model"] == str(tiny_model_dir) and data["adapter"] is None
    assert list(data["tasks"]) == ["boolq", "ARC-Challenge"]
    for r in data["tasks"].values():
        assert r["n"] == 2 and 0 <= r["correct"] <= 2 and r["accuracy"] == r["correct"] / 2
        assert r["seconds"] > 0 and r["examples_per_s"] > 0
    assert data["mean_accuracy"] == pytest.approx(sum(r["accuracy"] for r in data["tasks"].values()) / 2)
    rows = [json.loads(l) for l in preds.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["boolq/0", "boolq/1", "ARC-Challenge/0", "ARC-Challenge/1"]
    gold = [json.loads(l)["answer"] for l in (mixed_data / "boolq.jsonl").read_text().splitlines()[:2]]
    assert [r["answer"] for r in rows[:2]] == gold
    assert all({"prediction", "generation", "answer", "correct"} <= r.keys() for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --adapter"),
        (["--model", "M", "--adapter", "A"], "exactly one of --adapter"),
        (["--model", "M", "--batch-size", "0"], "--batch-size"),
        (["--model", "M", "--quantization", "3"], "--quantization"),
    ],
)
def test_bad_options_exit_2(args, message, mixed_data, capsys):
    from lrft.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--data", str(mixed_data), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_data_without_tasks_fails_before_loading_the_model(tmp_path, capsys):
    from lrft.cli import main

    (tmp_path / "train.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(tmp_path / "no-such-model"), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "boolq" in err and "openbookqa" in err


def test_adapter_is_evaluated_on_its_base(tiny, tiny_model_dir, mixed_data, tmp_path):
    from lrft.adapters import get_adapter
    from lrft.adapter_folder import save_adapter
    from lrft.inject import inject_adapters
    from lrft.model import load_base_model
    from lrft.recipe import ModelSection, QuantizationSection

    base = {"base_model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"}, "quantization": {"bits": None}}
    config = get_adapter("lora").config(type="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = load_base_model(ModelSection(**base["base_model"]), QuantizationSection(bits=None), torch.device("cpu"))
    torch.manual_seed(1)
    layers = inject_adapters(model, config)
    with torch.no_grad():
        for layer in layers.values():
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer."):
                    p.normal_(0, 0.5)  # LoRA starts as the identity: make it change the model
    save_adapter(tmp_path / "adapter", layers, config, base)
    _, tokenizer = tiny

    in_memory = []
    evaluate_model(model, tokenizer, mixed_data, "boolq", 2, "loglik", 2, in_memory)
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    results = run_eval(adapter=tmp_path / "adapter", model=None, data=mixed_data, tasks="boolq", limit=2, mode="loglik",
                       batch_size=2, output=out, predictions=preds, quantization=None, loss=False)
    assert results["adapter"] == str(tmp_path / "adapter") and results["model"] == str(tiny_model_dir)
    loaded = [json.loads(l) for l in preds.read_text().splitlines()]
    plain = []
    evaluate_model(tiny[0], tokenizer, mixed_data, "boolq", 2, "loglik", 2, plain)
    for a, b, c in zip(loaded, in_memory, plain):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
        assert a["scores"] != pytest.approx(c["scores"], abs=1e-3)  # the adapter was applied


def _naive_losses(model, ids, first_target):
    """(summed loss, tokens) of predicting ids[first_target:] from what precedes, one unpadded forward, float64."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    targets = range(max(1, first_target), len(ids))
    return sum(-float(logp[t - 1, ids[t]]) for t in targets), len(targets)


def test_loss_mode_reports_full_and_answer_only_loss(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    sample = tmp_path / "train.jsonl"
    sample.write_text("".join(TRAIN_SAMPLE.read_text().splitlines(keepends=True)[:6]))
    out, preds = tmp_path / "loss.json", tmp_path / "rows.jsonl"
    results = run_eval(adapter=None, model=str(tiny_model_dir), data=sample, tasks=None, limit=None, mode="generate",
                       batch_size=4, output=out, predictions=preds, quantization=None, loss=True)
    assert json.loads(out.read_text())["mode"] == "loss" and results["n"] == 6 and results["format"] == "commonsense"
    assert results["perplexity"] == pytest.approx(math.exp(results["loss"]))
    assert results["answer_perplexity"] == pytest.approx(math.exp(results["answer_loss"]))
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(6))
    # independent: each record alone, no padding; the answer is what follows as many tokens as the prompt alone
    # has (training's masking: the prompt's last token may merge with the answer's first)
    from lrft.data import training_text

    totals = {"all": [0.0, 0], "answer": [0.0, 0]}
    for row, line in zip(rows, sample.read_text().splitlines()):
        record = json.loads(line)
        ids = tokenizer(training_text(record, "commonsense"))["input_ids"] + [tokenizer.eos_token_id]
        prompt = tokenizer(training_text(record, "commonsense", with_output=False))["input_ids"]
        for key, first in (("all", 1), ("answer", len(prompt))):
            total, count = _naive_losses(model, ids, first)
            totals[key][0] += total
            totals[key][1] += count
            prefix = "" if key == "all" else "answer_"
            assert row[f"{prefix}tokens"] == count
            assert row[f"{prefix}loss_sum"] == pytest.approx(total, rel=1e-4)
    assert results["tokens"] == totals["all"][1] and results["answer_tokens"] == totals["answer"][1]
    assert results["loss"] == pytest.approx(totals["all"][0] / totals["all"][1], rel=1e-4)
    assert results["answer_loss"] == pytest.approx(totals["answer"][0] / totals["answer"][1], rel=1e-4)
    assert math.log(49152) - 0.5 < results["loss"] < math.log(49152) + 0.5  # a random model: about uniform


def test_loss_on_chat_data_takes_the_answer_from_the_assistant_turns(tiny, tiny_model_dir, tmp_path):
    model, tokenizer = tiny
    chat = Path(__file__).resolve().parents[1] / "lrft" / "samples" / "chat" / "commonsense_chat.jsonl"
    preds = tmp_path / "rows.jsonl"
    results = run_eval(adapter=None, model=str(tiny_model_dir), data=chat, tasks=None, limit=3, mode="generate",
                       batch_size=2, output=None, predictions=preds, quantization=None, loss=True, cutoff_len=1024)
    assert results["format"] == "messages" and results["n"] == 3
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    render = lambda messages, open_turn: tokenizer(  # noqa: E731
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn), add_special_tokens=False
    )["input_ids"]
    for row, line in zip(rows, chat.read_text().splitlines()[:3]):
        messages = json.loads(line)["messages"]
        ids = render(messages, False)
        # each assistant turn: what the conversation up to its end adds to the one that ends before it
        answer = set()
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                answer |= set(range(len(render(messages[:i], True)), len(render(messages[: i + 1], False))))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        answer_losses = [-float(logp[t - 1, ids[t]]) for t in sorted(answer) if t >= 1]
        all_total, all_count = _naive_losses(model, ids, 1)
        assert row["tokens"] == all_count and row["loss_sum"] == pytest.approx(all_total, rel=1e-4)
        assert row["answer_tokens"] == len(answer_losses) > 0
        assert row["answer_loss_sum"] == pytest.approx(sum(answer_losses), rel=1e-4)


@pytest.mark.parametrize(
    "record, args, message",
    [
        ({"text": "no known fields"}, [], "--format"),
        ({"instruction": "q", "output": "a"}, ["--format", "alpacca"], "did you mean alpaca"),
        ({"instruction": "q", "output": "a"}, ["--cutoff-len", "4"], "--cutoff-len 4"),
    ],
)
def test_loss_input_errors_exit_2(record, args, message, tiny_model_dir, tmp_path, capfd):
    from conftest import lrft_main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n")
    code, err = lrft_main(["eval", "--model", str(tiny_model_dir), "--loss", "--data", str(data), *args], capfd)
    assert code == 2 and message in err, err


def test_trainer_eval_section_shape(tiny, mixed_data):
    model, tokenizer = tiny
    model.train()
    results = evaluate_model(model, tokenizer, str(mixed_data), ["piqa"], 1, "loglik", 8)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert set(results) >= {"mode", "model", "adapter", "tasks", "mean_accuracy"}
    assert results["tasks"]["piqa"]["n"] == 1


# --- the real embedded model ----------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_loglik_on_all_tasks(tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, [
        "eval", "--model", "smollm2-135m-instruct", "--data", str(DEV), "--mode", "loglik", "--limit", "5",
        "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["tasks"]) == list(KNOWN_TASKS)
    assert all(r["n"] == 5 and r["examples_per_s"] > 0 for r in data["tasks"].values())
    assert 0 <= data["mean_accuracy"] <= 1
