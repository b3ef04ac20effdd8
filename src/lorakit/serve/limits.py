"""What one client may ask of `lorakit serve`: the caps every request is checked against before any
work is queued for it, validated once here (the CLI flags `--max-body-bytes` ... feed this class).

A request over a cap gets an OpenAI-shaped 4xx naming the cap and its flag, so one client cannot
fill the shared queue (max_prompts), the parser's recursion (max_json_depth), memory (max_body_bytes,
max_header_bytes) or a thread forever (read_timeout). Adapter names have their own rule in
`model_state.check_adapter_name` (a plain identifier of at most 128 characters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import LorakitError
from ..io import MAX_JSON_DEPTH


def _cap(default, low, high, help: str):
    return field(default=default, metadata={"low": low, "high": high, "help": help})


@dataclass(frozen=True)
class Limits:
    """Caps on one request; each field is also a `lorakit serve --<field-with-dashes>` flag."""

    max_body_bytes: int = _cap(8 * 1024 * 1024, 1024, 2**31, "largest request body accepted, in bytes")
    max_header_bytes: int = _cap(64 * 1024, 256, 2**24, "largest request line + headers accepted, in bytes")
    max_json_depth: int = _cap(MAX_JSON_DEPTH, 2, 512, "deepest nesting of [ and { in a request body")
    max_prompts: int = _cap(256, 1, 65536, "most generations one request may queue (prompts x n)")
    max_logprobs: int = _cap(20, 0, 1024, "most top log-probabilities per token (logprobs, top_logprobs)")
    read_timeout: float = _cap(30.0, 0, 3600, "seconds a read from a client may stall before a 408 answer")

    def __post_init__(self):
        for f in fields(self):
            value, low, high = getattr(self, f.name), f.metadata["low"], f.metadata["high"]
            seconds = f.type == "float"
            number = isinstance(value, (int, float) if seconds else int) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not low <= value <= high or (seconds and value <= 0):
                allowed = f"seconds above 0, at most {high}" if seconds else f"an integer from {low} to {high}"
                raise LorakitError(f"{f.name}={value!r} is invalid ({flag(f.name)}): use {allowed}")


def flag(name: str) -> str:
    """The `lorakit serve` flag of a Limits field."""
    return "--" + name.replace("_", "-")
