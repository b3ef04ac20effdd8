"""pretrain-limits' verdicts: each of the documents' four reasons checked against the measured numbers.

Every verdict word (agrees / disagrees / partly / no clear trend) is chosen by a comparison of measured
values, never written in advance, and every comparison uses the seeds' spread (pretrain_runs.Spread):
a gap g = ppl_m / ppl_full - 1 counts as "behind" only when its 95% interval over seeds lies above 0.

* parameter space   - lora-only's gap at every size: agrees if behind everywhere, disagrees if nowhere;
* expressiveness    - the mechanism holds if full-rank's own update has rank90(W_t - W_0) > r, and it
                      costs quality if raising r (r8 -> r32) lowers the gap (the seed-paired drop's interval > 0);
* stability         - a learning-rate cliff (held-out loss spread over lr scales above 1.5x full-rank's, or a
                      divergence) and loss-curve noise (roughness above 1.2x full-rank's), each beyond the seeds'
                      interval; both = agrees, one = partly;
* scalability       - the gap from the smallest to the largest size, and from the main budget to the longer
                      one: an arm agrees when it ends behind and its gap grew (the paired change's interval > 0);
* alternatives      - gradient checkpointing, ReLoRA, GaLore, a mixture of experts at equal active parameters,
                      block-local attention and LoRA on the MoE's experts, each against its reference.
"""

from __future__ import annotations

import math

from .pretrain_alternatives import alternatives
from .pretrain_runs import Spread, Study, difference, lr_spreads, pct

NOISE = "its 95% interval over seeds"


def verdicts(runs, plan, sizes, trained) -> str:
    study = Study(runs, plan, sizes, trained)
    parts = (headline, parameter_space, expressiveness, stability, scalability, alternatives, replication, caveat)
    return "\n".join(line for part in parts if (line := part(study)))


# ----- headline ----------------------------------------------------------------------------------
def _state(cells: list[Spread]) -> str:
    if all(c.behind for c in cells):
        return "falls behind full-rank"
    if any(c.behind for c in cells):
        return "lands behind full-rank in some cells and within the spread in others"
    if any(c.ahead for c in cells):
        return "does at least as well as full-rank"
    return "matches full-rank within the seeds' spread"


def headline(st: Study) -> str:
    head = []
    for group, name in (
        (st.group("lora-only"), "LoRA-only (every matrix frozen at random init)"),
        (st.group("lora"), "LoRA with trainable embeddings/head"),
    ):
        cells = {(k, s): st.g(k, s) for k in group for s in st.sizes if st.run(k, s)}
        if cells:
            ordered = sorted(cells.values(), key=lambda c: c.mean)
            shown = pct(ordered[0]) + (f" to {pct(ordered[-1])}" if len(ordered) > 1 else "")
            head.append(f"{name} {_state(list(cells.values()))} (gap {shown} over sizes and ranks)")
    for sr in st.plan.series:
        if sr.name == "longer":
            size = sr.arm.size.name
            moved = [
                f"{k} {pct(st.g(k, size))} -> {pct(st.g(k, size, 'longer', sr.corpus))}"
                for k in sr.arm.methods
                if st.kind(k) in ("lora-only", "lora") and st.run(k, size, "longer", sr.corpus)
            ]
            if moved:
                ratio = sr.budget.steps / st.plan.budget.steps
                head.append(f"with {ratio:g}x the tokens at {size}: " + ", ".join(moved))
    return (
        "**In short:** " + "; ".join(head) + f". Gaps are means over {st.seeds()} seed(s) ± the half-width of "
        f"{NOISE}; a gap counts as behind or ahead only when that whole interval is.\n"
    )


# ----- 1. parameter space ------------------------------------------------------------------------
def parameter_space(st: Study) -> str:
    only = st.group("lora-only")
    if not only:
        return ""
    k, rank = only[0], st.plan.methods[only[0]].rank
    cells = {s: st.g(k, s) for s in st.sizes if st.run(k, s)}
    word = _word([c.behind for c in cells.values()])
    twin = f"lora-r{rank}"
    parts, closes = [], []
    for s, cell in cells.items():
        r, f, t = st.run(k, s), st.run("full", s), st.run(twin, s)
        parts.append(
            f"at {s} it trains {r['trainable']:,.0f} of {f['params']:,.0f} weights "
            f"({100 * r['trainable'] / f['params']:.1f}%) and ends {pct(cell)}"
            + (f" ({twin}, {t['trainable']:,.0f} trainable: {pct(st.g(twin, s))})" if t else "")
        )
        if t and difference(st.gaps(k, s), st.gaps(twin, s)).behind:
            closes.append(s)
    tail = (
        f"Training the embeddings and head closes part of the gap at {', '.join(closes)} (the seed-paired drop's "
        "interval lies above 0): part of what LoRA-only lacks is the freedom to move those random tables, not only "
        "rank in the block matrices."
        if closes
        else "Training the embeddings and head does not close the gap beyond the spread."
        if any(c.behind for c in cells.values())
        else ""
    )
    return f"1. **Limited parameter space: {word}.** {k}: " + "; ".join(parts) + ". " + tail


def _word(flags: list[bool]) -> str:
    return "agrees" if flags and all(flags) else "disagrees" if not any(flags) else "partly agrees"


# ----- 2. expressiveness -------------------------------------------------------------------------
def expressiveness(st: Study) -> str:
    adapters = st.group("lora-only") + st.group("lora")
    f_big = st.run("full", st.sizes[-1])
    if not adapters or not f_big or not f_big["rank_curve"]:
        return ""
    r_min = min(st.plan.methods[k].rank for k in adapters)
    mech = min(st.measured("full", st.sizes[-1], "update_rank90_mean").values()) > r_min
    steps = _rank_steps(st)
    drops = {(s, a, b): difference(st.gaps(a, s), st.gaps(b, s)) for s, a, b in steps}
    helps = [c for c, d in drops.items() if d.behind]
    binding = [c for c in helps if st.g(c[1], c[0]).behind]
    word = (
        "agrees"
        if mech and binding
        else "partly: a larger r helps, but only where rank r was within the spread of full-rank"
        if mech and helps
        else "the mechanism is there but it does not cost quality here"
        if mech
        else "disagrees: full-rank's own update is within reach of rank r"
    )
    ranks = {s: st.run("full", s)["update_rank90_mean"] for s in st.sizes if st.run("full", s)}
    text = (
        f"2. **Limited expressiveness: {word}.** Full-rank training's update W_t - W_0 needs rank90 "
        + ", ".join(f"{v:.1f} at {s}" for s, v in ranks.items())
        + _rank_growth(st, ranks)
        + ". The other methods' highest: "
        + ", ".join(_reach(st))
        + " - a LoRA adapter cannot exceed r; ReLoRA's merges and GaLore's moving subspace are not capped. "
    )
    if steps:
        text += "Raising the rank: " + "; ".join(
            f"{a} -> {b} at {s}: {pct(st.g(a, s))} -> {pct(st.g(b, s))}" for s, a, b in steps
        )
        text += (
            f". The larger r lowers the gap beyond the spread in {len(helps)} of {len(steps)} comparisons, "
            f"{len(binding)} of them where rank r was itself behind full-rank. "
        )
    return text + _underused(st, helps)


def _rank_steps(st: Study) -> list[tuple[str, str, str]]:
    out = []
    for s in st.sizes:
        for grp in (st.group("lora-only"), st.group("lora")):
            for a in grp:
                for b in grp:
                    if st.plan.methods[a].rank < st.plan.methods[b].rank and st.run(a, s) and st.run(b, s):
                        out.append((s, a, b))
    return out


def _rank_growth(st: Study, ranks: dict[str, float]) -> str:
    widths = list(ranks.values())
    text = ""
    if len(widths) > 1:
        steady = all(x < y for x, y in zip(widths, widths[1:]))
        text = "; it grows with width" if steady else "; it does not grow steadily with width"
    for sr in st.plan.series:
        m, lg = (st.run("full", sr.arm.size.name, series, sr.corpus) for series in ("main", "longer"))
        if sr.name == "longer" and m and lg:
            grew = lg["update_rank90_mean"] > m["update_rank90_mean"]
            text += (
                f"; {'it grows' if grew else 'it does not grow'} with training: {m['update_rank90_mean']:.1f} -> "
                f"{lg['update_rank90_mean']:.1f} at {sr.arm.size.name} over "
                f"{sr.budget.steps / st.plan.budget.steps:g}x the steps"
            )
    return text


def _reach(st: Study) -> list[str]:
    reach = []
    for k in st.trained:
        cells = [(st.run(k, s)["update_rank90_mean"], s) for s in st.sizes if k != "full" and st.run(k, s)]
        if cells:
            top, where = max(cells)
            reach.append(f"{k} {top:.1f} (at {where})")
    return reach


def _underused(st: Study, helps) -> str:
    larger = [st.run(b, s) for s, _, b in helps]
    underused = [r for r in larger if r["update_rank90_mean"] < r["rank"] / 2]
    if not underused:
        return ""
    return (
        "The larger adapters use rank90 "
        + ", ".join(f"{r['update_rank90_mean']:.1f} of r={r['rank']}" for r in underused)
        + ", and they also train more weights, so part of that gain is capacity rather than the rank cap itself."
    )


# ----- 3. stability ------------------------------------------------------------------------------
def stability(st: Study) -> str:
    cliff, lr_text = _lr_cliff(st)
    noisy, rough_text = _roughness(st)
    word = "agrees" if cliff and noisy else "partly agrees" if cliff or noisy else "disagrees"
    said = "; ".join(t for t in (lr_text, rough_text) if t)
    return f"3. **Training stability: {word}.** " + said[:1].upper() + said[1:] + "."


def _lr_cliff(st: Study) -> tuple[list[str], str]:
    series = next((s for s in st.plan.series if s.name == "lr"), None)
    if series is None:
        return [], ""
    spreads = lr_spreads(st.runs, st.plan, series)
    full = spreads.get("full", {})
    if not full:
        return [], ""
    diverged = [k for k, v in spreads.items() if any(math.isinf(x) for x in v.values())]
    cliff = [
        k
        for k, v in spreads.items()
        if k != "full" and (k in diverged or Spread.of(v[s] - 1.5 * full[s] for s in v if s in full).behind)
    ]
    scales = ", ".join(f"x{sc:.2g}" for sc in sorted({*series.lr_scales, 1.0}))
    text = (
        f"over learning-rate scales {scales} at {series.arm.size.name} the held-out loss spreads by "
        + ", ".join(f"{k} {Spread.of(v.values()).mean:.3f}" for k, v in spreads.items() if v)
        + " nats (mean over seeds)"
        + (f"; diverged: {', '.join(diverged)}" if diverged else "; nothing diverged")
        + (
            f" - {', '.join(cliff)} {'punishes' if len(cliff) == 1 else 'punish'} a mis-set rate more than 1.5x "
            "full-rank beyond the spread"
            if cliff
            else ""
        )
    )
    return cliff, text


def _roughness(st: Study) -> tuple[list[str], str]:
    big = st.sizes[-1]
    rough = {k: st.measured(k, big, "roughness") for k in st.trained if st.run(k, big)}
    full = rough.get("full", {})
    adapters = st.group("lora-only") + st.group("lora")
    noisy = [k for k in adapters if k in rough and Spread.of(v - 1.2 * full[s] for s, v in rough[k].items()).behind]
    text = (
        f"loss-curve roughness at {big} (mean |step-to-step change| over the second half): "
        + ", ".join(f"{k} {Spread.of(v.values()).mean:.3f}" for k, v in rough.items())
        + (
            f" - {', '.join(noisy)} {'is' if len(noisy) == 1 else 'are'} noisier than 1.2x full-rank beyond the spread"
            if noisy
            else " - the LoRA curves are no noisier than 1.2x full-rank's beyond the spread"
        )
    )
    return noisy, text


# ----- 4. scalability ----------------------------------------------------------------------------
def _trend(changes: list[tuple[Spread, Spread]]) -> str:
    """(final gap, change of the gap) per arm: agrees if every arm ends behind and grew; partly if some do."""
    if not changes:
        return "not measured"
    grows = [end.behind and change.behind for end, change in changes]
    if all(grows):
        return "agrees"
    if any(grows):
        return "partly agrees"
    return "disagrees" if all(change.ahead for _, change in changes) else "no clear trend"


def scalability(st: Study) -> str:
    arms = [k for k in st.group("lora-only")[:1] + st.group("lora")[:1] if all(st.run(k, s) for s in st.sizes)]
    first, last = st.sizes[0], st.sizes[-1]
    by_size = (
        [(st.g(k, last), difference(st.gaps(k, last), st.gaps(k, first))) for k in arms] if len(st.sizes) > 1 else []
    )
    by_len, lines = [], []
    for s in (s for s in st.plan.series if s.name == "longer"):
        size = s.arm.size.name
        for k in s.arm.methods:
            if k != "full" and st.kind(k) in ("lora-only", "lora") and st.run(k, size, "longer", s.corpus):
                short, long_ = st.gaps(k, size), st.gaps(k, size, "longer", s.corpus)
                by_len.append((Spread.of(long_.values()), difference(long_, short)))
                lines.append(
                    f"{k} at {size} {pct(Spread.of(short.values()))} after {st.plan.budget.steps} steps -> "
                    f"{pct(Spread.of(long_.values()))} after {s.budget.steps}"
                )
    text = f"4. **Scalability: with model size, {_trend(by_size)}; with training length, {_trend(by_len)}.** "
    if len(st.sizes) > 1 and arms:
        text += "As the model grows at fixed r (r/d shrinks): " + "; ".join(
            f"{k} " + " -> ".join(f"{pct(st.g(k, s))} at {s}" for s in st.sizes) for k in arms
        )
        text += ". "
        rates = {a.size.name: a.rates for a in st.plan.arms}
        if len({(r.full, r.lora, r.lora_only) for r in rates.values()}) > 1:
            text += "The learning rates differ between sizes (each from its pilots), which also moves these gaps. "
    if lines:
        text += "As training goes on: " + "; ".join(lines) + ". "
    return text + (
        "An arm agrees when it ends behind full-rank and its gap grew, both beyond the seeds' interval. The GaLore "
        "paper's Table 2 shows LoRA falling further behind from 60M to 1B parameters, trained on billions of tokens."
    )


# ----- 6. another corpus, and the scale caveat ---------------------------------------------------
def replication(st: Study) -> str:
    lines = []
    for s in (s for s in st.plan.series if s.name == "replicate"):
        size = s.arm.size.name
        pairs = [(k, st.g(k, size), st.g(k, size, "replicate", s.corpus)) for k in s.arm.methods if k != "full"]
        same = all(a.behind == b.behind for _, a, b in pairs)
        lines.append(
            f"6. **Another corpus ({s.corpus}, {size}): {'same picture' if same else 'a different picture'}.** "
            + "; ".join(f"{k} {pct(b)} (shakespeare {pct(a)})" for k, a, b in pairs)
            + "."
        )
    return "\n".join(lines)


def caveat(st: Study) -> str:
    params = [r["params"] for r in st.runs if r["method"] == "full"]
    tokens = max(r["tokens"] for r in st.runs)
    return (
        f"\nScale caveat: these are {min(params):,}"
        + (f" to {max(params):,}" if max(params) != min(params) else "")
        + f"-parameter byte-level models that see at most {tokens:,} tokens, far from the 60M-1B models and "
        "billions of tokens of the GaLore and ReLoRA papers; a result here says what happens at this scale."
    )
