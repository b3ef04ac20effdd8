"""DoRA on every layer kind (Linear, Conv1d/2d/3d, Embedding with padding_idx) in PEFT's format, both ways,
with PEFT itself as the reference: magnitudes perturbed so that a wrong norm axis or layout would show."""

import json

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import conv_inputs, conv_net, randomize_adapter

import lorakit
from lorakit import LoraConfig

TARGETS = ["embed", "conv1d", "conv2d", "conv3d", "head"]  # Conv2d: kernel 3, stride 2, padding 1


def dora_net() -> torch.nn.Module:
    model = conv_net()
    torch.manual_seed(5)
    model.embed = torch.nn.Embedding(50, 8, padding_idx=0)
    return model.eval()


def inputs():
    ids, image, volume = conv_inputs()
    ids[:, 0] = 0  # the padding index is looked up too
    return ids, image, volume


def run(model, seed=0):
    torch.manual_seed(seed)  # the same dropout masks on both sides in training mode
    return model(*inputs())


def test_peft_loads_lorakit_dora_on_conv_and_embedding(tmp_path):
    model = lorakit.inject(dora_net(), LoraConfig(r=2, alpha=4, target_modules=TARGETS, use_dora=True, dropout=0.2))
    randomize_adapter(model, "default")  # also moves m away from ||W0 + s·B·A||
    expected, expected_train = run(model), run(model.train())
    lorakit.save_adapter(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(dora_net(), tmp_path / "a").eval()
    magnitudes = {n: p for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 5
    for name, param in magnitudes.items():  # PEFT's own layout: (d,) for Linear / Embedding, (1, d, 1...) for Conv
        assert saved[name.replace(".default.weight", "")].shape == param.shape
    torch.testing.assert_close(run(peft_model), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(peft_model.train()), expected_train, atol=1e-5, rtol=1e-5)


def test_lorakit_loads_peft_dora_on_conv_and_embedding(tmp_path):
    config = PeftLoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    peft_model = get_peft_model(dora_net(), config).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    expected = run(peft_model)
    peft_model.save_pretrained(tmp_path / "p")
    model = lorakit.load_adapter(dora_net(), tmp_path / "p")
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)
    lorakit.merge(model)  # merged, then unmerged: the same outputs and the base back
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    for path in TARGETS:
        before = dict(dora_net().named_parameters())[f"{path}.weight"]
        assert (model.get_submodule(path).base_layer.weight - before).abs().max() <= 1e-6
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=1e-5)
