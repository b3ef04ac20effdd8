"""Streaming text with stop strings and unfinished UTF-8, and the sampler."""

from __future__ import annotations

import pytest
import torch

from lorakit import LorakitError
from lorakit.serve.sampling import SamplingParams, sample_rows
from lorakit.serve.text import TextStream

BYTES = [bytes([b]) for b in range(256)]


def byte_decode(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def feed(stream, text: str):
    out, stops = [], []
    for b in text.encode():
        delta, stopped = stream.push(b)
        out.append(delta)
        stops.append(stopped)
    return out, stops


def test_stop_strings_are_cut_and_never_leak():
    stream = TextStream(byte_decode, ["END", "xyz"])
    deltas, stops = feed(stream, "abc EN dEND tail")
    sent = "".join(deltas)
    assert sent == "abc EN d" and stops.index(True) == len("abc EN dEND") - 1
    assert "E" not in deltas[4]  # "E" was held back until "EN " proved it was no stop
    assert stream.finish() == ""


def test_unfinished_utf8_is_held_back_and_flushed():
    stream = TextStream(byte_decode, [])
    deltas, _ = feed(stream, "né€")
    assert "".join(deltas) == "né€" and all("\ufffd" not in d for d in deltas)
    stream = TextStream(byte_decode, [])
    stream.push("€".encode()[0])
    assert stream.text == "" and stream.finish() == "\ufffd"  # an unfinished character at the end is still sent


def test_sampling_params_validation():
    for bad, match in (
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"seed": "1"}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
    ):
        with pytest.raises(LorakitError, match=match):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"]


def test_sampler_greedy_nucleus_seed_and_distribution():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0)
    assert sample_rows(logits, [greedy, greedy], [None, None]) == [1, 0]
    tiny = SamplingParams(temperature=5e-324)  # no overflow to NaN: the most likely token, always
    assert sample_rows(logits, [tiny, tiny], [tiny.generator(), tiny.generator()]) == [1, 0]
    tight = SamplingParams(temperature=1.0, top_p=0.0)
    assert all(sample_rows(logits, [tight, tight], [tight.generator(), tight.generator()]) == [1, 0] for _ in range(20))

    seeded = SamplingParams(temperature=1.0, seed=5)

    def draw():
        g = seeded.generator()  # a fresh generator from the same seed
        return [sample_rows(logits[:1], [seeded], [g])[0] for _ in range(30)]

    assert draw() == draw() and len(set(draw())) > 1

    params = SamplingParams(temperature=0.5, seed=0)
    g = params.generator()
    counts = torch.bincount(torch.tensor([sample_rows(logits[:1], [params], [g])[0] for _ in range(3000)]), minlength=4)
    expected = torch.softmax(logits[0] / 0.5, 0) * 3000
    assert ((counts - expected).abs() < 5 * expected.sqrt() + 5).all()

    nucleus = SamplingParams(
        temperature=1.0, top_p=0.6, seed=1
    )  # p = .64 (token 1), .24, .09, .03: the 0.6 nucleus is token 1
    g = nucleus.generator()
    assert {sample_rows(logits[:1], [nucleus], [g])[0] for _ in range(50)} == {1}
