import torch

from lrft.data import (
    COMMONSENSE_EVAL,
    DataOrder,
    collate,
    eval_prompt,
    training_text,
    tokenize_record,
)

RECORD = {"instruction": "Q?", "input": "", "output": "the correct answer is true", "answer": "true"}


def test_commonsense_training_template_exact_whitespace():
    text = training_text(RECORD, "commonsense")
    pad = " " * 16
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
        f"{pad}### Instruction:\n{pad}Q?\n{pad}\n{pad}### Response:\n{pad}the correct answer is true"
    )
    assert text == expected


def test_commonsense_eval_template_differs_as_published():
    pad = " " * 16
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
        f"{pad}### Instruction:\n{pad}Q?\n\n{pad}### Response:\n{pad}"
    )
    assert eval_prompt("Q?") == expected
    assert COMMONSENSE_EVAL.endswith("### Response:\n" + pad)


class FakeTokenizer:
    eos_token_id = 99

    def __call__(self, text, truncation=True, max_length=None, add_special_tokens=True):
        ids = [1] + [ord(c) % 90 + 2 for c in text]
        if truncation and max_length:
            ids = ids[:max_length]
        return {"input_ids": ids}


def test_eos_appended_only_below_cutoff_and_prompt_masking():
    tok = FakeTokenizer()
    full = tokenize_record(RECORD, tok, "commonsense", cutoff_len=10_000, train_on_inputs=True)
    assert full["input_ids"][-1] == 99 and full["labels"] == full["input_ids"]
    cut = tokenize_record(RECORD, tok, "commonsense", cutoff_len=50, train_on_inputs=True)
    assert len(cut["input_ids"]) == 50 and cut["input_ids"][-1] != 99
    masked = tokenize_record(RECORD, tok, "commonsense", cutoff_len=10_000, train_on_inputs=False)
    prompt_len = len(tok(training_text(RECORD, "commonsense", with_output=False))["input_ids"])
    assert masked["labels"][:prompt_len] == [-100] * prompt_len
    assert masked["labels"][prompt_len:] == full["input_ids"][prompt_len:]


def test_data_order_is_a_pure_function_of_step():
    a = DataOrder(10, 4, seed=3)
    b = DataOrder(10, 4, seed=3)
    seq = [a.global_batch(s) for s in range(6)]
    assert [b.global_batch(s) for s in reversed(range(6))][::-1] == seq
    flat = sum(seq[:5], [])[:10]
    assert sorted(flat) == list(range(10))  # the first epoch is a permutation
    assert DataOrder(10, 4, seed=4).global_batch(0) != seq[0] or DataOrder(10, 4, seed=4).global_batch(1) != seq[1]


def test_collate_right_pads_and_ignores_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
