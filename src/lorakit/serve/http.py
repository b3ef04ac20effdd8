"""The HTTP layer under the routes: reading a request within the Limits, and the one error writer.

Every byte a client sends passes through here before any route sees it:

    request line   at most max_header_bytes, exactly `METHOD /path HTTP/1.x`       else 400 / 414
    headers        together with the line at most max_header_bytes, <= 100 fields  else 431
    method, path   a route table: unknown path 404, known path with another method 405 (Allow: ...)
    body           Content-Length only (digits, one header), <= max_body_bytes,
                   read within read_timeout                                          else 400/411/413/408
    JSON           strict UTF-8 JSON (lorakit.io.parse_json), nesting <= max_json_depth, an object

and every answer that is not a success, including the ones the standard library's own parser
gives (`send_error`), is written by `reply_error` as OpenAI's {"error": {message, type, param,
code}} with a 4xx status (5xx only for the server's own faults). A request whose body was not
read, or that broke the framing, closes its connection so stray bytes are never parsed as the
next request. A HEAD request gets the headers of the answer (JSON content type, length), no body.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from ..io import parse_json
from .limits import Limits, flag
from .protocol import ApiError

log = logging.getLogger("lorakit.serve")
DIGITS = frozenset("0123456789")


def shown(text: str, width: int = 60) -> str:
    """`text` quoted, cut to `width` characters: client input echoed in an error stays one short line."""
    text = repr(text)
    return text if len(text) <= width else text[: width - 3] + "..."


class _HeaderReader:
    """The socket file as http.client.parse_headers reads it, refusing past `budget` bytes."""

    def __init__(self, raw, budget: int):
        self.raw, self.budget = raw, budget

    def readline(self, size: int = -1) -> bytes:
        line = self.raw.readline(self.budget + 1 if size < 0 else min(size, self.budget + 1))
        self.budget -= len(line)
        if self.budget < 0:
            raise http.client.LineTooLong("request line + headers")
        return line


class JsonHandler(BaseHTTPRequestHandler):
    """Request plumbing for a JSON API; subclasses set `routes` = {path: {method: handler method name}}."""

    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    default_request_version = "HTTP/1.0"  # a malformed request line still gets a status line and headers
    server_version = "lorakit"
    routes: dict[str, dict[str, str]] = {}
    linger = False  # set when the connection closes with bytes of the client's request unread

    @property
    def limits(self) -> Limits:
        return self.server.limits

    def setup(self) -> None:
        self.timeout = self.limits.read_timeout  # StreamRequestHandler puts it on the socket: no read hangs
        super().setup()

    def log_message(self, format: str, *args) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # ----- one request -----------------------------------------------------------------------
    def finish(self) -> None:
        if self.linger:
            self._linger()
        super().finish()

    def _linger(self) -> None:
        """Read (and drop) what the client still sends for a moment before closing, as Apache's lingering
        close does: closing a socket with unread bytes resets it, and the client may lose our answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.2)
            deadline, total = time.monotonic() + 1.0, 0
            while time.monotonic() < deadline and total < 1 << 20:
                data = self.connection.recv(1 << 16)
                if not data:
                    return
                total += len(data)
        except OSError:  # timed out or gone: either way we are done
            return

    def handle_one_request(self) -> None:
        self.command, self.headers, self.body_read, self.requestline = None, None, False, ""
        self.request_version, self.expect_continue = self.default_request_version, False
        try:
            started = self.rfile.peek(1)  # waits for the first byte without taking it
        except (TimeoutError, ConnectionError):  # an idle keep-alive connection: nothing to answer
            started = b""
        if not started:
            self.close_connection = True
            return
        try:
            self.raw_requestline = self.rfile.readline(self.limits.max_header_bytes + 1)
            if self._parse():
                self._dispatch()
            self.wfile.flush()
        except TimeoutError:
            self.reply_error(ApiError(408, f"the request was not received within {self._timeout_text()}"))
        except ConnectionError:  # the client went away (reset, broken pipe, aborted)
            self.close_connection = True

    def _parse(self) -> bool:
        """Request line and headers, within max_header_bytes; False when an error was answered."""
        limit, line = self.limits.max_header_bytes, self.raw_requestline
        if len(line) > limit:
            self.requestline = ""
            self.reply_error(ApiError(414, f"the request line is over {limit} bytes ({flag('max_header_bytes')})"))
            return False
        if len(line.split()) != 3:  # no HTTP/0.9 requests (they have no headers to frame a body)
            self.requestline = line.decode("latin-1").rstrip("\r\n")
            self.reply_error(
                ApiError(400, f"malformed request line {shown(self.requestline)}; send 'METHOD /path HTTP/1.1'")
            )
            return False
        raw, self.rfile = self.rfile, _HeaderReader(self.rfile, limit - len(line))
        try:
            return self.parse_request()  # the standard parser; its errors come back through send_error
        finally:
            self.rfile = raw

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        methods = self.routes.get(path)
        method = "GET" if self.command == "HEAD" else self.command
        if methods is None:
            self.reply_error(ApiError(404, f"no route {self.command} {shown(path)}; the API is under /v1"))
        elif method not in methods:
            allowed = ", ".join(sorted(methods))
            message = f"{shown(self.command)} is not allowed on {path}; use {allowed}"
            self.reply_error(ApiError(405, message, headers={"Allow": allowed}))
        else:
            self.guard(getattr(self, methods[method]))
        if not self.body_read and self._has_body():
            self.close_connection = True  # its bytes would otherwise be read as the next request

    def guard(self, action) -> None:
        """Run a route: an ApiError is answered as it says; anything else is the server's fault (500)."""
        try:
            action()
        except ApiError as err:
            self.reply_error(err)
        except (ConnectionError, TimeoutError):  # the client went away
            raise
        except Exception as err:  # a bug answers 500 with one line, never a traceback to the client
            log.exception("request failed")
            self.reply_error(ApiError(500, f"internal error: {type(err).__name__}: {err}"))

    # ----- the body --------------------------------------------------------------------------
    def handle_expect_100(self) -> bool:
        """`Expect: 100-continue`: the go-ahead is sent once the body's size is known to be acceptable."""
        self.expect_continue = True
        return True

    def _has_body(self) -> bool:
        headers = self.headers
        return headers is not None and (
            "Transfer-Encoding" in headers or headers.get("Content-Length", "0").strip() != "0"
        )

    def read_json(self) -> dict:
        """The body as a JSON object, every limit checked."""
        data = self._read_body()
        try:
            body = parse_json(data, self.limits.max_json_depth)
        except ValueError as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, not a {type(body).__name__}")
        return body

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "chunked request bodies are not supported; send the body with a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise ApiError(411, "the request needs a Content-Length header with the JSON body's size")
        text = lengths[0].strip()
        if len(lengths) > 1 or not text or not set(text) <= DIGITS or len(text) > 19:
            raise ApiError(400, f"Content-Length {shown(', '.join(lengths))} is invalid; send one byte count")
        length, limit = int(text), self.limits.max_body_bytes
        if length > limit:
            raise ApiError(413, f"the request body is {length} bytes; the limit is {limit} ({flag('max_body_bytes')})")
        if self.expect_continue:  # only now that the body is acceptable
            self.send_response_only(100)
            self.end_headers()
        deadline, parts, left = time.monotonic() + self.limits.read_timeout, [], length
        while left:  # in pieces, so a client trickling bytes still meets one deadline for the whole body
            if time.monotonic() > deadline:
                raise TimeoutError
            part = self.rfile.read1(min(left, 1 << 16))
            if not part:
                raise ApiError(400, f"the body ended after {length - left} of its {length} bytes (Content-Length)")
            parts.append(part)
            left -= len(part)
        self.body_read = True
        return b"".join(parts)

    def _timeout_text(self) -> str:
        return f"{self.limits.read_timeout:g} s ({flag('read_timeout')})"

    # ----- answers ---------------------------------------------------------------------------
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard parser's errors (bad request line, headers too long ...) as JSON, always 4xx."""
        status = code if 400 <= code < 500 else 400
        text = message or HTTPStatus(code).phrase
        if code == 431:
            text = f"the request line + headers are over {self.limits.max_header_bytes} bytes or 100 fields"
            text += f" ({flag('max_header_bytes')})"
        self.reply_error(ApiError(status, text[:200]))

    def reply_error(self, err: ApiError) -> None:
        unframed = self.headers is None or (not self.body_read and self._has_body())
        if unframed or err.status in (408, 411, 413) or err.status >= 500:
            self.close_connection = self.linger = True  # the rest of what the client sent cannot be framed
        try:
            self.send_json(err.status, err.body(), err.headers)
        except (ConnectionError, TimeoutError):  # the client went away
            self.close_connection = True

    def send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
