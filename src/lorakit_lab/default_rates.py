"""Which learning rates should `lorakit train` use when the user gives none? A sweep on real tasks.

Six real tasks, three of each kind, each trained by the real engine (`lorakit.train.train`, the
code behind `lorakit train`) with every setting at its default except the learning rates:

  seq-cls on all-MiniLM-L6-v2 (a new classifier head, trained in full beside the adapter), 3 epochs
  of 200 examples (75 steps at batch 8), scored by held-out accuracy on 150 examples:
    sentiment-cls    movie-review sentences, positive / negative
    chatbot-topic    chatterbot-corpus exchanges, 5 topics (tech support, trivia, emotion, coding, AI)
    play-genre       Shakespeare speeches: comedy, history or tragedy (never the same play in both splits)
  causal-lm on SmolLM2-135M-Instruct, one epoch of 128 examples (16 steps at batch 8), scored by
  held-out loss on the supervised tokens of 32 examples:
    sentiment-chat   the demo's task: a review as chat, the loss on the one-word answer only
    chatbot-qa       chatterbot exchanges as prompt / completion, loss on the completion
    shakespeare      Shakespeare speeches as plain text, every token supervised

Grid, where an earlier partial sweep pointed (AMD EPYC, 2026-12-02 morning: the old default lr 2e-4
was 5-43 points / 14-1140% off the best on every task it ran on, so it is no longer run; an adapter
and head at 3e-3 beat lr 1e-3 with the head at 1e-2 on the seq-cls tasks it reached): seq-cls, the
adapter lr in 1e-3, 3e-3, 1e-2 with the head at the same rate, at 1e-2 or at 3e-2; causal-lm, lr
1e-3, 3e-3 and 1e-2 (no head to train; 1e-2 because 3e-3 beat 1e-3 on every causal task). A setting
is "within reach" of a task's best when its accuracy is at most 2 points below the best (seq-cls) or
its loss at most 2% above the best (causal-lm); the tables give each setting's worst gap to the best
over the tasks, and the defaults are the setting with the smallest worst gap (the one likeliest to
hold on tasks not in the sweep; the report says whether it is within reach of every task). Seeds (adapter and head
initialisation, data order): one 150-example accuracy has a standard error of ~3-4 points, larger
than the 2-point margin, so the seq-cls contenders (pairs within 5 points of every task's best at
seed 0, or the best on one) also run at seed 1 and are scored by their mean accuracy; causal-lm,
~10x dearer per run, one seed.

Each finished run is appended to a cache (lorakit's cache folder, default-rates/runs.jsonl), so an
interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.models import SMOLLM2, cache_dir

from . import real_data
from .params import minilm_path
from .report import Report, fmt

TITLE = "Default learning rates from a sweep on real tasks"
SEQ_CLS_LRS = (1e-3, 3e-3, 1e-2)
HEAD_LRS = (None, 1e-2, 3e-2)  # None: the head at the adapter's rate
CAUSAL_LRS = (1e-3, 3e-3, 1e-2)  # 1e-2: 3e-3 beat 1e-3 on all three causal tasks, so the grid goes past it
SEQ_CLS_SEEDS = (0, 1)  # seeds past the first: only for contenders (see `contenders`)
FAR_OFF = 10.0  # points: a seq-cls pair this far below one task's best is not run on the rest (it cannot be chosen)
CONTENDER_GAP = 5.0  # points: a seq-cls pair this close to every task's best at seed 0 is run at the other seeds
# the likeliest defaults first, so a sweep cut short has them for every task: (lr, head_lr)
PRIORITY = ((3e-3, None), (3e-3, 1e-2), (1e-3, None), (1e-3, 1e-2))
SYSTEM = "Classify the sentiment of the movie review as positive or negative."
TOPICS = ("tech_support", "trivia", "emotion", "coding", "ai")
GENRES = ("comedies", "histories", "tragedies")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # causal-lm | seq-cls
    model: str
    rows: tuple[list[dict], list[dict]]  # (train, held out)
    epochs: float
    max_length: int
    description: str


def _take(rows: list[dict], n: int, seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _unique(rows: list[dict], key: str) -> list[dict]:
    """The first row of each distinct `key` (chatterbot repeats some lines across conversations)."""
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row[key], row)
    return list(seen.values())


def _balanced(rows: list[dict], key: str, per_class: int, seed: int) -> list[dict]:
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row[key], []).append(row)
    return _take([r for group in by_class.values() for r in _take(group, per_class, seed)], 10**9, seed)


def tasks(quick: bool) -> list[Task]:
    n_cls, n_eval_cls, n_lm, n_eval_lm = (48, 40, 16, 16) if quick else (200, 150, 128, 32)
    minilm = str(minilm_path())
    reviews = real_data.movie_reviews()
    train, held = real_data.split(reviews, eval_fraction=0.1, seed=0)
    sentiment_cls = tuple(
        [{"text": r["text"], "label": r["label"]} for r in _take(part, n, 1)]
        for part, n in ((train, n_cls), (held, n_eval_cls))
    )

    pairs = real_data.chatterbot_pairs(list(TOPICS))
    topics = _balanced(
        _unique([{"text": f"{p['prompt']} {p['completion']}", "label": p["category"]} for p in pairs], "text"),
        "label",
        100,
        2,
    )
    cut = round(len(topics) * 0.6)
    chatbot_topic = (topics[:cut][:n_cls], topics[cut:][:n_eval_cls])

    speeches = real_data.shakespeare_speeches(min_chars=120, max_chars=400)
    genre_of = {play: g for g in GENRES for play in real_data.shakespeare_plays([g])}
    plays = sorted({s["play"] for s in speeches if s["play"] in genre_of})
    held_plays = {p for i, p in enumerate(sorted(plays, key=lambda p: (genre_of[p], p))) if i % 4 == 0}
    genre_rows = [
        {"text": s["text"], "label": genre_of[s["play"]], "play": s["play"]} for s in speeches if s["play"] in genre_of
    ]
    play_genre = tuple(
        [{"text": r["text"], "label": r["label"]} for r in _balanced(part, "label", n, 3)]
        for part, n in (
            ([r for r in genre_rows if r["play"] not in held_plays], n_cls // 3),
            ([r for r in genre_rows if r["play"] in held_plays], n_eval_cls // 3),
        )
    )

    def chat(row):
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": row["label"]},
            ]
        }

    sentiment_chat = (
        [chat(r) for r in _take(train, n_lm, 4)],
        [chat(r) for r in _take(held, n_eval_lm, 4)],
    )
    qa = _take(_unique(real_data.chatterbot_pairs(), "prompt"), 10**9, 5)
    qa_rows = [{"prompt": f"Q: {p['prompt']}\nA:", "completion": " " + p["completion"]} for p in qa]
    chatbot_qa = (qa_rows[:n_lm], qa_rows[-n_eval_lm:])
    text_plays = [s for s in speeches if s["play"] not in held_plays]
    held_text = [s for s in speeches if s["play"] in held_plays]
    shakespeare = (
        [{"text": s["text"]} for s in _take(text_plays, n_lm, 6)],
        [{"text": s["text"]} for s in _take(held_text, n_eval_lm, 6)],
    )
    cls_epochs, lm_epochs = 3.0, 1.0
    return [
        Task("sentiment-cls", "seq-cls", minilm, sentiment_cls, cls_epochs, 64, "movie-review sentiment, 2 classes"),
        Task("chatbot-topic", "seq-cls", minilm, chatbot_topic, cls_epochs, 64, "chatterbot exchanges, 5 topics"),
        Task("play-genre", "seq-cls", minilm, play_genre, cls_epochs, 96, "Shakespeare speech -> genre, 3 classes"),
        Task("sentiment-chat", "causal-lm", SMOLLM2, sentiment_chat, lm_epochs, 128, "review as chat, answer loss"),
        Task("chatbot-qa", "causal-lm", SMOLLM2, chatbot_qa, lm_epochs, 96, "chatterbot Q/A, completion loss"),
        Task("shakespeare", "causal-lm", SMOLLM2, shakespeare, lm_epochs, 128, "Shakespeare speeches, every token"),
    ]


def settings(task: Task) -> list[dict[str, Any]]:
    """The seed-0 grid for a task: causal-lm, each lr; seq-cls, each distinct (lr, head lr) pair."""
    if task.kind == "causal-lm":
        return [{"lr": lr, "head_lr": None, "seed": 0} for lr in CAUSAL_LRS]
    return [{"lr": lr, "head_lr": h, "seed": 0} for lr in SEQ_CLS_LRS for h in HEAD_LRS if h != lr]


def contenders(runs: list[dict], names: list[str]) -> list[tuple[float, float | None]]:
    """The (lr, head lr) pairs worth more seeds: within CONTENDER_GAP points of the best on every task in
    `names`, or the best on one (so no task's best rests on one lucky seed)."""
    best = {n: max((r for r in runs if r["task"] == n), key=_score) for n in names if any(r["task"] == n for r in runs)}
    if len(best) < len(names):
        return []
    picked = []
    for pair in sorted({(r["lr"], r["head_lr"]) for r in runs if r["task"] in names}, key=str):
        cell = {r["task"]: r for r in runs if r["task"] in names and (r["lr"], r["head_lr"]) == pair}
        gaps = [gap(cell[n], best[n]) for n in names if n in cell]
        if len(gaps) == len(names) and (max(gaps) <= CONTENDER_GAP or min(gaps) == 0):
            picked.append(pair)
    return picked


def _priority(setting: dict) -> tuple[int, int]:
    pair = (setting["lr"], setting["head_lr"])
    return setting["seed"], PRIORITY.index(pair) if pair in PRIORITY else len(PRIORITY)


def _key(task: Task, setting: dict) -> str:
    named = {k: v for k, v in setting.items() if k != "seed" or v}  # seed 0 as before seeds were swept
    return json.dumps({"task": task.name, **named, "n": len(task.rows[0])}, sort_keys=True)


def train_once(task: Task, setting: dict, workdir: Path) -> dict[str, Any]:
    """One `lorakit train` run with everything at its default but the rates; held-out metrics after."""
    from lorakit.train import TrainConfig, train

    data = real_data.write_jsonl(task.rows[0], workdir / "train.jsonl")
    held = real_data.write_jsonl(task.rows[1], workdir / "held.jsonl")
    started = time.perf_counter()
    result = train(
        TrainConfig(
            model=task.model,
            data=str(data),
            eval_data=str(held),
            out=str(workdir / "run"),
            task=task.kind,
            epochs=task.epochs,
            max_length=task.max_length,
            lr=setting["lr"],
            head_lr=setting["head_lr"],
            seed=setting["seed"],
            overwrite=True,
            progress=False,
            plot=False,
        )
    )
    after = result.eval_after
    return {
        "task": task.name,
        "kind": task.kind,
        **setting,
        "steps": result.steps,
        "accuracy": after.get("accuracy"),
        "loss": after["loss"],
        "loss_before": result.eval_before["loss"],
        "seconds": time.perf_counter() - started,
    }


def _score(run: dict) -> float:
    """Higher is better: accuracy (seq-cls), minus the loss (causal-lm)."""
    return run["accuracy"] if run["kind"] == "seq-cls" else -run["loss"]


def within_reach(run: dict, best: dict) -> bool:
    if run["kind"] == "seq-cls":
        return run["accuracy"] >= best["accuracy"] - 0.02
    return run["loss"] <= best["loss"] * 1.02


def _label(setting: dict) -> str:
    head = "same" if setting["head_lr"] is None else fmt(setting["head_lr"])
    return f"lr {fmt(setting['lr'])}" + (f", head {head}" if setting.get("kind", "seq-cls") == "seq-cls" else "")


def run(out, quick: bool, command: str, only_cached: bool = False, kinds=("seq-cls", "causal-lm")) -> dict:

    logging.getLogger("lorakit").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    report = Report("default-rates", TITLE, command, quick)
    cache = cache_dir() / "default-rates" / ("runs-quick.jsonl" if quick else "runs.jsonl")
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            record = json.loads(line)
            done[record.pop("key")] = record
    all_tasks = [t for t in tasks(quick) if t.kind in kinds]
    # the likeliest defaults first, so a sweep cut short has them for every task
    plan = sorted(((t, s) for t in all_tasks for s in settings(t)), key=lambda ts: _priority(ts[1]))
    skipped: list[tuple[str, dict]] = []
    runs = _execute(plan, done, cache, only_cached, skipped)
    cls_tasks = [t for t in all_tasks if t.kind == "seq-cls"]
    pairs = contenders(runs, [t.name for t in cls_tasks])
    more = [
        (t, {"lr": lr, "head_lr": h, "seed": seed}) for seed in SEQ_CLS_SEEDS[1:] for lr, h in pairs for t in cls_tasks
    ]
    plan += more
    runs += _execute(sorted(more, key=lambda ts: _priority(ts[1])), done, cache, only_cached, [])
    if skipped:
        left = "; ".join(f"{name} {_label({**s, 'kind': 'seq-cls'})}" for name, s in skipped)
        report.add(f"Not run, already {FAR_OFF:g}+ points below the best on another seq-cls task: {left}.")
    if len(runs) + len(skipped) < len(plan):
        report.add(
            f"**Partial sweep: {len(runs)} of {len(plan) - len(skipped)} runs finished** (the rest were not run: the "
            "shared machine was saturated). Rerun the command above to finish it; finished runs are cached."
        )
    chosen = summarise(report, all_tasks, mean_over_seeds(runs))
    results = {"tasks": [{"name": t.name, "kind": t.kind, "description": t.description} for t in all_tasks]}
    results["chosen"] = chosen
    results["runs"] = runs
    report.write(out, results)
    return results


def far_off(runs: list[dict], task: Task, setting: dict) -> bool:
    """A seq-cls pair already FAR_OFF points or more below the best on another task (seed 0): not worth a run."""
    if task.kind != "seq-cls" or setting["seed"] != 0:
        return False
    pair = (setting["lr"], setting["head_lr"])
    for name in {r["task"] for r in runs if r["kind"] == "seq-cls" and r["task"] != task.name}:
        best = max((r for r in runs if r["task"] == name), key=_score)
        mine = [r for r in runs if r["task"] == name and (r["lr"], r["head_lr"]) == pair]
        if mine and gap(mine[0], best) >= FAR_OFF:
            return True
    return False


def _execute(plan: list[tuple[Task, dict]], done: dict, cache: Path, only_cached: bool, skipped: list) -> list[dict]:
    """The runs of `plan`: from the cache `done` where there, else trained now and appended to the cache;
    seed-0 seq-cls runs of a pair already far off on another task are left out (listed in `skipped`)."""
    from tqdm.auto import tqdm

    runs: list[dict] = []
    with tqdm(total=len(plan), desc="default-rates", unit="run") as bar:
        for task, setting in plan:
            key = _key(task, setting)
            if key not in done and (only_cached or far_off(runs, task, setting)):
                if not only_cached:
                    skipped.append((task.name, setting))
                bar.update(1)
                continue
            if key not in done:
                bar.set_postfix_str(
                    f"{task.name} lr {setting['lr']:g} head {setting['head_lr']} seed {setting['seed']}"
                )
                with tempfile.TemporaryDirectory() as tmp:
                    done[key] = train_once(task, setting, Path(tmp))
                with cache.open("a") as f:
                    f.write(json.dumps({"key": key, **done[key]}) + "\n")
            runs.append(done[key])
            bar.update(1)
    return runs


def mean_over_seeds(runs: list[dict]) -> list[dict]:
    """One record per (task, lr, head lr): accuracy and loss averaged over its seeds, `seeds` how many."""
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((r["task"], r["lr"], r["head_lr"]), []).append(r)
    merged = []
    for group in cells.values():
        mean = {**group[0], "seeds": len(group), "loss": sum(r["loss"] for r in group) / len(group)}
        if group[0]["kind"] == "seq-cls":
            mean["accuracy"] = sum(r["accuracy"] for r in group) / len(group)
        mean.pop("seed", None)
        merged.append(mean)
    return merged


def gap(run: dict, best: dict) -> float:
    """How far a run is from its task's best: accuracy points below it (seq-cls), % loss above it (causal-lm)."""
    if run["kind"] == "seq-cls":
        return (best["accuracy"] - run["accuracy"]) * 100
    return (run["loss"] / best["loss"] - 1) * 100


def choose(runs: list[dict], names: list[str]) -> dict | None:
    """Of the settings run on every task in `names`, the one with the smallest worst gap to a task's best;
    `everywhere`: whether that gap is within reach on every task (None: no setting ran on all of them)."""
    if not all(any(r["task"] == n for r in runs) for n in names):
        return None
    best = {n: max((r for r in runs if r["task"] == n), key=_score) for n in names}
    candidates = []
    for pair in sorted({(r["lr"], r["head_lr"]) for r in runs if r["task"] in names}, key=str):
        cell = {r["task"]: r for r in runs if r["task"] in names and (r["lr"], r["head_lr"]) == pair}
        if len(cell) == len(names):
            reach = all(within_reach(cell[n], best[n]) for n in names)
            candidates.append((max(gap(cell[n], best[n]) for n in names), reach, pair))
    if not candidates:
        return None
    worst, reach, (lr, head_lr) = min(candidates, key=lambda c: c[0])
    return {"lr": lr, "head_lr": head_lr, "worst_gap": worst, "everywhere": reach}


def summarise(report: Report, all_tasks: list[Task], runs: list[dict]) -> dict:
    """The tables and the figure from seed-averaged `runs`; returns the chosen setting per kind (see `choose`)."""
    best = {t.name: max((r for r in runs if r["task"] == t.name), key=_score) for t in all_tasks}
    report.add(__doc__.split("\n\n", 1)[1])
    chosen = {}
    for kind in ("seq-cls", "causal-lm"):
        names = [t.name for t in all_tasks if t.kind == kind]
        chosen[kind] = choose(runs, names)
        grid = sorted({(r["lr"], r["head_lr"] or 0.0) for r in runs if r["kind"] == kind})
        rows = []
        for lr, head in grid:
            cells, reach, gaps, seeds = [], 0, [], set()
            for name in names:
                run_ = next(
                    (r for r in runs if r["task"] == name and r["lr"] == lr and (r["head_lr"] or 0.0) == head), None
                )
                if run_ is None:
                    cells.append("-")
                    continue
                ok = within_reach(run_, best[name])
                reach += ok
                gaps.append(gap(run_, best[name]))
                seeds.add(run_.get("seeds", 1))
                value = run_["accuracy"] * 100 if kind == "seq-cls" else run_["loss"]
                cells.append(f"{'**' if ok else ''}{fmt(value, 4)}{'**' if ok else ''}")
            setting = f"{fmt(lr)}" + ((" / " + ("same" if head == 0 else fmt(head))) if kind == "seq-cls" else "")
            worst = f"{max(gaps):.1f}" + (" (partial)" if len(gaps) < len(names) else "")
            rows.append(
                [setting, *cells, f"{reach} of {len(names)}", worst]
                + (["-".join(map(str, sorted(seeds)))] if kind == "seq-cls" else [])
            )
        metric = "held-out accuracy, %" if kind == "seq-cls" else "held-out loss"
        first = "lr / head lr" if kind == "seq-cls" else "lr"
        margin = "2 points" if kind == "seq-cls" else "2%"
        report.table(
            [first, *names, "within reach", f"worst gap ({'points' if kind == 'seq-cls' else '%'})"]
            + (["seeds"] if kind == "seq-cls" else []),
            rows,
            caption=f"**{kind}** ({metric}; bold: within {margin} of the task's best)",
        )
        pick, unit = chosen[kind], "points" if kind == "seq-cls" else "%"
        if pick is None:
            report.add(f"**{kind} choice:** none (no setting ran on every task).")
            continue
        reach = "within reach of every task" if pick["everywhere"] else "**not** within reach of every task"
        report.add(
            f"**{kind} choice:** {_label({**pick, 'kind': kind})}: the smallest worst gap, {pick['worst_gap']:.2f} "
            f"{unit}, {reach}."
        )
    report.figure(_plot(all_tasks, runs), "default_rates.png", "Held-out quality against the adapter learning rate")
    return chosen


def _plot(all_tasks: list[Task], runs: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("seq-cls", "causal-lm")):
        for task in (t for t in all_tasks if t.kind == kind):
            heads = sorted({r["head_lr"] or 0.0 for r in runs if r["task"] == task.name})
            for head in heads:
                points = sorted(
                    (r["lr"], r["accuracy"] * 100 if kind == "seq-cls" else r["loss"])
                    for r in runs
                    if r["task"] == task.name and (r["head_lr"] or 0.0) == head
                )
                label = task.name + ("" if kind != "seq-cls" else f" (head {'= lr' if head == 0 else fmt(head)})")
                ax.plot(*zip(*points), marker="o", label=label, linestyle="-" if head == 0 else ":")
        ax.set_xscale("log")
        ax.set_xlabel("adapter learning rate (--lr)")
        ax.set_ylabel("held-out accuracy (%)" if kind == "seq-cls" else "held-out loss")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # write the report from the runs cached so far (a sweep cut short)
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "docs/default-rates"
    run(Path(out), False, f"lorakit experiment default-rates --threads 1 --out {out}", only_cached=True)
