"""kohya / A1111 LoRA files both ways, with diffusers' own kohya conversion (a pipeline's load_lora_weights)
as the independent reference for names, alphas and conv layers."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_diffusion import UNET_TARGETS, run_clip, run_unet, tiny_clip, tiny_pipeline, tiny_unet
from tiny_models import randomize_adapter

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.formats.detect import detect, load

UNET_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.resnets.1.time_emb_proj",
]
# named text_model.* in files. All of a layer's attention projections: diffusers 0.42 drops a text encoder's q/k/v
# LoRAs when out_proj has none (its old-format detection keys on to_out_lora)
TEXT_MODULES = [
    f"encoder.layers.0.{m}"
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")
]
TEXT_MODULES += ["encoder.layers.1.mlp.fc2"]


def kohya_file(path, unet, text_encoder, seed=0, alpha=None):
    """A kohya file built from the module shapes alone: random down/up factors, mixed ranks, one alpha (or a
    different alpha per module)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, model, paths in (("lora_unet_", unet, UNET_MODULES), ("lora_te_", text_encoder, TEXT_MODULES)):
        for i, module_path in enumerate(paths):
            module = model.get_submodule(module_path)
            r = 2 + i % 2
            name = prefix + ("text_model." + module_path if prefix == "lora_te_" else module_path).replace(".", "_")
            if isinstance(module, torch.nn.Conv2d):
                down = torch.randn(r, module.in_channels, *module.kernel_size, generator=g)
                up = torch.randn(module.out_channels, r, 1, 1, generator=g)
            else:
                down = torch.randn(r, module.in_features, generator=g)
                up = torch.randn(module.out_features, r, generator=g)
            tensors[f"{name}.lora_down.weight"] = 0.3 * down
            tensors[f"{name}.lora_up.weight"] = 0.3 * up
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else 1 + i))
    save_file(tensors, path)
    return path


def test_lorakit_reads_kohya_like_diffusers(tmp_path):
    file = kohya_file(tmp_path / "style.safetensors", tiny_unet(), tiny_clip(), alpha=3.0)
    assert detect(file) == "kohya"
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(file), adapter_name="style")
    unet = lorakit.load_adapter(tiny_unet(), file, name="style")  # the format is detected
    text = load(tiny_clip(), file, name="style")
    torch.testing.assert_close(run_unet(unet), run_unet(pipe.unet), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run_clip(text), run_clip(pipe.text_encoder), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run_unet(unet), run_unet(tiny_unet()), atol=1e-4)
    assert sorted(p for p, _ in lorakit.model_state.lora_layers(unet)) == sorted(UNET_MODULES)


def test_per_module_alphas_follow_kohya_rule(tmp_path):
    """alpha / r per module (diffusers 0.42 drops per-module alphas of attention layers, so the reference here is
    the kohya rule computed by hand: W + (alpha / r)·up·down)."""
    file = kohya_file(tmp_path / "k.safetensors", tiny_unet(), tiny_clip())
    tensors = load_file(file)
    unet = load(tiny_unet(), file)
    for i, path in enumerate(UNET_MODULES):
        name = "lora_unet_" + path.replace(".", "_")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        expected = (1 + i) / down.shape[0] * up.flatten(1) @ down.flatten(1)
        torch.testing.assert_close(unet.get_submodule(path).delta_weight("default"), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=2, alpha=4, target_modules=UNET_TARGETS),
        dict(
            r=4,
            alpha=3,
            target_modules=UNET_TARGETS,
            use_rslora=True,
            rank_pattern={"to_k": 2},
            alpha_pattern={"to_q": 5},
        ),
    ],
)
def test_diffusers_reads_kohya_lorakit_writes(kwargs, tmp_path):
    model = lorakit.inject(tiny_unet(), LoraConfig(**kwargs))
    randomize_adapter(model, "default", std=0.3)
    expected = run_unet(model)
    file = lorakit.save_adapter(model, tmp_path / "mine.safetensors", format="kohya")
    keys = load_file(file)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(file), adapter_name="mine")
    torch.testing.assert_close(run_unet(pipe.unet), expected, atol=1e-5, rtol=1e-5)
    again = load(tiny_unet(), file)  # and lorakit reads its own file back
    torch.testing.assert_close(run_unet(again), expected, atol=1e-5, rtol=1e-5)


def test_text_encoder_kohya_file(tmp_path):
    model = lorakit.inject(
        tiny_clip(), LoraConfig(r=2, alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc2"])
    )
    randomize_adapter(model, "default", std=0.3)
    file = lorakit.save_adapter(model, tmp_path / "te.safetensors", format="kohya")
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(file))
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(file))
    torch.testing.assert_close(run_clip(pipe.text_encoder), run_clip(model), atol=1e-5, rtol=1e-5)


def test_kohya_refusals(tmp_path):
    dora = lorakit.inject(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="DoRA magnitude.*kohya"):
        lorakit.save_adapter(dora, tmp_path / "d.safetensors", format="kohya")
    plain = lorakit.inject(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="ending in .safetensors"):
        lorakit.save_adapter(plain, tmp_path / "folder", format="kohya")
    file = kohya_file(tmp_path / "k.safetensors", tiny_unet(), tiny_clip())
    tensors = load_file(file)
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 8)
    save_file(tensors, file)
    unet = tiny_unet()
    with pytest.raises(LorakitError, match="lora_unet_no_such_block_to_q.*does not have"):
        load(unet, file)
    assert not list(lorakit.model_state.lora_layers(unet))
