"""The HTTP front: an OpenAI-compatible API over one Engine, on the standard library's
ThreadingHTTPServer (one thread per connection; the engine thread does all model work, so the
HTTP threads only parse, tokenize and stream text back).

    POST /v1/completions          {"model": "<adapter or base name>", "prompt": ..., "stream": ...}
    POST /v1/chat/completions     {"model": ..., "messages": [...], "stream": ...}   (SSE when streaming)
    GET  /v1/models               the base model and every adapter in the adapters directory
    POST /v1/adapters/load        {"name": "<adapter>"}   load now (else loaded on first use)
    POST /v1/adapters/unload      {"name": "<adapter>"}   free it (409 while requests use it)
    GET  /health

The request's `model` names the adapter; the base model's own name means no adapter. Requests
are read within the Limits by http.JsonHandler, which also answers every error as OpenAI-shaped
JSON (unknown adapter 404, malformed body or too long a prompt 400, ...).
No extra dependency: http.server is enough for a local multi-adapter server, and keeps the
package light (an ASGI stack would add several packages for no gain at this scale).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from ..errors import LorakitError
from . import protocol
from .adapter_cache import AdapterBusy, UnknownAdapter
from .engine import ContextTooLong, Engine, EngineStopped
from .http import JsonHandler
from .limits import Limits
from .protocol import ApiError, Job
from .sampling import SamplingParams
from .text import TextStream

log = logging.getLogger("lorakit.serve")


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

    def submit(self, job: Job) -> list[tuple[object, list[int], TextStream]]:
        """Tokenize and queue every prompt of `job`: [(engine request, prompt ids, text stream)]."""
        adapter = self.adapter_for(job.model)
        encoded = [self.encode(p) for p in job.prompts]
        submitted = []
        try:
            for ids in encoded:
                max_tokens = job.sampling["max_tokens"]
                if max_tokens is None:  # chat without a limit: the rest of the context
                    max_tokens = max(1, self.engine.context - len(ids))
                params = SamplingParams(**{**job.sampling, "max_tokens": max_tokens})
                request = self.engine.submit(ids, adapter, params)
                submitted.append((request, ids, TextStream(self.decode, params.stop)))
        except ContextTooLong as err:
            self._cancel(submitted)
            raise ApiError(400, str(err), "messages" if job.chat else "prompt", "context_length_exceeded") from None
        except UnknownAdapter as err:
            self._cancel(submitted)
            raise ApiError(404, str(err), "model", "model_not_found") from None
        except EngineStopped as err:
            self._cancel(submitted)
            raise ApiError(503, str(err)) from None
        except LorakitError as err:
            self._cancel(submitted)
            raise ApiError(400, str(err)) from None
        return submitted

    @staticmethod
    def _cancel(submitted) -> None:
        for request, _, _ in submitted:
            request.cancel()

    @staticmethod
    def events(request, stream: TextStream):
        """Text deltas of one request, then its finish reason: yields (delta, None)... (tail, reason)."""
        reason = None
        for kind, value in request:
            if kind == "token":
                delta, stopped = stream.push(value)
                if stopped and reason is None:
                    reason = "stop"
                    request.cancel()  # the engine drops the row at its next step
                if delta:
                    yield delta, None
            elif kind == "done":
                yield stream.finish(), reason or ("length" if value == "length" else "stop")
            else:
                raise ApiError(500, value)

    # ----- routes ----------------------------------------------------------------------------
    def complete(self, job: Job) -> dict:
        submitted = self.submit(job)
        choices, produced = [], 0
        try:
            for request, _, stream in submitted:
                text, reason = "", None
                for delta, finish in self.events(request, stream):
                    text += delta
                    reason = finish or reason
                choices.append((text, reason))
                produced += len(stream.ids)
        finally:
            self._cancel(submitted)
        prompt_tokens = sum(len(ids) for _, ids, _ in submitted)
        return protocol.response(job, protocol.new_id(job.chat), choices, prompt_tokens, produced)

    def stream(self, job: Job):
        """Server-sent event payloads (dicts), ending with the finish chunk (and usage if asked)."""
        [(request, ids, stream)] = self.submit(job)
        rid = protocol.new_id(job.chat)
        try:
            first = True
            for delta, finish in self.events(request, stream):
                if delta or first or finish:
                    yield protocol.chunk(job, rid, delta if (delta or first) else None, finish, first=first)
                first = False
            if job.include_usage:
                yield {**protocol.chunk(job, rid, None), "usage": protocol.usage(len(ids), len(stream.ids))}
        finally:
            request.cancel()  # a client that went away stops its generation

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


class Handler(JsonHandler):
    """The routes; reading, limits and error answers are JsonHandler's (http.py)."""

    routes = {
        "/v1/completions": {"POST": "completions"},
        "/v1/chat/completions": {"POST": "chat_completions"},
        "/v1/models": {"GET": "models"},
        "/v1/adapters/load": {"POST": "load"},
        "/v1/adapters/unload": {"POST": "unload"},
        "/health": {"GET": "health"},
    }

    @property
    def app(self) -> App:
        return self.server.app

    def completions(self) -> None:
        self._generate(protocol.parse_completion(self.read_json(), self.limits))

    def chat_completions(self) -> None:
        self._generate(protocol.parse_chat(self.read_json(), self.limits))

    def models(self) -> None:
        self.send_json(200, self.app.models())

    def load(self) -> None:
        self.send_json(200, self.app.manage("load", self.read_json()))

    def unload(self) -> None:
        self.send_json(200, self.app.manage("unload", self.read_json()))

    def health(self) -> None:
        self.send_json(200, {"status": "ok"})

    def _generate(self, job: Job) -> None:
        if not job.stream:
            self.send_json(200, self.app.complete(job))
            return
        events = self.app.stream(job)
        first = next(events)  # errors before the first byte still get a proper JSON error status
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self.send_chunk(f"data: {json.dumps(first)}\n\n")
            for event in events:
                self.send_chunk(f"data: {json.dumps(event)}\n\n")
        except ApiError as err:  # the stream already started: report in-band, as OpenAI does
            self.send_chunk(f"data: {json.dumps(err.body())}\n\n")
        finally:
            events.close()
        self.send_chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the listen backlog: many clients connecting at once must not be refused

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None):
        self.app = app
        self.limits = limits or Limits()
        try:
            super().__init__((host, port), Handler)
        except OSError as err:
            raise LorakitError(
                f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host"
            ) from None

    _serving = False

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._serving = False

    def close(self) -> None:
        """Stop accepting requests, finish the engine thread, release the port."""
        if self._serving:  # shutdown() waits for serve_forever, so only when it runs
            self.shutdown()
        self.server_close()
        self.app.engine.stop()
        log.info("served %s", self.app.engine.stats)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"
