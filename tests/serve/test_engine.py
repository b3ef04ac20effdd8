"""The continuous-batching engine, stepped by hand so requests join mid-generation deterministically.

Every request's tokens must equal what the reference (the same adapter alone, HF generate) gives.
"""

from __future__ import annotations

import pytest
import torch
from serve_assets import ADAPTERS, Reference, build_assets, build_model, randomize

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import AdapterCache, Engine, SamplingParams


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    model_dir, adapters_dir = build_assets(tmp_path_factory.mktemp("engine"))
    return model_dir, adapters_dir, Reference(model_dir, adapters_dir)


def make_engine(model_dir, adapters_dir, capacity=8, **kwargs):
    tokenizer = load_tokenizer(str(model_dir))
    cache = AdapterCache(load_model(str(model_dir)), adapters_dir, capacity=capacity)
    return Engine(
        cache.model, cache, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.eos_token_id, **kwargs
    )


def prompts(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 300, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
        for _ in range(count)
    ]


def tokens_and_reason(request):
    events = list(request.events.queue)
    return [v for k, v in events if k == "token"], events[-1] if events and events[-1][0] != "token" else None


def test_requests_joining_between_decode_steps_match_alone(assets):
    model_dir, adapters_dir, reference = assets
    engine = make_engine(model_dir, adapters_dir, capacity=1, max_batch=5, max_prefill_tokens=30)
    names = [None, *ADAPTERS]
    jobs = []
    for wave in range(4):  # new requests arrive while earlier ones are mid-generation
        for i, ids in enumerate(prompts(4, seed=wave)):
            name, max_tokens = names[(wave + i) % len(names)], 3 + (wave * 4 + i) % 9
            jobs.append(
                (name, ids, max_tokens, engine.submit(ids, name, SamplingParams(max_tokens=max_tokens, temperature=0)))
            )
        for _ in range(wave + 1):
            engine.step()
        assert len(engine.rows) <= 5
    while engine.step():
        pass
    for name, ids, max_tokens, request in jobs:
        got, done = tokens_and_reason(request)
        assert got == reference.ids(name, ids, max_tokens), (name, ids)
        assert done == ("done", "length" if len(got) == max_tokens else "stop")
    assert engine.stats["max_rows"] == 5 and engine.stats["requests"] == len(jobs)
    assert engine.adapters.holds == {} and len(engine.adapters.loaded) == 1  # held ones exceeded it, then evicted
    assert engine.cache is None and engine.mask is None


def test_cancel_and_padding_trim(assets):
    model_dir, adapters_dir, reference = assets
    engine = make_engine(model_dir, adapters_dir)
    long = engine.submit(list(range(1, 40)), "sql", SamplingParams(max_tokens=3, temperature=0))
    short = engine.submit([5, 6], "poet", SamplingParams(max_tokens=20, temperature=0))
    gone = engine.submit([7, 8, 9], "dora_bot", SamplingParams(max_tokens=20, temperature=0))
    engine.step()
    assert engine.mask.shape[1] == 40  # 39 prompt tokens + 1 decoded, the short rows left-padded
    gone.cancel()
    for _ in range(3):
        engine.step()
    assert tokens_and_reason(long)[1] == ("done", "length")
    assert tokens_and_reason(gone)[1] == ("done", "cancelled")
    assert len(engine.rows) == 1 and engine.mask.shape[1] == 2 + 4  # only `short` is left: its 2 + 4 tokens, no padding
    while engine.step():
        pass
    assert tokens_and_reason(short)[0] == reference.ids("poet", [5, 6], 20)
    assert engine.adapters.holds == {}


def test_bad_requests_and_adapters_are_refused(assets, tmp_path):
    model_dir, adapters_dir, _ = assets
    engine = make_engine(model_dir, adapters_dir)
    with pytest.raises(LorakitError, match="maximum context length is 64"):
        engine.submit([1] * 60, None, SamplingParams(max_tokens=5))
    with pytest.raises(LorakitError, match="empty"):
        engine.submit([], None, SamplingParams())
    with pytest.raises(LorakitError, match="does not exist"):
        engine.submit([1], "nope", SamplingParams())
    with pytest.raises(LorakitError, match="temperature"):
        SamplingParams(temperature=-1)

    model = build_model(320, 0)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], bias="all"), name="biased")
    randomize(model, "biased", 0)
    lorakit.save_adapter(model, tmp_path / "biased", name="biased")
    cache = AdapterCache(build_model(320, 0), tmp_path)
    with pytest.raises(LorakitError, match="trains biases"):
        cache.acquire("biased")
    assert cache.available() == ["biased"] and not cache.loaded


def test_hot_load_and_unload_touch_nothing_else(assets):
    """Loads freeze only the new tensors (freeze=False); loads, unloads and mixed batches never
    write a base weight (all adapters unloaded: the same state dict, bit for bit)."""
    _, adapters_dir, _ = assets
    model = build_model(320, 0)
    cache = AdapterCache(model, adapters_dir)
    assert not any(p.requires_grad for p in model.parameters())
    model.lm_head.weight.requires_grad_(True)  # someone's choice after start: hot loads leave it alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache.load("poet")
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.lora_A["poet"].requires_grad and model.lm_head.weight.requires_grad

    cache.load("dora_bot")
    cache.unload("poet")
    with torch.no_grad(), lorakit.per_row(model, ["dora_bot", None]):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    cache.unload("dora_bot")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # base never written


def test_server_closes_cleanly_without_ever_serving(assets):
    from lorakit.serve import create_server

    model_dir, adapters_dir, _ = assets
    server = create_server(load_model(str(model_dir)), load_tokenizer(str(model_dir)), adapters_dir, port=0)
    server.close()  # returns: the engine thread stops and the port is released
    assert server.app.engine._thread is None
