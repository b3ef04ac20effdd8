"""Tiny seeded diffusers / CLIP models built from configs for the format tests (imported as `tiny_diffusion`)."""

from __future__ import annotations

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)


def run_unet(unet) -> torch.Tensor:
    sample, context = unet_inputs()
    with torch.no_grad():
        return unet(sample, 3, encoder_hidden_states=context).sample


def tiny_clip(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=8,
    )
    return CLIPTextModel(config).eval()


def run_clip(model) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).last_hidden_state


def tiny_pipeline(unet=None, text_encoder=None):
    """A StableDiffusionPipeline around the tiny parts (never run end to end: LoRA loading only needs the parts)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=4, sample_size=8
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder or tiny_clip(),
        tokenizer=None,
        unet=unet or tiny_unet(),
        scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    ).eval()


def run_sd3(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([5]),
    )
    with torch.no_grad():
        return model(**inputs).sample
