"""pretrain-limits' figures: loss curves, the gap to full-rank against size and against tokens seen,
rank90(W_t - W_0) against steps, learning-rate sensitivity, and memory/time per step.

The gap of a method m is held-out perplexity relative to full-rank on the same run series,
gap = ppl_m / ppl_full - 1 = exp(loss_m - loss_full) - 1 (losses in nats per byte), so it can be read at
every evaluation step, not only at the end.
"""

from __future__ import annotations

import math

from lorakit.train.metrics import running_mean

from .plots import plt
from .pretrain_runs import series_runs


def gap_curve(run, full):
    """[(tokens seen, gap in %)] at the evaluation steps both runs share."""
    ref = dict(full["eval_curve"])
    per_step = run["tokens"] / run["steps"]
    return [(s * per_step, 100 * (math.exp(loss - ref[s]) - 1)) for s, loss in run["eval_curve"] if s in ref]


def _color(keys, key):
    return f"C{list(keys).index(key) % 10}"


def _label(ax, xlabel, ylabel, title=None, legend=7):
    """Axis labels, grid and legend: the styling every panel here shares."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def loss_curves(runs, corpus, sizes, keys):
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        by = series_runs(runs, "main", corpus, size)
        for key in keys:
            r = by.get(key)
            if r is None or "train_loss" not in r:
                continue
            losses = r["train_loss"]
            ax.plot(
                range(1, len(losses) + 1),
                running_mean(losses, max(1, len(losses) // 30)),
                color=_color(keys, key),
                lw=1.1,
                label=key,
            )
            if r["eval_curve"]:
                xs, ys = zip(*r["eval_curve"])
                ax.plot(xs, ys, "o--", color=_color(keys, key), ms=3, lw=0.7)
        _label(
            ax,
            "step",
            "loss (nats/byte); dots = held-out",
            f"{corpus}, {size} ({by['full']['params']:,} params)",
            legend=0,
        )
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def gap_vs_size(runs, corpus, sizes, keys):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key in keys:
        if key == "full":
            continue
        pts = []
        for s in sizes:
            by = series_runs(runs, "main", corpus, s)
            if key in by:
                pts.append((by["full"]["params"], 100 * (by[key]["held_out_ppl"] / by["full"]["held_out_ppl"] - 1)))
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-" if key.startswith("lora-only") else "s--", color=_color(keys, key), label=key)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    _label(ax, "model parameters", "held-out perplexity vs full-rank (%)", "gap to full-rank at the same token budget")
    fig.tight_layout()
    return fig


def gap_vs_tokens(runs, panels, keys):
    """One panel per (series, corpus, size): the gap to that series' own full-rank run at every evaluation."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (series, corpus, size) in zip(axes[0], panels):
        by = series_runs(runs, series, corpus, size)
        for key in keys:
            if key == "full" or key not in by or "eval_curve" not in by[key]:
                continue
            curve = gap_curve(by[key], by["full"])
            if not curve:  # diverged before its first evaluation
                continue
            xs, ys = zip(*curve)
            ax.plot([x / 1e3 for x in xs], ys, "o-", ms=3, color=_color(keys, key), label=key)
        ax.axhline(0, color="k", lw=0.8)
        _label(
            ax,
            "tokens seen (thousands of bytes)",
            "held-out ppl vs full-rank (%)",
            f"{size}, {series} run ({by['full']['steps']} steps)",
        )
    fig.tight_layout()
    return fig


def rank_vs_steps(runs, panels, keys):
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (series, corpus, size) in zip(axes[0], panels):
        by = series_runs(runs, series, corpus, size)
        for key in keys:
            if key not in by or not by[key].get("rank_curve"):
                continue
            xs, ys = zip(*by[key]["rank_curve"])
            ax.plot(xs, ys, "o-", ms=3, color=_color(keys, key), label=key)
        for r in sorted({by[k]["rank"] for k in by if by[k]["rank"]}):
            ax.axhline(r, color="gray", lw=0.6, ls=":")
        _label(
            ax,
            "step",
            "rank90(W_t - W_0), mean over block matrices",
            f"{size}, {series} run (max rank {by['full']['update_rank_max_possible']:.0f}; dotted: r)",
        )
    fig.tight_layout()
    return fig


def lr_sensitivity(table):
    """table: {method: [(lr scale, held-out loss)]}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, pts) in enumerate(table.items()):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, "o-", color=f"C{i}", label=key)
    ax.set_xscale("log")
    scales = sorted({x for pts in table.values() for x, _ in pts})
    ax.set_xticks(scales, [f"x{x:.2g}" for x in scales])
    ax.minorticks_off()
    _label(ax, "learning-rate scale (x every rate of the method)", "held-out loss (nats/byte)", legend=8)
    fig.tight_layout()
    return fig


def memory_time(runs, corpus, size, keys):
    by = series_runs(runs, "main", corpus, size)
    keys = [k for k in keys if k in by]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(keys)
    for j, part in enumerate(("weights", "grads", "optimizer", "activations")):
        vals = [by[k]["memory"][part] / 1e6 for k in keys]
        ax.bar(keys, vals, bottom=bottom, label=part, color=f"C{j}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("accounted training memory (MB)")
    ax.set_title(f"{corpus}, {size}")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=45)
    ax2.bar(keys, [1000 * by[k]["step_seconds"] for k in keys], color="C4")
    ax2.set_ylabel("time per step (ms)")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig
