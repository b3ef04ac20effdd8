"""`lorakit serve` under abuse: bad requests generated from a grammar of mutations.

Raw sockets send what no HTTP client would (garbage request lines, every method on every path, huge
or broken headers, lying Content-Lengths, truncated bodies); http.client sends bodies (not JSON,
invalid UTF-8, deep nesting, non-objects, every field with every wrong type, too many prompts).
Each answer must be an OpenAI-shaped JSON error {"error": {message, type, param, code}} with a 4xx
status, within a few seconds (never a hang, never a 500, never HTML), and the server must answer a
good request correctly afterwards.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time

import pytest
from serve_assets import build_assets

from lorakit.models import load_model, load_tokenizer
from lorakit.serve import Limits, create_server

BASE = "tiny-llama"
LIMITS = Limits(max_body_bytes=64 * 1024, max_header_bytes=8 * 1024, max_json_depth=16, max_prompts=8, read_timeout=1)
GOOD = {"model": BASE, "prompt": "Hello world", "max_tokens": 3, "temperature": 0}
GOOD_CHAT = {"model": "sql", "messages": [{"role": "user", "content": "SELECT"}], "max_tokens": 3, "temperature": 0}
ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters/load", "/health"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir, adapters_dir = build_assets(tmp_path_factory.mktemp("abuse"))
    server = create_server(
        load_model(str(model_dir)), load_tokenizer(str(model_dir)), adapters_dir, name=BASE, port=0, limits=LIMITS
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    expected = post(server, "/v1/completions", json.dumps(GOOD).encode())[1]["choices"][0]["text"]
    server.expected = expected
    yield server
    server.close()


# ----- talking to it --------------------------------------------------------------------------------
def post(server, path: str, body: bytes, method: str = "POST") -> tuple[int, dict, dict]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}, dict(response.getheaders())
    finally:
        connection.close()


def raw(server, data: bytes, wait: float = 5.0) -> tuple[int, dict, bytes]:
    """Send bytes, read one response: (status, headers, body). Fails if nothing complete comes in `wait` s."""
    with socket.create_connection(server.server_address[:2], timeout=wait) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read everything (e.g. 431)
        received, deadline = b"", time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            received += part
            if _complete(received, head_only=data.startswith(b"HEAD ")):
                break
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"no status line in {received[:80]!r} for {data[:80]!r}"
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _complete(received: bytes, head_only: bool) -> bool:
    head, sep, body = received.partition(b"\r\n\r\n")
    if not sep or head_only:
        return bool(sep)
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def assert_error(status: int, headers: dict, body: dict | bytes, case) -> None:
    assert 400 <= status < 500, (status, body, case)
    assert headers.get("Content-Type") == "application/json", (headers, case)
    if isinstance(body, bytes):
        body = json.loads(body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, (body, case)
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str), (body, case)
    assert "Traceback" not in error["message"] and len(error["message"]) < 400, (body, case)


def assert_alive(server) -> None:
    status, body, _ = post(server, "/v1/completions", json.dumps(GOOD).encode())
    assert status == 200 and body["choices"][0]["text"] == server.expected


# ----- the grammar: request lines and headers (raw sockets) -------------------------------------------
def request_line_cases() -> list[tuple[bytes, int | None]]:
    """(bytes, expected status or None for any 4xx)."""
    rng = random.Random(0)
    body = json.dumps(GOOD).encode()
    cases = []
    for method in ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "FOO", "get", "P\x01ST"]:
        for path in ROUTES + ["/nope"]:
            expected = 404 if path == "/nope" else 405
            cases.append((f"{method} {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body, expected))
    for path in ["/v1/completions", "/v1/chat/completions", "/v1/adapters/unload"]:
        cases.append((f"GET {path} HTTP/1.1\r\n\r\n".encode(), 405))
    for path in ["/v1/models", "/health"]:
        cases.append((f"POST {path} HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}".encode(), 405))
    for path in ["/", "*", "/v1", "/v1/completions/x", "//v1//models", "/%00", "/\xff\xfe", "http://x/nope", "/a?b=c"]:
        cases.append((f"GET {path} HTTP/1.1\r\n\r\n".encode("latin-1"), 404))
    for version in [
        "HTTP/2.0",
        "HTTP/9.9",
        "HTTP/1",
        "HTTP/x.y",
        "FTP/1.1",
        "HTTP/1.1.1",
        "http/1.1",
        "HTTP/01234567891.1",
    ]:
        cases.append((f"GET /v1/models {version}\r\n\r\n".encode(), 400))
    for line in [b"", b"GET", b"GET /v1/models", b"GET /v1/models HTTP/1.1 extra", b"\x00\x01\x02", b"   "]:
        cases.append((line + b"\r\n\r\n", 400))
    for _ in range(12):  # random bytes, and a TLS ClientHello sent to the plain-HTTP port
        cases.append((bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\r\n\r\n", None))
    cases.append((b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n", 400))
    cases.append((b"GET /" + b"a" * (LIMITS.max_header_bytes + 10) + b" HTTP/1.1\r\n\r\n", 414))
    return cases


def header_cases() -> list[tuple[bytes, int | None]]:
    body = json.dumps(GOOD).encode()

    def request(headers: str, data: bytes = body) -> bytes:
        return f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + data

    big = LIMITS.max_header_bytes
    cases = [
        (request(f"X-Big: {'a' * big}\r\nContent-Length: {len(body)}\r\n"), 431),
        (request("".join(f"X-{i}: {i}\r\n" for i in range(101)) + f"Content-Length: {len(body)}\r\n"), 431),
        (request("".join(f"X-{i}: {'b' * 100}\r\n" for i in range(90)) + f"Content-Length: {len(body)}\r\n"), 431),
        (request(""), 411),  # no Content-Length
        (request("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 411),
        (request(f"Transfer-Encoding: chunked\r\nContent-Length: {len(body)}\r\n"), 411),
        (request(f"Content-Length: {len(body)}\r\nContent-Length: {len(body)}\r\n"), 400),
        (request(f"Content-Length: {LIMITS.max_body_bytes + 1}\r\n"), 413),
        (request(f"Content-Length: {LIMITS.max_body_bytes + 1}\r\n", b"x" * (LIMITS.max_body_bytes + 1)), 413),
        (request(f"Content-Length: {LIMITS.max_body_bytes + 1}\r\nExpect: 100-continue\r\n", b""), 413),
        (request("Content-Length: 99999999999999999999999999\r\n"), 400),
    ]
    for value in ["-1", "abc", "1e3", "+5", "0x10", "", " ", "5 5", "١٢", "-0", "4.0", "\xff"]:
        cases.append((request(f"Content-Length: {value}\r\n"), 400))
    return cases


def truncated_cases() -> list[tuple[bytes, int]]:
    """Bodies shorter than their Content-Length, the connection left open: 408 within read_timeout."""
    body = json.dumps(GOOD).encode()
    head = "POST /v1/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n"
    return [
        (head.format(len(body) + 1).encode() + body, 408),
        (head.format(1000).encode() + body[:5], 408),
        (head.format(10).encode(), 408),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Len", 408),  # headers never finished
        (b"GET /v1/mod", 408),  # the request line never finished
    ]


def test_request_lines_and_headers(server):
    cases = request_line_cases() + header_cases()
    assert len(cases) >= 100
    for i, (data, expected) in enumerate(cases):
        status, headers, body = raw(server, data)
        assert_error(status, headers, body, data[:100])
        assert expected is None or status == expected, (status, body, data[:100])
        if i % 25 == 0:
            assert_alive(server)
    assert_alive(server)


def test_truncated_requests_time_out_with_408(server):
    start = time.monotonic()
    results = [None] * len(truncated_cases())

    def send(i, data):
        results[i] = raw(server, data, wait=LIMITS.read_timeout + 4)

    threads = [threading.Thread(target=send, args=c) for c in enumerate(c[0] for c in truncated_cases())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (status, headers, body), (data, expected) in zip(results, truncated_cases()):
        assert_error(status, headers, body, data)
        assert status == expected
    assert time.monotonic() - start < LIMITS.read_timeout + 4
    assert_alive(server)


def test_head_gets_json_headers_and_no_body(server):
    status, headers, body = raw(server, b"HEAD /v1/completions HTTP/1.1\r\n\r\n")
    assert status == 405 and headers["Content-Type"] == "application/json" and headers["Allow"] == "POST"
    assert body == b"" and int(headers["Content-Length"]) > 0
    status, headers, body = raw(server, b"HEAD /v1/models HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b""


# ----- the grammar: bodies (http.client) ---------------------------------------------------------
WRONG = [True, -1, 1.5, "x", "", [], {}, [1, "a"], {"a": 1}, 10**30, -(10**30), "a" * 300]
# per field, the values among WRONG that a request may legitimately carry (the rest must be refused)
VALID = {
    "model": [],
    "prompt": ["x"],
    "max_tokens": [],
    "temperature": [1.5],
    "top_p": [],
    "stop": ["x", "a" * 300, []],
    "seed": [-1, 10**30, -(10**30)],
    "stream": [True],
    "stream_options": [{}, {"a": 1}],
    "n": [],
    "best_of": [],
    "echo": [True],
    "logprobs": [],
    "suffix": [""],
    "tools": [[]],
}


def is_valid(field: str, value) -> bool:
    return any(type(value) is type(v) and value == v for v in VALID[field])


def body_cases() -> list[tuple[str, bytes]]:
    cases = []
    for path in ["/v1/completions", "/v1/chat/completions", "/v1/adapters/load"]:
        for data in [b"", b"{", b"nul", b"\xff\xfe{}", b'{"model": "\xff"}', b"\xef\xbb\xbf{}", b'{"a": NaN}']:
            cases.append((path, data))
        cases += [(path, b'{"a": 1, "a": 2}'), (path, b'{"a": "\\ud800"}'), (path, b'{"a": ' + b"9" * 5000 + b"}")]
        for depth in (LIMITS.max_json_depth + 1, 1000, 100000):
            cases.append((path, b"[" * depth + b"]" * depth))
            cases.append((path, b'{"a":' * depth + b"1" + b"}" * depth))
        for value in ([], "s", 1, None, True, [GOOD]):
            cases.append((path, json.dumps(value).encode()))
    for field in VALID:
        cases += [("/v1/completions", json.dumps({**GOOD, field: v}).encode()) for v in WRONG if not is_valid(field, v)]
    for field in ("model", "prompt"):  # the required ones
        cases.append(("/v1/completions", json.dumps({k: v for k, v in GOOD.items() if k != field}).encode()))
    for value in WRONG + [None, [1], [{}], [{"role": "x", "content": "y"}], [{"role": "user"}]]:
        cases.append(("/v1/chat/completions", json.dumps({**GOOD_CHAT, "messages": value}).encode()))
    for content in [1, None, [1], [{"type": "image_url", "image_url": "x"}], [{"type": "text", "text": 1}], {}]:
        message = {"role": "user", "content": content}
        cases.append(("/v1/chat/completions", json.dumps({**GOOD_CHAT, "messages": [message]}).encode()))
    for field in ("max_tokens", "max_completion_tokens", "temperature", "stop", "seed", "model", "stream"):
        for value in (1.5, {}, [1], "x" if field == "stream" else True) if field != "temperature" else ("x", -1, 3):
            cases.append(("/v1/chat/completions", json.dumps({**GOOD_CHAT, field: value}).encode()))
    for name in WRONG + ["../sql", "/etc/passwd", "nobody", "a" * 256, "a" * 5000, "sql\x00"]:
        cases.append(("/v1/adapters/load", json.dumps({"name": name}).encode()))
        cases.append(("/v1/completions", json.dumps({**GOOD, "model": name}).encode()))
    cases += [
        ("/v1/completions", json.dumps({**GOOD, "prompt": ["x"] * 5000}).encode()),  # fills no queue
        ("/v1/completions", json.dumps({**GOOD, "prompt": [[1, 2]] * (LIMITS.max_prompts + 1)}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "prompt": [10**9]}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "prompt": [-1]}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "prompt": [[]]}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "prompt": "hello " * 200}).encode()),  # over the context
        ("/v1/completions", json.dumps({**GOOD, "max_tokens": 10**6}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "stop": ["s"] * 17}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "stop": [""]}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "stream_options": {"include_usage": "yes"}}).encode()),
        ("/v1/adapters/load", json.dumps({"name": "sql", "path": "/etc"}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "n": 0}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "n": LIMITS.max_prompts + 1}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "n": 3, "prompt": ["a", "b", "c"]}).encode()),  # 9 > 8 generations
        ("/v1/completions", json.dumps({**GOOD, "logprobs": LIMITS.max_logprobs + 1}).encode()),
        ("/v1/completions", json.dumps({**GOOD, "n": 2, "stream": True}).encode()),
        ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "n": 2, "stream": True}).encode()),
        (
            "/v1/completions",
            json.dumps({**GOOD, "max_tokens": 0, "prompt": [10**6], "echo": True, "logprobs": 1}).encode(),
        ),
        ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "echo": True}).encode()),
        ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "top_logprobs": 2}).encode()),
        ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "logprobs": 1}).encode()),
        ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "logprobs": True, "top_logprobs": -1}).encode()),
        ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "logprobs": True, "top_logprobs": 10**6}).encode()),
        ("/v1/adapters/unload", json.dumps({"name": "poet"}).encode()),  # not loaded
    ]
    return cases


def test_bodies(server):
    cases = body_cases()
    assert len(cases) >= 200
    for i, (path, data) in enumerate(cases):
        status, body, headers = post(server, path, data)
        assert_error(status, headers, body, (path, data[:120]))
        if i % 50 == 0:
            assert_alive(server)
    assert_alive(server)
    assert len(server.app.engine.waiting) == 0 and not server.app.engine.adapters.holds
    # legal but extreme: a denormal temperature samples the likeliest token (not NaN, failing the batch)
    status, body, _ = post(server, "/v1/completions", json.dumps({**GOOD, "temperature": 5e-324}).encode())
    assert status == 200 and body["choices"][0]["text"] == server.expected


def test_expect_100_continue_then_the_body(server):
    """curl's large POSTs: the go-ahead comes once the size is acceptable, then the answer."""
    body = json.dumps(GOOD).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        received = b""
        while not _complete(received, head_only=False):
            received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    assert json.loads(received.partition(b"\r\n\r\n")[2])["choices"][0]["text"] == server.expected
