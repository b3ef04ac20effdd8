"""The HTTP front: an OpenAI-compatible API over one Engine, on the standard library's
ThreadingHTTPServer (one thread per connection; the engine thread does all model work, so the
HTTP threads only parse, tokenize and stream text back).

    POST /v1/completions          {"model": "<adapter or base name>", "prompt": ..., "stream": ...}
    POST /v1/chat/completions     {"model": ..., "messages": [...], "stream": ...}   (SSE when streaming)
    GET  /v1/models               the base model and every adapter in the adapters directory
    POST /v1/adapters/load        {"name": "<adapter>"}   load now (else loaded on first use)
    POST /v1/adapters/unload      {"name": "<adapter>"}   free it (409 while requests use it)
    GET  /health

The request's `model` names the adapter; the base model's own name means no adapter. Errors
are OpenAI-shaped JSON: unknown adapter 404, malformed body or too long a prompt 400.
No extra dependency: http.server is enough for a local multi-adapter server, and keeps the
package light (an ASGI stack would add several packages for no gain at this scale).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import LorakitError
from . import protocol
from .adapter_cache import AdapterBusy, UnknownAdapter
from .engine import ContextTooLong, Engine, EngineStopped
from .protocol import ApiError, Job
from .sampling import SamplingParams
from .text import TextStream

log = logging.getLogger("lorakit.serve")
MAX_BODY = 8 * 1024 * 1024


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
        with self._tokenizer_lock:
            if isinstance(prompt, list):  # chat messages
                if getattr(self.tokenizer, "chat_template", None):
                    text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
                    return self.tokenizer(text, add_special_tokens=False)["input_ids"]
                prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
            return self.tokenizer(prompt)["input_ids"]

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

    def manage(self, action: str, body: object) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, 'the request body must be a JSON object like {"name": "my-adapter"}')
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "lorakit"

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format: str, *args) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._guard(lambda: self._json(200, self.app.models()))
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(ApiError(404, f"no route GET {path}; try /v1/models"))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        routes = {"/v1/completions": protocol.parse_completion, "/v1/chat/completions": protocol.parse_chat}
        if path in routes:
            self._guard(lambda: self._generate(routes[path](self._body())))
        elif path in ("/v1/adapters/load", "/v1/adapters/unload"):
            action = path.rsplit("/", 1)[1]
            self._guard(lambda: self._json(200, self.app.manage(action, self._body())))
        else:
            self._drain()
            self._error(ApiError(404, f"no route POST {path}; try /v1/completions or /v1/chat/completions"))

    # ----- plumbing --------------------------------------------------------------------------
    def _guard(self, action) -> None:
        try:
            action()
        except ApiError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # a bug answers 500 with one line, never a traceback to the client
            log.exception("request failed")
            self._error(ApiError(500, f"internal error: {type(err).__name__}: {err}"))

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= MAX_BODY:
            self.rfile.read(length)

    def _body(self) -> object:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "the request needs a Content-Length header with the JSON body's size") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None

    def _generate(self, job: Job) -> None:
        if not job.stream:
            self._json(200, self.app.complete(job))
            return
        events = self.app.stream(job)
        first = next(events)  # errors before the first byte still get a proper JSON error status
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._chunk(f"data: {json.dumps(first)}\n\n")
            for event in events:
                self._chunk(f"data: {json.dumps(event)}\n\n")
        except ApiError as err:  # the stream already started: report in-band, as OpenAI does
            self._chunk(f"data: {json.dumps(err.body())}\n\n")
        finally:
            events.close()
        self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError) -> None:
        try:
            self._json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the listen backlog: many clients connecting at once must not be refused

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 8000):
        self.app = app
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
