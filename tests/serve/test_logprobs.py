"""logprobs, echo and n on `lorakit serve`, checked against an independent reference: a plain forward of
a separately loaded transformers model with the request's adapter (lorakit.set_adapter, the single-
adapter path), log_softmax over the whole sequence. Requests for different adapters run at once, so
their tokens are decoded in mixed batches (and echoed prompts scored between engine steps).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import torch
from serve_assets import ADAPTERS, Reference, build_assets

import lorakit
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import create_server

BASE = "tiny-llama"
PROMPTS = ["SELECT name FROM users", "Shall I compare thee", "def add(a, b):", "The quick brown fox"]
TOL = 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir, adapters_dir = build_assets(tmp_path_factory.mktemp("logprobs"))
    server = create_server(
        load_model(str(model_dir)), load_tokenizer(str(model_dir)), adapters_dir, name=BASE, port=0, max_batch=8
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield server, client, Reference(model_dir, adapters_dir)
    server.close()


def reference_logprobs(reference: Reference, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:i+1]) for every position i: (len(ids), vocab), from one plain forward."""
    lorakit.set_adapter(reference.model, adapter)
    with torch.no_grad():
        logits = reference.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def check_tokens(logprobs, ids: list[int], expected: torch.Tensor, k: int, first: int, decode) -> None:
    """Entries first.. of a completions logprobs object against the reference rows for ids: the chosen
    token's logprob, and top_logprobs = {text: logprob} of the k likeliest and the chosen token (a text
    that several tokens decode to, such as bytes of one character, keeps the likeliest)."""
    for i in range(first, len(ids)):
        row = expected[i - 1]
        assert logprobs.token_logprobs[i] == pytest.approx(float(row[ids[i]]), abs=TOL), i
        values, top = row.topk(k)
        want = {}
        for t, v in [*zip(top.tolist(), values.tolist()), (ids[i], float(row[ids[i]]))]:
            want.setdefault(decode([t]), v)
        assert logprobs.top_logprobs[i] == pytest.approx(want, abs=TOL), i


def models():
    return [BASE, *ADAPTERS]


def test_echo_scores_prompts_with_each_adapter(served):
    """What lm-eval's loglikelihood sends: max_tokens 0, echo, logprobs; several prompts per request."""
    _, client, reference = served

    def ask(model):
        return model, client.completions.create(model=model, prompt=PROMPTS, max_tokens=0, echo=True, logprobs=3)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, models()))
    for model, answer in answers:
        adapter = None if model == BASE else model
        assert [c.index for c in answer.choices] == list(range(len(PROMPTS)))
        for choice, prompt in zip(answer.choices, PROMPTS):
            ids = reference.tokenizer(prompt)["input_ids"]
            lp = choice.logprobs
            assert choice.text == prompt and choice.finish_reason == "length"
            assert lp.tokens == [reference.tokenizer.decode([t]) for t in ids]
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
            assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
            check_tokens(lp, ids, reference_logprobs(reference, adapter, ids), 3, 1, reference.tokenizer.decode)
        assert answer.usage.completion_tokens == 0


def test_generated_tokens_logprobs_in_mixed_batches(served):
    _, client, reference = served
    jobs = [(m, p) for p in PROMPTS for m in models()]

    def ask(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, prompt), answer in zip(jobs, answers):
        adapter = None if model == BASE else model
        prompt_ids = reference.tokenizer(prompt)["input_ids"]
        generated = reference.ids(adapter, prompt_ids, 6)
        eos = [reference.tokenizer.eos_token_id] if len(generated) < 6 else []  # it ended the text
        lp = answer.choices[0].logprobs
        assert lp.tokens == [reference.tokenizer.decode([t]) for t in generated + eos]
        expected = reference_logprobs(reference, adapter, prompt_ids + generated + eos)
        full = SimpleNamespace(
            tokens=[""] * len(prompt_ids) + lp.tokens,
            token_logprobs=[None] * len(prompt_ids) + lp.token_logprobs,
            top_logprobs=[None] * len(prompt_ids) + lp.top_logprobs,
        )
        check_tokens(full, prompt_ids + generated + eos, expected, 2, len(prompt_ids), reference.tokenizer.decode)


def test_echo_with_generation_is_what_lm_eval_sends(served):
    """max_tokens 1 + echo + logprobs 1: the prompt's tokens, then the generated one, in one list."""
    _, client, reference = served
    for model in ("sql", "dora_bot"):
        answer = client.completions.create(
            model=model, prompt=PROMPTS[1], max_tokens=1, temperature=0, echo=True, logprobs=1, seed=1234
        )
        ids = reference.tokenizer(PROMPTS[1])["input_ids"]
        generated = reference.ids(model, ids, 1)
        full = ids + (generated or [reference.tokenizer.eos_token_id])
        lp = answer.choices[0].logprobs
        assert len(lp.tokens) == len(full) and lp.token_logprobs[0] is None
        assert answer.choices[0].text == PROMPTS[1] + reference.tokenizer.decode(generated)
        check_tokens(lp, full, reference_logprobs(reference, model, full), 1, 1, reference.tokenizer.decode)


def test_token_id_prompts_and_n_choices(served):
    _, client, reference = served
    ids = [reference.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    answer = client.completions.create(model="poet", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    for choice, prompt_ids in zip(answer.choices, ids):
        assert choice.text == reference.tokenizer.decode(prompt_ids)
        assert all(len(t) == 1 for t in choice.logprobs.top_logprobs[1:])  # k=0: the chosen token only
        expected = reference_logprobs(reference, "poet", prompt_ids)
        check_tokens(choice.logprobs, prompt_ids, expected, 0, 1, reference.tokenizer.decode)

    sampled = client.completions.create(model="poet", prompt=PROMPTS[:2], max_tokens=5, temperature=1, n=3, seed=7)
    assert [c.index for c in sampled.choices] == list(range(6))  # prompt-major: prompt k, sample j -> 3k + j
    again = client.completions.create(model="poet", prompt=PROMPTS[:2], max_tokens=5, temperature=1, n=3, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # seeded: reproducible
    assert len({c.text for c in sampled.choices[:3]}) > 1  # ... and the n samples differ
    greedy = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=5, temperature=0, n=2)
    assert [c.text for c in greedy.choices] == [reference.text("sql", PROMPTS[0], 5)] * 2
    assert greedy.usage.prompt_tokens == len(reference.tokenizer(PROMPTS[0])["input_ids"])  # counted once


def test_chat_logprobs(served):
    _, client, reference = served
    messages = [{"role": "user", "content": "Hello there"}]
    answer = client.chat.completions.create(
        model="dora_bot", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, n=2
    )
    text = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    generated = reference.ids("dora_bot", prompt_ids, 5)
    expected = reference_logprobs(reference, "dora_bot", prompt_ids + generated)
    assert [c.index for c in answer.choices] == [0, 1]
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content][: len(generated)] == [reference.tokenizer.decode([t]) for t in generated]
    for i, item in enumerate(content[: len(generated)]):
        row = expected[len(prompt_ids) - 1 + i]
        assert item.logprob == pytest.approx(float(row[generated[i]]), abs=TOL)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=TOL)
        assert item.bytes == list(item.token.encode())
    plain = client.chat.completions.create(model="dora_bot", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_and_echo_equal_the_whole_answer(served):
    _, client, _ = served
    args = dict(model="sql", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=2, echo=True, stop=["zz"])
    whole = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text and chunks[0].text == PROMPTS[2]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(c.logprobs, field) for c in chunks if c.logprobs), []) == getattr(whole.logprobs, field)

    messages = [{"role": "user", "content": "SELECT"}]
    chat = dict(model="poet", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**chat).choices[0]
    chunks = [c.choices[0] for c in client.chat.completions.create(**chat, stream=True) if c.choices]
    streamed = [item for c in chunks if c.logprobs for item in c.logprobs.content]
    assert [i.model_dump() for i in streamed] == [i.model_dump() for i in whole.logprobs.content]
    assert "".join(c.delta.content or "" for c in chunks) == whole.message.content
