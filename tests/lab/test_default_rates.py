"""The default-rates sweep: its tasks are real, disjoint and balanced; "within reach" and the report."""

import pytest

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
    assert {s["lr"] for s in dr.settings(lm)} == set(dr.CAUSAL_LRS)
    runs = [(s["lr"], s["head_lr"], s["seed"]) for s in dr.settings(cls)]
    assert {lr for lr, _, _ in runs} == set(dr.SEQ_CLS_LRS) and {s for *_, s in runs} == {0}
    assert len(set(runs)) == len(runs) and all(lr != head for lr, head, _ in runs)  # no setting run twice
    assert dr._key(lm, dr.settings(lm)[0]) == dr._key(lm, {"lr": dr.CAUSAL_LRS[0], "head_lr": None})  # cache


def test_seeds_are_averaged_per_setting():
    runs = [_run("c1", 1e-3, None, 0.8) | {"seed": 0}, _run("c1", 1e-3, None, 0.9) | {"seed": 1}]
    runs.append(_run("c1", 3e-3, None, 0.7))
    merged = {(r["lr"], r["seeds"]): r for r in dr.mean_over_seeds(runs)}
    assert merged[(1e-3, 2)]["accuracy"] == pytest.approx(0.85) and merged[(3e-3, 1)]["accuracy"] == 0.7


def _run(task, lr, head_lr, value):
    kind = "seq-cls" if task.startswith("c") else "causal-lm"
    return {"task": task, "kind": kind, "lr": lr, "head_lr": head_lr, "accuracy": value, "loss": value}


def test_choose_prefers_the_smallest_worst_gap_within_reach_everywhere():
    runs = [
        _run("c1", 1e-3, None, 0.90),  # best on c1, 5 points off on c2
        _run("c2", 1e-3, None, 0.80),
        _run("c1", 3e-3, None, 0.89),  # 1 point off on c1, best on c2 -> chosen
        _run("c2", 3e-3, None, 0.85),
        _run("c1", 1e-2, 3e-2, 0.885),  # within reach on both but a worse worst gap (1.5 points)
        _run("c2", 1e-2, 3e-2, 0.84),
        _run("c1", 3e-2, None, 0.95),  # run on one task only: never chosen
    ]
    picked = dr.choose(runs[:6], ["c1", "c2"])
    assert picked == {"lr": 3e-3, "head_lr": None, "worst_gap": pytest.approx(1.0), "everywhere": True}
    picked = dr.choose(runs, ["c1", "c2"])  # the best on c1 is now 5+ points above every complete setting
    assert picked == {"lr": 1e-3, "head_lr": None, "worst_gap": pytest.approx(5.0), "everywhere": False}
    lm = [_run("l1", 1e-3, None, 2.0), _run("l1", 3e-3, None, 2.03)]
    assert dr.choose(lm, ["l1"]) == {"lr": 1e-3, "head_lr": None, "worst_gap": 0.0, "everywhere": True}
    assert dr.choose(lm, ["l1", "l2"]) is None


def test_contenders_are_close_everywhere_or_best_somewhere():
    runs = [
        _run("c1", 1e-3, None, 0.90),
        _run("c2", 1e-3, None, 0.70),  # 15 points off on c2, but the best on c1
        _run("c1", 3e-3, None, 0.86),
        _run("c2", 3e-3, None, 0.85),  # best on c2, 4 points off on c1
        _run("c1", 1e-2, None, 0.80),
        _run("c2", 1e-2, None, 0.84),  # 10 points off on c1, best on neither
    ]
    assert dr.contenders(runs, ["c1", "c2"]) == [(1e-3, None), (3e-3, None)]
    assert dr.contenders(runs[:2], ["c1", "c2"]) == [(1e-3, None)]
    assert dr.contenders(runs[:1], ["c1", "c2"]) == []  # c2 not measured yet


def test_a_pair_far_off_on_one_task_is_not_run_on_the_next():
    task = next(t for t in dr.tasks(quick=True) if t.name == "play-genre")
    runs = [_run("c1", 1e-3, None, 0.90), _run("c1", 1e-2, None, 0.79), _run("c1", 3e-3, None, 0.81)]
    assert not dr.far_off(runs, task, {"lr": 3e-3, "head_lr": None, "seed": 0})  # 9 points off: still run
    assert dr.far_off(runs, task, {"lr": 1e-2, "head_lr": None, "seed": 0})  # 11 points off
    assert not dr.far_off(runs, task, {"lr": 1e-2, "head_lr": 3e-2, "seed": 0})  # never run elsewhere
    assert not dr.far_off(runs, task, {"lr": 1e-2, "head_lr": None, "seed": 1})  # a contender's seeds all run
