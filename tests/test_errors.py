"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing half-written.

One row per case: (id, recipe YAML or None, extra CLI args, text the message must contain). Adding a case is
one line. ``<name>`` in a row is replaced by the fixture file of that name; an ``ENV:KEY=VALUE`` argument
sets an environment variable instead of being passed on. The rows run through the CLI's ``main`` in this
process (a row with ``ENV:`` in a subprocess); ``test_a_fresh_process_prints_one_line`` runs one row of each
command as a user would, in a new Python process, so that nothing printed at start-up goes unseen.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import lrft_main

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "lrft/samples/commonsense/train_500.jsonl")
GOOD = f"data: {{path: {SAMPLE}}}\nadapter: {{type: lora, r: 4, target_modules: [q_proj]}}\n"
CHAT = "adapter: {type: lora, r: 4, target_modules: [q_proj]}\ndata:\n  path: <chat>\n  format: messages\n"

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
    ("conversation with an unknown role", CHAT.replace("<chat>", "<badrole>"),
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "record 2 turn 2 has role 'bot'"),
    ("chat template neither file nor template", CHAT.replace("<chat>", "<chat>") + "  chat_template: nothing/here.jinja\n",
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "data.chat_template"),
    ("completion record missing its field", GOOD.replace("{path: " + SAMPLE + "}", "{path: <badcompletion>, format: completion}"),
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "record 1 missing or non-text field(s) completion"),
    ("train_on with another format", GOOD.replace("{path: " + SAMPLE + "}", "{path: " + SAMPLE + ", train_on: all}"),
     ["train", "<recipe>"], "data.train_on applies to data.format: messages only"),
    ("chat without a model", None, ["chat"], "give exactly one of --adapter"),
    ("chat with a model without a chat template", None, ["chat", "--model", "<notemplate>"], "has no chat template"),
    ("generate with an adapter for another base", None, ["generate", "--adapter", "<wrongbase>", "--prompt", "hi"],
     "belongs to another base model"),
    ("generate from a missing file", None, ["generate", "--model", "<tiny>", "--input", "/no/such/prompts.jsonl"], "does not exist"),
    ("generate from a bad line", None, ["generate", "--model", "<tiny>", "--input", "<badprompts>", "--output", "<out>"],
     "line 2: not valid JSON"),
    ("generate without prompts", None, ["generate", "--model", "<tiny>"], "give --prompt TEXT"),
    ("tracker not installed", GOOD + "training: {report_to: [wandb]}\n",
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "pip install 'lrft[wandb]'"),
    ("paged optimizer on the CPU", GOOD + "training: {optimizer: paged_adamw_8bit}\n",
     ["train", "<recipe>", "--set", "model.name_or_path=<tiny>", "--output-dir", "<out>"], "needs CUDA; use adamw_8bit"),
    # damaged adapter folders: every command that reads one names the file and what is wrong
    ("adapter config not JSON (merge)", None, ["merge", "<damaged:notjson>", "--output", "<out>"], "adapter_config.json is not valid JSON"),
    ("adapter config not an object (inspect)", None, ["inspect-rank", "<damaged:list>"], "adapter_config.json"),
    ("adapter config without layers (eval)", None,
     ["eval", "--adapter", "<damaged:nolayers>", "--data", "lrft/samples/commonsense/dev", "--mode", "loglik"], "layers"),
    ("adapter config with a bad option (merge)", None, ["merge", "<damaged:badoption>", "--output", "<out>"], "adapter.r"),
    ("adapter config with a bad layer shape (inspect)", None, ["inspect-rank", "<damaged:badshape>"], "layers"),
    ("adapter weights missing (export)", None, ["merge", "<damaged:noweights>", "--output", "<out>", "--format", "peft"],
     "adapter.safetensors"),
    ("adapter weights truncated (inspect)", None, ["inspect-rank", "<damaged:truncated>"], "adapter.safetensors"),
    ("adapter tensor missing (merge)", None, ["merge", "<damaged:missingtensor>", "--output", "<out>"], "lora_B"),
    ("adapter tensor unexpected (eval)", None,
     ["eval", "--adapter", "<damaged:extratensor>", "--data", "lrft/samples/commonsense/dev", "--mode", "loglik"], "extra"),
    ("adapter tensor of the wrong shape (inspect)", None, ["inspect-rank", "<damaged:wrongshape>"], "lora_A"),
]


LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def write_damaged_adapters(root, model_dir):
    """A valid LoRA adapter folder for the tiny model, written by hand, and one damaged copy per kind."""

    def write(kind, config=None, tensors=None, raw_config=None):
        folder = root / kind
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(config))
        if tensors is not None:
            save_file(tensors, str(folder / "adapter.safetensors"))
        return folder

    config = {
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        "layers": {name: [64, 64] for name in LAYERS},
        "base_model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "quantization": {"bits": None},
    }
    tensors = {}
    for name in LAYERS:
        tensors[f"{name}.lora_A"] = torch.ones(4, 64)
        tensors[f"{name}.lora_B"] = torch.ones(64, 4)
    folders = {
        "notjson": write("notjson", raw_config='{"adapter": {"type": "lora"', tensors=tensors),
        "list": write("list", raw_config="[]", tensors=tensors),
        "nolayers": write("nolayers", {k: v for k, v in config.items() if k != "layers"}, tensors),
        "badoption": write("badoption", dict(config, adapter=dict(config["adapter"], r=0)), tensors),
        "badshape": write("badshape", dict(config, layers={LAYERS[0]: "64x64"}), tensors),
        "noweights": write("noweights", config),
        "missingtensor": write("missingtensor", config, {k: v for k, v in tensors.items() if not k.endswith("1.self_attn.q_proj.lora_B")}),
        "extratensor": write("extratensor", config, dict(tensors, **{"model.layers.0.mlp.extra": torch.ones(2)})),
        "wrongshape": write("wrongshape", config, dict(tensors, **{f"{LAYERS[1]}.lora_A": torch.ones(4, 32)})),
    }
    truncated = write("truncated", config, tensors)
    data = (truncated / "adapter.safetensors").read_bytes()
    (truncated / "adapter.safetensors").write_bytes(data[: len(data) - 100])
    folders["truncated"] = truncated
    return folders


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
    dtypes = '"dtypes": {"load": "float32", "compute": "float32", "frozen": "float32"}'
    (corrupt / "adapter_config.json").write_text(
        '{"adapter": {"type": "lora", "r": 4}, "layers": {"model.layers.0.self_attn.q_proj": [64, 64]}, '
        '"base_model": {"name_or_path": "%s"}, %s}' % (tiny_model_dir, dtypes)
    )
    (corrupt / "adapter.safetensors").write_bytes(b"\x10\x00\x00garbage")
    wrong_base = tmp_path / "wrongbase"
    wrong_base.mkdir()
    (wrong_base / "adapter_config.json").write_text(
        '{"adapter": {"type": "lora", "r": 4}, "layers": {"model.layers.0.self_attn.q_proj": [999, 999]}, '
        '"base_model": {"name_or_path": "%s"}, %s}' % (tiny_model_dir, dtypes)
    )
    wrong = {"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 999), "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(999, 4)}
    save_file(wrong, str(wrong_base / "adapter.safetensors"))
    chat = tmp_path / "chat.jsonl"
    bad_role = tmp_path / "badrole.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat.write_text(json.dumps({"messages": turns}) + "\n")
    bad_role.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": [turns[0], {"role": "bot", "content": "x"}]}) + "\n")
    bad_completion = tmp_path / "badcompletion.jsonl"
    bad_completion.write_text(json.dumps({"prompt": "2 + 2 ="}) + "\n")
    no_template = tmp_path / "notemplate"
    shutil.copytree(tiny_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config_path = no_template / "tokenizer_config.json"
    config_path.write_text(json.dumps({k: v for k, v in json.loads(config_path.read_text()).items() if k != "chat_template"}))
    bad_prompts = tmp_path / "badprompts.jsonl"
    bad_prompts.write_text('{"prompt": "fine"}\n{not json}\n')
    no_tasks = tmp_path / "notasks"
    no_tasks.mkdir()
    (no_tasks / "readme.txt").write_text("no task files here")
    # a bitsandbytes that fails to import, shadowing the real one through PYTHONPATH
    no_bnb = tmp_path / "nobnb" / "bitsandbytes"
    no_bnb.mkdir(parents=True)
    (no_bnb / "__init__.py").write_text("raise ImportError('libbitsandbytes not found (simulated)')\n")
    damaged = write_damaged_adapters(tmp_path / "damaged", tiny_model_dir)
    return {
        **{f"damaged:{kind}": str(folder) for kind, folder in damaged.items()},
        "chat": str(chat), "badrole": str(bad_role), "badcompletion": str(bad_completion),
        "notemplate": str(no_template), "badprompts": str(bad_prompts),
        "tiny": str(tiny_model_dir), "empty": str(empty), "badrecords": str(bad), "corrupt": str(corrupt),
        "wrongbase": str(wrong_base), "notasks": str(no_tasks), "nobnb": str(no_bnb.parent),
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(case, tmp_path, files, capfd):
    name, recipe_text, args, expected = case
    fill = dict(files, out=str(tmp_path / "out"), recipe=str(tmp_path / "recipe.yaml"))
    if recipe_text is not None:
        (tmp_path / "recipe.yaml").write_text(substitute(recipe_text, fill))
    args = [substitute(a, fill) for a in args]
    env = {k: v for k, v in (a[len("ENV:"):].split("=", 1) for a in args if a.startswith("ENV:"))}
    args = [a for a in args if not a.startswith("ENV:")]
    code, stderr = run_lrft(args, env, capfd, subprocess_=bool(env))
    assert_one_line_and_exit_2(code, stderr, expected)
    out = tmp_path / "out"
    assert not (out / "adapter").exists() and not (out / "metrics.jsonl").exists() or not out.exists()


FRESH = ["missing recipe", "adapter config without layers (eval)", "adapter tensor missing (merge)", "adapter config not an object (inspect)"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in FRESH], ids=FRESH)
def test_a_fresh_process_prints_one_line(case, tmp_path, files):
    name, recipe_text, args, expected = case
    fill = dict(files, out=str(tmp_path / "out"), recipe=str(tmp_path / "recipe.yaml"))
    code, stderr = run_lrft([substitute(a, fill) for a in args], {}, None, subprocess_=True)
    assert_one_line_and_exit_2(code, stderr, expected)


def run_lrft(args, env, capfd, subprocess_):
    """(exit code, stderr) of ``lrft ARGS``: in a new process, or through ``lrft.cli.main`` in this one."""
    if subprocess_:
        proc = subprocess.run(
            [sys.executable, "-m", "lrft", *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
            env=dict(os.environ, HF_HUB_OFFLINE="1", **env),
        )
        return proc.returncode, proc.stderr
    return lrft_main(args, capfd)


def assert_one_line_and_exit_2(code, stderr, expected):
    assert code == 2, (code, stderr[-2000:])
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("error: ")
    if expected:
        assert expected in lines[0], lines[0]


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrft", "train", "nope.yaml", "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "lrft.errors.UserError: recipe nope.yaml does not exist" in proc.stderr
