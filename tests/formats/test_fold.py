"""fold_scales: rsLoRA, alpha_pattern and rank_pattern folded into B, so a runtime that reads only lora_alpha
and r (vLLM) or one alpha with each tensor's rank (llama.cpp) computes the update PEFT computes."""

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import randomize_adapter, tiny_llama, token_ids

import lorakit
from lorakit import LoraConfig

KWARGS = dict(
    r=4,
    alpha=8,
    target_modules=["q_proj", "v_proj", "o_proj"],
    use_rslora=True,
    rank_pattern={"v_proj": 2},
    alpha_pattern={"o_proj": 3},
)


def test_folded_adapter_gives_every_runtime_the_same_update(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(**KWARGS))
    randomize_adapter(model, "default")
    expected = model(token_ids()).logits
    lorakit.save_adapter(model, tmp_path / "f", fold_scales=True, pure=True)
    config = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4
    assert not config["use_rslora"] and not config["rank_pattern"] and not config["alpha_pattern"]
    tensors = load_file(tmp_path / "f" / "adapter_model.safetensors")
    # what vLLM computes: s = lora_alpha / r for every module; llama.cpp: alpha / (rank of this tensor)
    for path, layer in lorakit.model_state.lora_layers(model):
        a = tensors[f"base_model.model.{path}.lora_A.weight"]
        b = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == 4  # padded to one rank
        for runtime_scale in (config["lora_alpha"] / config["r"], config["lora_alpha"] / a.shape[0]):
            torch.testing.assert_close(runtime_scale * b @ a, layer.delta_weight("default"), atol=1e-6, rtol=1e-5)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "f").eval()
    torch.testing.assert_close(peft_model(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_folding_keeps_dora_exact(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(**KWARGS, use_dora=True))
    randomize_adapter(model, "default")
    expected = model(token_ids()).logits
    lorakit.save_adapter(model, tmp_path / "f", fold_scales=True)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "f").eval()
    torch.testing.assert_close(peft_model(token_ids()).logits, expected, atol=1e-5, rtol=1e-5)
