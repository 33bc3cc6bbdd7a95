"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing half-written.

One row per case: (id, recipe YAML or None, extra CLI args, text the message must contain). Adding a case is
one line. ``<name>`` in a row is replaced by the fixture file of that name; an ``ENV:KEY=VALUE`` argument
sets an environment variable instead of being passed on. The commands run in a subprocess, as a user would run them.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "lrft/samples/commonsense/train_500.jsonl")
GOOD = f"data: {{path: {SAMPLE}}}\nadapter: {{type: lora, r: 4, target_modules: [q_proj]}}\n"

CASES = [
    ("missing recipe", None, ["train", "nope.yaml"], "does not exist"),
    ("yaml syntax", "data:\n  path: [x\n", ["train", "<recipe>"], "YAML syntax error at line"),
    ("unknown key", GOOD + "trainig: {}\n", ["train", "<recipe>"], "did you mean training?"),
    ("misspelled adapter key", GOOD.replace("r: 4", "lora_rank: 4"), ["train", "<recipe>"], "did you mean adapter.r?"),
    ("wrong type", GOOD + "training: {max_steps: lots}\n", ["train", "<recipe>"], "training.max_steps"),
    ("out of range", GOOD + "training: {learning_rate: -1}\n", ["train", "<recipe>"], "training.learning_rate"),
    ("unknown adapter type", GOOD.replace("type: lora", "type: lorax"), ["train", "<recipe>"], "known types:"),
    ("missing data file", GOOD.replace(SAMPLE, "/nonexistent/data.json"), ["train", "<recipe>", "--output-dir", "<out>"], None),
    ("missing data file (train)", GOOD.replace(SAMPLE, "/nonexistent/commonsense_170k.json"),
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "commonsense_170k.json"),
    ("targets match nothing", GOOD.replace("[q_proj]", "[qkv]"),
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "linear layers are"),
    ("rank too large", GOOD.replace("r: 4", "r: 4096"),
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "smaller dimension"),
    ("empty dataset", GOOD.replace(SAMPLE, "<empty>"),
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "empty"),
    ("record missing fields", GOOD.replace(SAMPLE, "<badrecords>"),
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "record 2"),
    ("cutoff shorter than template", GOOD + "training: {max_steps: 1}\n",
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--set", "data.cutoff_len=10", "--output-dir", "<out>"],
     "shorter than the commonsense prompt template"),
    ("model folder missing", GOOD, ["train", "<recipe>", "--set", "model.name_or_path=/no/such/model", "--dry-run"],
     "does not exist"),
    ("hub id offline", GOOD, ["train", "<recipe>", "--set", "model.name_or_path=someone/not-a-model", "--dry-run"],
     "someone/not-a-model"),
    ("bad override", GOOD, ["train", "<recipe>", "--set", "training.max_steps"], "KEY=VALUE"),
    ("adapter option of another type", GOOD.replace("r: 4", "r: 4, mask_rank: 2"), ["train", "<recipe>"], "adapter.mask_rank"),
    ("adapter dir missing", None, ["merge", "/no/such/adapter", "--output", "<out>"], "does not exist"),
    ("adapter for another base (eval)", None, ["eval", "--adapter", "<wrongbase>", "--data", "lrft/samples/commonsense/dev", "--mode", "loglik"],
     "belongs to another base model"),
    ("adapter for another base (merge)", None, ["merge", "<wrongbase>", "--output", "<out>"], "belongs to another base model"),
    ("eval folder without tasks", None, ["eval", "--model", "<tiny>", "--data", "<notasks>"], "boolq"),
    ("bitsandbytes unusable", GOOD + "quantization: {bits: 4}\n",
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>", "ENV:PYTHONPATH=<nobnb>"],
     "quantization.bits=4 needs a working bitsandbytes"),
    ("corrupt adapter file", None, ["eval", "--adapter", "<corrupt>", "--data", "lrft/samples/commonsense/dev", "--mode", "loglik"], "corrupt"),
]


def substitute(text, values):
    for key, value in values.items():
        text = text.replace(f"<{key}>", value)
    return text


@pytest.fixture
def files(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(
        '{"adapter": {"type": "lora", "r": 4}, "layers": {}, "base_model": {"name_or_path": "%s"}}' % tiny_model_dir
    )
    (corrupt / "adapter.safetensors").write_bytes(b"\x10\x00\x00garbage")
    wrong_base = tmp_path / "wrongbase"
    wrong_base.mkdir()
    (wrong_base / "adapter_config.json").write_text(
        '{"adapter": {"type": "lora", "r": 4}, "layers": {"model.layers.0.self_attn.q_proj": [999, 999]}, '
        '"base_model": {"name_or_path": "%s"}}' % tiny_model_dir
    )
    save_file({}, str(wrong_base / "adapter.safetensors"))
    no_tasks = tmp_path / "notasks"
    no_tasks.mkdir()
    (no_tasks / "readme.txt").write_text("no task files here")
    # a bitsandbytes that fails to import, shadowing the real one through PYTHONPATH
    no_bnb = tmp_path / "nobnb" / "bitsandbytes"
    no_bnb.mkdir(parents=True)
    (no_bnb / "__init__.py").write_text("raise ImportError('libbitsandbytes not found (simulated)')\n")
    return {
        "tiny": str(tiny_model_dir), "empty": str(empty), "badrecords": str(bad), "corrupt": str(corrupt),
        "wrongbase": str(wrong_base), "notasks": str(no_tasks), "nobnb": str(no_bnb.parent),
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(case, tmp_path, files):
    name, recipe_text, args, expected = case
    fill = dict(files, out=str(tmp_path / "out"), recipe=str(tmp_path / "recipe.yaml"))
    if recipe_text is not None:
        (tmp_path / "recipe.yaml").write_text(substitute(recipe_text, fill))
    args = [substitute(a, fill) for a in args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.update(a[len("ENV:"):].split("=", 1) for a in args if a.startswith("ENV:"))
    args = [a for a in args if not a.startswith("ENV:")]
    proc = subprocess.run([sys.executable, "-m", "lrft", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and lines[0].startswith("error: ")
    if expected:
        assert expected in lines[0], lines[0]
    out = tmp_path / "out"
    assert not (out / "adapter").exists() and not (out / "metrics.jsonl").exists() or not out.exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrft", "train", "nope.yaml", "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
