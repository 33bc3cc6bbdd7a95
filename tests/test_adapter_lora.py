"""LoRA (Hu et al. 2021). Forward, ΔW, gradients, parameter count, zero start and save/reload are checked
for every adapter type in test_adapter_contract.py; this file keeps what is LoRA's own."""

from adapter_reference import build_layer


def test_lora_default_alpha_is_twice_r():
    layer = build_layer("lora", "none", 16, 8, randomize=False, r=4)
    assert layer.scaling == 2.0  # default alpha = 2r
