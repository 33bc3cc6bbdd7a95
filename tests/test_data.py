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
    assert "attention_mask" not in batch  # causal attention keeps padding out (tests/test_loss.py)
    assert batch["input_ids"].dtype == torch.long


# --- conversations, completions, packing ------------------------------------------------------------------

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from conftest import ROOT  # noqa: E402
from lrft.data import (  # noqa: E402
    IGNORE_INDEX,
    conversation,
    load_training_data,
    pack,
    render_chat,
    target_tokens,
    tokenize_completion,
    tokenize_conversation,
)
from lrft.errors import UserError  # noqa: E402
from lrft.recipe import DataSection  # noqa: E402

CHAT_SAMPLE = ROOT / "lrft/samples/chat/commonsense_chat.jsonl"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from lrft.model import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def sample_conversations():
    return [json.loads(line) for line in CHAT_SAMPLE.read_text().splitlines()]


def first_label_positions(labels):
    """Where each run of labels starts (the first token of each trained span)."""
    return [i for i, t in enumerate(labels) if t != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


def test_training_prompt_is_what_inference_sends(smollm2_tokenizer):
    """For every conversation of the sample and every assistant turn, the generation prompt rendered for
    inference (messages so far + add_generation_prompt) is exactly the training sequence up to that turn's
    first trained token, under the embedded SmolLM2 template."""
    checked = 0
    for record in sample_conversations():
        messages = conversation(record)
        example = tokenize_conversation(messages, smollm2_tokenizer, None, 4096, "assistant")
        starts = first_label_positions(example["labels"])
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(starts) == len(turns)
        for turn, start in zip(turns, starts):
            prompt = render_chat(smollm2_tokenizer, messages[:turn], add_generation_prompt=True)
            assert example["input_ids"][:start] == prompt
            trained = [t for t in example["labels"][start:] if t != IGNORE_INDEX]
            assert smollm2_tokenizer.decode(trained).startswith(messages[turn]["content"])
            checked += 1
    assert checked > 300


def test_assistant_spans_end_with_the_end_of_turn_token(smollm2_tokenizer):
    messages = conversation(sample_conversations()[2])
    example = tokenize_conversation(messages, smollm2_tokenizer, None, 4096, "assistant")
    trained = smollm2_tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained == "".join(f"{reply}<|im_end|>\n" for reply in replies)
    last = tokenize_conversation(messages, smollm2_tokenizer, None, 4096, "last_assistant")
    assert smollm2_tokenizer.decode([t for t in last["labels"] if t != IGNORE_INDEX]) == f"{replies[-1]}<|im_end|>\n"
    everything = tokenize_conversation(messages, smollm2_tokenizer, None, 4096, "all")
    assert everything["labels"] == everything["input_ids"]


def test_sharegpt_and_openai_forms_tokenize_alike(smollm2_tokenizer):
    record = sample_conversations()[0]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in record["messages"]]}
    assert conversation(sharegpt) == conversation(record)


def test_completion_trains_on_the_completion(smollm2_tokenizer):
    record = {"prompt": "The capital of France is", "completion": " Paris."}
    example = tokenize_completion(record, smollm2_tokenizer, 256, train_on_inputs=False)
    prompt = smollm2_tokenizer("The capital of France is")["input_ids"]
    assert example["input_ids"][: len(prompt)] == prompt and example["input_ids"][-1] == smollm2_tokenizer.eos_token_id
    assert example["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert example["labels"][len(prompt) :] == example["input_ids"][len(prompt) :]
    assert DataSection(path="x", format="completion").train_on_inputs is False  # the format's default


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_without_targets_are_skipped_and_counted(smollm2_tokenizer, tmp_path):
    records = sample_conversations()[:6]
    long_question = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", records + [long_question])
    data = load_training_data(DataSection(path=str(path), format="messages", cutoff_len=256), smollm2_tokenizer, 0)
    assert (data.examples, data.skipped) == (6, 1)
    only_long = write_jsonl(tmp_path / "long.jsonl", [long_question])
    with pytest.raises(UserError, match="none of its 1 training records has a token to learn from"):
        load_training_data(DataSection(path=str(only_long), format="messages", cutoff_len=256), smollm2_tokenizer, 0)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "record 2 turn 1 has role 'robot'; use one of"),
        ({"messages": [{"role": "user", "content": 5}]}, "record 2 turn 1's content is not text"),
        ({"conversations": [{"from": "human"}]}, "record 2 turn 1's value is not text"),
        ({"text": "no conversation"}, "record 2 has no list field messages (OpenAI form) or conversations (ShareGPT form)"),
        ({"messages": []}, "record 2 is an empty conversation"),
    ],
)
def test_bad_conversations_name_the_record(smollm2_tokenizer, tmp_path, record, message):
    path = write_jsonl(tmp_path / "chat.jsonl", sample_conversations()[:1] + [record])
    with pytest.raises(UserError, match=re.escape(message)):
        load_training_data(DataSection(path=str(path), format="messages"), smollm2_tokenizer, 0)


def test_templates_that_reject_or_render_unstably_are_refused(smollm2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", sample_conversations()[:3])
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match=r"record 1 is rejected by the chat template \(no system role\)"):
        load_training_data(DataSection(path=str(path), format="messages", chat_template=strict), smollm2_tokenizer, 0)
    # a template whose rendering of the turns so far depends on how many turns there are
    unstable = "{{ messages | length }}{% for m in messages %}|{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}|{% endif %}"
    with pytest.raises(UserError, match="record 1 is not rendered stably by the chat template"):
        load_training_data(DataSection(path=str(path), format="messages", chat_template=unstable), smollm2_tokenizer, 0)
    template_file = tmp_path / "plain.jinja"
    template_file.write_text("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:\n{% endif %}")
    data = load_training_data(DataSection(path=str(path), format="messages", chat_template=str(template_file)), smollm2_tokenizer, 0)
    assert data.examples == 3 and "<|im_start|>" not in smollm2_tokenizer.decode(data.train[0]["input_ids"])


def test_a_tokenizer_without_a_template_needs_one(smollm2_tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", sample_conversations()[:1])
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)
    with pytest.raises(UserError, match="needs a chat template and the tokenizer of the model has none; set data.chat_template"):
        load_training_data(DataSection(path=str(path), format="messages"), smollm2_tokenizer, 0)


# --- packing ---------------------------------------------------------------------------------------------


def random_examples(count, seed=0, low=3, high=40, vocab=128):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        n = int(torch.randint(low, high, (1,), generator=g))
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX if (j < n // 3 and i % 2) else t for j, t in enumerate(ids)]  # some prompts masked
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def test_pack_fills_rows_keeps_every_token_and_is_deterministic():
    examples = random_examples(60)
    rows = pack(examples, 64)
    assert rows == pack(examples, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    assert target_tokens(rows) == target_tokens(examples)  # each example's first label is never a target
    assert sum(len(r["input_ids"]) for r in rows) / (64 * len(rows)) > 0.9
    for row in rows:  # positions restart at 0 for every example
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)


def test_group_by_length_puts_similar_lengths_together_and_stays_a_permutation():
    lengths = [int(x) for x in torch.randint(1, 500, (256,), generator=torch.Generator().manual_seed(1))]
    order = DataOrder(256, 8, seed=3, lengths=lengths)
    batches = [order.global_batch(s) for s in range(32)]
    assert sorted(i for b in batches for i in b) == list(range(256))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / 32
    plain = DataOrder(256, 8, seed=3)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in (plain.global_batch(s) for s in range(32))) / 32
    assert spread < plain_spread / 4
    assert [DataOrder(256, 8, seed=3, lengths=lengths).global_batch(s) for s in range(32)] == batches
