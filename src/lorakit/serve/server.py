"""The HTTP front: an OpenAI-compatible API over one Engine, on the standard library's
ThreadingHTTPServer (one thread per connection; the engine thread does all model work, so the
HTTP threads only parse, tokenize and stream text back).

    POST /v1/completions          {"model": "<adapter or base name>", "prompt": ..., "stream": ...,
                                   "n", "echo", "logprobs": k}
    POST /v1/chat/completions     {"model": ..., "messages": [...], "stream": ..., "n", "logprobs": true,
                                   "top_logprobs": k}   (SSE when streaming)
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
from http.server import ThreadingHTTPServer

from ..errors import LorakitError
from . import protocol
from .app import App
from .http import JsonHandler
from .limits import Limits
from .protocol import ApiError, Job

log = logging.getLogger("lorakit.serve")


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
