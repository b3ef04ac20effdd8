"""Looking up pretrain-limits runs in results.json, and the gap to full-rank that every table and verdict uses.

gap(r, full) = ppl_r / ppl_full - 1, in percent: positive = behind full-rank at the same token budget.

A comparison runs with several seeds (each seed its own random init and batch order, shared by every
method at that seed), so a gap is paired seed by seed and summarised as a Spread: the mean and the
half-width of its 95% Student-t interval, h = t(0.975, n-1)·sd/sqrt(n). A gap is called behind (or
ahead) only when the whole interval is above (below) zero; with one seed there is no interval and
nothing is called either way. The same holds for a difference of gaps (a larger rank, a larger model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# t(0.975, df) for df = 1..10: the 95% two-sided quantile of Student's t
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


@dataclass(frozen=True)
class Spread:
    """A mean over seeds and the half-width of its 95% t-interval (inf with fewer than two seeds)."""

    mean: float
    half: float
    n: int

    @classmethod
    def of(cls, values) -> Spread:
        vals = [v for v in values if not math.isnan(v)]
        n = len(vals)
        if n == 0:
            return cls(float("nan"), float("nan"), 0)
        if any(math.isinf(v) for v in vals):  # a diverged run: infinitely behind, no interval to speak of
            return cls(math.inf if any(v > 0 for v in vals if math.isinf(v)) else -math.inf, 0.0, n)
        mean = sum(vals) / n
        if n == 1:
            return cls(mean, math.inf, 1)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        return cls(mean, T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n), n)

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    @property
    def behind(self) -> bool:
        """The whole interval above zero (for a gap: worse than full-rank)."""
        return self.lo > 0

    @property
    def ahead(self) -> bool:
        return self.hi < 0

    def __str__(self) -> str:
        return pct(self)


def seed_runs(runs, series, corpus, size, method, scale=1.0) -> dict[int, dict]:
    """{seed: run} for one (series, corpus, size, method, lr scale)."""
    return {
        r.get("seed", 0): r
        for r in runs
        if r["series"] == series
        and r["corpus"] == corpus
        and r["size"] == size
        and r["method"] == method
        and math.isclose(r["lr_scale"], scale)
    }


def series_runs(runs, series, corpus, size, scale=1.0):
    """{method: the seed-averaged run} for one (series, corpus, size, lr scale)."""
    methods = dict.fromkeys(
        r["method"]
        for r in runs
        if r["series"] == series and r["corpus"] == corpus and r["size"] == size and math.isclose(r["lr_scale"], scale)
    )
    return {m: find(runs, series, corpus, size, m, scale) for m in methods}


def find(runs, series, corpus, size, method, scale=1.0):
    """The run averaged over its seeds (see `average`), or None."""
    by_seed = seed_runs(runs, series, corpus, size, method, scale)
    return average(list(by_seed.values())) if by_seed else None


def average(group: list[dict]) -> dict:
    """One run whose numbers are the seeds' means (curves pointwise); `seeds` keeps every seed's run."""
    if len(group) == 1:
        return {**group[0], "seeds": group}
    out = dict(group[0])
    for key, value in group[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
            values = [r[key] for r in group]
            out[key] = value if all(v == value for v in values) else _mean(values)  # sizes and ranks stay whole
        elif key in ("train_loss", "eval_curve", "rank_curve"):
            out[key] = _mean_curve([r[key] for r in group], pairs=key != "train_loss")
        elif key == "memory":
            out[key] = {k: _mean([r[key][k] for r in group]) for k in value}
    out["diverged"] = any(r.get("diverged") for r in group)
    out["seeds"] = group
    return out


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _mean_curve(curves, pairs: bool):
    length = min(len(c) for c in curves)
    if not pairs:
        return [sum(c[i] for c in curves) / len(curves) for i in range(length)]
    return [(curves[0][i][0], sum(c[i][1] for c in curves) / len(curves)) for i in range(length)]


def gap(r, f) -> float:
    """Held-out perplexity of r relative to full-rank run f, in percent.

    A run that diverged is infinitely behind (+inf); nan when a run is missing or full-rank diverged.
    """
    if r is None or f is None or f.get("diverged"):
        return float("nan")
    if r.get("diverged"):
        return math.inf
    return 100 * (r["held_out_ppl"] / f["held_out_ppl"] - 1)


def seed_gaps(runs, series, corpus, size, method, reference="full", scale=1.0) -> dict[int, float]:
    """{seed: gap of `method` to `reference` run at the same seed}."""
    mine = seed_runs(runs, series, corpus, size, method, scale)
    theirs = seed_runs(runs, series, corpus, size, reference, scale)
    return {s: gap(mine[s], theirs[s]) for s in mine if s in theirs}


def gap_spread(runs, series, corpus, size, method, reference="full", scale=1.0) -> Spread:
    return Spread.of(seed_gaps(runs, series, corpus, size, method, reference, scale).values())


def difference(a: dict[int, float], b: dict[int, float]) -> Spread:
    """a - b, seed by seed (the seeds both have)."""
    return Spread.of(a[s] - b[s] for s in a if s in b)


def pct(x) -> str:
    if isinstance(x, Spread):
        if x.n > 1 and math.isfinite(x.mean):
            return f"{x.mean:+.1f}% ± {x.half:.1f}"
        x = x.mean
    return "diverged" if x == math.inf else f"{x:+.1f}%" if math.isfinite(x) else "-"


def lr_table(runs, plan, s) -> dict[str, list[tuple[float, float]]]:
    """{method: [(scale, held-out loss averaged over seeds)]}; scale 1 from the main grid when it ran at the same
    rates."""
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


def lr_spreads(runs, plan, s) -> dict[str, dict[int, float]]:
    """{method: {seed: max - min held-out loss over the lr scales}} (scale 1 from the main grid as in lr_table)."""
    size, out = s.arm.size.name, {}
    base = any(a.size == s.arm.size and a.rates == s.arm.rates for a in plan.arms) and s.budget == plan.budget
    for key in s.arm.methods:
        per_seed: dict[int, list[float]] = {}
        for sc in s.lr_scales:
            for seed, r in seed_runs(runs, "lr", s.corpus, size, key, sc).items():
                per_seed.setdefault(seed, []).append(r["held_out_loss"])
        if base and s.corpus == plan.corpus:
            for seed, r in seed_runs(runs, "main", s.corpus, size, key).items():
                per_seed.setdefault(seed, []).append(r["held_out_loss"])
        out[key] = {
            seed: (max(v) - min(v)) if all(math.isfinite(x) for x in v) else math.inf
            for seed, v in per_seed.items()
            if len(v) > 1
        }
    return out


@dataclass
class Study:
    """The runs and plan, with the lookups every verdict shares."""

    runs: list
    plan: object
    sizes: list[str]
    trained: list[str]

    def kind(self, key: str) -> str:
        return self.plan.methods[key].kind

    def arch(self, key: str) -> str:
        return self.plan.methods[key].arch

    def group(self, kind: str) -> list[str]:
        return [k for k in self.trained if self.kind(k) == kind and self.arch(k) == "dense"]

    def run(self, key, size, series="main", corpus=None):
        return find(self.runs, series, corpus or self.plan.corpus, size, key)

    def gaps(self, key, size, series="main", corpus=None, reference="full") -> dict[int, float]:
        return seed_gaps(self.runs, series, corpus or self.plan.corpus, size, key, reference)

    def g(self, key, size, series="main", corpus=None, reference="full") -> Spread:
        return Spread.of(self.gaps(key, size, series, corpus, reference).values())

    def measured(self, key, size, field: str, series="main") -> dict[int, float]:
        return {s: r[field] for s, r in seed_runs(self.runs, series, self.plan.corpus, size, key).items()}

    def seeds(self) -> int:
        return len(self.plan.seeds)
