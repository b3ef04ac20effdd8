"""diffusers' LoRA format both ways, with real diffusers (tiny configs) as the reference: what lorakit writes
loads in a model's load_lora_adapter and a pipeline's load_lora_weights with the right scale, and lorakit
loads what diffusers writes (config in the header, unet./text_encoder. prefixes, or none)."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_diffusion import UNET_TARGETS, run_clip, run_sd3, run_unet, tiny_clip, tiny_pipeline, tiny_sd3, tiny_unet
from tiny_models import randomize_adapter

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.formats.detect import detect, load

CASES = {
    "plain": dict(r=2, alpha=4, target_modules=UNET_TARGETS),
    "rslora-patterns": dict(
        r=4, alpha=4, target_modules=UNET_TARGETS, use_rslora=True, rank_pattern={"conv1": 2}, alpha_pattern={"to_q": 7}
    ),
}


def lorakit_unet(case):
    model = lorakit.inject(tiny_unet(), LoraConfig(**CASES[case]))
    randomize_adapter(model, "default", std=0.3)
    return model


@pytest.mark.parametrize("case", CASES)
def test_diffusers_loads_what_lorakit_writes(case, tmp_path):
    model = lorakit_unet(case)
    expected = run_unet(model)
    lorakit.save_adapter(model, tmp_path / "d", format="diffusers")
    assert detect(tmp_path / "d") == "diffusers"
    unet = tiny_unet()
    unet.load_lora_adapter(tmp_path / "d", prefix="unet", adapter_name="mine", use_safetensors=True)
    torch.testing.assert_close(run_unet(unet), expected, atol=1e-5, rtol=1e-5)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(tmp_path / "d", adapter_name="mine")
    torch.testing.assert_close(run_unet(pipe.unet), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run_unet(tiny_unet()), expected, atol=1e-4)


def test_a_transformer_model_loads_with_diffusers_default_prefix(tmp_path):
    model = lorakit.inject(tiny_sd3(), LoraConfig(r=2, alpha=6, target_modules=["to_q", "add_q_proj", "to_out.0"]))
    randomize_adapter(model, "default", std=0.3)
    lorakit.save_adapter(model, tmp_path / "t", format="diffusers")
    other = tiny_sd3()
    other.load_lora_adapter(tmp_path / "t", use_safetensors=True)  # prefix="transformer" is diffusers' default
    torch.testing.assert_close(run_sd3(other), run_sd3(model), atol=1e-5, rtol=1e-5)
    again = load(tiny_sd3(), tmp_path / "t")
    torch.testing.assert_close(run_sd3(again), run_sd3(model), atol=1e-5, rtol=1e-5)


def test_pipeline_loads_a_lorakit_text_encoder_adapter(tmp_path):
    model = lorakit.inject(tiny_clip(), LoraConfig(r=2, alpha=6, target_modules=["q_proj", "v_proj", "fc1"]))
    randomize_adapter(model, "default", std=0.3)
    expected = run_clip(model)
    lorakit.save_adapter(model, tmp_path / "te", format="diffusers")
    pipe = tiny_pipeline()
    pipe.load_lora_weights(tmp_path / "te", adapter_name="te")
    torch.testing.assert_close(run_clip(pipe.text_encoder), expected, atol=1e-5, rtol=1e-5)


def diffusers_unet_with_lora():
    unet = tiny_unet()
    unet.add_adapter(PeftLoraConfig(r=2, lora_alpha=6, target_modules=UNET_TARGETS, init_lora_weights=False))
    return unet


def test_lorakit_loads_a_pipeline_file(tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = diffusers_unet_with_lora()
    expected = run_unet(unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "p",
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    model = lorakit.load_adapter(tiny_unet(), tmp_path / "p", name="sd")  # the format is detected
    torch.testing.assert_close(run_unet(model), expected, atol=1e-5, rtol=1e-5)


def test_lorakit_loads_each_component_of_a_pipeline_file(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import inject_adapter_in_model

    text_config = PeftLoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    unet, text = diffusers_unet_with_lora(), inject_adapter_in_model(text_config, tiny_clip())
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "p",
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
        safe_serialization=True,
    )
    torch.testing.assert_close(run_unet(load(tiny_unet(), tmp_path / "p")), run_unet(unet), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_clip(load(tiny_clip(), tmp_path / "p")), run_clip(text), atol=1e-5, rtol=1e-5)


def test_lorakit_loads_a_model_level_file(tmp_path):
    unet = diffusers_unet_with_lora()
    expected = run_unet(unet)
    unet.save_lora_adapter(tmp_path / "m")
    model = load(tiny_unet(), tmp_path / "m" / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(run_unet(model), expected, atol=1e-5, rtol=1e-5)


def test_file_without_metadata_follows_diffusers_scale_rule(tmp_path):
    """No config in the header: diffusers applies each module at scale 1; lorakit must do the same."""
    model = lorakit_unet("plain")
    lorakit.save_adapter(model, tmp_path / "d", format="diffusers")
    file = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    save_file(load_file(file), file)  # drop the header
    reference = tiny_unet()
    reference.load_lora_adapter(tmp_path / "d", prefix="unet", use_safetensors=True)
    got = load(tiny_unet(), tmp_path / "d")
    torch.testing.assert_close(run_unet(got), run_unet(reference), atol=1e-5, rtol=1e-5)


def test_header_holds_the_config_and_fingerprint(tmp_path):
    lorakit.save_adapter(lorakit_unet("plain"), tmp_path / "d", format="diffusers")
    with safe_open(str(tmp_path / "d" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        header = f.metadata()
        keys = list(f.keys())
    config = json.loads(header["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 4
    assert "0" not in config["unet.target_modules"] and "lorakit_base_fingerprint" in header
    assert all(k.startswith("unet.") for k in keys)


def test_what_diffusers_cannot_hold_is_refused(tmp_path):
    model = lorakit.inject(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    with pytest.raises(LorakitError, match="LoRA factors only"):
        lorakit.save_adapter(model, tmp_path / "x", format="diffusers")
    assert not (tmp_path / "x").exists()
    with pytest.raises(LorakitError, match="format='onnx'"):
        lorakit.save_adapter(model, tmp_path / "x", format="onnx")
