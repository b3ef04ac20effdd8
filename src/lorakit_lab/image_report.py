"""image-styles' report: tables, figures and verdicts computed from the numbers in results."""

from __future__ import annotations

import numpy as np

from . import plots
from .report import Report, human_bytes

PIXEL_TOLERANCE = 1e-3  # max |Δ pixel| on a [0, 1] scale: a quarter of one 8-bit grey level
WEIGHT_TOLERANCE = 1e-5  # relative Frobenius error of a combined ΔW: float32 rounding of the factors
SIGNIFICANT = 3.0  # a shift counts when it exceeds this many paired standard errors


def write_report(report: Report, results: dict) -> None:
    plan, params = results["plan"], results["params"]
    a, b = (s["name"] for s in results["styles"])
    shape = plan["shape"]
    report.add(
        f"The base is a diffusers `UNet2DModel` ({params['base']:,} parameters; channels {tuple(shape['channels'])}, "
        f"{shape['layers_per_block']} ResNet block per level, attention at the lowest resolution) trained from random "
        f"init as a DDPM (1,000 noise levels, cosine schedule) on all 1,797 real 8x8 handwritten digits that ship with "
        f"scikit-learn (UCI optical recognition of handwritten digits), {plan['base_steps']} steps of batch "
        f"{plan['batch']}, AdamW lr {plan['base_lr']:g}, EMA {plan['ema']:g}. Two lorakit LoRA adapters "
        f"(r={plan['r']}, alpha={plan['r']}) on its ResNet `Conv2d` 3x3 layers and attention `Linear` layers "
        f"({', '.join(results['targets'])}) then train on one real sub-population each, "
        f"{plan['adapter_steps']} steps of batch {plan['adapter_batch']}, lr {plan['adapter_lr']:g}, everything "
        "else frozen. Every sample comes out of "
        f"diffusers' `DDIMPipeline` ({plan['sample_steps']} DDIM steps, eta 0) with the lorakit-adapted UNet inside; "
        f"sample i of every model starts from the noise of seed i, so the columns of the grid (and the "
        f"{plan['samples']} samples behind each row of the tables) are comparable image by image. " + plan["note"]
    )
    report.section("The data and its two styles")
    report.add(
        "*ink* = mean ink per pixel (0-1); *slant* = -mu11/mu02 from the image moments, the horizontal shift per row "
        "upwards in pixels (> 0 leans right). Each style is the top third of its statistic within every digit "
        "class, so both sub-populations hold the same mix of digits as the whole set."
    )
    describe = {s["name"]: s["description"] for s in results["styles"]}
    report.table(
        ["data", "images", "mean ink", "mean slant"],
        [
            [f"{k}: {describe[k]}" if k in describe else "all digits", d["n"], _pm(d, "ink"), _pm(d, "slant")]
            for k, d in results["data"].items()
        ],
    )
    report.figure(
        plots.digit_grid([(k, np.array(v)) for k, v in results["data_examples"].items()]),
        "data.png",
        "Real digits: the first images of the whole set and of each sub-population",
    )
    report.section("The adapters")
    n = params["base"]
    report.table(
        ["model", "parameters", "share of the base", "file"],
        [
            ["base UNet (trained fully)", n, "100%", "-"],
            *[
                [
                    f"style adapter {k}",
                    params[k],
                    f"{100 * params[k] / n:.2f}%",
                    human_bytes(params["adapter_file_bytes"]),
                ]
                for k in (a, b)
            ],
            [
                f"a combination (exact: rank {results['checks']['combine_rank']} = r_A + r_B)",
                params[a] + params[b],
                f"{100 * (params[a] + params[b]) / n:.2f}%",
                "-",
            ],
        ],
        caption=f"lorakit adapts {params['adapted_layers']} layers (Conv2d and Linear) of the UNet:",
    )
    sec = results["seconds"]
    report.add(
        "Cost on the CPU named above, 1 process: "
        + ", ".join(f"{k} {v['cpu']:.0f} CPU-s ({v['wall']:.0f} s wall)" for k, v in sec.items())
        + "."
    )
    report.figure(plots.ddpm_losses(results), "losses.png", "Denoising loss while training the base and each adapter")
    report.section("Samples")
    report.figure(
        plots.digit_grid([(r["label"], np.array(results["grid"][r["key"]])) for r in results["rows"]]),
        "samples.png",
        "Samples through diffusers' DDIMPipeline; column i starts from seed i's noise in every row",
    )
    report.section(f"Style statistics of {plan['samples']} samples per model", _stats_note())
    report.table(*style_table(results))
    report.figure(
        plots.style_curves(results),
        "styles.png",
        "Mean ink and slant of the samples against the mix weight (bars: standard error; dotted: the data)",
    )
    report.section("Exactness", "")
    report.table(*exactness_table(results))
    report.section("Verdicts (computed from the numbers above)", "\n".join(verdicts(results)))


def _pm(d: dict, stat: str) -> str:
    return f"{d[stat]:.4f} ± {d[f'{stat}_se']:.4f}"


def _shift(row: dict, stat: str) -> str:
    return f"{row[f'{stat}_shift']:+.4f} ± {row[f'{stat}_shift_se']:.4f}" if row["key"] != "base" else "-"


def _stats_note() -> str:
    return (
        "Mean ± standard error over the samples. *vs base* is the paired shift (sample i against the base's "
        "sample i, same starting noise) ± its standard error, far smaller than the rows' own errors. The data's own "
        "values are the last rows (their *vs base* is a plain difference of means)."
    )


def style_table(results: dict) -> tuple[list[str], list[list]]:
    rows = {r["key"]: r for r in results["rows"]}
    base = rows["base"]
    table = []
    for r in results["rows"]:
        weights = ", ".join(f"{k} {w:g}" for k, w in r["weights"].items()) or "-"
        table.append([r["label"], weights, _pm(r, "ink"), _shift(r, "ink"), _pm(r, "slant"), _shift(r, "slant")])
    for k, d in results["data"].items():
        table.append(
            [
                f"*data: {k}*",
                "-",
                _pm(d, "ink"),
                f"{d['ink'] - base['ink']:+.4f}",
                _pm(d, "slant"),
                f"{d['slant'] - base['slant']:+.4f}",
            ]
        )
    return ["samples of", "adapter weights", "mean ink", "vs base", "mean slant", "vs base"], table


def exactness_table(results: dict) -> tuple[list[str], list[list]]:
    c = results["checks"]
    a, b = (s["name"] for s in results["styles"])
    mix = ", ".join(f"{w:g}·{k}" for k, w in c["mix_weights"].items())
    rows = [
        [
            f"{a} merged into the weights (lorakit.merge) vs unmerged: samples",
            c["merged_vs_unmerged_max_abs"],
            PIXEL_TOLERANCE,
        ],
        [
            f"lorakit.combine({mix}) saved, vs the weighted sum of the two saved adapters' s·B·A (plain matmul): "
            "ΔW, relative",
            c["combine_weight_max_rel_error"],
            WEIGHT_TOLERANCE,
        ],
        [
            f"lorakit.combine({mix}) vs a plain UNet holding W0 + that weighted sum: samples",
            c["combine_vs_reference_max_abs"],
            PIXEL_TOLERANCE,
        ],
        [
            f"{a} saved by lorakit, loaded by PEFT into a plain UNet (merge_and_unload) vs lorakit: samples",
            c["peft_vs_lorakit_max_abs"],
            PIXEL_TOLERANCE,
        ],
    ]
    return ["check", "max abs difference", "tolerance", "verdict"], [
        [what, f"{value:.2e}", f"{tol:g}", "equal" if value <= tol else "DIFFERENT"] for what, value, tol in rows
    ]


def verdicts(results: dict) -> list[str]:
    rows = {r["key"]: r for r in results["rows"]}
    styles = results["styles"]
    base = rows["base"]
    lines = []
    for i, style in enumerate(styles, 1):
        name, stat = style["name"], style["stat"]
        other = next(s["stat"] for s in styles if s["stat"] != stat)
        target, got, start = results["data"][name][stat], rows[name][stat], base[stat]
        closed = (got - start) / (target - start) if target != start else float("nan")
        shift, error = rows[name][f"{stat}_shift"], rows[name][f"{stat}_shift_se"]
        toward = abs(got - target) < abs(start - target) and abs(shift) > SIGNIFICANT * error
        side = rows[name][f"{other}_shift"]
        own = results["data"][name][other] - results["data"]["all"][other]
        lines.append(
            f"{i}. **Style {name} moves the samples toward its sub-population: {'yes' if toward else 'no'}** - mean "
            f"{stat} {start:.4f} (base) -> {got:.4f} with the adapter; the {name} digits have {target:.4f} "
            f"({100 * closed:.0f}% of the gap closed; the paired shift is {abs(shift) / max(error, 1e-12):.0f} "
            f"standard errors). Its {other} moves {side:+.4f} (the {name} digits differ from all digits by {own:+.4f} "
            f"in {other})."
        )
    mixed = sorted((r for r in results["rows"] if r["mix_weight"] is not None), key=lambda r: r["mix_weight"])
    ws = ", ".join(f"{r['mix_weight']:g}" for r in mixed)
    for stat in ("ink", "slant"):
        values = [r[stat] for r in mixed]
        steps = np.diff(values)
        direction = np.sign(values[-1] - values[0])
        monotone = bool(direction != 0 and np.all(np.sign(steps) == direction))
        lines.append(
            f"{len(lines) + 1}. **Mixes land in between, monotone in the weight ({stat}): "
            f"{'yes' if monotone else 'no'}** - w = {ws} on {styles[0]['name']}: "
            + " -> ".join(f"{v:.4f}" for v in values)
            + "."
        )
    if "both" in rows:
        kept = [
            (rows["both"][s["stat"]] - base[s["stat"]]) / (rows[s["name"]][s["stat"]] - base[s["stat"]])
            if rows[s["name"]][s["stat"]] != base[s["stat"]]
            else float("nan")
            for s in styles
        ]
        lines.append(
            f"{len(lines) + 1}. **Both styles at full weight** (not a mix, a sum): the samples keep "
            f"{100 * kept[0]:.0f}% of {styles[0]['name']}'s {styles[0]['stat']} shift and {100 * kept[1]:.0f}% of "
            f"{styles[1]['name']}'s {styles[1]['stat']} shift."
        )
    _, table = exactness_table(results)
    equal = all(row[-1] == "equal" for row in table)
    lines.append(
        f"{len(lines) + 1}. **Exactness: {'holds' if equal else 'FAILS'}** - merged and unmerged adapters, the "
        "combination and the weighted sum of deltas, and PEFT reading lorakit's file give the same samples "
        "within the tolerances above."
    )
    return lines
