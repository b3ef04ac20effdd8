"""Tiny offline assets for the server tests: a byte-level BPE tokenizer trained on the fly, a
seeded Llama-style model saved as safetensors, and adapters saved in PEFT's layout. Plus the
independent reference: one request alone, through HF generate with the single-adapter path."""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit import LoraConfig

CORPUS = [
    "SELECT name FROM users WHERE age > 30 ORDER BY name;",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "def add(a, b):\n    return a + b\n",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# name -> (config, seed); different ranks, targets and a DoRA adapter, all routed per row
ADAPTERS = {
    "sql": (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), 1),
    "poet": (LoraConfig(r=8, alpha=4, target_modules="all-linear"), 2),
    "dora_bot": (LoraConfig(r=2, target_modules=["o_proj", "down_proj"], use_dora=True), 3),
}


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_model(vocab: int, eos: int, seed: int = 0, context: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return LlamaForCausalLM(config).eval()


def randomize(model, name: str, seed: int) -> None:
    from lorakit.model_state import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.specs:
                for store in (layer.lora_A, layer.lora_B):
                    store[name].copy_(torch.randn(store[name].shape, generator=g) * 0.3)


def build_assets(root: Path) -> tuple[Path, Path]:
    """(model folder with tokenizer, adapters folder with one subfolder per adapter)."""
    model_dir, adapters_dir = root / "tiny-llama", root / "adapters"
    tokenizer = build_tokenizer(model_dir)
    model = build_model(len(tokenizer), tokenizer.eos_token_id)
    model.save_pretrained(model_dir)
    for name, (config, seed) in ADAPTERS.items():
        lorakit.inject(model, config, name=name)
        randomize(model, name, seed)
        lorakit.save_adapter(model, adapters_dir / name, name=name)
    return model_dir, adapters_dir


class Reference:
    """What each adapter generates alone: a separate model, set_adapter, greedy HF generate."""

    def __init__(self, model_dir: Path, adapters_dir: Path):
        from lorakit.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = load_model(str(model_dir))
        for name in ADAPTERS:
            lorakit.load_adapter(self.model, adapters_dir / name, name=name)

    def ids(self, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        lorakit.set_adapter(self.model, adapter)
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        return [t for t in out[0, len(prompt_ids) :].tolist() if t != eos]

    def text(self, adapter: str | None, prompt: str, max_tokens: int) -> str:
        ids = self.ids(adapter, self.tokenizer(prompt)["input_ids"], max_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, adapter: str | None, messages: list[dict], max_tokens: int) -> str:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.ids(adapter, self.tokenizer(text, add_special_tokens=False)["input_ids"], max_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)
