"""An adapter folder and the base it was trained on: it reloads with the dtypes training resolved, on any
machine; damaged folders are refused with one line."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lrft.cli import app


def train_args(model_dir, out, kind, *extra):
    return [
        "train", f"recipes/smollm2-commonsense-{kind}.yaml",
        "--set", f"model.name_or_path={model_dir}", "--set", "quantization.bits=none", "--set", "eval=null",
        "--set", "data.cutoff_len=64", "--set", "data.val_size=0", "--set", "training.batch_size=4",
        "--set", "training.micro_batch_size=4", "--set", "training.warmup_steps=0", "--set", "training.save_steps=100",
        "--set", "adapter.target_modules=[q_proj,down_proj]", "--max-steps", "2", "--output-dir", str(out), *extra,
    ]


@pytest.mark.parametrize("kind", ["randlora", "vera", "nola"])
def test_frozen_bases_reload_in_the_dtype_training_resolved(kind, tiny_model_dir, tmp_path, monkeypatch):
    """A run whose "auto" dtypes resolved to bfloat16 (as on a GPU) is merged on a machine where "auto" means
    float32: the merged weights are the trained base plus exactly the ΔW training used, bit for bit."""
    from lrft import model as model_module
    from lrft import train as train_module

    real_resolve, real_save = model_module.resolve_dtype, train_module.save_adapter
    used = {}

    def capture(directory, layers, *args, **kwargs):
        with torch.no_grad():
            used.update({name: layer.delta_weight().clone() for name, layer in layers.items()})
        return real_save(directory, layers, *args, **kwargs)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:  # training on "a GPU": auto resolves to bfloat16
        patch.setattr(model_module, "resolve_dtype", lambda n, d: torch.bfloat16 if n == "auto" else real_resolve(n, d))
        patch.setattr(train_module, "save_adapter", capture)
        result = CliRunner().invoke(app, train_args(tiny_model_dir, out, kind))
    assert result.exit_code == 0, result.output
    assert used and any(bool(delta.abs().max() > 0) for delta in used.values())

    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(out / "adapter"), "--output", str(merged), "--dtype", "float32", "--no-verify"])
    assert result.exit_code == 0, result.output
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    weights = load_file(str(merged / "model.safetensors"))
    for name, delta in used.items():
        trained_base = base[f"{name}.weight"].to(torch.bfloat16).float()  # the base as training held it
        assert torch.equal(weights[f"{name}.weight"], trained_base + delta), name

    from lrft.adapter_folder import AdapterFolder

    folder = AdapterFolder.read(out / "adapter")
    assert folder.dtypes.frozen == folder.dtypes.load == torch.bfloat16
    for name, delta in used.items():
        with torch.no_grad():
            assert torch.equal(folder.layer(name).delta_weight(), delta), name


def test_folder_without_recorded_dtypes_loads_with_one_warning(tmp_path, capsys):
    """Folders written before lrft 0.2 say "auto": resolved on the machine that reads them, said once."""
    from safetensors.torch import save_file

    from lrft.adapter_folder import AdapterFolder

    name = "model.layers.0.self_attn.q_proj"
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "adapter": {"type": "lora", "r": 2}, "layers": {name: [8, 8]},
        "base_model": {"name_or_path": "somewhere", "dtype": "auto"}, "quantization": {"bits": 4, "compute_dtype": "auto"},
    }))
    save_file({f"{name}.lora_A": torch.ones(2, 8), f"{name}.lora_B": torch.ones(8, 2)}, str(tmp_path / "adapter.safetensors"))
    first = AdapterFolder.read(tmp_path)
    AdapterFolder.read(tmp_path)
    assert first.dtypes.frozen == torch.float32 and first.model.dtype == "float32"  # a CPU: auto is float32
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "records no resolved dtypes" in err and '"dtypes"' in err
