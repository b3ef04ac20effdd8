"""The experiments' figures (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _runs(runs, corpus, size):
    return {r["method"]: r for r in runs if r["corpus"] == corpus and r["size"] == size}


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def pretrain_curves(runs, corpus, sizes, keys):
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        by = _runs(runs, corpus, size)
        for i, key in enumerate(keys):
            r = by.get(key)
            if r is None:
                continue
            color = f"C{i}"
            losses = r["train_loss"]
            ax.plot(range(1, len(losses) + 1), smooth(losses, max(1, len(losses) // 30)), color=color, lw=1.2, label=key)
            if r["eval_curve"]:
                xs, ys = zip(*r["eval_curve"])
                ax.plot(xs, ys, "o--", color=color, ms=3, lw=0.8)
        ax.set_title(f"{corpus}, {size} ({by['full']['params']:,} params)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte); dots = held-out")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def pretrain_gap(runs, corpus, sizes, keys):
    fig, ax = plt.subplots(figsize=(6, 4))
    params = [_runs(runs, corpus, s)["full"]["params"] for s in sizes]
    for i, key in enumerate(keys):
        if key == "full":
            continue
        gaps = []
        for s in sizes:
            by = _runs(runs, corpus, s)
            gaps.append(100 * (by[key]["held_out_ppl"] / by["full"]["held_out_ppl"] - 1) if key in by else float("nan"))
        ax.plot(params, gaps, "o-", color=f"C{i}", label=key)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("held-out perplexity vs full-rank (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pretrain_memory(runs, corpus, size, keys):
    by = _runs(runs, corpus, size)
    keys = [k for k in keys if k in by]
    parts = ("weights", "grads", "optimizer", "activations")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(keys)
    for j, part in enumerate(parts):
        vals = [by[k]["memory"][part] / 1e6 for k in keys]
        ax.bar(keys, vals, bottom=bottom, label=part, color=f"C{j}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("accounted training memory (MB)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=45)
    ax2.bar(keys, [1000 * by[k]["step_seconds"] for k in keys], color="C4")
    ax2.set_ylabel("time per step (ms)")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def pretrain_rank(runs, corpus, sizes, keys):
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(sizes)
    for j, size in enumerate(sizes):
        by = _runs(runs, corpus, size)
        vals = [by[k]["update_rank90_mean"] if k in by else 0 for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=f"{size} (max {by['full']['update_rank_max_possible']:.0f})", color=f"C{j}")
    ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(keys))], keys, rotation=30)
    ax.set_ylabel("rank for 90% of ||W_final - W_init||² (mean)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def params_sweep(results):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, m) in enumerate(results["models"].items()):
        for ls, targets in (("-", "q,v"), ("--", "all-linear")):
            rows = [row for row in m["sweep"] if row["targets"] == targets]
            ax.plot([r["r"] for r in rows], [r["reduction"] for r in rows], ls, marker="o", color=f"C{i}", label=f"{name}, {targets}")
            ax2.plot([r["r"] for r in rows], [r["adapter_bytes"] / 1e6 for r in rows], ls, marker="o", color=f"C{i}", label=f"{name}, {targets}")
        ax2.axhline(m["sweep"][0]["full_bytes"] / 1e6, color=f"C{i}", lw=0.8, ls=":", label=f"{name}: full model file")
    for y, label in ((10_000, "10,000x (documents, GPT-3)"), (256, "256x (4096x4096, r=8)")):
        ax.axhline(y, color="gray", lw=0.8, ls=":")
        ax.text(1, y * 1.1, label, fontsize=7, color="gray")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("rank r")
        a.grid(alpha=0.3)
    ax.set_ylabel("whole model / trainable parameters")
    ax2.set_ylabel("checkpoint file (MB)")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig
