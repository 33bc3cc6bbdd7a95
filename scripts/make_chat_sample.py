"""Builds lrft/samples/chat/commonsense_chat.jsonl from the commonsense sample (lrft/samples/commonsense/
train_500.jsonl): the same questions and answers as conversations in the OpenAI messages form, a third of
them single-turn, a third two-turn, a third three-turn, half of them with a system prompt. Deterministic:
`python scripts/make_chat_sample.py` rewrites the same file."""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "lrft/samples/commonsense/train_500.jsonl"
TARGET = ROOT / "lrft/samples/chat/commonsense_chat.jsonl"
SYSTEM_PROMPTS = [
    "You answer multiple-choice questions. Reply with the label of the correct option.",
    "You are a careful assistant. For each question, name the correct answer by its label.",
]


def main() -> None:
    records = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    rng.shuffle(records)
    conversations, i = [], 0
    while i < len(records):
        turns = 1 + len(conversations) % 3
        messages = []
        if len(conversations) % 2 == 0:
            messages.append({"role": "system", "content": SYSTEM_PROMPTS[len(conversations) % 4 // 2]})
        for record in records[i : i + turns]:
            messages.append({"role": "user", "content": record["instruction"]})
            messages.append({"role": "assistant", "content": record["output"]})
        conversations.append({"messages": messages})
        i += turns
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    print(f"wrote {len(conversations)} conversations to {TARGET}")


if __name__ == "__main__":
    main()
