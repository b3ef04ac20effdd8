"""`lorakit serve` end to end: the official openai client against a server on 127.0.0.1.

Every generated text is checked against the independent reference in serve_assets: the same
request run alone, on a separate model, through HF generate with the single-adapter path.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_assets import ADAPTERS, Reference, build_assets

from lorakit.models import load_model, load_tokenizer
from lorakit.serve import create_server

BASE = "tiny-llama"
PROMPTS = ["SELECT name FROM", "Shall I compare", "The quick brown", "def add(a, b):", "Hello world"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapters_dir = build_assets(root)
    server = create_server(
        load_model(str(model_dir)),
        load_tokenizer(str(model_dir)),
        adapters_dir,
        name=BASE,
        port=0,
        max_batch=8,
        max_adapters=2,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield server, client, Reference(model_dir, adapters_dir), adapters_dir
    server.close()


def post(server, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_concurrent_completions_equal_each_adapter_alone(served):
    """Requests for different adapters (and the base) are batched together, with LRU size 2 < 3."""
    server, client, reference, _ = served
    jobs = [
        (name, prompt, 4 + (i % 5))
        for i, (name, prompt) in enumerate((n, p) for p in PROMPTS for n in [BASE, *ADAPTERS])
    ]

    def ask(job):
        name, prompt, max_tokens = job
        return client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, prompt, max_tokens), answer in zip(jobs, answers):
        expected = reference.text(None if name == BASE else name, prompt, max_tokens)
        assert answer.choices[0].text == expected, (name, prompt)
        assert answer.model == name and answer.object == "text_completion"
        assert answer.usage.completion_tokens <= max_tokens
    assert server.app.engine.stats["max_rows"] > 1  # they really shared batches
    assert len(server.app.engine.adapters.loaded) <= 2


def test_chat_streaming_and_multiple_prompts(served):
    _, client, reference, _ = served
    messages = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": "Hello there"}]
    chunks = list(
        client.chat.completions.create(
            model="poet",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.chat("poet", messages, 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens <= 12 and not chunks[-1].choices

    whole = client.chat.completions.create(model="poet", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == text and whole.object == "chat.completion"

    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=9, temperature=0, stream=True)
    )
    assert streamed == reference.text("sql", PROMPTS[0], 9)
    several = client.completions.create(model="dora_bot", prompt=PROMPTS[:3], max_tokens=5, temperature=0)
    assert [c.text for c in several.choices] == [reference.text("dora_bot", p, 5) for p in PROMPTS[:3]]


def test_stop_strings_and_seeded_sampling(served):
    _, client, reference, _ = served
    full = reference.text("sql", PROMPTS[1], 12)
    stop = full[3:5]
    cut = client.completions.create(model="sql", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="sql", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == cut.choices[0].text

    def sample(seed):
        return (
            client.completions.create(
                model="poet", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(4) as pool:  # the same seed gives the same text, batched or not
        texts = list(pool.map(sample, [7, 7, 8, 7]))
    assert texts[0] == texts[1] == texts[3] == sample(7)


def test_models_and_adapter_management(served):
    server, client, reference, adapters_dir = served
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE and sorted(ids[1:]) == sorted(ADAPTERS)

    # a new adapter folder appears while serving: listed, hot-loaded on request, base untouched
    shutil.copytree(adapters_dir / "poet", adapters_dir / "poet2")
    assert "poet2" in [m.id for m in client.models.list().data]
    status, body = post(server, "/v1/adapters/load", json.dumps({"name": "poet2"}).encode())
    assert status == 200 and body["loaded"] and body["load_ms"] < 1000
    answer = client.completions.create(model="poet2", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert answer.choices[0].text == reference.text("poet", PROMPTS[3], 6)
    base = client.completions.create(model=BASE, prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert base.choices[0].text == reference.text(None, PROMPTS[3], 6)
    status, body = post(server, "/v1/adapters/unload", json.dumps({"name": "poet2"}).encode())
    assert status == 200 and "poet2" not in body["in_memory"]
    assert post(server, "/v1/adapters/unload", json.dumps({"name": "poet2"}).encode())[0] == 404
    assert post(server, "/v1/adapters/load", json.dumps({"name": "missing"}).encode())[0] == 404
    assert post(server, "/v1/adapters/load", json.dumps({"name": "x", "path": "/etc"}).encode())[0] == 400


def test_errors_are_openai_shaped(served, tmp_path):
    server, client, _, adapters_dir = served
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nobody", prompt="x", max_tokens=2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="sql", prompt="hello " * 60, max_tokens=8)
    assert err.value.code == "context_length_exceeded"
    for name in ("../adapters/sql", "/etc/passwd", "sql/../poet", ".."):
        with pytest.raises(openai.BadRequestError, match="plain identifier"):
            client.completions.create(model=name, prompt="x", max_tokens=2)
    outside = tmp_path / "outside"
    shutil.copytree(adapters_dir / "sql", outside)
    os.symlink(outside, adapters_dir / "escape")
    with pytest.raises(openai.BadRequestError, match="outside the adapters directory"):
        client.completions.create(model="escape", prompt="x", max_tokens=2)
    assert "escape" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="sql", prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="sql", prompt="x", max_tokens=2, best_of=3)

    status, body = post(server, "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    status, body = post(server, "/v1/chat/completions", json.dumps({"model": BASE, "messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(server, "/v1/completions", json.dumps({"prompt": "x"}).encode())
    assert status == 400 and body["error"]["param"] == "model"
    assert post(server, "/v1/nothing", b"{}")[0] == 404
