"""Serving many adapters on one base model: an OpenAI-compatible HTTP server with continuous
batching over mixed-adapter batches.

    adapter_cache.py  adapters loaded lazily from a directory, LRU-bounded, hot-swapped
    engine.py         continuous batching: prefill joiners, one decode step for all rows, KV cache
    sampling.py       greedy / temperature / top_p, seeded per request
    text.py           token ids to streamed text, stop strings
    protocol.py       OpenAI request parsing, response and error shapes
    logprobs.py       log-probabilities of generated and prompt tokens, in OpenAI's two shapes
    limits.py         the caps on one request (body, headers, JSON depth, prompts, timeouts)
    app.py            what the routes do: n generations per prompt, echo, logprobs, adapters
    http.py           reading a request within the limits; every error answered as OpenAI JSON
    server.py         the routes (standard library ThreadingHTTPServer)

    server = lorakit.serve.create_server(model, tokenizer, "adapters/", name="smollm2")
    server.serve_forever()
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .adapter_cache import AdapterBusy, AdapterCache, UnknownAdapter
from .app import App
from .engine import ContextTooLong, Engine, Request
from .limits import Limits
from .sampling import SamplingParams
from .server import Server


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token that ends a generation: the generation config's and the tokenizer's."""
    found = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        found += value if isinstance(value, list) else [value]
    return sorted({int(v) for v in found if v is not None})


def create_server(
    model: nn.Module,
    tokenizer,
    adapters: str | Path | None = None,
    *,
    name: str = "base",
    aliases: tuple[str, ...] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_adapters: int = 32,
    max_prefill_tokens: int = 2048,
    limits: Limits | None = None,
) -> Server:
    """A ready server (engine thread running); call serve_forever(), and close() when done."""
    cache = AdapterCache(model, adapters, capacity=max_adapters) if adapters is not None else None
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    engine = Engine(
        model, cache, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens, eos_token_ids=eos, pad_token_id=pad
    )
    server = Server(App(engine, tokenizer, name, aliases), host, port, limits)
    engine.start()
    return server


__all__ = [
    "AdapterBusy",
    "AdapterCache",
    "App",
    "ContextTooLong",
    "Engine",
    "Limits",
    "Request",
    "SamplingParams",
    "Server",
    "UnknownAdapter",
    "create_server",
    "eos_ids",
]
