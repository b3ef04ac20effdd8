"""Looking up pretrain-limits runs in results.json, and the gap to full-rank that every table and verdict uses.

gap(r, full) = ppl_r / ppl_full - 1, in percent: positive = behind full-rank at the same token budget.
"""

from __future__ import annotations

import math


def series_runs(runs, series, corpus, size, scale=1.0):
    """{method: run} for one (series, corpus, size, lr scale)."""
    return {
        r["method"]: r
        for r in runs
        if r["series"] == series and r["corpus"] == corpus and r["size"] == size and math.isclose(r["lr_scale"], scale)
    }


def find(runs, series, corpus, size, method, scale=1.0):
    return series_runs(runs, series, corpus, size, scale).get(method)


def gap(r, f) -> float:
    """Held-out perplexity of r relative to full-rank run f, in percent.

    A run that diverged is infinitely behind (+inf); nan when a run is missing or full-rank diverged.
    """
    if r is None or f is None or f.get("diverged"):
        return float("nan")
    if r.get("diverged"):
        return math.inf
    return 100 * (r["held_out_ppl"] / f["held_out_ppl"] - 1)


def pct(x: float) -> str:
    return "diverged" if x == math.inf else f"{x:+.1f}%" if math.isfinite(x) else "-"


def lr_table(runs, plan, s) -> dict[str, list[tuple[float, float]]]:
    """{method: [(scale, held-out loss)]}, scale 1 taken from the main grid when it ran at the same rates."""
    size, out = s.arm.size.name, {}
    base = next(
        (a for a in plan.arms if a.size == s.arm.size and a.rates == s.arm.rates and s.budget == plan.budget), None
    )
    for key in s.arm.methods:
        pts = [(sc, r["held_out_loss"]) for sc in s.lr_scales if (r := find(runs, "lr", s.corpus, size, key, sc))]
        if base is not None and s.corpus == plan.corpus and (r := find(runs, "main", s.corpus, size, key)):
            pts.append((1.0, r["held_out_loss"]))
        out[key] = sorted(pts)
    return out
