"""Tiny seeded models built from configs, shared by the tests (imported as `tiny_models`)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")


# The shape of every tiny Llama-family decoder here (Llama, Qwen2, ...): 2 layers, 4 query / 2 key-value heads.
TINY_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_decoder(family: str = "llama", seed: int = 0, vocab: int = 128, **overrides):
    """A seeded tiny causal LM of a Llama-family architecture ("llama" or "qwen2"), in eval mode;
    `overrides` go to its config (e.g. tie_word_embeddings, attn_implementation)."""
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{name}Config")(vocab_size=vocab, **{**TINY_DECODER, **overrides})
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()


def tiny_llama(seed: int = 0, vocab: int = 128):
    return tiny_decoder("llama", seed, vocab, tie_word_embeddings=False)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


class ConvNet(nn.Module):
    """A small image/sequence model with every layer type LoRA supports."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2d = nn.Conv2d(3, 6, 3, padding=1, stride=2)
        self.conv3d = nn.Conv3d(2, 4, 2)
        self.head = nn.Linear(8 + 6 + 4, 5)

    def forward(self, ids, image, volume):
        seq = self.conv1d(self.embed(ids).transpose(1, 2)).mean(-1)
        img = self.conv2d(image).mean((-1, -2))
        vol = self.conv3d(volume).mean((-1, -2, -3))
        return self.head(torch.cat([seq, img, vol], dim=-1))


def conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def conv_inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 50, (batch, 7), generator=g),
        torch.randn(batch, 3, 8, 8, generator=g),
        torch.randn(batch, 2, 4, 4, 4, generator=g),
    )


def token_ids(batch: int = 2, length: int = 9, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapter(model: nn.Module, name: str, seed: int = 0, std: float = 0.2) -> None:
    """Give adapter `name` non-zero A and B (a fresh adapter has B = 0, a no-op)."""
    from lorakit.model_state import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.specs:
                for store in (layer.lora_A, layer.lora_B):
                    store[name].copy_(torch.randn(store[name].shape, generator=g) * std)
                if name in layer.lora_magnitude:
                    layer.lora_magnitude[name].mul_(
                        1 + 0.1 * torch.randn(layer.lora_magnitude[name].shape, generator=g)
                    )
