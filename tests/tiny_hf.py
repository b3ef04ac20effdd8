"""Tiny seeded models saved as Hugging Face folders, each with a tokenizer trained here (no downloads).

Shared by tests/cli and tests/train: their test modules import the fixtures from here directly, so no
folder needs a conftest.py of its own (a second conftest.py would shadow tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a good film with a great cast and a warm heart",
    "a bad film, dull and slow, with a weak plot",
    "to be or not to be, that is the question",
    "what is the answer? the answer is forty two",
] * 20


def tiny_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (vocab 300) with ChatML specials and chat template, saved to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny(directory: Path, kind: str) -> Path:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(directory)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                tie_word_embeddings=False,
                **special,
            )
        )
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=128, **special)
        )
    else:
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
                num_labels=2,
                **special,
            )
        )
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny(root / kind, kind) for kind in ("llama", "gpt2", "bert")}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    text = [{"text": line} for line in CORPUS[:5]] * 4
    pc = [{"prompt": f"Q: {a}\nA:", "completion": f" {b}"} for a, b in zip(CORPUS[:5], CORPUS[1:6])] * 4
    chat = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in pc
    ]
    cls = [{"text": CORPUS[1], "label": "positive"}, {"text": CORPUS[2], "label": "negative"}] * 8
    return {
        "text": write_jsonl(root / "text.jsonl", text),
        "pc": write_jsonl(root / "pc.jsonl", pc),
        "chat": write_jsonl(root / "chat.jsonl", chat),
        "cls": write_jsonl(root / "cls.jsonl", cls),
    }


def reference_text_loss(model, tokenizer, data_file: Path) -> float:
    """The token-mean causal-LM loss of a `{"text": ...}` JSONL file, each text followed by EOS, computed by
    `model` (e.g. PEFT's) one text at a time: the independent reference for `lorakit eval`."""
    texts = [json.loads(line)["text"] for line in data_file.read_text().splitlines()]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count
