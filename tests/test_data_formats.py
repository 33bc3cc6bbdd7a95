"""The data-format registry (lrft/data.py FORMATS): every format keeps the example contract on its sample
record, the recipe accepts exactly the registry's names and applies each format's options and defaults, and a
new format is one entry."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from lrft.data import FORMATS, IGNORE_INDEX, DataFormat, RecordToExample, check_cutoff
from lrft.errors import UserError
from lrft.recipe import DataSection


@pytest.fixture(scope="module")
def tokenizer():
    from lrft.model import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def example(name: str, tokenizer, **options) -> dict:
    return RecordToExample(DataSection(path="x", format=name, **options), tokenizer, "SmolLM2")(FORMATS[name].sample)


def loss_options(fmt: DataFormat) -> tuple[dict, dict]:
    """The options that put the loss on the answer only, and on every token."""
    if fmt.chat:
        return {"train_on": "assistant"}, {"train_on": "all"}
    return {"train_on_inputs": False}, {"train_on_inputs": True}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_masks_the_prompt_and_cuts_at_cutoff(name, tokenizer):
    fmt = FORMATS[name]
    assert fmt.name == name
    answer_only, every_token = loss_options(fmt)
    whole = example(name, tokenizer, cutoff_len=512, **every_token)
    ids = whole["input_ids"]
    assert whole["labels"] == ids  # every token carries the loss

    masked = example(name, tokenizer, cutoff_len=512, **answer_only)
    assert masked["input_ids"] == ids  # masking changes the labels, never the tokens
    kept = [i for i, label in enumerate(masked["labels"]) if label != IGNORE_INDEX]
    assert all(masked["labels"][i] == ids[i] for i in kept)
    # the sample is a prompt followed by one answer: the answer is a non-empty suffix, the prompt is masked
    assert kept and kept == list(range(kept[0], len(ids))) and kept[0] > 1

    cutoff = len(ids) - 2
    assert cutoff > kept[0]  # the cut falls inside the answer
    short = example(name, tokenizer, cutoff_len=cutoff, **answer_only)
    assert short == {"input_ids": ids[:cutoff], "labels": masked["labels"][:cutoff]}


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_recipe_applies_each_formats_options_and_defaults(name):
    fmt = FORMATS[name]
    assert DataSection(path="x", format=name).train_on_inputs is fmt.train_on_inputs
    chat_option, input_option = {"train_on": "all"}, {"train_on_inputs": True}
    refused = input_option if fmt.chat else chat_option
    with pytest.raises(ValidationError, match="does not apply to data.format" if fmt.chat else "applies to data.format"):
        DataSection(path="x", format=name, **refused)
    DataSection(path="x", format=name, **(chat_option if fmt.chat else input_option))


def test_the_recipe_accepts_exactly_the_registry_names():
    assert DataSection.model_fields["format"].annotation.__args__ == tuple(FORMATS)
    with pytest.raises(ValidationError, match="'commonsense', 'alpaca', 'completion' or 'messages'"):
        DataSection(path="x", format="chat")


@pytest.mark.parametrize("name", [name for name, fmt in FORMATS.items() if fmt.templates])
def test_a_cutoff_shorter_than_the_template_is_refused(name, tokenizer):
    with pytest.raises(UserError, match=f"shorter than the {name} prompt template"):
        check_cutoff(tokenizer, name, 8)
    check_cutoff(tokenizer, name, 256)


def test_a_new_format_is_one_entry(tokenizer, monkeypatch):
    def shout(record, tok, section, template):
        ids = tok(record["text"].upper())["input_ids"][: section.cutoff_len]
        return {"input_ids": ids, "labels": list(ids)}

    monkeypatch.setitem(FORMATS, "shout", DataFormat("shout", shout, {"text": "hello there"}))
    section = SimpleNamespace(format="shout", cutoff_len=64)
    out = RecordToExample(section, tokenizer, "SmolLM2")({"text": "hello there"})
    assert tokenizer.decode(out["input_ids"]) == "HELLO THERE"
