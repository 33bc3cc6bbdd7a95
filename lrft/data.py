"""Training data: formats, chat templates, tokenization, loss masking, packing, batching and data order.

Formats (``data.format``)
-------------------------
``commonsense``: the LLM-Adapters instruction format (``instruction``, ``input``, ``output``) with its exact
training template, whitespace included (PROTOCOL.md of the commonsense data). ``alpaca``: Stanford Alpaca's
template. Both follow the published runs: the tokenizer adds BOS as it normally does; EOS is appended only
when the sequence is shorter than ``cutoff_len``; labels are the input ids unless ``train_on_inputs`` is
false, which masks the prompt.

``completion``: ``{prompt, completion}``; prompt and completion are tokenized apart and joined (so the model
is trained on exactly the prompt ids inference sends), EOS appended; loss on the completion only unless
``train_on_inputs``.

``messages``: a conversation, OpenAI style (``messages: [{role, content}]``) or ShareGPT style
(``conversations: [{from, value}]``, human/gpt/system), rendered with the tokenizer's chat template (or
``data.chat_template``) by :func:`render_chat`, the one function training and inference share. The loss
covers ``data.train_on``: every assistant turn (default), the last one, or all tokens. An assistant turn's
tokens are found by rendering the conversation up to it with the generation prompt and up to its end,
and taking what lies between: both renderings must be token prefixes of the whole conversation, which
also guarantees that the prompt training sees before each turn is exactly what inference sends (the
turn's end-of-turn token is in the span). A template that does not render prefixes stably is refused,
naming the record.

Every format is one entry of the registry :data:`FORMATS` (:class:`DataFormat`: its example function, a
sample record, its template and defaults); the recipe's ``data.format`` accepts the registry's names, so a new
format is one function and one entry. Records with no target token left (all masked, or truncated before the
first) are skipped and counted.

Packing (``data.packing``)
--------------------------
Examples are packed into rows of at most ``cutoff_len`` tokens, best-fit decreasing (deterministic, so a
resume sees the same rows); the row is then the unit of ``batch_size`` and ``micro_batch_size``. Within a
row, position ids restart at 0 for every example and attention is block-diagonal causal, so no token sees
another example. Training concatenates a micro-batch's rows into one row without padding and attends per
example (:mod:`lrft.packed_attention`; FlashAttention-2's variable-length kernel reads the same layout);
eager attention gets padded rows and a 4D mask. Each example's first label is ignored, as the
shift by one ignores it unpacked, so the loss is over the same tokens. ``data.group_by_length`` instead
keeps examples whole and puts examples of similar length in the same micro-batches.
"""

from __future__ import annotations

import json
from bisect import bisect_left, insort
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import UserError
from .packed_attention import NAME as PACKED_ATTENTION

IGNORE_INDEX = -100

# LLM-Adapters finetune.py templates (training). The odd indentation is part of the published format.
COMMONSENSE_TRAIN = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)
COMMONSENSE_TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Input:\n"
    "                {input}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)
# LLM-Adapters commonsense_evaluate.py template (evaluation): one space after "request.", an empty
# line (no indentation) before "### Response:", and the prompt ends with 16 spaces.
COMMONSENSE_EVAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Response:\n"
    "                "
)
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)


def training_text(record: dict, fmt: str, with_output: bool = True) -> str:
    """The full training text of a record, or only its prompt part (``with_output=False``)."""
    templates = FORMATS[fmt].templates if fmt in FORMATS else None
    if templates is None:
        raise ValueError(fmt)
    template = templates[1] if record.get("input") else templates[0]
    return template.format(
        instruction=record["instruction"], input=record.get("input", ""), output=record["output"] if with_output else ""
    )


def eval_prompt(instruction: str) -> str:
    return COMMONSENSE_EVAL.format(instruction=instruction)


# --- reading files ------------------------------------------------------------------------------------


def _files_in(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl", ".parquet"))
    if not files:
        raise UserError(f"data folder {path} holds no .json, .jsonl or .parquet file")
    return files


def _missing_file_error(path_or_id: str) -> UserError:
    return UserError(
        f"data file {path_or_id} does not exist; set data.path to a .json/.jsonl/.parquet file "
        "(commonsense_170k.json is LLM-Adapters' ft-training_set/commonsense_170k.json)"
    )


def _looks_like_path(path_or_id: str) -> bool:
    return path_or_id.startswith((".", "/", "~")) or Path(path_or_id).suffix in (".json", ".jsonl", ".parquet")


def check_data_source(path_or_id: str) -> None:
    """Fail fast (dry runs too) on a local data path that does not exist."""
    if _looks_like_path(path_or_id) and not Path(path_or_id).expanduser().exists():
        raise _missing_file_error(path_or_id)


def _read_json_file(path: Path) -> list[Any]:
    """A JSON list of records or JSON lines, parsed as written (no schema inference: the record numbers in
    error messages are the file's own)."""
    text = path.read_text()
    if not text.strip():
        raise UserError(f"data file {path} is empty; give a file with training records")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"data file {path} is not valid JSON ({exc}); fix or re-export it") from None
        return data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"data file {path}, line {number}: not valid JSON ({exc.msg}); fix or re-export the file") from None
    return records


def read_records(path_or_id: str) -> list[dict]:
    """Records from a local .json / .jsonl file or folder, a .parquet file or folder (``datasets``), or a
    hub dataset id."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        files = _files_in(path) if path.is_dir() else [path]
        kinds = {f.suffix for f in files}
        if len(kinds) > 1 and kinds != {".json", ".jsonl"}:
            raise UserError(f"data folder {path} mixes {', '.join(sorted(kinds))} files; keep one format")
        if ".parquet" not in kinds:
            return [record for f in files for record in _read_json_file(f)]
    else:
        check_data_source(path_or_id)
        files = None
    import datasets

    datasets.disable_progress_bars()
    try:
        if files is not None:
            ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        else:
            ds = datasets.load_dataset(path_or_id, split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for unreadable input
        raise UserError(f"cannot read data {path_or_id}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return [dict(r) for r in ds]


# --- one record -> one example ----------------------------------------------------------------------------


class RecordError(UserError):
    """A bad record; the loader adds which file and record."""


def _text_fields(record: Any, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if not isinstance(record, dict):
        raise RecordError(f"is a JSON {type(record).__name__}, not an object with {', '.join(fields)}")
    missing = [f for f in fields if not isinstance(record.get(f), str)]
    missing += [f for f in optional if record.get(f) is not None and not isinstance(record.get(f), str)]
    if missing:
        raise RecordError(f"missing or non-text field(s) {', '.join(missing)}; each record needs {', '.join(fields)}")


def tokenize_record(record: dict, tokenizer, fmt: str, cutoff_len: int, train_on_inputs: bool) -> dict:
    """A commonsense or alpaca record as the published runs tokenize it."""
    _text_fields(record, ("instruction", "output"), ("input",))
    text = training_text(record, fmt)
    ids = tokenizer(text, truncation=True, max_length=cutoff_len, add_special_tokens=True)["input_ids"]
    if ids and ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
        ids = ids + [tokenizer.eos_token_id]
    labels = list(ids)
    if not train_on_inputs:
        prompt_ids = tokenizer(training_text(record, fmt, with_output=False), truncation=True, max_length=cutoff_len)["input_ids"]
        n = min(len(prompt_ids), len(labels))
        labels[:n] = [IGNORE_INDEX] * n
    return {"input_ids": ids, "labels": labels}


def tokenize_completion(record: dict, tokenizer, cutoff_len: int, train_on_inputs: bool) -> dict:
    _text_fields(record, ("prompt", "completion"))
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + completion)[:cutoff_len]
    labels = (list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + completion
    return {"input_ids": ids, "labels": labels[:cutoff_len]}


# ShareGPT's speaker names and OpenAI's roles
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def conversation(record: Any) -> list[dict[str, str]]:
    """The record's messages as [{role, content}] with OpenAI roles (from either form)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages", record.get("conversations")), list):
        raise RecordError("has no list field messages (OpenAI form) or conversations (ShareGPT form)")
    sharegpt = "messages" not in record
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for turn, item in enumerate(record["conversations" if sharegpt else "messages"], 1):
        if not isinstance(item, dict):
            raise RecordError(f"turn {turn} is not an object with {role_key} and {content_key}")
        role = ROLES.get(item.get(role_key)) if isinstance(item.get(role_key), str) else None
        if role is None:
            raise RecordError(
                f"turn {turn} has {role_key} {item.get(role_key)!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(item.get(content_key), str):
            raise RecordError(f"turn {turn}'s {content_key} is not text; give each turn its text as a string")
        messages.append({"role": role, "content": item[content_key]})
    if not messages:
        raise RecordError("is an empty conversation")
    return messages


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, template: Optional[str] = None) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template (``template`` overrides the tokenizer's):
    the one rendering that training, ``lrft generate`` and ``lrft chat`` share."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except TemplateError as exc:
        raise RecordError(f"is rejected by the chat template ({exc}); fix the conversation or set data.chat_template") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(messages: list[dict], tokenizer, template: Optional[str], cutoff_len: int, train_on: str) -> dict:
    full = render_chat(tokenizer, messages, False, template)
    if train_on == "all":
        labels = list(full)
    else:
        labels = [IGNORE_INDEX] * len(full)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in turns[-1:] if train_on == "last_assistant" else turns:
            before = render_chat(tokenizer, messages[:i], True, template)
            after = render_chat(tokenizer, messages[: i + 1], False, template)
            if full[: len(before)] != before or full[: len(after)] != after:
                raise RecordError(
                    f"is not rendered stably by the chat template: the conversation up to assistant turn {i + 1} is "
                    "not a token prefix of the whole, so its tokens cannot be found; set data.chat_template to a "
                    "template that renders prefixes stably, or data.train_on: all"
                )
            labels[len(before) : len(after)] = full[len(before) : len(after)]
    return {"input_ids": full[:cutoff_len], "labels": labels[:cutoff_len]}


def chat_template(section, tokenizer, model_name: str) -> Optional[str]:
    """The template ``data.format: messages`` renders with: ``data.chat_template`` (a file or a Jinja string)
    or the tokenizer's own."""
    value = section.chat_template
    if value is None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"data.format={section.format} needs a chat template and the tokenizer of {model_name} has none; set "
                "data.chat_template to a .jinja file or a Jinja string"
            )
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise UserError(f"data.chat_template {value!r} is neither a file nor a Jinja template; give a .jinja file or a template string")


def has_targets(example: dict) -> bool:
    """Whether any label survives the shift by one (the first label is never predicted)."""
    return any(t != IGNORE_INDEX for t in example["labels"][1:])


def check_cutoff(tokenizer, fmt: str, cutoff_len: int) -> None:
    """Refuse a cutoff that cannot hold even the empty template: every label would be cut off."""
    if fmt not in FORMATS or FORMATS[fmt].templates is None:
        return
    empty = training_text({"instruction": "", "input": "", "output": ""}, fmt)
    n = len(tokenizer(empty)["input_ids"])
    if cutoff_len <= n:
        raise UserError(
            f"data.cutoff_len={cutoff_len} is shorter than the {fmt} prompt template alone ({n} tokens); "
            f"raise data.cutoff_len (the published runs use 256)"
        )


# --- the format registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFormat:
    """One ``data.format``: how a record becomes an example ``{input_ids, labels}`` (labels: the input ids, or
    IGNORE_INDEX where no loss is taken). Adding a format is one ``example`` function and one entry in
    :data:`FORMATS`; the recipe's ``data.format`` accepts the registry's names."""

    name: str
    # (record, tokenizer, data section, chat template or None) -> example; raises RecordError on a bad record
    example: Callable[[Any, Any, Any, Optional[str]], dict]
    sample: dict  # a minimal valid record: documents the format; the tests check every format's contract on it
    templates: Optional[tuple[str, str]] = None  # instruction formats: the training template without / with input
    chat: bool = False  # rendered with a chat template: data.chat_template and data.train_on apply to it
    train_on_inputs: bool = True  # the default of data.train_on_inputs (a chat format uses data.train_on)


def _instruction_example(record: Any, tokenizer, section, template: Optional[str]) -> dict:
    return tokenize_record(record, tokenizer, section.format, section.cutoff_len, section.train_on_inputs)


def _completion_example(record: Any, tokenizer, section, template: Optional[str]) -> dict:
    return tokenize_completion(record, tokenizer, section.cutoff_len, section.train_on_inputs)


def _messages_example(record: Any, tokenizer, section, template: Optional[str]) -> dict:
    return tokenize_conversation(conversation(record), tokenizer, template, section.cutoff_len, section.train_on)


_INSTRUCTION_SAMPLE = {"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true"}
FORMATS: dict[str, DataFormat] = {f.name: f for f in [
    DataFormat("commonsense", _instruction_example, _INSTRUCTION_SAMPLE, (COMMONSENSE_TRAIN, COMMONSENSE_TRAIN_WITH_INPUT)),
    DataFormat("alpaca", _instruction_example, _INSTRUCTION_SAMPLE, (ALPACA, ALPACA_WITH_INPUT)),
    DataFormat("completion", _completion_example, {"prompt": "Q: What is the capital of France?\nA:",
                                                       "completion": " Paris, on the Seine."},
               train_on_inputs=False),
    DataFormat("messages", _messages_example, {"messages": [{"role": "user", "content": "Is the sky blue?"},
                                                            {"role": "assistant", "content": "Yes, on a clear day."}]},
               chat=True),
]}


@dataclass
class TokenizedData:
    train: list[dict]  # examples, or packed rows with data.packing
    val: list[dict]
    skipped: int = 0  # records without a target token
    examples: int = 0  # training examples before packing


class RecordToExample:
    """One record -> one example (or None when no token is left to learn from) for ``data.format``."""

    def __init__(self, section, tokenizer, model_name: str):
        self.section, self.tokenizer = section, tokenizer
        self.format = FORMATS[section.format]
        self.template = chat_template(section, tokenizer, model_name) if self.format.chat else None

    def __call__(self, record: Any) -> Optional[dict]:
        example = self.format.example(record, self.tokenizer, self.section, self.template)
        return example if has_targets(example) else None

    def many(self, records: list, indices: list[int]) -> list[dict]:
        """The examples of ``records[i]`` for ``indices``, in order, those with nothing to learn left out; a bad
        record is one line naming its number (1-based)."""
        out = []
        for i in indices:
            try:
                example = self(records[i])
            except RecordError as exc:
                raise UserError(f"data {self.section.path}, record {i + 1} {exc}") from None
            if example is not None:
                out.append(example)
        return out


def load_training_data(section, tokenizer, seed: int, model_name: str = "the model") -> TokenizedData:
    records = read_records(section.path)
    if not records:
        raise UserError(f"data {section.path} holds no records; give a file with at least one training record")
    check_cutoff(tokenizer, section.format, section.cutoff_len)
    if section.max_samples:
        records = records[: section.max_samples]
    numbers = list(range(len(records)))
    val_numbers: list[int] = []
    if section.val_size:
        if section.val_size >= len(records):
            raise UserError(
                f"data.val_size={section.val_size} leaves no training records (the data has {len(records)}); lower it"
            )
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        val_numbers, numbers = order[: section.val_size], sorted(order[section.val_size :])
    tokenize = RecordToExample(section, tokenizer, model_name)
    train, val = tokenize.many(records, numbers), tokenize.many(records, val_numbers)
    skipped = len(numbers) + len(val_numbers) - len(train) - len(val)
    if not train:
        raise UserError(
            f"data {section.path}: none of its {len(numbers)} training records has a token to learn from "
            f"(data.train_on / train_on_inputs masks them all, or cutoff_len={section.cutoff_len} cuts them off); "
            "check the format and raise data.cutoff_len"
        )
    count = len(train)
    if section.packing:
        train = pack(train, section.cutoff_len)
    return TokenizedData(train=train, val=val, skipped=skipped, examples=count)


# --- packing --------------------------------------------------------------------------------------------


def pack(examples: list[dict], cutoff_len: int) -> list[dict]:
    """Best-fit decreasing into rows of at most ``cutoff_len`` tokens. Each row holds ``input_ids``,
    ``labels`` (each example's first label ignored: nothing predicts it, as unpacked) and ``position_ids``
    restarting at 0 per example. Deterministic: ties break by the examples' order."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        size = len(examples[i]["input_ids"])
        at = bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = cutoff_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - size > 0:
            insort(free, (room - size, row))
    packed = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            example = examples[i]
            ids += example["input_ids"]
            labels += [IGNORE_INDEX] + example["labels"][1:]
            positions += range(len(example["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


# --- order and batching -------------------------------------------------------------------------------


class DataOrder:
    """A deterministic, resumable stream of example indices: epoch e is a permutation seeded by
    (seed, e); optimizer step s takes items [s·B, (s+1)·B) of the concatenated epochs. The position
    is a pure function of the step, so resuming needs only the step number, and every process of a
    distributed run sees the same global batch and takes its own slice.

    With ``lengths`` (``data.group_by_length``), each epoch's permutation is cut into chunks of 32 global
    batches, each chunk sorted by length (longest first) and cut into global batches, and the batches
    are shuffled: every micro-batch (a contiguous slice of a global batch) holds examples of similar length.
    """

    GROUP_CHUNK = 32  # global batches per length-sorted chunk

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True, lengths: Optional[list[int]] = None):
        self.n = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self._perms: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + e)
                perm = torch.randperm(self.n, generator=g).tolist()
            else:
                perm = list(range(self.n))
            if self.lengths is not None:
                perm = self._grouped(perm, e)
            self._perms[e] = perm
            self._perms.pop(e - 2, None)
        return self._perms[e]

    def _grouped(self, perm: list[int], e: int) -> list[int]:
        chunk, batch = self.GROUP_CHUNK * self.batch_size, self.batch_size
        by_length = []
        for start in range(0, len(perm), chunk):
            by_length += sorted(perm[start : start + chunk], key=lambda i: -self.lengths[i])
        batches = [by_length[i : i + batch] for i in range(0, len(by_length), batch)]
        g = torch.Generator().manual_seed(self.seed * 100_003 + e + 7_919)
        return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]

    def global_batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(self._epoch(pos // self.n)[pos % self.n])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n


# attention implementations that find a row's examples from its position ids
ROW_ATTENTION = ("flash_attention_2", PACKED_ATTENTION)


def collate(examples: list[dict], pad_id: int, attention: str = "sdpa", mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A micro-batch laid out for the attention that will read it. For attention that finds the examples
    from the position ids (:data:`ROW_ATTENTION`; training switches SDPA models to it), one row of the
    real tokens of every example and packed row, with no padding at all (:func:`one_row`). Otherwise
    right-padded rows: unpacked ones need no attention mask (under causal attention a real token never sees
    the padding after it, and padding carries no label, so the attention keeps its unmasked kernel);
    packed ones get a 4D block-diagonal causal mask, bool for SDPA, additive in ``mask_dtype`` for eager
    attention, where the padding at a row's end is a segment of its own, so it changes no real token."""
    if attention in ROW_ATTENTION:
        return one_row(examples)
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
    batch = {"input_ids": ids, "labels": labels}
    if "position_ids" not in examples[0]:
        return batch
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["position_ids"])
        positions[i, :n] = torch.tensor(e["position_ids"])
        positions[i, n:] = torch.arange(width - n)  # the padding: one more segment
    batch["position_ids"] = positions
    batch["attention_mask"] = block_causal_mask(positions, attention, mask_dtype)
    return batch


def one_row(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Examples (or packed rows) concatenated into one row: position ids restart at 0 per example, and
    each example's first label is ignored, as the shift by one ignores it in a padded row (the previous
    example's last token would otherwise predict it)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        ids += example["input_ids"]
        labels += [IGNORE_INDEX] + example["labels"][1:]
        positions += example.get("position_ids") or range(len(example["input_ids"]))
    return {key: torch.tensor([values], dtype=torch.long) for key, values in (("input_ids", ids), ("labels", labels), ("position_ids", positions))}


def block_causal_mask(positions: torch.Tensor, attention: str, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, L, L): query q may see key k iff k <= q in the same segment (a new segment starts where the
    position id does not follow the previous one)."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    segment = starts.long().cumsum(-1)
    width = positions.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment.unsqueeze(2) == segment.unsqueeze(1)) & causal
    allowed = allowed.unsqueeze(1)
    if attention == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


def micro_batches(examples: list[dict], micro_batch_size: int) -> Iterator[list[dict]]:
    for i in range(0, len(examples), micro_batch_size):
        yield examples[i : i + micro_batch_size]


def target_tokens(examples: list[dict]) -> int:
    """Tokens that contribute to the loss (labels shifted by one, as the model predicts the next token)."""
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)


def padded_tokens(examples: list[dict], processes: int, micro_batch_size: int, attention: str = "sdpa") -> int:
    """Tokens the forward passes of a global batch compute, padding included (each micro-batch is padded to
    its longest member, unless :func:`collate` lays it out as one row for ``attention``)."""
    per_process = len(examples) // processes
    total = 0
    for rank in range(processes):
        for chunk in micro_batches(examples[rank * per_process : (rank + 1) * per_process], micro_batch_size):
            if attention in ROW_ATTENTION:
                total += sum(len(e["input_ids"]) for e in chunk)
            else:
                total += len(chunk) * max(len(e["input_ids"]) for e in chunk)
    return total
