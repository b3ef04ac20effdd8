"""target_modules that PEFT resolves to exactly the modules lorakit adapted, on models whose paths have numeric
parts (a diffusers UNet's to_out.0, nn.Sequential), checked by loading the saved adapter in real PEFT;
and base_model_name_or_path holding a hub id, never a local folder."""

import json

import pytest
import torch
from peft import PeftModel
from tiny_diffusion import UNET_TARGETS, run_unet, tiny_unet
from tiny_models import randomize_adapter, tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.formats.peft import hub_id


def peft_matches(targets, name):
    """PEFT's rule for a list: the name equals an entry or ends with "." + entry; a string is a full regex."""
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def save_and_read(model, tmp_path):
    lorakit.save_adapter(model, tmp_path / "a")
    return json.loads((tmp_path / "a" / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    "targets",
    [
        UNET_TARGETS,
        r".*down_blocks\.0\..*attn1\.to_out\.0",  # only some of the to_out.0 layers
        r"up_blocks\.1\.attentions\.1\..*\.(to_q|to_out\.0)|conv_in",
    ],
)
def test_peft_adapts_exactly_lorakit_modules_of_a_unet(targets, tmp_path):
    model = lorakit.inject(tiny_unet(), LoraConfig(r=2, alpha=4, target_modules=targets))
    randomize_adapter(model, "default", std=0.3)
    expected = run_unet(model)
    adapted = {p for p, _ in lorakit.model_state.lora_layers(model)}
    config = save_and_read(model, tmp_path)
    fresh = tiny_unet()
    assert {n for n, _ in fresh.named_modules() if n and peft_matches(config["target_modules"], n)} == adapted
    assert "0" not in config["target_modules"]
    peft_model = PeftModel.from_pretrained(tiny_unet(), tmp_path / "a").eval()
    peft_adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert peft_adapted == adapted
    with torch.no_grad():
        got = peft_model.base_model.model(*_unet_args()).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, run_unet(tiny_unet()), atol=1e-4)  # the adapter does change the output


def _unet_args():
    from tiny_diffusion import unet_inputs

    sample, context = unet_inputs()
    return sample, 3, context


def sequential():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)),
    ).eval()


@pytest.mark.parametrize("targets", [["0"], ["2.1", "3.0"], r"2\.0|3\.1"])
def test_peft_adapts_exactly_lorakit_modules_of_a_sequential(targets, tmp_path):
    model = lorakit.inject(sequential(), LoraConfig(r=2, alpha=4, target_modules=targets))
    randomize_adapter(model, "default", std=0.3)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    adapted = {p for p, _ in lorakit.model_state.lora_layers(model)}
    config = save_and_read(model, tmp_path)
    assert {n for n, _ in sequential().named_modules() if n and peft_matches(config["target_modules"], n)} == adapted
    peft_model = PeftModel.from_pretrained(sequential(), tmp_path / "a").eval()
    torch.testing.assert_close(peft_model(x), expected, atol=1e-6, rtol=1e-6)


def test_leaf_names_stay_short_when_unambiguous(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert save_and_read(model, tmp_path)["target_modules"] == ["q_proj", "v_proj"]


def test_base_model_name_is_a_hub_id_or_nothing(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id(model) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.config._name_or_path = "smollm2-135m-instruct"
    assert hub_id(model) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.config._name_or_path = str(tmp_path)  # a local folder: runtimes would take it for a hub id
    assert hub_id(model) is None
    cached = tmp_path / "hub" / "models--org--tiny-model" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    model.config._name_or_path = str(cached)
    assert hub_id(model) == "org/tiny-model"
    model.config._name_or_path = ""
    assert hub_id(model) is None
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    model.config._name_or_path = str(tmp_path)
    assert save_and_read(model, tmp_path)["base_model_name_or_path"] is None
