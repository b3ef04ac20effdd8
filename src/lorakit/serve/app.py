"""What the routes do, independent of HTTP: tokenize, queue n generations per prompt on the Engine,
gather their text (and log-probabilities), list and manage adapters.

A request's `model` names the adapter; the base model's own name means none. Tokenizing happens
here on the HTTP threads (under one lock: fast tokenizers are not thread-safe); all model work
happens on the engine thread, except the one forward pass that scores an echoed prompt
(logprobs.prompt_logprobs, which holds the engine's model lock).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorakitError
from . import logprobs, protocol
from .adapter_cache import AdapterBusy, UnknownAdapter
from .engine import ContextTooLong, Engine, EngineStopped, Request
from .protocol import ApiError, Job
from .sampling import SamplingParams
from .text import TextStream

log = logging.getLogger("lorakit.serve")


@dataclass
class Generation:
    """One choice being generated: its engine request (None when max_tokens is 0), prompt and text."""

    request: Request | None
    prompt: int  # index into job.prompts
    ids: list[int]
    stream: TextStream

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()


class App:
    """What the routes do, independent of HTTP plumbing."""

    def __init__(self, engine: Engine, tokenizer, base_name: str, aliases: tuple[str, ...] = ()):
        self.engine = engine
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.base_names = {base_name, *aliases}
        self.started = int(time.time())
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads

    # ----- helpers ---------------------------------------------------------------------------
    def adapter_for(self, model: str) -> str | None:
        if model in self.base_names:
            return None
        if self.engine.adapters is None:
            raise ApiError(
                404,
                f"model '{model}' does not exist; this server has only '{self.base_name}'",
                "model",
                "model_not_found",
            )
        try:
            self.engine.adapters.folder(model)
        except UnknownAdapter:
            raise ApiError(
                404,
                f"model '{model}' does not exist: it is neither the base model '{self.base_name}' nor an adapter "
                "in the adapters directory (GET /v1/models lists them)",
                "model",
                "model_not_found",
            ) from None
        except LorakitError as err:
            raise ApiError(400, str(err), "model") from None
        return model

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        try:
            with self._tokenizer_lock:
                if isinstance(prompt, list):  # chat messages
                    if getattr(self.tokenizer, "chat_template", None):
                        text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
                        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
                return self.tokenizer(prompt)["input_ids"]
        except Exception as err:  # the input alone decides (a chat template's raise_exception, ...): a 400
            log.warning("tokenizing a request failed: %s: %s", type(err).__name__, err)
            raise ApiError(400, f"the prompt cannot be tokenized: {type(err).__name__}: {str(err)[:200]}") from None

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, special tokens included (the tokens of a logprobs answer)."""
        with self._tokenizer_lock:
            return self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)

    def submit(self, job: Job) -> list[Generation]:
        """Tokenize `job`'s prompts and queue n generations of each (prompt-major: OpenAI's choice order)."""
        adapter = self.adapter_for(job.model)
        encoded = [self.encode(p) for p in job.prompts]
        submitted: list[Generation] = []
        with self._refusals(job, submitted):
            for index, ids in enumerate(encoded):
                max_tokens = job.sampling["max_tokens"]
                if max_tokens is None:  # chat without a limit: the rest of the context
                    max_tokens = max(1, self.engine.context - len(ids))
                self.engine.check(ids, max_tokens)
                for j in range(job.n):
                    seed = job.sampling["seed"]  # the n samples of a seeded request differ, each reproducible
                    seed = None if seed is None else seed + j
                    params = SamplingParams(**{**job.sampling, "max_tokens": max(max_tokens, 1), "seed": seed})
                    request = self.engine.submit(ids, adapter, params) if max_tokens > 0 else None
                    submitted.append(Generation(request, index, ids, TextStream(self.decode, params.stop)))
        return submitted

    @staticmethod
    @contextmanager
    def _refusals(job: Job, submitted: list[Generation]):
        """Engine and adapter errors as HTTP answers; what was queued already is cancelled."""
        try:
            yield
        except BaseException as err:
            for g in submitted:
                g.cancel()
            if isinstance(err, ContextTooLong):
                param = "messages" if job.chat else "prompt"
                raise ApiError(400, str(err), param, "context_length_exceeded") from None
            if isinstance(err, UnknownAdapter):
                raise ApiError(404, str(err), "model", "model_not_found") from None
            if isinstance(err, EngineStopped):
                raise ApiError(503, str(err)) from None
            if isinstance(err, LorakitError):
                raise ApiError(400, str(err)) from None
            raise

    @staticmethod
    def events(request, stream: TextStream, entries: list | None = None):
        """Text deltas of one request, then its finish reason: yields (delta, None)... (tail, reason);
        its logprob entries, when it asked for them, are appended to `entries`."""
        reason = None
        for kind, value in request:
            if kind == "token":
                delta, stopped = stream.push(value)
                if stopped and reason is None:
                    reason = "stop"
                    request.cancel()  # the engine drops the row at its next step
                if delta:
                    yield delta, None
            elif kind == "logprobs":
                if entries is not None:
                    entries.append(value)
            elif kind == "done":
                yield stream.finish(), reason or ("length" if value == "length" else "stop")
            else:
                raise ApiError(500, value)

    def collect(self, g: Generation) -> tuple[str, str, list]:
        """(text, finish reason, logprob entries) of one finished generation."""
        if g.request is None:  # max_tokens 0
            return "", "length", []
        text, reason, entries = "", None, []
        for delta, finish in self.events(g.request, g.stream, entries):
            text += delta
            reason = finish or reason
        # the tokens that made the text, and the end-of-sequence token when that ended it (scorers count it)
        keep = len(g.stream.ids) + (0 if g.stream.stopped else 1)
        return text, reason, entries[:keep]

    def prompt_entries(self, job: Job, g: Generation) -> list:
        """Logprob entries of g's prompt tokens (echo + logprobs), from one forward with the adapter."""
        with self._refusals(job, []):
            return logprobs.prompt_logprobs(self.engine, g.ids, self.adapter_for(job.model), job.logprobs)

    # ----- routes ----------------------------------------------------------------------------
    def complete(self, job: Job) -> dict:
        submitted = self.submit(job)
        choices, produced, scored = [], 0, {}
        try:
            for g in submitted:
                text, reason, entries = self.collect(g)
                produced += len(g.stream.ids)
                if job.echo:
                    prompt = job.prompts[g.prompt]
                    text = (prompt if isinstance(prompt, str) else self.decode(g.ids)) + text
                    if job.logprobs is not None:
                        if g.prompt not in scored:  # once per prompt, shared by its n choices
                            scored[g.prompt] = self.prompt_entries(job, g)
                        entries = scored[g.prompt] + entries
                shaped = None
                if job.logprobs is not None:
                    shaped = (logprobs.chat if job.chat else logprobs.completion)(entries, self.texts)
                choices.append((text, reason, shaped))
        finally:
            for g in submitted:
                g.cancel()
        prompt_tokens = sum(len(g.ids) for g in submitted[:: job.n])
        return protocol.response(job, protocol.new_id(job.chat), choices, prompt_tokens, produced)

    def stream(self, job: Job):
        """Server-sent event payloads (dicts), ending with the finish chunk (and usage if asked). With
        echo the prompt comes first; with logprobs each chunk carries those of its new tokens."""
        [g] = self.submit(job)
        rid, entries, sent, offset = protocol.new_id(job.chat), [], 0, 0
        events = self.events(g.request, g.stream, entries) if g.request is not None else iter([("", "length")])

        def shaped(new: list) -> dict | None:
            nonlocal offset
            if job.logprobs is None:
                return None
            if job.chat:
                return logprobs.chat(new, self.texts)
            out = logprobs.completion(new, self.texts, offset)
            offset += sum(len(t) for t in out["tokens"])
            return out

        try:
            first = True
            if job.echo:
                prompt = job.prompts[0] if isinstance(job.prompts[0], str) else self.decode(g.ids)
                head = self.prompt_entries(job, g) if job.logprobs is not None else []
                yield protocol.chunk(job, rid, prompt, None, logprobs=shaped(head))
                first = False
            for delta, finish in events:
                if delta or first or finish:
                    end = len(entries) if not finish else len(g.stream.ids) + (0 if g.stream.stopped else 1)
                    new, sent = entries[sent:end], max(sent, end)
                    text = delta if (delta or first) else None
                    yield protocol.chunk(job, rid, text, finish, first=first, logprobs=shaped(new))
                first = False
            if job.include_usage:
                yield {**protocol.chunk(job, rid, None), "usage": protocol.usage(len(g.ids), len(g.stream.ids))}
        finally:
            g.cancel()  # a client that went away stops its generation

    def models(self) -> dict:
        data = [
            {"id": self.base_name, "object": "model", "created": self.started, "owned_by": "lorakit", "loaded": True}
        ]
        adapters = self.engine.adapters
        loaded = adapters.in_memory() if adapters is not None else []
        for name in adapters.available() if adapters is not None else []:
            created = int(Path(adapters.directory / name).stat().st_mtime)
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "lorakit",
                    "parent": self.base_name,
                    "root": self.base_name,
                    "loaded": name in loaded,
                }
            )
        return {"object": "list", "data": data}

    def manage(self, action: str, body: dict) -> dict:
        if any(k in body for k in ("path", "lora_path")):
            raise ApiError(
                400, 'adapters load by name from the server\'s adapters directory only; send {"name": ...}', "path"
            )
        name = body.get("name", body.get("lora_name"))
        if not isinstance(name, str):
            raise ApiError(400, "'name' (the adapter's folder name in the adapters directory) is required", "name")
        adapters = self.engine.adapters
        if adapters is None:
            raise ApiError(404, "this server was started without an adapters directory", "name", "model_not_found")
        try:
            if action == "load":
                ms = adapters.load(name)
                return {"name": name, "loaded": True, "load_ms": round(ms, 2), "in_memory": adapters.in_memory()}
            adapters.unload(name)
            return {"name": name, "loaded": False, "in_memory": adapters.in_memory()}
        except UnknownAdapter as err:
            raise ApiError(404, str(err), "name", "model_not_found") from None
        except AdapterBusy as err:
            raise ApiError(409, str(err), "name") from None
        except LorakitError as err:
            raise ApiError(400, str(err), "name") from None
