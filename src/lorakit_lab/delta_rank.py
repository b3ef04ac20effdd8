"""delta-rank: how low-rank is the update fine-tuning makes? (the LoRA paper, Section 7, measured)

LoRA rests on the hypothesis that the fine-tuning update ΔW has a low "intrinsic rank". Here
all-MiniLM-L6-v2 learns movie-review sentiment (a real task, finetune.py) in two ways:

* full fine-tuning: ΔW = W_after - W_before for every W_q and W_v. Its singular values give the
  rank that holds 90% of ||ΔW||_F^2, and how much energy a rank-r matrix can capture at best
  (Eckart-Young), against what a random r-dimensional subspace would (r/d);
* LoRA on q,v at r = 8 and 64, two seeds each: how much of the full update's energy lies in the
  adapter's output subspace, and the normalised subspace similarity
      phi(U1, U2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)
  between the top singular directions of adapters of different rank and seed (1 = same space,
  about j/d for unrelated ones), on ΔW's output side and on A's input side as the paper does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lorakit.model_state import lora_layers

from . import finetune, plots
from .finetune import Variant
from .report import Report
from .spectra import captured_energy, energy_rank, left_basis, projected_energy, singular_values, subspace_similarity

TITLE = "delta-rank: the rank of fine-tuning updates, and how adapters of different rank and seed align"


@dataclass
class Plan:
    steps: int
    ranks: tuple[int, int]
    seeds: tuple[int, int]
    train: int | None
    eval: int
    shape: tuple[int, int]


FULL = Plan(steps=60, ranks=(8, 64), seeds=(0, 1), train=None, eval=400, shape=(16, 48))
QUICK = Plan(steps=3, ranks=(2, 8), seeds=(0, 1), train=256, eval=16, shape=(8, 32))
CAPTURE_RANKS = (1, 2, 4, 8, 16, 32, 64)


def qv_updates(model: nn.Module, targets: list[str], before: dict | None = None) -> dict[str, dict]:
    """{matrix name: {"w": effective weight, "delta": w - before's w, "a": the adapter's A or None}} for q and v."""
    adapted = dict(lora_layers(model))
    out = {}
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] not in targets:
            continue
        if path in adapted:
            layer = adapted[path]
            w = layer.base_layer.weight.detach().double() + layer.delta_weight("default").detach().double()
            a = layer.a_2d("default").detach().double()
        else:
            w, a = module.weight.detach().double().clone(), None
        short = path.replace("bert.encoder.layer.", "L").replace(".attention.self.", ".")
        out[short] = {"w": w, "a": a, "delta": w - before[short]["w"] if before else torch.zeros_like(w)}
    return out


def run(out, quick: bool, command: str) -> dict:
    report = Report("delta-rank", TITLE, command, quick)
    plan = QUICK if quick else FULL
    warnings.filterwarnings("ignore", message=".*newly initialized.*")
    from transformers.utils import logging

    logging.set_verbosity_error()
    task = finetune.sentiment_task(plan.train, plan.eval, plan.shape[1], plan.shape[0])
    before = qv_updates(task.load(), task.qv)  # pretrained weights, loaded exactly as each run loads them
    small, big = plan.ranks
    variants = [(Variant("full", "full"), 0)] + [
        (Variant(f"lora-qv-r{r}", "lora", r), s) for r in plan.ranks for s in plan.seeds
    ]
    runs, updates = [], {}
    with tqdm(total=plan.steps * len(variants), desc="delta-rank", unit="step") as bar:
        for variant, seed in variants:
            bar.set_postfix_str(f"{variant.key} seed {seed}")
            record = finetune.train_variant(
                task, variant, plan.steps, seed=seed, bar=bar, keep_model=True, measure_costs=False
            )
            model = record.pop("model")
            key = variant.key if variant.kind == "full" else f"r{variant.r}-s{seed}"
            updates[key] = qv_updates(model, task.qv, before)
            runs.append(
                {"key": key, "held_out_accuracy": record["held_out"]["accuracy"], "trainable": record["trainable"]}
            )
            del model
    layers = []
    for name, full in updates["full"].items():
        d = full["delta"].shape[0]
        s0 = f"r{small}-s{plan.seeds[0]}"
        row = {
            "layer": name,
            "shape": list(full["delta"].shape),
            "rank90_full": energy_rank(full["delta"], 0.9),
            "rank50_full": energy_rank(full["delta"], 0.5),
            "singular_values": singular_values(full["delta"]).tolist(),
            # string keys: the same after a round trip through results.json
            "best_capture": {str(r): captured_energy(full["delta"], r) for r in CAPTURE_RANKS if r <= d},
            "random_capture": {str(r): r / d for r in CAPTURE_RANKS if r <= d},
            "lora_capture": {},
            "lora_rank90": {},
        }
        for key, ups in updates.items():
            if key == "full":
                continue
            r = int(key[1:].split("-")[0])
            row["lora_capture"][key] = projected_energy(full["delta"], left_basis(ups[name]["delta"], r))
            row["lora_rank90"][key] = energy_rank(ups[name]["delta"], 0.9)
        u = {key: left_basis(ups[name]["delta"]) for key, ups in updates.items() if key != "full"}
        a = {
            key: left_basis(ups[name]["a"].T)
            for key, ups in updates.items()
            if key != "full" and ups[name]["a"] is not None
        }
        s1, b0, b1 = f"r{small}-s{plan.seeds[1]}", f"r{big}-s{plan.seeds[0]}", f"r{big}-s{plan.seeds[1]}"
        row["phi_rank"] = [
            [subspace_similarity(u[s0], u[b0], i, j) for j in range(1, big + 1)] for i in range(1, small + 1)
        ]
        row["phi_rank_A"] = [
            [subspace_similarity(a[s0], a[b0], i, j) for j in range(1, big + 1)] for i in range(1, small + 1)
        ]
        row["phi_seed_top"] = {
            f"r{small}": [subspace_similarity(u[s0], u[s1], i, i) for i in range(1, small + 1)],
            f"r{big}": [subspace_similarity(u[b0], u[b1], i, i) for i in range(1, big + 1)],
        }
        row["phi_seed_top_A"] = {f"r{big}": [subspace_similarity(a[b0], a[b1], i, i) for i in range(1, big + 1)]}
        layers.append(row)
    results = {
        "plan": plan.__dict__,
        "runs": runs,
        "layers": layers,
        "task": task.description,
        "lr_full": task.lr_full,
        "lr_lora": task.lr_lora,
    }
    write_report(report, results, plan)
    report.write(out, results)
    return results


def write_report(report: Report, results: dict, plan: Plan) -> None:
    small, big = plan.ranks
    s0, b0 = f"r{small}-s{plan.seeds[0]}", f"r{big}-s{plan.seeds[0]}"
    report.add(
        f"Task: {results['task']}. Every run: {plan.steps} steps x batch {plan.shape[0]}, same batches; full "
        "fine-tuning "
        f"lr {results['lr_full']:g}, LoRA lr {results['lr_lora']:g} with alpha 16. Held-out accuracy: "
        + ", ".join(f"{r['key']} {r['held_out_accuracy']:.3f}" for r in results["runs"])
        + "."
    )
    rows = []
    for row in results["layers"]:
        d = min(row["shape"])
        rows.append(
            [
                row["layer"],
                f"{row['shape'][0]} x {row['shape'][1]}",
                row["rank50_full"],
                row["rank90_full"],
                f"{100 * row['best_capture'][str(small)]:.1f}%",
                f"{100 * row['lora_capture'][s0]:.1f}%",
                f"{100 * small / d:.1f}%",
                f"{100 * row['best_capture'][str(big)]:.1f}%" if str(big) in row["best_capture"] else "-",
                f"{100 * row['lora_capture'][b0]:.1f}%",
                row["lora_rank90"][b0],
            ]
        )
    report.section("The full fine-tuning update ΔW, and what rank-r adapters capture of it")
    report.table(
        [
            "matrix",
            "d x k",
            "rank 50%",
            "rank 90%",
            f"best rank-{small}",
            f"LoRA r={small} subspace",
            f"random {small}-dim",
            f"best rank-{big}",
            f"LoRA r={big} subspace",
            f"rank 90% of LoRA r={big}'s ΔW",
        ],
        rows,
        caption="'best rank-r' = the energy share of the best rank-r approximation of the full update (Eckart-Young); "
        "'LoRA subspace' = the share of the full update's energy inside the trained adapter's output subspace.",
    )
    rows = []
    for row in results["layers"]:
        phi = row["phi_rank"]
        rows.append(
            [
                row["layer"],
                f"{phi[0][0]:.3f}",
                f"{phi[0][-1]:.3f}",
                f"{phi[-1][small - 1]:.3f}",
                f"{row['phi_rank_A'][0][0]:.3f}",
                f"{row['phi_seed_top'][f'r{small}'][0]:.3f}",
                f"{row['phi_seed_top'][f'r{big}'][0]:.3f}",
                f"{row['phi_seed_top'][f'r{big}'][small - 1]:.3f}",
                f"{row['phi_seed_top_A'][f'r{big}'][small - 1]:.3f}",
                f"{small / min(row['shape']):.3f}",
            ]
        )
    report.section("Subspace similarity between adapters (LoRA paper, Section 7.2)")
    report.table(
        [
            "matrix",
            f"phi(r{small}, r{big}, 1, 1)",
            f"phi(r{small}, r{big}, 1, {big})",
            f"phi(r{small}, r{big}, {small}, {small})",
            "same on A, (1, 1)",
            f"seeds r{small}, top-1",
            f"seeds r{big}, top-1",
            f"seeds r{big}, top-{small}",
            f"seeds r{big} on A, top-{small}",
            f"random, top-{small}",
        ],
        rows,
        caption="phi on ΔW's output directions unless marked 'A' (input directions of the down-projection, as in the "
        "paper). "
        f"Seed columns compare seed {plan.seeds[0]} and seed {plan.seeds[1]}.",
    )
    report.figure(
        plots.delta_spectra(results, plan),
        "spectra.png",
        "Singular values and captured energy of the full fine-tuning update ΔW",
    )
    report.figure(
        plots.delta_similarity(results, plan),
        "subspace_similarity.png",
        f"phi(r{small}, r{big}, i, j) on one layer (output side and A side), the paper's Figure 3 layout",
    )
    report.section("The documents' claims against these measurements", verdicts(results, plan))


def verdicts(results: dict, plan: Plan) -> str:
    small, big = plan.ranks
    s0 = f"r{small}-s{plan.seeds[0]}"
    layers = results["layers"]
    n = len(layers)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rank90 = mean([r["rank90_full"] for r in layers])
    dmin = mean([min(r["shape"]) for r in layers])
    best = mean([r["best_capture"][str(small)] for r in layers])
    rand = mean([small / min(r["shape"]) for r in layers])
    lora = mean([r["lora_capture"][s0] for r in layers])
    phi11 = mean([r["phi_rank"][0][0] for r in layers])
    phi_a = mean([r["phi_rank_A"][0][0] for r in layers])
    seeds = mean([r["phi_seed_top"][f"r{big}"][small - 1] for r in layers])
    lines = [
        '1. **"The update has a low intrinsic rank": '
        f"{'agrees' if rank90 < dmin / 4 else 'not for full fine-tuning here'}.** "
        f"Full fine-tuning's ΔW needs on average {rank90:.0f} of {dmin:.0f} directions for 90% of its energy ({n} "
        "matrices); its best "
        f"rank-{small} approximation holds {100 * best:.1f}% (a random {small}-dim subspace: {100 * rand:.1f}%). "
        f"The rank varies by depth: {layers[0]['layer']} needs {layers[0]['rank90_full']}, {layers[-1]['layer']} "
        f"{layers[-1]['rank90_full']}. "
        "The energy is concentrated but the tail is long: Adam also spreads small updates over many directions. "
        "LoRA's claim is that a low-rank update suffices, which the finetune-vs-full report tests on quality.",
        f"2. **LoRA finds the update's dominant directions: {'agrees' if lora > 2 * rand else 'no'}.** The r={small} "
        "adapter's output "
        f"subspace holds {100 * lora:.1f}% of the full update's energy, against {100 * best:.1f}% for the best "
        f"possible rank-{small} "
        f"subspace and {100 * rand:.1f}% for a random one.",
        f"3. **Adapters of different rank share their top direction (paper: phi(r8, r64, 1, 1) > 0.5): "
        f"{'agrees' if phi11 > 0.5 else 'weaker here'}.** Mean phi(r{small}, r{big}, 1, 1) = {phi11:.3f} on ΔW's "
        "output side, "
        f"{phi_a:.3f} on A; two seeds at r={big} overlap {seeds:.3f} in their top-{small} directions (random: "
        f"~{rand:.3f}). "
        f"Across seeds the overlap is {'well above' if seeds > 3 * rand else 'close to'} chance but far from 1: the "
        "top direction "
        "is shared across ranks trained from the same seed, less so across seeds. "
        + (
            "A keeps much of its random start after this short run, so the input side aligns less than the output "
            "side, which B learns from zero."
            if phi_a < phi11 - 0.1
            else "The input side (A) aligns about as much as the output side."
        ),
    ]
    return "\n".join(lines)
