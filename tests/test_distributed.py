"""Distributed training on the CPU: two processes under torchrun (gloo backend, DDP) on a tiny random Llama.

* two processes with half the per-process accumulation end where one process ends (same global batch, same
  data order): the loss is normalised by the global batch's target tokens and the gradients are summed;
* only the main process writes: one metrics file without repeated steps, one adapter, one run.json;
* a two-process run killed (SIGKILL) after a checkpoint and resumed ends bit-identical to an uninterrupted
  two-process run, with dropout on, so every process's own RNG stream is restored;
* FSDP (version 1, driven directly: accelerate enables it on GPUs only) with lrft's FSDP pieces over a 4-bit
  base ends where one unwrapped process ends.

Every process is pinned to one thread (torchrun's default for several processes, set here for the single
process too): a different thread count changes the order of float additions inside the matmuls, and with
it the last bits of the gradients, which AdamW's first steps amplify.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lrft.cli import app

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def train_cmd(model_dir, out, processes: int, *extra):
    # --standalone: a private rendezvous on a free port, so concurrent test runs do not collide
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    return [
        sys.executable, *launcher, "-m", "lrft", "train", "recipes/smollm2-commonsense-randlora.yaml",
        "--set", f"model.name_or_path={model_dir}", "--set", "adapter.r=8", "--set", "data.cutoff_len=96",
        "--set", "data.max_samples=40", "--set", "data.val_size=4", "--set", "training.batch_size=4",
        "--set", "training.micro_batch_size=1", "--set", "training.warmup_steps=1", "--set", "training.eval_steps=2",
        "--set", "training.save_steps=2", "--set", "training.learning_rate=3e-3",
        "--output-dir", str(out), *extra,
    ]


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_with_twice_the_accumulation(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--max-steps", "4", "--set", "adapter.dropout=0")
    # the single process runs in this one (an interpreter start saved), on one thread as the workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = CliRunner().invoke(app, train_cmd(tiny_model_dir, one, 1, *args)[3:])  # 4 micro-batches of 1 per step
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output[-3000:]
    double = run(train_cmd(tiny_model_dir, two, 2, *args))  # 2 micro-batches of 1 per step and process
    assert double.returncode == 0, double.stderr[-3000:]

    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    # RandLoRA's Λ start at zero; they moved a hundred times the tolerance, so the comparison means something
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lambdas")) > 1e-3
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == [1, 2, 3, 4]  # the main process alone logs: no repeated steps
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)  # the loss is the global batch's
        assert ("val_loss" in r1) == ("val_loss" in r2)
        if "val_loss" in r1:
            assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-6)

    # rank-0-only writing: the same files as a single-process run, and the progress bar printed once
    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert files.count("metrics.jsonl") == 1 and files.count("adapter/adapter.safetensors") == 1
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert double.stdout.count("adapter saved to") == 1


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own)."""
    parent = psutil.Process(proc.pid)
    for p in parent.children(recursive=True) + [parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def test_two_processes_resume_after_sigkill(tiny_model_dir, tmp_path):
    # dropout on: each process draws its own masks, and resume must restore each process's RNG state
    args = ("--max-steps", "6", "--set", "adapter.dropout=0.1")
    ref = tmp_path / "ref"
    done = run(train_cmd(tiny_model_dir, ref, 2, *args))
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_model_dir, out, 2, *args), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "step-2" / "trainer_state.pt"
    start = time.time()
    while not state.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() - start < 240
        time.sleep(0.05)
    _kill_tree(proc)
    assert not (out / "adapter").exists()
    saved = torch.load(state, weights_only=False)
    assert len(saved["rng_per_process"]) == 2

    resumed = run(train_cmd(tiny_model_dir, out, 2, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = adapter(ref), adapter(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(ref)]


# --- FSDP (version 1) on the CPU --------------------------------------------------------------------------
# accelerate enables FSDP on GPUs only, so this drives torch's FSDP directly with lrft's FSDP pieces: the
# unit policy (adapter layers and their frozen 4-bit linears as units of their own), the gather of the
# adapter for saving, FSDP's gradient clipping and the optimizer-state gather / reload of checkpoints.


def _fsdp_worker(model_dir: str, result: str) -> None:
    import functools
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lrft import distributed as T
    from lrft.checkpoint import seed_everything
    from lrft.inject import adapter_state_dict, inject_adapters, trainable_parameters
    from lrft.model import load_base_model
    from lrft.recipe import ModelSection, QuantizationSection, validate_recipe

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    quant = QuantizationSection(bits=4, quant_storage="float32", compute_dtype="float32")
    adapter = validate_recipe({"adapter": {"type": "randlora", "r": 8}, "data": {"path": "x"}}).adapter
    torch.manual_seed(1)
    batch = torch.randint(0, 49152, (4, 12))  # the global batch: 4 sequences, one micro-batch each

    def build():
        model = load_base_model(ModelSection(name_or_path=model_dir), quant, torch.device("cpu"))
        seed_everything(0)
        layers = inject_adapters(model, adapter, torch.float32)
        return model.train(), layers

    def loss_of(model, ids, scale):  # token loss summed, over the global batch's tokens (as the loop)
        logits = model(input_ids=ids).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum") * scale / (4 * 11)

    ref, ref_layers = build()  # one process, no wrapping
    ref_params = trainable_parameters(ref_layers)
    ref_opt = torch.optim.AdamW(ref_params, lr=3e-3)
    for _ in range(3):
        for row in batch:
            loss_of(ref, row[None], 1).backward()
        torch.nn.utils.clip_grad_norm_(ref_params, 0.05)
        ref_opt.step()
        ref_opt.zero_grad()

    model, layers = build()
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=world,
                          state=SimpleNamespace(fsdp_plugin=SimpleNamespace(auto_wrap_policy=policy)))
    T.fsdp_own_units(acc, layers)
    model = FSDP(model, auto_wrap_policy=acc.state.fsdp_plugin.auto_wrap_policy, use_orig_params=True,
                 device_id=torch.device("cpu"))
    units = [type(u.module).__name__ for u in FSDP.fsdp_modules(model)]
    params = trainable_parameters(layers)
    local_numel = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=3e-3)
    mine = batch[rank * 2 : (rank + 1) * 2]
    for _ in range(3):
        for i, row in enumerate(mine):
            with model.no_sync() if i < len(mine) - 1 else nullcontext():
                loss_of(model, row[None], world).backward()
        T.clip_grad_norm(model, params, 0.05, acc)
        opt.step()
        opt.zero_grad()
    optimizer_state = T.optimizer_state(model, opt, acc)
    with T.whole_adapter(model, acc):
        state = {k: v.clone() for k, v in adapter_state_dict(layers).items()}
    shared = [optimizer_state]
    dist.broadcast_object_list(shared, src=0)  # as every process reads the checkpoint's file
    T.load_optimizer_state(model, opt, shared[0], acc)
    reloaded = sorted({int(s["step"]) for s in opt.state.values()})
    if rank == 0:
        expected = adapter_state_dict(ref_layers)
        Path(result).write_text(json.dumps({
            "units": {u: units.count(u) for u in set(units)},
            "local_numel": local_numel,
            "full_numel": sum(p.numel() for p in ref_params),
            "same_keys": sorted(state) == sorted(expected),
            "max_diff": max(float((state[k] - expected[k]).abs().max()) for k in expected),
            "max_value": max(float(v.abs().max()) for v in expected.values()),
            "optimizer_states": len(optimizer_state["state"]),
            "reloaded_steps": reloaded,
        }))
    dist.destroy_process_group()


def test_fsdp_pieces_on_the_cpu(tiny_model_dir, tmp_path):
    result = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "fsdp-worker", str(tiny_model_dir), str(result)]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(result.read_text())
    # 2 decoder layers; each of the 10 adapted projections: one adapter unit, one frozen 4-bit unit
    assert out["units"] == {"LlamaForCausalLM": 1, "LlamaDecoderLayer": 2, "RandLoRALayer": 10, "Linear4bit": 10}
    assert out["local_numel"] * 2 == out["full_numel"]  # each process holds half of the adapter
    assert out["same_keys"] and out["max_diff"] < 1e-5 < 1e-3 < out["max_value"]
    assert out["optimizer_states"] == 20 and out["reloaded_steps"] == [3]


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp-worker"]:
    sys.path.insert(0, str(ROOT))
    _fsdp_worker(sys.argv[2], sys.argv[3])
