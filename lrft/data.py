"""Training data: formats, prompt templates, tokenization, loss masking, batching and data order.

Formats
-------
``commonsense``: the LLM-Adapters instruction format (``instruction``, ``input``, ``output``, ``answer``)
with its exact training template, whitespace included (see docs/data.md and PROTOCOL.md of the
commonsense data). ``alpaca``: Stanford Alpaca's template (``instruction``, ``input``, ``output``).

Tokenization follows the published runs: the tokenizer adds BOS as it normally does; EOS is appended
only when the tokenized sequence is shorter than ``cutoff_len``; labels equal the input ids unless
``train_on_inputs`` is false, in which case the prompt's tokens are masked with -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import UserError

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

REQUIRED_FIELDS = ("instruction", "output")


def training_text(record: dict, fmt: str, with_output: bool = True) -> str:
    """The full training text of a record, or only its prompt part (``with_output=False``)."""
    if fmt == "commonsense":
        template = COMMONSENSE_TRAIN_WITH_INPUT if record.get("input") else COMMONSENSE_TRAIN
    elif fmt == "alpaca":
        template = ALPACA_WITH_INPUT if record.get("input") else ALPACA
    else:
        raise ValueError(fmt)
    return template.format(
        instruction=record["instruction"], input=record.get("input", ""), output=record["output"] if with_output else ""
    )


def eval_prompt(instruction: str) -> str:
    return COMMONSENSE_EVAL.format(instruction=instruction)


# --- reading files ----------------------------------------------------------------------------------


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


def read_records(path_or_id: str) -> list[dict]:
    """Records from a local file or folder (through the ``datasets`` library) or a hub dataset id."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(path_or_id).expanduser()
    try:
        if path.exists():
            files = _files_in(path) if path.is_dir() else [path]
            kinds = {f.suffix for f in files}
            if len(kinds) > 1:
                raise UserError(f"data folder {path} mixes {', '.join(sorted(kinds))} files; keep one format")
            builder = "parquet" if ".parquet" in kinds else "json"
            if builder == "json" and path.is_file() and path.stat().st_size == 0:
                raise UserError(f"data file {path} is empty; give a file with training records")
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        else:
            check_data_source(path_or_id)
            ds = datasets.load_dataset(path_or_id, split="train")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for unreadable input
        raise UserError(f"cannot read data {path_or_id}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    return [dict(r) for r in ds]


def check_records(records: list[dict], source: str) -> None:
    if not records:
        raise UserError(f"data {source} holds no records; give a file with at least one training record")
    for i, record in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise UserError(
                f"data {source}, record {i + 1}: missing or non-text field(s) {', '.join(missing)}; "
                "each record needs instruction and output (input optional)"
            )


# --- tokenization -------------------------------------------------------------------------------------


def tokenize_record(record: dict, tokenizer, fmt: str, cutoff_len: int, train_on_inputs: bool) -> dict:
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


def check_cutoff(tokenizer, fmt: str, cutoff_len: int) -> None:
    """Refuse a cutoff that cannot hold even the empty template: every label would be cut off."""
    empty = training_text({"instruction": "", "input": "", "output": ""}, fmt)
    n = len(tokenizer(empty)["input_ids"])
    if cutoff_len <= n:
        raise UserError(
            f"data.cutoff_len={cutoff_len} is shorter than the {fmt} prompt template alone ({n} tokens); "
            f"raise data.cutoff_len (the published runs use 256)"
        )


@dataclass
class TokenizedData:
    train: list[dict]
    val: list[dict]


def load_training_data(section, tokenizer, seed: int) -> TokenizedData:
    records = read_records(section.path)
    check_records(records, section.path)
    check_cutoff(tokenizer, section.format, section.cutoff_len)
    if section.max_samples:
        records = records[: section.max_samples]
    val: list[dict] = []
    if section.val_size:
        if section.val_size >= len(records):
            raise UserError(
                f"data.val_size={section.val_size} leaves no training records (the data has {len(records)}); lower it"
            )
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        val = [records[i] for i in order[: section.val_size]]
        records = [records[i] for i in sorted(order[section.val_size :])]
    tok = lambda rs: [  # noqa: E731
        tokenize_record(r, tokenizer, section.format, section.cutoff_len, section.train_on_inputs) for r in rs
    ]
    return TokenizedData(train=tok(records), val=tok(val))


# --- order and batching -------------------------------------------------------------------------------


class DataOrder:
    """A deterministic, resumable stream of example indices: epoch e is a permutation seeded by
    (seed, e); optimizer step s takes items [s·B, (s+1)·B) of the concatenated epochs. The position
    is a pure function of the step, so resuming needs only the step number, and every process of a
    distributed run sees the same global batch and takes its own slice."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + e)
                self._perms[e] = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perms[e] = list(range(self.n))
            self._perms.pop(e - 2, None)
        return self._perms[e]

    def global_batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(self._epoch(pos // self.n)[pos % self.n])
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding positions are masked in attention and ignored in the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def micro_batches(examples: list[dict], micro_batch_size: int) -> Iterator[list[dict]]:
    for i in range(0, len(examples), micro_batch_size):
        yield examples[i : i + micro_batch_size]


def target_tokens(examples: list[dict]) -> int:
    """Tokens that contribute to the loss (labels shifted by one, as the model predicts the next token)."""
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)
