"""Commonsense-8 evaluation (the LLM-Adapters protocol) and plain loss evaluation.

Two scoring modes, reported under their own names:

``generate`` is the published protocol: 4-beam deterministic search, at most 32 new tokens, stop at
EOS; decode skipping special tokens, keep the text after the last "### Response:", and the prediction
is the FIRST match of the task's case-sensitive regex (no word boundaries: "answer10" contains
"answer1"). No match counts as wrong.

``loglik`` scores every allowed label as the continuation "the correct answer is <label>" of the same
prompt and picks the most likely one. The score is the SUM of the continuation tokens' log-probabilities,
not length-normalised: the labels of a task have the same shape ("answer1".."answer5") and differ in
one token or so. The continuation is cut from the jointly tokenized prompt + answer (as training saw
it), so a boundary token where the prompt's trailing spaces merge with "the" is part of it, identical
for every label. It is much cheaper than ``generate`` and never unparsable, but its numbers are not
comparable with the papers' tables.

Batches are left padded with explicit position ids, so the predictions do not depend on the batch size.
Examples are batched in order of prompt length (less padding); results keep the files' order.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch.nn import functional as F

from .data import FORMATS, IGNORE_INDEX, RecordError, collate, eval_prompt, micro_batches, read_records, target_tokens
from .errors import UserError
from .io import write_json_atomic, write_text_atomic
from .loss import position_losses, summed_token_loss, use_loss_head

# The paper's task order (the order of its tables) and each task's answer labels.
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}
KNOWN_TASKS = tuple(TASK_LABELS)

# LLM-Adapters commonsense_evaluate.py extract_answer: the multiple-choice tasks all search answer1..5.
_ANSWER_N = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS: dict[str, re.Pattern] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "social_i_qa": re.compile(_ANSWER_N),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
    "ARC-Easy": re.compile(_ANSWER_N),
    "ARC-Challenge": re.compile(_ANSWER_N),
    "openbookqa": re.compile(_ANSWER_N),
}

NUM_BEAMS = 4
MAX_NEW_TOKENS = 32
RESPONSE_MARKER = "### Response:"
LOGLIK_PREFIX = "the correct answer is "
LOSS_CUTOFF = 256
MODES = ("generate", "loglik")

# "Answer format: answer1/answer2/answer3" closes every instruction; it says how many options a
# question really has (a few ARC questions have 3 or 5), so loglik never picks an option that is not there.
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


def extract_answer(task: str, text: str) -> Optional[str]:
    """The first label the task's regex finds in ``text`` (case-sensitive, no word boundaries), or None."""
    match = ANSWER_PATTERNS[task].search(text)
    return match.group(0) if match else None


def response_text(decoded: str) -> str:
    """The text after the last "### Response:" of a decoded prompt + generation, stripped."""
    return decoded.rsplit(RESPONSE_MARKER, 1)[-1].strip()


def candidate_labels(task: str, instruction: str) -> tuple[str, ...]:
    """The labels loglik chooses among: those the instruction's answer format lists, else the task's."""
    match = _ANSWER_FORMAT.search(instruction)
    if match:
        listed = [label for label in match.group(1).split("/") if label in TASK_LABELS[task]]
        if len(listed) >= 2:
            return tuple(listed)
    return TASK_LABELS[task]


# --- finding and reading task files -------------------------------------------------------------


def find_task_files(data: Union[str, Path]) -> dict[str, Path]:
    """Task name -> file, in the paper's order: ``<task>.jsonl``, ``<task>.json`` or ``<task>/test.json``
    inside a folder, or a single file whose stem is a task name."""
    path = Path(data).expanduser()
    known = ", ".join(KNOWN_TASKS)
    if not path.exists():
        raise UserError(f"eval data {data} does not exist; pass a folder of <task>.json(l) files (tasks: {known})")
    if path.is_file():
        if path.stem not in TASK_LABELS:
            raise UserError(f"eval data file {path.name}: the file name must be a task name; known tasks: {known}")
        return {path.stem: path}
    found: dict[str, Path] = {}
    for task in KNOWN_TASKS:
        for candidate in (path / f"{task}.jsonl", path / f"{task}.json", path / task / "test.json"):
            if candidate.is_file():
                found[task] = candidate
                break
    if not found:
        raise UserError(
            f"eval data folder {path} holds no known task; expected <task>.json, <task>.jsonl or <task>/test.json "
            f"for tasks: {known}"
        )
    return found


def select_tasks(found: dict[str, Path], tasks: Union[str, Sequence[str], None], source: Union[str, Path]) -> list[str]:
    if tasks is None:
        return list(found)
    wanted = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    wanted = [t for t in wanted if t]
    if not wanted:
        raise UserError("--tasks is empty; give comma-separated task names, e.g. --tasks boolq,piqa")
    for task in wanted:
        if task not in TASK_LABELS:
            close = difflib.get_close_matches(task, KNOWN_TASKS, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"unknown task {task!r}; {hint}known tasks: {', '.join(KNOWN_TASKS)}")
        if task not in found:
            raise UserError(f"task {task} has no file in {source}; tasks found there: {', '.join(found)}")
    return list(dict.fromkeys(wanted))


def read_task_records(path: Path, task: str) -> list[dict]:
    """Records of one task file (a JSON list or JSON lines), each checked for an instruction and an answer."""
    text = path.read_text()
    records = None
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = None  # maybe JSON lines under a .json name
    if records is None:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {number}: not valid JSON ({exc.msg}); fix or re-export the file") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path} holds no records; a task file is a JSON list or JSON lines of records")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise UserError(f"{path}, record {i + 1}: no text field 'instruction'; each record needs instruction and answer")
        answer = record.get("answer")
        if not isinstance(answer, str):
            # the answer is also the label at the end of "the correct answer is <label>"
            answer = extract_answer(task, record["output"]) if isinstance(record.get("output"), str) else None
            if answer is None:
                raise UserError(f"{path}, record {i + 1}: no text field 'answer'; each record needs instruction and answer")
            record = dict(record, answer=answer)
            records[i] = record
    return records


# --- batching helpers ---------------------------------------------------------------------------


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


# --- generate mode ------------------------------------------------------------------------------


def generation_config(model, tokenizer):
    """The published decoding: 4-beam deterministic search, 32 new tokens, stop at EOS. Options a model's
    own generation_config could otherwise slip in (penalties, sampling) are pinned to neutral values."""
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    return GenerationConfig(
        num_beams=NUM_BEAMS,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=0,
        early_stopping=False,
        length_penalty=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_return_sequences=1,
        eos_token_id=eos,
        pad_token_id=_pad_id(tokenizer),
    )


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], config=None) -> list[str]:
    """The response text (after the last "### Response:") of each prompt, by the published beam search."""
    config = config or generation_config(model, tokenizer)
    eos = set(config.eos_token_id)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    ids, mask = _left_pad(encoded, _pad_id(tokenizer), _model_device(model))
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    texts = []
    width = ids.shape[1]
    for row, prompt_ids in enumerate(encoded):
        new = out[row, width:].tolist()
        # a finished beam is filled with pad tokens after its EOS: cut there whatever the pad token is
        stop = next((i for i, t in enumerate(new) if t in eos), len(new))
        decoded = tokenizer.decode(prompt_ids + new[:stop], skip_special_tokens=True)
        texts.append(response_text(decoded))
    return texts


# --- loglik mode --------------------------------------------------------------------------------


def _loglik_parts(tokenizer, prompt: str, labels: Sequence[str]) -> tuple[list[int], int, list[list[int]]]:
    """(shared ids, start, per-label suffix ids): every label's full text tokenizes to shared + suffix;
    the scored continuation is shared[start:] + suffix. Each suffix holds at least one token."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = [tokenizer(prompt + LOGLIK_PREFIX + label)["input_ids"] for label in labels]
    shortest = min(len(f) for f in full)
    start = min(_common_prefix(prompt_ids, f) for f in full)
    shared = min(min(_common_prefix(full[0], f) for f in full[1:]), shortest - 1)
    start = max(1, min(start, shared))  # the first token has no prediction to score
    return full[0][:shared], start, [f[shared:] for f in full]


@torch.no_grad()
def loglik_batch(model, tokenizer, prompts: list[str], label_sets: list[Sequence[str]]) -> list[list[float]]:
    """Sum of log-probabilities of "the correct answer is <label>" after each prompt, for each label.

    One forward over the (left padded) prompts + shared answer prefix; its key/value cache is then
    repeated once per label and only the label-specific tokens are run, when a label has more than one.
    """
    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    parts = [_loglik_parts(tokenizer, p, labels) for p, labels in zip(prompts, label_sets)]
    shared = [p[0] for p in parts]
    ids, mask = _left_pad(shared, pad_id, device)
    # logits are needed only from the position before the first scored token on
    keep = max(len(s) - start + 1 for s, start, _ in parts)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logprobs = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)

    scores: list[list[float]] = []
    for row, (tokens, start, suffixes) in enumerate(parts):
        # token t of row sits at column width - len + t; it is predicted by the column before it
        first = keep - 1 - (len(tokens) - start)
        targets = torch.tensor(tokens[start:], device=device)
        shared_score = float(logprobs[row, first : keep - 1].gather(-1, targets[:, None]).sum()) if len(targets) else 0.0
        last = logprobs[row, keep - 1]
        scores.append([shared_score + float(last[suffix[0]]) for suffix in suffixes])

    longest = max(len(s) for _, _, suffixes in parts for s in suffixes)
    if longest > 1:
        # run every label's remaining tokens on a copy of its prompt's cache
        owners = [row for row, (_, _, suffixes) in enumerate(parts) for _ in suffixes]
        suffixes = [s for _, _, sfx in parts for s in sfx]
        cache = out.past_key_values
        cache.batch_select_indices(torch.tensor(owners, device=device))
        inputs = torch.full((len(suffixes), longest - 1), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros_like(inputs)
        for i, s in enumerate(suffixes):
            inputs[i, : len(s) - 1] = torch.tensor(s[:-1], dtype=torch.long)
            suffix_mask[i, : len(s) - 1] = 1
        owner_index = torch.tensor(owners, device=device)
        prefix_mask = mask[owner_index]
        positions = prefix_mask.sum(-1, keepdim=True) + torch.arange(longest - 1, device=device)
        suffix_out = model(
            input_ids=inputs.to(device),
            attention_mask=torch.cat([prefix_mask, suffix_mask.to(device)], dim=1),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        suffix_logprobs = torch.log_softmax(suffix_out.logits.float(), dim=-1)
        flat = [score for row in scores for score in row]
        for i, s in enumerate(suffixes):
            if len(s) > 1:
                targets = torch.tensor(s[1:], device=device)
                flat[i] += float(suffix_logprobs[i, : len(s) - 1].gather(-1, targets[:, None]).sum())
        it = iter(flat)
        scores = [[next(it) for _ in row] for row in scores]
    return scores


# --- the benchmark ------------------------------------------------------------------------------


def evaluate_task(
    model, tokenizer, task: str, records: list[dict], mode: str, batch_size: int, predictions: Optional[list] = None,
    progress=None,
) -> dict:
    """Accuracy of ``model`` on one task's records; appends one dict per example to ``predictions``."""
    prompts = [eval_prompt(r["instruction"]) for r in records]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    # longest first: similar lengths share a batch (less padding), and running out of memory shows at once
    order = sorted(range(len(records)), key=lambda i: -lengths[i])
    config = generation_config(model, tokenizer) if mode == "generate" else None
    outputs: dict[int, dict] = {}
    started = time.perf_counter()
    for lo in range(0, len(order), batch_size):
        batch = order[lo : lo + batch_size]
        if mode == "generate":
            texts = generate_batch(model, tokenizer, [prompts[i] for i in batch], config)
            for i, text in zip(batch, texts):
                outputs[i] = {"generation": text, "prediction": extract_answer(task, text)}
        else:
            label_sets = [candidate_labels(task, records[i]["instruction"]) for i in batch]
            scores = loglik_batch(model, tokenizer, [prompts[i] for i in batch], label_sets)
            for i, labels, row in zip(batch, label_sets, scores):
                best = max(range(len(labels)), key=lambda k: row[k])  # first of equal scores
                outputs[i] = {
                    "generation": None,
                    "prediction": labels[best],
                    "scores": {label: round(s, 6) for label, s in zip(labels, row)},
                }
        if progress is not None:
            progress(len(batch))
    seconds = time.perf_counter() - started
    correct = 0
    for i, record in enumerate(records):
        hit = outputs[i]["prediction"] == record["answer"]
        correct += hit
        if predictions is not None:
            predictions.append(
                {"id": f"{task}/{i}", "task": task, "index": i, **outputs[i], "answer": record["answer"], "correct": hit}
            )
    n = len(records)
    return {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "no_answer": sum(1 for o in outputs.values() if o["prediction"] is None),
        "seconds": round(seconds, 3),
        "examples_per_s": round(n / seconds, 3) if seconds > 0 else None,
    }


def evaluate_model(
    model,
    tokenizer,
    data_dir: Union[str, Path],
    tasks: Union[str, Sequence[str], None] = None,
    limit: Optional[int] = None,
    mode: str = "loglik",
    batch_size: int = 8,
    predictions: Optional[list] = None,
    console=None,
) -> dict:
    """Evaluate a loaded model on the commonsense tasks in ``data_dir``; the results JSON (see module doc).

    Used by ``lrft eval`` and by the trainer's end-of-training ``eval`` section.
    """
    if mode not in MODES:
        raise UserError(f"eval mode {mode!r} is unknown; use generate or loglik")
    if batch_size < 1:
        raise UserError(f"eval batch size {batch_size} must be at least 1")
    if limit is not None and limit < 1:
        raise UserError(f"eval limit {limit} must be at least 1 (or leave it out for every example)")
    found = find_task_files(data_dir)
    selected = select_tasks(found, tasks, data_dir)
    records = {task: read_task_records(found[task], task)[:limit] for task in selected}

    was_training = model.training
    model.eval()
    results: dict = {}
    try:
        with _progress(console, sum(len(r) for r in records.values())) as advance:
            for task in selected:
                results[task] = evaluate_task(model, tokenizer, task, records[task], mode, batch_size, predictions, advance)
    finally:
        if was_training:
            model.train()
    return {
        "mode": mode,
        "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "adapter": None,
        "data": str(data_dir),
        "limit": limit,
        "batch_size": batch_size,
        "tasks": results,
        "mean_accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
    }


class _progress:
    """A transient progress bar on interactive consoles; a no-op elsewhere (logs, tests)."""

    def __init__(self, console, total: int):
        self.console, self.total, self.bar = console, total, None

    def __enter__(self):
        if self.console is None or not self.console.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "eval", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=self.console, transient=True
        )
        self.bar.start()
        task_id = self.bar.add_task("eval", total=self.total)
        return lambda n: self.bar.advance(task_id, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


# --- token loss: training, validation and `lrft eval --loss` ---------------------------------------


@torch.no_grad()
def mean_token_loss(
    model, examples: list[dict], batch_size: int, pad_id: int, device, autocast: Callable = nullcontext
) -> tuple[float, int]:
    """Mean token loss over ``examples`` (tokenized, with labels) and the number of target tokens, in eval
    mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for chunk in micro_batches(examples, batch_size):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            with autocast():
                total += float(summed_token_loss(model, batch))
    finally:
        if was_training:
            model.train()
    count = target_tokens(examples)
    return total / max(1, count), count


def detect_format(record: Any) -> str:
    """The data format a record is in, by its fields: messages/conversations, prompt + completion, or an
    instruction record (commonsense; alpaca records have the same fields and need ``--format alpaca``)."""
    if isinstance(record, dict):
        if "messages" in record or "conversations" in record:
            return "messages"
        if "prompt" in record and "completion" in record:
            return "completion"
        if "instruction" in record:
            return "commonsense"
    raise UserError(
        f"--data: the first record has neither messages, prompt + completion nor instruction fields; give a training-format "
        f"file or name its format with --format ({', '.join(FORMATS)})"
    )


def loss_examples(records: list, tokenizer, fmt: str, cutoff_len: int, source) -> list[dict]:
    """Each record tokenized as training would with loss on every token (``labels``) and on the answer
    only (``answer_labels``: the output, the completion, the assistant turns), numbered by ``index``."""
    from types import SimpleNamespace

    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, list(FORMATS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"--format {fmt!r} is unknown; {hint}formats: {', '.join(FORMATS)}")
    if cutoff_len < 8:
        raise UserError(f"--cutoff-len {cutoff_len} must be at least 8")
    data_format = FORMATS[fmt]
    if data_format.chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--data {source} holds conversations and the model's tokenizer has no chat template to render them")
    everything = SimpleNamespace(format=fmt, cutoff_len=cutoff_len, train_on_inputs=True, train_on="all")
    answer_only = SimpleNamespace(format=fmt, cutoff_len=cutoff_len, train_on_inputs=False, train_on="assistant")
    template = None  # the tokenizer's own
    examples = []
    for number, record in enumerate(records, 1):
        try:
            full = data_format.example(record, tokenizer, everything, template)
            answer = data_format.example(record, tokenizer, answer_only, template)
        except RecordError as exc:
            raise UserError(f"data {source}, record {number} {exc}") from None
        examples.append({"input_ids": full["input_ids"], "labels": full["labels"], "answer_labels": answer["labels"],
                         "index": number - 1})
    return examples


@torch.no_grad()
def example_losses(model, examples: list[dict], batch_size: int, pad_id: int, device) -> list[dict]:
    """Per example: the summed loss and token count over every target token and over the answer's."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for chunk in micro_batches(examples, batch_size):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            answers = collate([{"input_ids": e["input_ids"], "labels": e["answer_labels"]} for e in chunk], pad_id)["labels"]
            losses = position_losses(model, batch).double()
            # position t predicts token t + 1: the masks move left as the labels do
            full = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
            answer = F.pad(answers[:, 1:], (0, 1), value=IGNORE_INDEX).to(device) != IGNORE_INDEX
            for row, example in enumerate(chunk):
                rows.append({
                    "index": example["index"],
                    "tokens": int(full[row].sum()),
                    "loss_sum": float(losses[row][full[row]].sum()),
                    "answer_tokens": int(answer[row].sum()),
                    "answer_loss_sum": float(losses[row][answer[row]].sum()),
                })
    finally:
        if was_training:
            model.train()
    return rows


def evaluate_loss_file(
    model, tokenizer, data: Union[str, Path], limit: Optional[int] = None, batch_size: int = 8, fmt: Optional[str] = None,
    cutoff_len: int = LOSS_CUTOFF, predictions: Optional[list] = None,
) -> dict:
    """Token loss and perplexity on a training-format file, over every token (``loss``: prompt and answer,
    as ``train_on_inputs: true`` trains) and over the answer's tokens only (``answer_loss``: the output,
    completion or assistant turns); both the mean over tokens, not examples. Per-example rows go to
    ``predictions``."""
    records = read_records(str(data))[:limit]
    if not records:
        raise UserError(f"data {data} holds no records; give a file with at least one training record")
    fmt = fmt or detect_format(records[0])
    examples = loss_examples(records, tokenizer, fmt, cutoff_len, data)
    examples.sort(key=lambda e: -len(e["input_ids"]))  # less padding
    use_loss_head(model)  # where exact, the logits exist a chunk at a time
    started = time.perf_counter()
    rows = sorted(example_losses(model, examples, batch_size, _pad_id(tokenizer), _model_device(model)), key=lambda r: r["index"])
    seconds = time.perf_counter() - started
    for row in rows:
        row["id"] = row["index"]
        row["loss"] = row["loss_sum"] / row["tokens"] if row["tokens"] else None
        row["answer_loss"] = row["answer_loss_sum"] / row["answer_tokens"] if row["answer_tokens"] else None
    if predictions is not None:
        predictions.extend(rows)
    tokens, answer_tokens = sum(r["tokens"] for r in rows), sum(r["answer_tokens"] for r in rows)
    loss = sum(r["loss_sum"] for r in rows) / max(1, tokens)
    answer_loss = sum(r["answer_loss_sum"] for r in rows) / answer_tokens if answer_tokens else None
    return {
        "mode": "loss",
        "model": getattr(getattr(model, "config", None), "_name_or_path", None),
        "adapter": None,
        "data": str(data),
        "format": fmt,
        "cutoff_len": cutoff_len,
        "n": len(rows),
        "tokens": tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "answer_tokens": answer_tokens,
        "answer_loss": answer_loss,
        "answer_perplexity": math.exp(min(answer_loss, 700.0)) if answer_loss is not None else None,
        "seconds": round(seconds, 3),
    }


# --- reporting ----------------------------------------------------------------------------------


def print_results(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if results.get("mode") == "loss":
        table = Table(title=f"loss on {results['data']} ({results['format']}, mean over tokens)")
        for column in ("tokens on", "examples", "tokens", "mean loss", "perplexity"):
            table.add_column(column, justify="right" if column != "tokens on" else "left")
        table.add_row("every token", str(results["n"]), str(results["tokens"]), f"{results['loss']:.4f}", f"{results['perplexity']:.3f}")
        if results["answer_loss"] is not None:
            table.add_row("answer only", str(results["n"]), str(results["answer_tokens"]), f"{results['answer_loss']:.4f}",
                          f"{results['answer_perplexity']:.3f}")
        console.print(table)
        console.print(f"{results['seconds']:.1f} s", highlight=False)
        return
    if results.get("mode") == "harness":
        from .harness import print_harness_results

        print_harness_results(results, console)
        return
    if results["mode"] == "generate":
        title = "commonsense accuracy, generate (the published protocol)"
    else:
        title = "commonsense accuracy, loglik (label likelihood; not comparable with published tables)"
    table = Table(title=title)
    table.add_column("task")
    for column in ("n", "accuracy", "seconds", "examples/s"):
        table.add_column(column, justify="right")
    tasks = results["tasks"]
    for task, r in tasks.items():
        rate = f"{r['examples_per_s']:.2f}" if r.get("examples_per_s") else "-"
        table.add_row(task, str(r["n"]), f"{100 * r['accuracy']:.1f}", f"{r['seconds']:.1f}", rate)
    seconds = sum(r["seconds"] for r in tasks.values())
    n = sum(r["n"] for r in tasks.values())
    table.add_section()
    table.add_row(
        "mean", str(n), f"{100 * results['mean_accuracy']:.1f}", f"{seconds:.1f}", f"{n / seconds:.2f}" if seconds > 0 else "-"
    )
    console.print(table)


# --- the command ----------------------------------------------------------------------------------


def run_eval(
    adapter: Optional[Path],
    model: Optional[str],
    data: Optional[Path],
    tasks: Optional[str],
    limit: Optional[int],
    mode: str,
    batch_size: int,
    output: Optional[Path],
    predictions: Optional[Path],
    quantization: Optional[str],
    loss: bool,
    keep_quantized: bool = False,
    harness: Optional[str] = None,
    include_path: Optional[Path] = None,
    num_fewshot: Optional[int] = None,
    data_format: Optional[str] = None,
    cutoff_len: int = LOSS_CUTOFF,
    apply_chat_template: bool = False,
) -> dict:
    """``lrft eval``: commonsense-8 (``mode``), lm-eval tasks (``harness``) or token loss (``loss``); every
    input is checked before the model loads."""
    from rich.console import Console

    from .inference import load_for_inference, parse_bits

    if (adapter is None) == (model is None):
        raise UserError("give exactly one of --adapter ADAPTER_DIR (base + adapter) or --model MODEL (a plain or merged model)")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} must be at least 1 (or leave it out for every example)")
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is unknown; use generate or loglik")
    if harness is not None and loss:
        raise UserError("--harness and --loss are two evaluations; run them one at a time")
    if harness is None and (include_path is not None or num_fewshot is not None or apply_chat_template):
        raise UserError("--include-path, --num-fewshot and --apply-chat-template apply to --harness only")
    if not loss and (data_format is not None or cutoff_len != LOSS_CUTOFF):
        raise UserError("--format and --cutoff-len apply to --loss only")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot {num_fewshot} must be 0 or more")
    parse_bits(quantization)  # a bad value fails before the data is read
    console = Console()
    manager = None
    if harness is not None:
        from .harness import harness_data, parse_task_names, task_manager

        if tasks is not None:
            raise UserError("--tasks names commonsense tasks; with --harness name lm-eval tasks in --harness itself")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--harness runs in one process (lm-eval is handed the loaded model); run lrft eval without torchrun / accelerate launch")
        names = parse_task_names(harness)
        manager = task_manager(names, include_path, harness_data(data))
    elif data is None:
        raise UserError("--data is missing; give a folder of <task>.json(l) files (or a training-format file with --loss)")
    elif loss:
        if tasks is not None:
            raise UserError("--tasks does not apply with --loss; --data is one training-format file")
        if not Path(data).expanduser().exists():
            raise UserError(f"--data {data} does not exist; with --loss give a training-format .json/.jsonl file")
    else:
        # check the data before spending time on loading the model
        select_tasks(find_task_files(data), tasks, data)

    loaded = load_for_inference(adapter, model, quantization, keep_quantized)
    if loaded.note:
        console.print(loaded.note, highlight=False)
    rows: Optional[list] = [] if predictions is not None else None
    if harness is not None:
        from .harness import run_harness

        if apply_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
            raise UserError(f"--apply-chat-template: the tokenizer of {loaded.name} has no chat template; leave the option out")
        results = run_harness(loaded, names, manager, limit, batch_size, num_fewshot, rows, apply_chat_template)
        results["data"] = str(data) if data is not None else None
    elif loss:
        results = evaluate_loss_file(loaded.model, loaded.tokenizer, data, limit, batch_size, data_format, cutoff_len, rows)
    else:
        results = evaluate_model(loaded.model, loaded.tokenizer, data, tasks, limit, mode, batch_size, rows, console)
    results.update(model=loaded.name, adapter=str(adapter) if adapter is not None else None, quantization=loaded.bits,
                   adapter_applied=loaded.note or None)
    print_results(results, console)
    if output is not None:
        write_json_atomic(output, results)
        console.print(f"results written to {output}")
    if predictions is not None:
        write_text_atomic(predictions, "".join(json.dumps(row) + "\n" for row in rows))
        console.print(f"predictions written to {predictions}")
    return results
