"""The pretrain-limits report: the GaLore-Table-2-shaped grid, per-size tables, the extra series, plots, verdicts.

Every comparison is against full-rank training of the same size on the same batches:
gap = ppl_m / ppl_full - 1 = exp(L_m - L_full) - 1, with L the held-out loss in nats per byte.
Each gap is paired seed by seed and shown as mean ± the half-width of its 95% t-interval over seeds
(pretrain_runs.Spread); other numbers are seed means. The verdicts are computed from the measured
numbers and their spread; none of their conclusions is written in advance.
"""

from __future__ import annotations

import math

from . import pretrain_plots as plots
from .pretrain_runs import find, gap_spread, lr_table, pct
from .pretrain_verdicts import verdicts
from .report import Report, human_bytes


def _trained(plan) -> list[str]:
    used = {k for a in plan.arms for k in a.methods}
    return [k for k, m in plan.methods.items() if k in used and not m.checkpointing]


def _all_keys(plan) -> list[str]:
    used = {k for a in plan.arms for k in a.methods}
    return [k for k in plan.methods if k in used]


def write_report(report: Report, results: dict, plan) -> None:
    runs, corpus = results["runs"], plan.corpus
    sizes = [a.size.name for a in plan.arms]
    trained, keys = _trained(plan), _all_keys(plan)
    _intro(report, results, plan)
    _main_grid(report, runs, corpus, sizes, trained)
    _contrast(report, runs, corpus, sizes, plan)
    for s in sizes:
        _size_table(report, runs, corpus, s, keys)
    for s in plan.series:
        {"longer": _longer, "lr": _lr, "replicate": _replicate}[s.name](report, runs, plan, s)
    panels = [("main", corpus, s) for s in sizes] + [
        ("longer", s.corpus, s.arm.size.name) for s in plan.series if s.name == "longer"
    ]
    report.figure(
        plots.loss_curves(runs, corpus, sizes, trained),
        "loss_curves.png",
        "Training loss (smoothed lines) and held-out loss (dots) per size",
    )
    report.figure(
        plots.gap_vs_size(runs, corpus, sizes, trained),
        "gap_vs_size.png",
        "Held-out perplexity gap to full-rank as the model grows (the GaLore paper's Table 2 shape)",
    )
    report.figure(
        plots.gap_vs_tokens(runs, panels, trained),
        "gap_vs_tokens.png",
        "The gap to full-rank at every evaluation, against tokens seen (each panel against its own full-rank run)",
    )
    report.figure(
        plots.rank_vs_steps(runs, panels, trained),
        "rank_vs_steps.png",
        "rank90(W_t - W_0) of the block matrices as training goes on; a LoRA adapter's is capped at r (dotted)",
    )
    report.figure(
        plots.memory_time(runs, corpus, sizes[-1], keys),
        "memory_time.png",
        f"Accounted training memory and time per step, size {sizes[-1]}",
    )
    report.section("The documents' claims against these measurements", verdicts(runs, plan, sizes, trained))


def _intro(report: Report, results: dict, plan) -> None:
    b, c = plan.budget, results["corpora"][plan.corpus]
    rates = "; ".join(
        f"{a.size.name} (hidden {a.size.hidden}, {a.size.layers} layers, {a.size.heads} heads): full-rank "
        f"{a.rates.full:g}, "
        f"LoRA factors {a.rates.lora:g}"
        + (f" (lora-only {a.rates.lora_only:g})" if a.rates.lora_only is not None else "")
        + f", GaLore matrices {a.rates.galore:g}"
        for a in plan.arms
    )
    a0 = plan.arms[0].rates
    report.add(
        f"Each model starts from random weights and sees the same {b.tokens:,} byte-level tokens ({b.steps} steps x "
        f"{b.batch} "
        f"windows x {b.context} bytes) of {plan.corpus} ({c['train_bytes']:,} training bytes; held-out = every tenth "
        "file, "
        f"{c['held_out_bytes']:,} bytes, scored on {plan.eval_windows} fixed windows at {b.eval_points} evenly spaced "
        "steps). "
        f"Every comparison runs with seeds {', '.join(map(str, plan.seeds))} (a seed fixes the random init and the "
        "batch order, shared by every method at that seed; timing-only runs use the first). "
        "AdamW without weight decay, 10% warm-up then cosine decay, gradient "
        "clipping at 1. "
        f"Peak learning rates per size - {rates}; embeddings, norms and head train at the full-rank rate wherever "
        "they train. "
        f"LoRA alpha = {a0.lora_alpha:g} (s = alpha/r). ReLoRA merges and restarts every {b.relora_every} steps (with "
        "a short "
        f"re-warm-up of the rate); GaLore re-projects every {a0.galore_gap} steps, scale {a0.galore_scale:g}. "
        "Loss is nats per byte; perplexity is per byte.\n\n"
        "Methods: **full** - every weight trains; **full+ckpt** - the same with gradient checkpointing, timed for a "
        "few steps; "
        "**lora-only-rN** - the literal 'pre-train with LoRA': every weight matrix (embeddings, attention, MLP, head) "
        "stays at "
        "its random init and learns only through a rank-N adapter, only the RMSNorm gains also train; **lora-rN** - "
        "LoRA on the "
        "attention and MLP matrices with embeddings, norms and head trained fully (the LoRA baseline of the GaLore "
        "and ReLoRA "
        "papers); **relora-rN** - lora-rN with periodic merge-and-restart; **galore-rN** - every weight trains, the "
        "block "
        "matrices' Adam moments live in a rank-N projection of the gradient; **moe** - a Mixtral-style mixture of "
        "4 experts of half the dense MLP width with top-2 routing (the dense model's active parameters per token, "
        "twice its MLP weights; the router's load-balancing loss is added in training, every reported loss is the "
        "language-model loss); **moe-lora-rN** - lora-rN's recipe on that model, the adapters on the attention "
        "matrices and on every expert of the 3-D expert stacks (lorakit's target_parameters, one rank-N adapter per "
        "expert); **local-wN** - the dense model with block-local attention: a query sees the previous block of N "
        "tokens and, causally, its own (N to 2N-1 keys instead of up to the whole context)."
    )
    pilots = plan.extra.get("pilots")
    if isinstance(pilots, list) and pilots:
        heads = list(pilots[0])
        report.section(
            "Learning-rate pilots",
            "Short runs that chose the rates above (held-out loss after the pilot's steps; "
            "lower is better). " + pilot_check(plan, pilots),
        )
        report.table(heads, [[p.get(h, "-") for h in heads] for p in pilots])
    elif pilots:
        report.section("Learning-rate pilots", str(pilots))


def _main_grid(report, runs, corpus, sizes, trained) -> None:
    rows = []
    for key in trained:
        row = [key]
        for s in sizes:
            r = find(runs, "main", corpus, s, key)
            row.append(f"{r['held_out_ppl']:.3f} ({pct(gap_spread(runs, 'main', corpus, s, key))})" if r else "-")
        rows.append(row)
    report.section(
        "Held-out perplexity by model size (gap to full-rank in brackets)",
        "Perplexity is the mean over seeds; the gap is paired seed by seed, mean ± the half-width of its 95% interval.",
    )
    report.table(
        ["method"] + [f"{s} ({find(runs, 'main', corpus, s, 'full')['params']:,.0f} params)" for s in sizes], rows
    )


def _contrast(report, runs, corpus, sizes, plan) -> None:
    rows = []
    for s in sizes:
        for key, m in plan.methods.items():
            if m.kind != "lora-only":
                continue
            only, lora = find(runs, "main", corpus, s, key), find(runs, "main", corpus, s, f"lora-r{m.rank}")
            if only and lora:
                g_only = gap_spread(runs, "main", corpus, s, key)
                g_lora = gap_spread(runs, "main", corpus, s, f"lora-r{m.rank}")
                rows.append(
                    [s, m.rank, only["trainable"], pct(g_only), lora["trainable"], pct(g_lora),
                     f"{g_only.mean - g_lora.mean:+.1f} pts"]
                )  # fmt: skip
    if rows:
        report.section(
            "What freezing the embeddings and head costs: lora-only vs lora at the same rank",
            "Both adapt the block matrices at rank r; lora-only also keeps the token embeddings and the output head "
            "at their random init (adapted, not trained), lora trains them fully.",
        )
        report.table(
            ["size", "r", "lora-only trainable", "lora-only gap", "lora trainable", "lora gap", "difference"], rows
        )


def _size_table(report, runs, corpus, size, keys) -> None:
    f = find(runs, "main", corpus, size, "full")
    rows = []
    seeds = {k: len(r["seeds"]) for k in keys if (r := find(runs, "main", corpus, size, k))}
    for key in keys:
        r = find(runs, "main", corpus, size, key)
        if r is None:
            continue
        trained = "held_out_ppl" in r
        rows.append(
            [
                key,
                seeds[key],
                f"{r['params']:,.0f}"
                + (f" ({r['active_params']:,.0f})" if r.get("active_params") != r["params"] else ""),
                r["trainable"],
                f"{100 * r['trainable'] / r['params']:.1f}%",
                r["held_out_loss"] if trained else "-",
                r["held_out_ppl"] if trained else "-",
                pct(gap_spread(runs, "main", corpus, size, key)) if trained and key != "full" else "-",
                r["roughness"] if trained else "-",
                f"{r['update_rank90_mean']:.1f} / {r['update_rank_max_possible']:.0f}" if trained else "-",
                f"{1000 * r['step_seconds']:.0f}",
                human_bytes(r["memory"]["optimizer"]),
                human_bytes(r["memory"]["activations"]),
                human_bytes(r["memory_accounted"]),
                human_bytes(r["measured_rss_rise"]) if r["measured_rss_rise"] is not None else "-",
                f"{r['frozen_drift']:g}",
            ]
        )
    report.section(
        f"Size {size} ({f['params']:,.0f} parameters in the dense model)",
        "Numbers are means over the seeds run; params in brackets are those active per token (a mixture of "
        "experts runs 2 of its 4 experts). Frozen drift is the largest change of any weight that does not take "
        "gradient steps: 0 proves a freeze held; ReLoRA's is non-zero by design (each restart merges s·B·A into "
        "the frozen base).",
    )
    report.table(
        [
            "method",
            "seeds",
            "params (active)",
            "trainable",
            "share",
            "held-out loss",
            "ppl",
            "gap",
            "roughness",
            "rank90(ΔW) / max",
            "ms/step",
            "optimizer state",
            "activations",
            "accounted memory",
            "measured RSS rise",
            "frozen drift",
        ],
        rows,
    )


def _longer(report, runs, plan, s) -> None:
    size, rows = s.arm.size.name, []
    f = find(runs, "main", s.corpus, size, "full")
    for key in s.arm.methods:
        short, long_ = find(runs, "main", s.corpus, size, key), find(runs, "longer", s.corpus, size, key)
        if short and long_:
            rows.append(
                [
                    key,
                    short["held_out_ppl"],
                    pct(gap_spread(runs, "main", s.corpus, size, key)) if key != "full" else "-",
                    long_["held_out_ppl"],
                    pct(gap_spread(runs, "longer", s.corpus, size, key)) if key != "full" else "-",
                    f"{short['update_rank90_mean']:.1f}",
                    f"{long_['update_rank90_mean']:.1f}",
                ]
            )
    report.section(
        f"A {s.budget.steps / plan.budget.steps:g}x longer budget at size {size} ({s.budget.steps} steps, "
        f"{s.budget.tokens:,} tokens)",
        f"Tokens per parameter go from {plan.budget.tokens / f['params']:.1f} to {s.budget.tokens / f['params']:.1f}; "
        f"ReLoRA restarts every {s.budget.relora_every} steps here.",
    )
    report.table(
        [
            "method",
            f"ppl, {plan.budget.steps} steps",
            "gap",
            f"ppl, {s.budget.steps} steps",
            "gap",
            f"rank90(ΔW), {plan.budget.steps}",
            f"rank90(ΔW), {s.budget.steps}",
        ],
        rows,
    )


RATE_FIELD = {"full": "full", "lora": "lora", "lora-only": "lora_only", "galore": "galore", "relora": "lora"}


def pilot_check(plan, pilots: list[dict]) -> str:
    """Compare each piloted (size, method)'s chosen rate with its best pilot rate; name the sizes never piloted."""
    rates = {a.size.name: a.rates for a in plan.arms}
    loss_key = next(k for k in pilots[0] if k.startswith("held-out loss"))
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for p in pilots:
        cells.setdefault((p["size"], p["method"]), []).append((p["lr"], p[loss_key]))
    notes, matched = [], 0
    for (size, method), tried in cells.items():
        if size not in rates or method not in plan.methods:
            continue
        field = RATE_FIELD[plan.methods[method].kind]
        chosen = getattr(rates[size], field) or rates[size].lora  # lora_only defaults to lora's rate
        best_lr, best = min(tried, key=lambda t: t[1])
        at = dict(tried).get(chosen)
        edge = best_lr in (min(t[0] for t in tried), max(t[0] for t in tried))
        if math.isclose(best_lr, chosen):
            matched += 1
            if edge:
                notes.append(f"{method} at {size}: its best rate {best_lr:g} is at the edge of the rates tried")
        else:
            notes.append(
                f"{method} at {size} runs at {chosen:g} ({'not piloted' if at is None else f'{at:.3f}'}) while "
                f"{best_lr:g} scored {best:.3f}" + (", at the edge of the rates tried" if edge else "")
            )
    unpiloted = [s for s in rates if not any(size == s for size, _ in cells)]
    return (
        f"{matched} of {len(cells)} piloted cells run at their best pilot rate"
        + (": " if notes else ".")
        + "; ".join(notes)
        + ("." if notes else "")
        + (
            f" Not piloted: {', '.join(unpiloted)} (the learning-rate series below checks x1/3 and x3 there)."
            if unpiloted
            else ""
        )
    )


def _lr(report, runs, plan, s) -> None:
    table = lr_table(runs, plan, s)
    scales = sorted({sc for pts in table.values() for sc, _ in pts})
    rows = []
    for key, pts in table.items():
        d = dict(pts)
        finite = [v for v in d.values() if math.isfinite(v)]
        rows.append([key] + [d.get(sc, "-") for sc in scales] + [max(finite) - min(finite) if len(finite) > 1 else "-"])
    report.section(
        f"Learning-rate sensitivity at size {s.arm.size.name}",
        "Every learning rate of the method (LoRA factors, and embeddings/norms/head where they train) scaled "
        "together; held-out loss in nats/byte, mean over seeds. A wide spread means the method punishes a mis-set "
        "rate.",
    )
    report.table(["method"] + [f"x{sc:.2g}" for sc in scales] + ["spread (max - min)"], rows)
    report.figure(
        plots.lr_sensitivity(table),
        "lr_sensitivity.png",
        f"Held-out loss against the learning-rate scale, size {s.arm.size.name}",
    )


def _replicate(report, runs, plan, s) -> None:
    size, rows = s.arm.size.name, []
    for key in s.arm.methods:
        r = find(runs, "replicate", s.corpus, size, key)
        if r:
            rows.append(
                [
                    key,
                    r["trainable"],
                    r["held_out_loss"],
                    r["held_out_ppl"],
                    pct(gap_spread(runs, "replicate", s.corpus, size, key)) if key != "full" else "-",
                    f"{r['update_rank90_mean']:.1f}",
                ]
            )
    report.section(
        f"Replication on {s.corpus}, size {size}",
        f"The same budget ({s.budget.tokens:,} tokens) on another corpus, {s.corpus}.",
    )
    report.table(["method", "trainable", "held-out loss", "ppl", "gap to full", "rank90(ΔW)"], rows)
