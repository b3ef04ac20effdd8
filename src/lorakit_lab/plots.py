"""The experiments' figures (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lorakit.train.metrics import running_mean  # noqa: E402


def params_sweep(results):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, m) in enumerate(results["models"].items()):
        for ls, targets in (("-", "q,v"), ("--", "all-linear")):
            rows = [row for row in m["sweep"] if row["targets"] == targets]
            ax.plot(
                [r["r"] for r in rows],
                [r["reduction"] for r in rows],
                ls,
                marker="o",
                color=f"C{i}",
                label=f"{name}, {targets}",
            )
            ax2.plot(
                [r["r"] for r in rows],
                [r["adapter_bytes"] / 1e6 for r in rows],
                ls,
                marker="o",
                color=f"C{i}",
                label=f"{name}, {targets}",
            )
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


def finetune_quality(results):
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items()):
        metric = t["metric"]
        for r in t["runs"]:
            marker = (
                "s"
                if r["kind"] == "full"
                else "^"
                if r["kind"] == "head"
                else "D"
                if r["dora"]
                else "o"
                if r["targets"] == "qv"
                else "v"
            )
            ax.scatter(r["trainable"], r["held_out"][metric], marker=marker, s=40)
            ax.annotate(
                r["variant"],
                (r["trainable"], r["held_out"][metric]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.axhline(t["base"][metric], color="gray", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"held-out {metric}" + (" (lower is better)" if metric == "perplexity" else ""))
        ax.set_title(f"{name} (dotted: before training)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def finetune_costs(results):
    tasks = results["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for col, (name, t) in enumerate(tasks.items()):
        keys = [r["variant"] for r in t["runs"]]
        ax = axes[0][col]
        bottom = [0.0] * len(keys)
        for j, part in enumerate(("weights", "grads", "optimizer", "activations")):
            vals = [r["memory"][part] / 1e6 for r in t["runs"]]
            ax.bar(keys, vals, bottom=bottom, label=part, color=f"C{j}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("accounted training memory (MB)")
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.legend(fontsize=7)
        ax2 = axes[1][col]
        ax2.bar(keys, [r["checkpoint_bytes"] / 1e6 for r in t["runs"]], color="C5")
        ax2.set_yscale("log")
        ax2.set_ylabel("checkpoint size (MB, log)")
        ax2.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    return fig


def finetune_curves(results):
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items()):
        for i, r in enumerate(t["runs"]):
            losses = r["train_loss"]
            ax.plot(
                range(1, len(losses) + 1),
                running_mean(losses, max(1, len(losses) // 15)),
                lw=1,
                color=f"C{i % 10}",
                label=r["variant"],
            )
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def delta_spectra(results, plan):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, row in enumerate(results["layers"]):
        s = row["singular_values"]
        ax.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], lw=0.9, color=f"C{i % 10}", label=row["layer"])
        ranks = sorted(int(r) for r in row["best_capture"])
        ax2.plot(ranks, [100 * row["best_capture"][str(r)] for r in ranks], "o-", ms=3, lw=0.8, color=f"C{i % 10}")
    first = results["layers"][0]
    ranks = sorted(int(r) for r in first["random_capture"])
    ax2.plot(ranks, [100 * first["random_capture"][str(r)] for r in ranks], "k:", label="random subspace")
    for key in (f"r{plan.ranks[0]}-s{plan.seeds[0]}", f"r{plan.ranks[1]}-s{plan.seeds[0]}"):
        r = int(key[1:].split("-")[0])
        vals = [100 * row["lora_capture"][key] for row in results["layers"]]
        ax2.scatter(
            [r] * len(vals),
            vals,
            marker="x",
            color="k",
            zorder=3,
            label=f"LoRA r={r} subspace" if key.endswith("s0") else None,
        )
    ax.set_xlabel("singular value index")
    ax.set_ylabel("s_i / s_1 of full-FT ΔW")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("rank r")
    ax2.set_ylabel("% of ||ΔW_full||² captured")
    ax2.axhline(90, color="gray", lw=0.6, ls="--")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def delta_similarity(results, plan):
    row = results["layers"][len(results["layers"]) // 2]
    fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
    for ax, key, side in ((axes[0], "phi_rank", "ΔW output side"), (axes[1], "phi_rank_A", "A (input side)")):
        im = ax.imshow(
            row[key],
            aspect="auto",
            vmin=0,
            vmax=1,
            cmap="viridis",
            extent=(0.5, len(row[key][0]) + 0.5, len(row[key]) + 0.5, 0.5),
        )
        ax.set_xlabel(f"j (r={plan.ranks[1]})")
        ax.set_ylabel(f"i (r={plan.ranks[0]})")
        ax.set_title(f"{row['layer']}: {side}", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def digit_grid(rows, title=""):
    """One row of 8x8 images per (label, images) pair, ink dark on white; columns share their seed."""
    columns = max(len(images) for _, images in rows)
    cell, label, top = 0.55, 1.4, 0.35 if title else 0.1  # inches: square cells, a label margin on the left
    width, height = label + cell * columns, top + cell * len(rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=label / width, right=0.995, bottom=0.02, top=1 - top / height, wspace=0.06, hspace=0.06)
    for i, (name, images) in enumerate(rows):
        for j in range(columns):
            ax = axes[i][j]
            if j < len(images):
                ax.imshow(images[j], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def style_curves(results):
    """Each style statistic of the samples against the mix weight, with the data's own values."""
    rows = [r for r in results["rows"] if r["mix_weight"] is not None]
    rows.sort(key=lambda r: r["mix_weight"])
    a, b = results["styles"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, stat in zip(axes, ("ink", "slant")):
        ws = [r["mix_weight"] for r in rows]
        ax.errorbar(
            ws,
            [r[stat] for r in rows],
            yerr=[r[f"{stat}_se"] for r in rows],
            fmt="o-",
            color="C0",
            capsize=3,
            label="samples, mix",
        )
        for key, color, ls in (("base", "C1", "--"), ("both", "C2", "-.")):
            row = next((r for r in results["rows"] if r["key"] == key), None)
            if row is not None:
                ax.axhline(row[stat], color=color, ls=ls, lw=1, label=f"samples, {row['label']}")
        for key, color in (("all", "gray"), (a["name"], "C3"), (b["name"], "C4")):
            ax.axhline(results["data"][key][stat], color=color, ls=":", lw=1.2, label=f"data: {key}")
        ax.set_xlabel(f"mix weight w on {a['name']} (1 - w on {b['name']})")
        ax.set_ylabel(f"mean {stat} of the samples")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def ddpm_losses(results):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (name, losses) in enumerate(results["losses"].items()):
        ax.plot(
            range(1, len(losses) + 1), running_mean(losses, max(1, len(losses) // 25)), lw=1, color=f"C{i}", label=name
        )
    ax.set_xlabel("step")
    ax.set_ylabel("denoising loss ||ε - ε_θ||² (smoothed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
