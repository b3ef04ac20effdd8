"""Real-data helpers, checked against the raw package files and the datasets' documented facts."""

import inspect
import json
import json.decoder

import pytest
import yaml

from lorakit import LorakitError
from lorakit_lab import real_data as lkd


def test_movie_reviews_match_the_published_ground_truth():
    everything = lkd.movie_reviews(include_neutral=True)
    assert len(everything) == 10605  # Hutto & Gilbert (ICWSM 2014): 10,605 movie-review snippets
    assert everything[0]["text"].startswith("The Rock is destined to be the 21st Century's new")
    assert everything[0]["score"] == pytest.approx(2.26666666667)
    rows = lkd.movie_reviews()
    assert {r["label"] for r in rows} == {"positive", "negative"}
    assert all((r["score"] > 0.5) == (r["label"] == "positive") and abs(r["score"]) > 0.5 for r in rows)
    assert len(rows) == sum(abs(r["score"]) > 0.5 for r in everything)


def test_shakespeare_speeches_parse_the_markdown():
    hamlet = lkd.shakespeare_speeches(["hamlet"])
    assert hamlet[0] == {"play": "hamlet", "speaker": "BERNARDO", "text": "Who's there?"}
    assert hamlet[3]["text"] == "Bernardo?"
    soliloquy = next(r for r in hamlet if r["text"].startswith("To be, or not to be"))
    assert soliloquy["speaker"] == "HAMLET"
    assert not any("**" in r["text"] or r["text"].startswith("_") for r in hamlet)
    assert len(lkd.shakespeare_plays()) == 38 and "macbeth" in lkd.shakespeare_plays(["tragedies"])
    with pytest.raises(LorakitError, match="unknown play"):
        lkd.shakespeare_speeches(["hamlet-ii"])


def test_chatterbot_pairs_and_stdlib_sources(tmp_path):
    raw = yaml.safe_load(open(lkd._package_dir("chatterbot_corpus", "") / "data/english/ai.yml"))
    pairs = lkd.chatterbot_pairs(["ai"])
    assert len(pairs) == sum(len(c) - 1 for c in raw["conversations"])
    assert pairs[0] == {"category": "ai", "prompt": "What is AI?", "completion": raw["conversations"][0][1]}
    chat = lkd.as_messages(pairs[:1], system="Be brief.")
    assert [m["role"] for m in chat[0]["messages"]] == ["system", "user", "assistant"]
    assert lkd.stdlib_sources(["json"])["json/decoder.py"] == inspect.getsource(json.decoder)

    train, held = lkd.split(list(range(100)), 0.2, seed=3)
    assert len(held) == 20 and sorted(train + held) == list(range(100))
    assert lkd.split(list(range(100)), 0.2, seed=3) == (train, held)
    path = lkd.write_jsonl(pairs[:3], tmp_path / "d.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == pairs[:3] == lkd.read_jsonl(path)
