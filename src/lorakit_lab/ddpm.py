"""A small DDPM on 8x8 images with diffusers' own UNet, scheduler and pipeline.

Training (Ho et al. 2020): pick t ~ U{0..T-1} and noise ε, form x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε
(DDPMScheduler.add_noise) and minimise ||ε - ε_θ(x_t, t)||². Only parameters with requires_grad
train, so the same loop trains the whole base UNet or only a lorakit adapter on it.

Sampling runs diffusers' DDIMPipeline (η = 0: deterministic given the starting noise), whatever
the UNet carries (lorakit adapters, merged or not); one torch.Generator per sample makes the
starting noise of sample i depend only on seed i, so every model starts column i from the same
noise and their samples can be compared image by image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.errors import LorakitError

TRAIN_TIMESTEPS = 1000


def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise LorakitError("the image experiment needs diffusers: pip install 'lorakit[lab]'") from err
    return diffusers


@dataclass
class UNetShape:
    """A diffusers UNet2DModel for 1-channel images; attention in the last down / first up block."""

    sample_size: int = 8
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_groups: int = 8
    head_dim: int = 16

    def build(self, seed: int) -> nn.Module:
        levels = len(self.channels)
        torch.manual_seed(seed)  # diffusers initialises from torch's global generator
        return _diffusers().UNet2DModel(
            sample_size=self.sample_size,
            in_channels=1,
            out_channels=1,
            block_out_channels=self.channels,
            layers_per_block=self.layers_per_block,
            down_block_types=["DownBlock2D"] * (levels - 1) + ["AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * (levels - 1),
            norm_num_groups=self.norm_groups,
            attention_head_dim=self.head_dim,
        )


def noise_scheduler():
    """The training scheduler; the pipeline derives its DDIM scheduler from this config."""
    return _diffusers().DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2")


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, 1, H, W) in [-1, 1], the range the pipeline maps back from."""
    return torch.from_numpy(images).float().unsqueeze(1) * 2 - 1


def train(
    unet: nn.Module, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int, bar=None, ema: float = 0.0
) -> list[float]:
    """Train unet's trainable parameters as a DDPM on `data` (N, 1, H, W); return the loss per step.

    AdamW with a linear warm-up over the first 5% of steps and a cosine decay after it. With
    ema > 0 the weights end as their exponential moving average (decay ramped up from 0, as
    diffusers' EMAModel does), which smooths the last steps' noise out of the samples.
    """
    scheduler = noise_scheduler()
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise LorakitError("nothing to train: the UNet has no parameter with requires_grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))),
    )
    average = [p.detach().clone() for p in params] if ema else None
    g = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=g)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if average is not None:
            with torch.no_grad():
                torch._foreach_lerp_(average, [p.detach() for p in params], 1 - min(ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
    if average is not None:
        with torch.no_grad():
            for p, a in zip(params, average):
                p.copy_(a)
    unet.eval()
    return losses


def sample(unet: nn.Module, seeds: list[int], steps: int, batch: int = 256) -> np.ndarray:
    """Images (N, H, W) in [0, 1] from diffusers' DDIMPipeline, sample i started from seed i's noise."""
    pipeline = _diffusers().DDIMPipeline(unet=unet, scheduler=noise_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start : start + batch]
        generators = [torch.Generator().manual_seed(s) for s in chunk]
        result = pipeline(
            batch_size=len(chunk), generator=generators, num_inference_steps=steps, eta=0.0, output_type="np"
        )
        out.append(np.asarray(result.images, dtype=np.float32)[..., 0])  # (N, H, W, 1) in [0, 1]
    return np.concatenate(out)


# ----- an independent reference: plain weights from the saved PEFT-format files -----------------
def summed_weights(base_state: dict[str, torch.Tensor], adapters: dict[str | Path, float]) -> dict[str, torch.Tensor]:
    """W0 + Σ_i w_i·(alpha_i/r_i)·B_i·A_i for every weight (float64), by plain matmuls on the saved files.

    `adapters` maps an adapter folder (adapter_config.json + adapter_model.safetensors, PEFT's
    layout) to its weight. Nothing of lorakit is used here, so it checks lorakit from outside.
    """
    state = {k: v.detach().clone().double() for k, v in base_state.items()}
    for folder, weight in adapters.items():
        folder = Path(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        if config["rank_pattern"] or config["alpha_pattern"] or config["use_rslora"] or config["use_dora"]:
            raise LorakitError(f"{folder}: the reference handles plain LoRA with one r and alpha only")
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            w0 = state[f"{path}.weight"]
            delta = b.double().reshape(b.shape[0], -1) @ a.double().reshape(a.shape[0], -1)
            state[f"{path}.weight"] = w0 + weight * scale * delta.reshape(w0.shape)
    return state  # float64, so a comparison sees the factors' error, not W0's rounding
