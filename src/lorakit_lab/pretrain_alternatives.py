"""pretrain-limits' fifth verdict section: the alternatives to LoRA for pre-training, each against its reference.

gradient checkpointing (activations against time), ReLoRA (merge-and-restart against plain LoRA at its
rank), GaLore (optimizer state against full-rank), a mixture of experts against the dense model at the same
active parameters per token, LoRA on the MoE's experts against training that MoE in full, and block-local
attention against full attention. Gaps are seed-paired Spreads (pretrain_runs.py).
"""

from __future__ import annotations

from .pretrain_runs import Spread, Study, pct
from .report import human_bytes


def alternatives(st: Study) -> str:
    parts = []
    for s in st.sizes:
        parts += _restarts_and_projections(st, s) + _checkpointing(st, s) + _moe(st, s) + _local(st, s)
    return "5. **The alternatives.** " + "; ".join(parts) + "." if parts else ""


def _restarts_and_projections(st: Study, s: str) -> list[str]:
    out = []
    for k in st.trained:
        run = st.run(k, s)
        if run is None:
            continue
        if st.kind(k) == "relora":
            twin = f"lora-r{st.plan.methods[k].rank}"
            t = st.run(twin, s)
            out.append(
                f"{k} at {s} ({run['restarts']:.0f} restarts, update rank90 {run['update_rank90_mean']:.1f}"
                + (f" vs {twin}'s {t['update_rank90_mean']:.1f}): gap {pct(st.g(k, s))} vs {twin} {pct(st.g(twin, s))}"
                   if t else f"): gap {pct(st.g(k, s))}")
            )  # fmt: skip
        if st.kind(k) == "galore":
            f = st.run("full", s)
            out.append(
                f"{k} at {s} (r/d = {st.plan.methods[k].rank}/{run['hidden']}; the GaLore paper projects to about "
                f"d/4): {pct(st.g(k, s))} with optimizer state {human_bytes(run['memory']['optimizer'])} vs "
                f"full-rank's {human_bytes(f['memory']['optimizer'])}"
            )
    return out


def _checkpointing(st: Study, s: str) -> list[str]:
    ck, f = st.run("full+ckpt", s), st.run("full", s)
    if not ck or not f:
        return []
    return [
        f"gradient checkpointing at {s}: activations {human_bytes(f['memory']['activations'])} -> "
        f"{human_bytes(ck['memory']['activations'])} for {ck['step_seconds'] / f['step_seconds']:.2f}x the time "
        "per step"
    ]


def _versus(cell: Spread, worse: str, better: str) -> str:
    return worse if cell.behind else better if cell.ahead else "within the seeds' spread of"


def _moe(st: Study, s: str) -> list[str]:
    out, f = [], st.run("full", s)
    for k in (k for k in st.trained if st.arch(k) == "moe" and st.kind(k) == "full"):
        m = st.run(k, s)
        if m and f:
            cell = st.g(k, s)
            out.append(
                f"a mixture of experts at {s} ({m['active_params']:,.0f} parameters active per token of "
                f"{m['params']:,.0f}, the dense model {f['params']:,.0f}) is "
                f"{_versus(cell, 'behind', 'ahead of')} the dense model: {pct(cell)}, at "
                f"{m['step_seconds'] / f['step_seconds']:.2f}x the time per step and "
                f"{m['memory_accounted'] / f['memory_accounted']:.2f}x the accounted memory"
            )
    for k in (k for k in st.trained if st.arch(k) == "moe" and st.kind(k) == "lora"):
        r, ref = st.run(k, s), next((x for x in st.trained if st.arch(x) == "moe" and st.kind(x) == "full"), None)
        if r and ref and st.run(ref, s):
            cell = st.g(k, s, reference=ref)
            out.append(
                f"LoRA on that model's experts ({k}: one rank-{r['rank']} adapter per expert; {r['trainable']:,.0f} "
                f"trainable) is {_versus(cell, 'behind', 'ahead of')} training the MoE in full: {pct(cell)} "
                f"({pct(st.g(k, s))} to the dense model)"
            )
    return out


def _local(st: Study, s: str) -> list[str]:
    out, f = [], st.run("full", s)
    for k in (k for k in st.trained if st.arch(k) == "local"):
        r = st.run(k, s)
        if r and f:
            cell = st.g(k, s)
            out.append(
                f"block-local attention ({k}) at {s} is {_versus(cell, 'behind', 'ahead of')} full attention: "
                f"{pct(cell)}, at {r['step_seconds'] / f['step_seconds']:.2f}x the time per step and "
                f"{r['memory']['activations'] / f['memory']['activations']:.2f}x the activations"
            )
    return out
