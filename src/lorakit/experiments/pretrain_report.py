"""The pretrain-limits report: the GaLore-Table-2-shaped grid, per-size tables, plots and verdicts."""

from __future__ import annotations

from . import plots
from .report import Report, human_bytes


def _by(runs, corpus, size, key, series="main"):
    for r in runs:
        if r["corpus"] == corpus and r["size"] == size and r["method"] == key and r.get("series", "main") == series:
            return r
    return None


def _gap(r, f) -> str:
    return f"{100 * (r['held_out_ppl'] / f['held_out_ppl'] - 1):+.1f}%"


def write_report(report: Report, results: dict, plan) -> None:
    runs = results["runs"]
    corpus = plan.corpus
    sizes = [s.name for s in plan.sizes]
    trained = [m.key for m in plan.methods if not m.checkpointing]
    c = results["corpora"][corpus]
    report.add(
        f"Each model starts from random weights and sees the same {plan.steps * plan.batch * plan.context:,} byte-level tokens "
        f"({plan.steps} steps x {plan.batch} x {plan.context}) of {corpus} ({c['train_bytes']:,} training bytes; "
        f"held-out = every tenth file, {c['held_out_bytes']:,} bytes, scored on {plan.eval_windows} fixed windows). "
        f"AdamW, warm-up + cosine, lr {plan.lr_full:g} for full-rank weights, {plan.lr_lora:g} for LoRA factors, {plan.lr_galore:g} for GaLore's "
        f"projected matrices (GaLore scale 0.25), {plan.lr_full:g} for everything else (embeddings, norms, head); LoRA alpha = {plan.lora_alpha:g} "
        f"(s = alpha/r); ReLoRA restarts every {plan.relora_every} steps; "
        f"GaLore re-projects every {plan.galore_gap} steps. Loss is nats per byte; perplexity is per byte."
        + (f" ({plan.extra['lr_pilot']}.)" if plan.extra.get("lr_pilot") else "")
    )
    # headline: the GaLore-Table-2-shaped grid
    rows = []
    for key in trained:
        row = [key]
        for s in sizes:
            r, f = _by(runs, corpus, s, key), _by(runs, corpus, s, "full")
            row.append(f"{r['held_out_ppl']:.3f} ({100 * (r['held_out_ppl'] / f['held_out_ppl'] - 1):+.1f}%)" if r and f else "-")
        rows.append(row)
    report.section("Held-out perplexity by model size (gap to full-rank in brackets)")
    report.table(["method"] + [f"{s} ({_by(runs, corpus, s, 'full')['params']:,} params)" for s in sizes], rows)
    for s in sizes:
        rows = []
        for m in plan.methods:
            r = _by(runs, corpus, s, m.key)
            if r is None:
                continue
            mem = r["memory"]
            rows.append([
                m.key, r["trainable"], f"{100 * r['trainable'] / r['params']:.1f}%",
                r.get("held_out_loss", "-"), r.get("held_out_ppl", "-"), r.get("roughness", "-"),
                f"{r['update_rank90_mean']:.1f} / {r['update_rank_max_possible']:.0f}" if "update_rank90_mean" in r else "-",
                f"{1000 * r['step_seconds']:.0f}", human_bytes(mem["optimizer"]), human_bytes(mem["activations"]),
                human_bytes(r["memory_accounted"]), human_bytes(r["measured_rss_rise"]) if r["measured_rss_rise"] is not None else "-",
            ])
        report.section(f"Size {s}")
        report.table(
            ["method", "trainable", "share", "held-out loss", "ppl", "roughness", "rank90(ΔW) / max", "ms/step",
             "optimizer state", "activations", "accounted memory", "measured RSS rise"], rows,
        )
    if plan.replicate:
        name, size, keys = plan.replicate
        rows = []
        for key in keys:
            r, f = _by(runs, name, size.name, key, "replicate"), _by(runs, name, size.name, "full", "replicate")
            if r and f:
                rows.append([key, r["trainable"], r["held_out_loss"], r["held_out_ppl"], _gap(r, f)])
        report.section(f"Replication on {name}, size {size.name}")
        report.table(["method", "trainable", "held-out loss", "ppl", "gap to full"], rows)
    if plan.longer:
        size, steps, keys = plan.longer
        rows = []
        for key in keys:
            r, f = _by(runs, corpus, size.name, key, "longer"), _by(runs, corpus, size.name, "full", "longer")
            short, short_f = _by(runs, corpus, size.name, key), _by(runs, corpus, size.name, "full")
            if r and f and short and short_f:
                rows.append([key, short["held_out_ppl"], _gap(short, short_f), r["held_out_ppl"], _gap(r, f),
                             f"{short['update_rank90_mean']:.1f}", f"{r['update_rank90_mean']:.1f}"])
        report.section(f"A 4x longer budget at size {size.name} ({steps} steps)")
        report.table(["method", f"ppl, {plan.steps} steps", "gap", f"ppl, {steps} steps", "gap", f"rank90(ΔW), {plan.steps}",
                      f"rank90(ΔW), {steps}"], rows)
        report.figure(plots.pretrain_longer(runs, corpus, size.name, list(keys)), "longer_budget.png",
                      f"Held-out loss over a {steps}-step run at size {size.name}")
    report.figure(plots.pretrain_curves(runs, corpus, sizes, trained), "loss_curves.png", "Training loss (smoothed) and held-out loss per size")
    report.figure(plots.pretrain_gap(runs, corpus, sizes, trained), "gap_vs_size.png", "Held-out perplexity gap to full-rank as the model grows")
    report.figure(plots.pretrain_memory(runs, corpus, sizes[-1], [m.key for m in plan.methods]), "memory_time.png",
                  f"Accounted training memory and time per step, size {sizes[-1]}")
    report.figure(plots.pretrain_rank(runs, corpus, sizes, trained), "update_rank.png", "Rank (90% energy) of the learned update W_final - W_init")
    report.section("The documents' claims against these measurements", verdicts(runs, corpus, sizes, trained, plan))


def verdicts(runs, corpus, sizes, trained, plan) -> str:
    big, small = sizes[-1], sizes[0]
    lora = [k for k in trained if k.startswith("lora-")]
    full_big = _by(runs, corpus, big, "full")
    gap = lambda s, k, series="main": 100 * (_by(runs, corpus, s, k, series)["held_out_ppl"] / _by(runs, corpus, s, "full", series)["held_out_ppl"] - 1)  # noqa: E731
    low = lora[0]
    worst = max(gap(s, k) for s in sizes for k in lora)
    best = min(gap(s, k) for s in sizes for k in lora)
    behind = gap(big, low) > 5
    lines = [
        f"**In short: {'this run reproduces' if behind else 'this run does not reproduce'} LoRA's weakness at pre-training.** "
        + ("LoRA-only falls behind full-rank training." if behind else
           "At these sizes and budgets LoRA-only (with embeddings, norms and head trainable) matches full-rank training within "
           "a few percent of perplexity. The documents' four reasons are arguments about scale; below, each is checked against what "
           "this scale can show.") + "\n",
    ]
    r_low = _by(runs, corpus, big, low)
    lines.append(
        f"1. **Limited parameter space: {'agrees' if behind else 'not at this scale'}.** At {big}, {low} trains {r_low['trainable']:,} of "
        f"{full_big['params']:,} weights ({100 * r_low['trainable'] / full_big['params']:.1f}%, much of it embeddings, norms and head) "
        f"and ends {gap(big, low):+.1f}% in held-out perplexity against full-rank; over all sizes and ranks LoRA-only lands between "
        f"{best:+.1f}% and {worst:+.1f}%."
    )
    fr = full_big["update_rank90_mean"]
    lr_ = {k: _by(runs, corpus, big, k)["update_rank90_mean"] for k in trained}
    lines.append(
        f"2. **Limited expressiveness: {'the mechanism is there' if all(lr_[k] < fr for k in lora) else 'partly'}, "
        f"{'and it costs quality' if behind else 'but it does not bind yet'}.** Full-rank pre-training moved its matrices by an update of "
        f"rank {fr:.1f} (90% energy, mean over matrices of max rank {full_big['update_rank_max_possible']:.0f}); "
        + ", ".join(f"{k} {lr_[k]:.1f}" for k in trained if k != "full")
        + ". A LoRA adapter cannot exceed r, while ReLoRA's merges and GaLore's moving subspace can. "
        + ("" if behind else "With this small a budget even full-rank training makes a low-rank update, so LoRA's ceiling is not reached.")
    )
    rough = {k: _by(runs, corpus, big, k)["roughness"] for k in trained}
    rougher = max(rough[k] for k in lora) > 1.2 * rough["full"]
    lines.append(
        f"3. **Training stability: {'LoRA is noisier here' if rougher else 'no difference at this scale'}.** No run diverged at the "
        "chosen learning rates; mean step-to-step loss change over the second half (lower is smoother): "
        + ", ".join(f"{k} {v:.3f}" for k, v in rough.items())
        + ". The learning-rate pilot is the clearer stability signal: LoRA factors at 1e-2 (a rate full-rank tolerates within "
        "a few tenths of a nat) stalled near 3 nats/byte after loss spikes, a much sharper cliff than full-rank's."
    )
    growing = gap(big, low) > gap(small, low) + 5
    lines.append(
        f"4. **Scalability: {'agrees' if growing else 'not visible over these sizes'}.** The {low} gap to full-rank is "
        f"{gap(small, low):+.1f}% at {small} and {gap(big, low):+.1f}% at {big}"
        + (" - it widens as the model grows, the GaLore paper's Table 2 shape." if growing else
           "; the GaLore paper's widening gap (60M to 1B parameters, billions of tokens) needs scales this CPU run cannot reach.")
    )
    if plan.longer:
        size, steps, _ = plan.longer
        grew = gap(size.name, low, "longer") > gap(size.name, low) + 2
        lines.append(
            f"5. **Longer training: {'the gap opens' if grew else 'no clear trend'}.** At {size.name}, {low} is {gap(size.name, low):+.1f}% after "
            f"{plan.steps} steps and {gap(size.name, low, 'longer'):+.1f}% after {steps}; full-rank's own update rank goes from "
            f"{_by(runs, corpus, size.name, 'full')['update_rank90_mean']:.1f} to {_by(runs, corpus, size.name, 'full', 'longer')['update_rank90_mean']:.1f} "
            f"while {low}'s stays below its r. "
            + ("The update keeps gaining directions that a fixed-rank adapter cannot follow, and it shows in quality."
               if grew else "The update keeps gaining directions as training goes on, but over 4x the budget that has not yet cost LoRA quality.")
        )
    g = [k for k in trained if k.startswith("galore")][0]
    ck_full = _by(runs, corpus, big, "full+ckpt")
    lines.append(
        f"6. **The alternatives.** {g}: {gap(big, g):+.1f}% vs full-rank at {big} with optimizer state "
        f"{human_bytes(_by(runs, corpus, big, g)['memory']['optimizer'])} instead of {human_bytes(full_big['memory']['optimizer'])}. "
        f"Gradient checkpointing: activations {human_bytes(full_big['memory']['activations'])} -> "
        f"{human_bytes(ck_full['memory']['activations'])} for {ck_full['step_seconds'] / full_big['step_seconds']:.2f}x the time per step, "
        f"identical math. (Mixture of experts and sparse attention are not measured here.)"
    )
    lines.append(
        f"\nScale caveat: these are {small}-{big}-parameter byte-level models trained for minutes on a shared two-core CPU, far from "
        "the 60M-1B models of the GaLore and ReLoRA papers; a result here says what happens at this scale, not at theirs."
    )
    return "\n".join(lines)
