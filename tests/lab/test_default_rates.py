"""The default-rates sweep: its tasks are real, disjoint and balanced; "within reach" and the report."""

from lorakit_lab import default_rates as dr


def test_tasks_are_real_disjoint_and_sized():
    tasks = {t.name: t for t in dr.tasks(quick=True)}
    assert [t.kind for t in tasks.values()].count("seq-cls") == 3
    for task in tasks.values():
        train, held = task.rows
        assert train and held
        key = "messages" if task.name == "sentiment-chat" else ("prompt" if task.name == "chatbot-qa" else "text")
        seen = {str(r[key]) for r in train}
        assert not any(str(r[key]) in seen for r in held), task.name  # no held-out row is trained on
    genres = {r["label"] for r in tasks["play-genre"].rows[0]}
    assert genres == {"comedies", "histories", "tragedies"}
    assert {r["label"] for r in tasks["chatbot-topic"].rows[0]} <= set(dr.TOPICS)


def test_within_reach_and_the_grid():
    best = {"kind": "seq-cls", "accuracy": 0.90}
    assert dr.within_reach({"kind": "seq-cls", "accuracy": 0.881}, best)
    assert not dr.within_reach({"kind": "seq-cls", "accuracy": 0.87}, best)
    best = {"kind": "causal-lm", "loss": 2.0}
    assert dr.within_reach({"kind": "causal-lm", "loss": 2.039}, best)
    assert not dr.within_reach({"kind": "causal-lm", "loss": 2.05}, best)
    cls, lm = (next(t for t in dr.tasks(quick=True) if t.kind == k) for k in ("seq-cls", "causal-lm"))
    assert all(s["head_lr"] is None for s in dr.settings(lm))
    assert {s["lr"] for s in dr.settings(cls)} == set(dr.LRS)
    assert any(s["head_lr"] is not None for s in dr.settings(cls))
