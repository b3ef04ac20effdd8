"""Choosing the next token: greedy (temperature 0), or temperature + nucleus (top_p) sampling.

Each request owns a torch.Generator seeded from its `seed`, so a seeded request draws the same
tokens whatever else shares its batch.

    p = softmax(logits / T);  keep the smallest set of most likely tokens whose mass reaches top_p
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import LorakitError

MAX_STOP = 16  # OpenAI takes 4; lm-eval's generate_until sends its task's stop strings plus the EOS text


@dataclass
class SamplingParams:
    """OpenAI's sampling fields, validated. `stop` strings are applied to the text (see text.py)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise LorakitError(f"max_tokens={self.max_tokens!r} is invalid: use an integer >= 1")
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise LorakitError(f"{name}={value!r} is invalid: use a number from {low:g} to {high:g}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if (
            not isinstance(self.stop, list)
            or not all(isinstance(s, str) and s for s in self.stop)
            or len(self.stop) > MAX_STOP
        ):
            raise LorakitError(
                f"stop={self.stop!r} is invalid: use a non-empty string or a list of up to {MAX_STOP} of them"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise LorakitError(f"seed={self.seed!r} is invalid: use an integer")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0
        ):
            raise LorakitError(f"logprobs={self.logprobs!r} is invalid: use an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed % (2**63))


def sample_rows(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` (rows x vocab); greedy rows share one argmax."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample(logits[i].float().cpu(), p, generators[i])
    return tokens


def _sample(logits: Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    # in float64, the max first: logits / 1e-300 would be inf - inf = NaN and fail the whole batch
    probs = torch.softmax((logits.double() - logits.max()) / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each token
        keep = before < p.top_p
        keep[0] = True  # the most likely token always stays (top_p=0 is greedy)
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
