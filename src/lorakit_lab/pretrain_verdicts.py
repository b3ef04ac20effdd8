"""pretrain-limits' verdicts: each of the documents' four reasons checked against the measured numbers.

Every verdict word (agrees / disagrees / partly / no clear trend) is chosen by a comparison of
measured values, never written in advance:

* parameter space   - lora-only's held-out gap g = ppl_m / ppl_full - 1 at every size, against
                      a materiality threshold M (agrees if g > M everywhere, disagrees if g <= M everywhere);
* expressiveness    - the mechanism holds if full-rank's own update has rank90(W_t - W_0) > r, and it
                      costs quality if raising r (r8 -> r32) lowers the gap by more than M;
* stability         - a learning-rate cliff (held-out loss spread over lr scales > 1.5x full-rank's, or a
                      divergence) and loss-curve noise (roughness > 1.2x full-rank's); both = agrees, one = partly;
* scalability       - the change of the gap from the smallest to the largest size, and from the main budget to
                      the longer one: agrees if every such change exceeds +M, partly if some do.
"""

from __future__ import annotations

import math

from .pretrain_runs import find, gap, lr_table, pct
from .report import human_bytes


def verdicts(runs, plan, sizes, trained, material: float) -> str:
    corpus, kinds = plan.corpus, {k: plan.methods[k].kind for k in trained}
    only = [k for k in trained if kinds[k] == "lora-only"]
    lora = [k for k in trained if kinds[k] == "lora"]
    big = sizes[-1]

    def g(key, size, series="main", corp=corpus):
        return gap(find(runs, series, corp, size, key), find(runs, series, corp, size, "full"))

    def gaps(key):
        return {s: g(key, s) for s in sizes if find(runs, "main", corpus, s, key)}

    def span(d):
        vals = [v for v in d.values() if not math.isnan(v)]  # a diverged run (+inf) counts as behind
        return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))

    lines = []
    # --- headline
    head = []
    for group, name in (
        (only, "LoRA-only (every matrix frozen at random init)"),
        (lora, "LoRA with trainable embeddings/head"),
    ):
        if not group:
            continue
        lo, hi = span({(k, s): v for k in group for s, v in gaps(k).items()})
        state = (
            "falls behind full-rank"
            if lo > material
            else "matches full-rank within noise"
            if max(abs(lo), abs(hi)) <= material
            else "lands near full-rank in some cells and behind in others"
            if hi > material
            else "does at least as well as full-rank"
        )
        head.append(f"{name} {state} (gap {pct(lo)}" + (f" to {pct(hi)} over sizes and ranks)" if hi != lo else ")"))
    for sr in plan.series:
        if sr.name == "longer":
            size = sr.arm.size.name
            moved = [
                f"{k} {pct(g(k, size))} -> {pct(g(k, size, 'longer', sr.corpus))}"
                for k in sr.arm.methods
                if kinds.get(k) in ("lora-only", "lora") and find(runs, "longer", sr.corpus, size, k)
            ]
            if moved:
                head.append(f"with {sr.budget.steps / plan.budget.steps:g}x the tokens at {size}: " + ", ".join(moved))
    lines.append(
        "**In short:** " + "; ".join(head) + f". A gap within +/-{material:g}% is read as noise (single seeds).\n"
    )

    # --- 1. parameter space
    if only:
        k = only[0]
        d = gaps(k)
        lo, hi = span(d)
        word = "agrees" if lo > material else "disagrees" if hi <= material else "partly agrees"
        parts = []
        for s in d:
            r, f = find(runs, "main", corpus, s, k), find(runs, "main", corpus, s, "full")
            twin = find(runs, "main", corpus, s, f"lora-r{plan.methods[k].rank}")
            parts.append(
                f"at {s} it trains {r['trainable']:,} of {f['params']:,} weights "
                f"({100 * r['trainable'] / f['params']:.1f}%) "
                f"and ends {pct(d[s])}"
                + (
                    f" (lora-r{plan.methods[k].rank}, {twin['trainable']:,} trainable: {pct(gap(twin, f))})"
                    if twin
                    else ""
                )
            )
        closes = [
            s
            for s in d
            if (t := find(runs, "main", corpus, s, f"lora-r{plan.methods[k].rank}"))
            and gap(t, find(runs, "main", corpus, s, "full")) < d[s] - material
        ]
        lines.append(
            f"1. **Limited parameter space: {word}.** {k}: "
            + "; ".join(parts)
            + ". "
            + (
                f"Training the embeddings and head closes at least {material:g} points of it at {', '.join(closes)}: "
                "part of what "
                "LoRA-only lacks is the freedom to move those random tables, not only rank in the block matrices."
                if closes
                else "Training the embeddings and head does not close the gap materially."
                if hi > material
                else ""
            )
        )
    # --- 2. expressiveness: does full-rank's update outgrow r, and does a larger r buy quality?
    f_big = find(runs, "main", corpus, big, "full")
    r_min = min(plan.methods[k].rank for k in lora + only) if lora + only else None
    if r_min is not None and f_big["rank_curve"]:
        mech = f_big["update_rank90_mean"] > r_min
        steps = [
            (s, a, b)
            for s in sizes
            for grp in (only, lora)
            for a in grp
            for b in grp
            if plan.methods[a].rank < plan.methods[b].rank
            and find(runs, "main", corpus, s, a)
            and find(runs, "main", corpus, s, b)
        ]
        helps = [(s, a, b) for s, a, b in steps if g(a, s) - g(b, s) > material]
        # the rank cap costs quality only where the rank-r adapter is itself materially behind full-rank
        binding = [(s, a, b) for s, a, b in helps if g(a, s) > material]
        word = (
            "agrees"
            if mech and binding
            else "partly: a larger r helps, but only where rank r already matched full-rank"
            if mech and helps
            else "the mechanism is there but it does not cost quality here"
            if mech
            else "disagrees: full-rank's own update is within reach of rank r"
        )
        full_rank = {
            s: find(runs, "main", corpus, s, "full")["update_rank90_mean"]
            for s in sizes
            if find(runs, "main", corpus, s, "full")
        }
        widths = list(full_rank.values())
        growth = (
            ""
            if len(widths) < 2
            else "; it grows with width"
            if all(x < y for x, y in zip(widths, widths[1:]))
            else "; it does not grow steadily with width"
        )
        for sr in plan.series:
            m, lg = (find(runs, series, sr.corpus, sr.arm.size.name, "full") for series in ("main", "longer"))
            if sr.name == "longer" and m and lg:
                grew = lg["update_rank90_mean"] > m["update_rank90_mean"]
                growth += (
                    f"; {'it grows' if grew else 'it does not grow'} with training: {m['update_rank90_mean']:.1f} -> "
                    f"{lg['update_rank90_mean']:.1f} at {sr.arm.size.name} over "
                    f"{sr.budget.steps / plan.budget.steps:g}x the steps"
                )
        reach = []  # the highest update rank each non-full method reached, and where
        for k in trained:
            cells = [
                (find(runs, "main", corpus, s, k)["update_rank90_mean"], s)
                for s in sizes
                if k != "full" and find(runs, "main", corpus, s, k)
            ]
            if cells:
                top, where = max(cells)
                reach.append(f"{k} {top:.1f} (at {where})")
        larger = [find(runs, "main", corpus, s, b) for s, _, b in helps]
        underused = [r for r in larger if r["update_rank90_mean"] < r["rank"] / 2]
        lines.append(
            f"2. **Limited expressiveness: {word}.** Full-rank training's update W_t - W_0 needs rank90 "
            + ", ".join(f"{v:.1f} at {s}" for s, v in full_rank.items())
            + f"{growth}. The other methods' highest: "
            + ", ".join(reach)
            + " - a LoRA adapter cannot exceed r; ReLoRA's merges and GaLore's moving subspace are not capped. "
            + (
                "Raising the rank: "
                + "; ".join(f"{a} -> {b} at {s}: {pct(g(a, s))} -> {pct(g(b, s))}" for s, a, b in steps)
                + ". "
                if steps
                else ""
            )
            + (
                f"A larger r buys more than {material:g} points in {len(helps)} of {len(steps)} comparisons, "
                f"{len(binding)} of them where rank r was itself more than {material:g}% behind full-rank. "
                if helps
                else ""
            )
            + (
                "The larger adapters use rank90 "
                + ", ".join(f"{r['update_rank90_mean']:.1f} of r={r['rank']}" for r in underused)
                + ", and they "
                "also train more weights, so part of that gain is capacity rather than the rank cap itself."
                if underused
                else ""
            )
        )
    # --- 3. stability: learning-rate cliff and loss-curve noise
    lr_series = [s for s in plan.series if s.name == "lr"]
    parts, cliff, loras = [], [], lora + only
    if lr_series:
        table = lr_table(runs, plan, lr_series[0])
        spread = {
            k: max(v for _, v in pts) - min(v for _, v in pts)
            for k, pts in table.items()
            if len(pts) > 1 and all(math.isfinite(v) for _, v in pts)
        }
        diverged = [k for k, pts in table.items() if any(not math.isfinite(v) for _, v in pts)]
        if "full" in spread:
            cliff = [k for k in spread if k != "full" and spread[k] > 1.5 * spread["full"]] + [
                k for k in diverged if k != "full"
            ]
            parts.append(
                f"over learning-rate scales {', '.join(f'x{sc:.2g}' for sc, _ in table['full'])} at "
                f"{lr_series[0].arm.size.name} "
                "the held-out loss spreads by "
                + ", ".join(f"{k} {v:.3f}" for k, v in spread.items())
                + " nats"
                + (f"; diverged: {', '.join(diverged)}" if diverged else "; nothing diverged")
                + (
                    f" - {', '.join(cliff)} {'punishes' if len(cliff) == 1 else 'punish'} a mis-set rate far more "
                    "than full-rank"
                    if cliff
                    else ""
                )
            )
    rough = {k: find(runs, "main", corpus, big, k)["roughness"] for k in trained if find(runs, "main", corpus, big, k)}
    noisy = [k for k in loras if k in rough and rough[k] > 1.2 * rough["full"]]
    parts.append(
        f"loss-curve roughness at {big} (mean |step-to-step change| over the second half): "
        + ", ".join(f"{k} {v:.3f}" for k, v in rough.items())
        + (
            f" - {', '.join(noisy)} {'is' if len(noisy) == 1 else 'are'} noisier than full-rank"
            if noisy
            else " - the LoRA curves are no noisier than full-rank's"
        )
    )
    word = "agrees" if cliff and noisy else "partly agrees" if cliff or noisy else "disagrees"
    said = "; ".join(parts)
    lines.append(f"3. **Training stability: {word}.** " + said[:1].upper() + said[1:] + ".")

    # --- 4. scalability: the gap against model size, and against training length
    def trend(series_of_gaps):
        """agrees if every LoRA arm ends materially behind and further behind than it started; partly if some do."""
        if not series_of_gaps:
            return "not measured"
        grows = [v[-1] > material and v[-1] - v[0] > material for v in series_of_gaps]
        if all(grows):
            return "agrees"
        if any(grows):
            return "partly agrees"
        return "disagrees" if all(v[0] - v[-1] > material for v in series_of_gaps) else "no clear trend"

    by_size = [(k, [g(k, s) for s in sizes if find(runs, "main", corpus, s, k)]) for k in only[:1] + lora[:1]]
    by_size = [(k, v) for k, v in by_size if len(v) > 1 and len(v) == len(sizes)]
    by_len = []
    for s in plan.series:
        if s.name == "longer":
            size = s.arm.size.name
            by_len += [
                (k, size, g(k, size), g(k, size, "longer", s.corpus), plan.budget.steps, s.budget.steps)
                for k in s.arm.methods
                if k != "full" and find(runs, "longer", s.corpus, size, k)
            ]
    lora_len = [[a, b] for k, _, a, b, _, _ in by_len if kinds.get(k) in ("lora-only", "lora")]
    rates = {a.size.name: a.rates for a in plan.arms}
    confound = len({(r.full, r.lora, r.lora_only) for r in rates.values()}) > 1
    lines.append(
        f"4. **Scalability: with model size, {trend([v for _, v in by_size])}; with training length, "
        f"{trend(lora_len)}.** "
        + (
            "As the model grows at fixed r (r/d shrinks): "
            + "; ".join(f"{k} " + " -> ".join(f"{pct(x)} at {s}" for x, s in zip(v, sizes)) for k, v in by_size)
            + ". "
            if by_size
            else ""
        )
        + (
            "The learning rates differ between sizes (each from its pilots), which also moves these gaps. "
            if by_size and confound
            else ""
        )
        + (
            "As training goes on: "
            + "; ".join(
                f"{k} at {size} {pct(a)} after {n} steps -> {pct(b)} after {m}" for k, size, a, b, n, m in by_len
            )
            + ". "
            if by_len
            else ""
        )
        + f"An arm agrees when it ends more than {material:g}% behind full-rank and more than {material:g} points "
        "further behind "
        "than it started. The GaLore paper's Table 2 shows LoRA falling further behind from 60M to 1B parameters, "
        "trained on "
        "billions of tokens."
    )
    # --- 5. alternatives
    parts = []
    for s in sizes:
        for k in trained:
            if kinds[k] == "relora" and find(runs, "main", corpus, s, k):
                twin, run = f"lora-r{plan.methods[k].rank}", find(runs, "main", corpus, s, k)
                twin_run = find(runs, "main", corpus, s, twin)  # None when the plan ran no plain LoRA at ReLoRA's rank
                parts.append(
                    f"{k} at {s} ({run['restarts']} restarts, update rank90 {run['update_rank90_mean']:.1f}"
                    + (
                        f" vs {twin}'s {twin_run['update_rank90_mean']:.1f}): gap {pct(g(k, s))} vs {twin} "
                        f"{pct(g(twin, s))}"
                        if twin_run
                        else f"): gap {pct(g(k, s))}"
                    )
                )
            if kinds[k] == "galore" and (r := find(runs, "main", corpus, s, k)):
                f = find(runs, "main", corpus, s, "full")
                parts.append(
                    f"{k} at {s} (r/d = {plan.methods[k].rank}/{r['hidden']}; the GaLore paper projects to about d/4): "
                    f"{pct(g(k, s))} with optimizer state {human_bytes(r['memory']['optimizer'])} "
                    f"vs full-rank's {human_bytes(f['memory']['optimizer'])}"
                )
    for s in sizes:
        ck, f = find(runs, "main", corpus, s, "full+ckpt"), find(runs, "main", corpus, s, "full")
        if ck:
            parts.append(
                f"gradient checkpointing at {s}: activations {human_bytes(f['memory']['activations'])} -> "
                f"{human_bytes(ck['memory']['activations'])} for {ck['step_seconds'] / f['step_seconds']:.2f}x the "
                "time per step"
            )
    lines.append(
        "5. **The alternatives.** " + "; ".join(parts) + ". (Mixture of experts and sparse attention are not measured.)"
    )
    # --- 6. another corpus
    for s in plan.series:
        if s.name == "replicate":
            size = s.arm.size.name
            pairs = [(k, g(k, size), g(k, size, "replicate", s.corpus)) for k in s.arm.methods if k != "full"]
            same = all((a > material) == (b > material) for _, a, b in pairs)
            lines.append(
                f"6. **Another corpus ({s.corpus}, {size}): {'same picture' if same else 'a different picture'}.** "
                + "; ".join(f"{k} {pct(b)} (shakespeare {pct(a)})" for k, a, b in pairs)
                + "."
            )
    params = [r["params"] for r in runs if r["method"] == "full"]
    tokens = max(r["tokens"] for r in runs)
    lines.append(
        f"\nScale caveat: these are {min(params):,}"
        + (f" to {max(params):,}" if max(params) != min(params) else "")
        + f"-parameter byte-level models that see at most {tokens:,} "
        "tokens, far from the 60M-1B models and billions of tokens of the GaLore and ReLoRA papers; a result here "
        "says what "
        "happens at this scale."
    )
    return "\n".join(lines)
