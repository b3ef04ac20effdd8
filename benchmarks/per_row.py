"""Mixed batches: lorakit.per_row (gather + batched matmul) vs PEFT's `adapter_names=`, same run.

Model: a Llama-style ~150M model built from a config (hidden 768, 12 layers, intermediate 2560,
vocab 32000), fp32 on the CPU; LoRA r=8 alpha=16 on q,k,v,o, with 64 adapters loaded on each side
(the same random non-zero weights in lorakit and PEFT). Row i of a batch uses adapter i mod n.

Phases (times are one forward pass, median over all repeats):
  prefill   16 rows x 64 tokens, no cache
  decode    64 rows x 1 new token on top of a 64-token KV cache (the cache is cropped back after
            every step, so every step sees the same cache length)
Cases per phase: `base` (the plain model, no LoRA layers at all), `lorakit-n` and `peft-n` for
n = 1, 4, 16, 64 distinct adapters in the batch. Cases alternate within each round, and the
order rotates between rounds, so background load hits all of them alike.

Bars (issue 4), decode at 64 adapters: lorakit <= 1.3x base; lorakit's overhead above base <=
1/3 of PEFT's; lorakit 64 adapters / 1 adapter <= 1.15.

    python benchmarks/per_row.py                       # the run recorded in RESULTS.md
    python benchmarks/per_row.py --rounds 1 --repeats 2 --prefill-repeats 1  # a quick look
    python benchmarks/per_row.py --kernels             # one layer's decode kernel vs gather + bmm
    python benchmarks/per_row.py --overhead            # per_row's Python cost per layer (CPU time)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

R, ALPHA, TARGETS = 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = 64


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2560,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def build_adapters(base, count: int):
    """(lorakit model, PEFT model) holding the same `count` adapters a0..a{count-1}."""
    from peft import LoraConfig, get_peft_model

    import lorakit
    from lorakit.model_state import lora_layers

    ours = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    for i in range(count):
        lorakit.inject(ours, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS), name=f"a{i}")
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            for name in layer.specs:
                for store in (layer.lora_A, layer.lora_B):
                    store[name].copy_(torch.randn(store[name].shape, generator=generator) * 0.02)
    ours.requires_grad_(False)

    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    theirs = get_peft_model(copy.deepcopy(base), peft_config, adapter_name="a0")
    for i in range(1, count):
        theirs.add_adapter(f"a{i}", peft_config)
    ours_layers = dict(lora_layers(ours))
    with torch.no_grad():
        for path, module in theirs.base_model.model.named_modules():
            if path in ours_layers:
                for name in ours_layers[path].specs:
                    module.lora_A[name].weight.copy_(ours_layers[path].lora_A[name])
                    module.lora_B[name].weight.copy_(ours_layers[path].lora_B[name])
    theirs.requires_grad_(False)
    return ours, theirs.eval()


def make_inputs(vocab: int, prefill_rows: int, decode_rows: int, base) -> dict:
    generator = torch.Generator().manual_seed(2)
    prefill = torch.randint(0, vocab, (prefill_rows, PROMPT), generator=generator)
    context = torch.randint(0, vocab, (decode_rows, PROMPT), generator=generator)
    step = torch.randint(0, vocab, (decode_rows, 1), generator=generator)
    with torch.no_grad():
        cache = base(context, use_cache=True).cache  # any 64-token cache; timing only
    return {"prefill": prefill, "decode": step, "cache": cache}


def forward(case: str, phase: str, models: dict, inputs: dict, n: int):
    """One forward pass for `case` in `phase`; returns the logits."""
    import lorakit

    ids = inputs[phase]
    kwargs = {}
    if phase == "decode":
        kwargs = {"cache": inputs["cache"], "use_cache": True}
    names = [f"a{i % n}" for i in range(ids.shape[0])]
    with torch.no_grad():
        if case == "base":
            out = models["base"](ids, **kwargs)
        elif case.startswith("lorakit"):
            with lorakit.per_row(models["lorakit"], names):
                out = models["lorakit"](ids, **kwargs)
        else:
            out = models["peft"](input_ids=ids, adapter_names=names, **kwargs)
    if phase == "decode":
        inputs["cache"].crop(PROMPT - inputs["cache"].get_seq_length())  # drop the new token again
    return out.logits


def kernel_times(rows: int = 64, adapters: int = 64, d: int = 768, repeats: int = 300) -> dict:
    """One layer's LoRA delta for a decode step (one token per row, each row its own adapter):
    the in-place decode kernel lorakit uses vs gathering each row's factors + two bmm calls."""
    import torch.nn.functional as F

    from lorakit.layers.per_row import RowIndex, delta_decode

    generator = torch.Generator().manual_seed(3)
    a = torch.randn(adapters + 1, R, d, generator=generator)
    b_t = torch.randn(adapters + 1, R, d, generator=generator)
    x = torch.randn(rows, d, generator=generator)
    weight = torch.randn(d, d, generator=generator)
    index = RowIndex((tuple(i % adapters + 1 for i in range(rows)), x.device, R, adapters + 1))

    def gathered():
        xa = torch.bmm(x[:, None], a.index_select(0, index.slots).transpose(1, 2))
        return torch.bmm(xa, b_t.index_select(0, index.slots))[:, 0]

    def in_place():
        return delta_decode(index, x, a, b_t)

    def base():
        return F.linear(x, weight)  # the frozen layer itself, for scale

    torch.testing.assert_close(in_place(), gathered(), atol=1e-4, rtol=1e-4)
    result = {}
    for name, fn in (("in_place_us", in_place), ("gather_bmm_us", gathered), ("base_linear_us", base)):
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(1e6 * (time.perf_counter() - start))
        result[name] = statistics.median(samples)
    return result


def overhead_times(layers: int = 4, adapters: int = 64, rows: int = 64, d: int = 16, repeats: int = 300) -> dict:
    """lorakit.per_row's Python cost per layer: a decode step (one token per row, each row its own
    adapter) through tiny (d x d) LoRA Linears, so the matmuls are negligible. CPU time of this process
    (time.process_time), min and median over `repeats` blocks: CPU time and the min are what other jobs
    on a shared machine disturb least. Uses only the public API, so it times any lorakit version."""
    import lorakit

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)]).eval()
    targets = [str(i) for i in range(layers)]
    for i in range(adapters):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets), name=f"a{i}")
    model.requires_grad_(False)
    names, x, samples = [f"a{i % adapters}" for i in range(rows)], torch.randn(rows, 1, d), []
    with torch.no_grad():
        for step in range(repeats + 30):  # 30 warm-up blocks
            start = time.process_time()
            with lorakit.per_row(model, names):
                model(x)
            if step >= 30:
                samples.append(1e6 * (time.process_time() - start) / layers)
    return {"min_us_per_layer": min(samples), "median_us_per_layer": statistics.median(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default="1,4,16,64", help="distinct adapters per batch, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="alternating passes over all cases")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode steps per case per round")
    parser.add_argument(
        "--prefill-repeats", type=int, default=2, help="timed prefills per case per round (each takes seconds)"
    )
    parser.add_argument("--phases", default="prefill,decode")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, 2 threads stall on each other)",
    )
    parser.add_argument("--json", default="benchmarks/results/per_row.json")
    parser.add_argument(
        "--kernels", action="store_true", help="only time one layer's decode kernels (768x768, 64 rows, 64 adapters)"
    )
    parser.add_argument(
        "--overhead", action="store_true", help="only time per_row's Python cost per layer (tiny layers, CPU time)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels or args.overhead:
        result = kernel_times() if args.kernels else overhead_times()
        print(", ".join(f"{k} {v:.0f}" for k, v in result.items()))
        path = Path(args.json).with_name("per_row_kernels.json" if args.kernels else "per_row_overhead.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                    "threads": args.threads,
                    "load_average": os.getloadavg(),
                    **result,
                },
                indent=2,
            )
        )
        print(f"wrote {path}")
        return
    counts = [int(c) for c in args.adapters.split(",")]
    phases = args.phases.split(",")

    started = time.time()
    base = build_model()
    ours, theirs = build_adapters(base, max(counts))
    models = {"base": base, "lorakit": ours, "peft": theirs}
    inputs = make_inputs(base.config.vocab_size, 16, 64, base)
    print(f"built base + {max(counts)} adapters on each side in {time.time() - started:.0f} s", flush=True)

    # Same weights, so lorakit and PEFT must agree (and differ from the base model).
    n = max(counts)
    checks = {}
    for phase in phases:
        mine, peft_out, plain = (forward(c, phase, models, inputs, n) for c in (f"lorakit-{n}", f"peft-{n}", "base"))
        checks[phase] = {
            "max_abs_diff_lorakit_vs_peft": (mine - peft_out).abs().max().item(),
            "max_abs_diff_lorakit_vs_base": (mine - plain).abs().max().item(),
        }
        print(
            f"{phase}: |lorakit - peft| = {checks[phase]['max_abs_diff_lorakit_vs_peft']:.2e}  "
            f"(|lorakit - base| = {checks[phase]['max_abs_diff_lorakit_vs_base']:.2e})",
            flush=True,
        )

    cases = ["base"] + [f"{kind}-{c}" for c in counts for kind in ("lorakit", "peft")]
    times: dict[str, dict[str, list[float]]] = {p: {c: [] for c in cases} for p in phases}
    for round_index in range(args.rounds):
        shift = round_index % len(cases)
        order = cases[shift:] + cases[:shift]
        for phase in phases:
            for case in order:
                n = int(case.split("-")[1]) if "-" in case else 1
                forward(case, phase, models, inputs, n)  # warm-up (first use of this batch layout)
                for _ in range(args.prefill_repeats if phase == "prefill" else args.repeats):
                    start = time.perf_counter()
                    forward(case, phase, models, inputs, n)
                    times[phase][case].append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{args.rounds} done ({time.time() - started:.0f} s)", flush=True)

    summary: dict[str, dict] = {}
    for phase in phases:
        med = {c: statistics.median(t) for c, t in times[phase].items()}
        base_t = med["base"]
        rows = {}
        for c in counts:
            ours_t, peft_t = med[f"lorakit-{c}"], med[f"peft-{c}"]
            rows[c] = {
                "lorakit_ms": 1000 * ours_t,
                "peft_ms": 1000 * peft_t,
                "lorakit_over_base": ours_t / base_t,
                "peft_over_base": peft_t / base_t,
                "lorakit_overhead_ms": 1000 * (ours_t - base_t),
                "peft_overhead_ms": 1000 * (peft_t - base_t),
                "overhead_ratio_lorakit_to_peft": (ours_t - base_t) / (peft_t - base_t) if peft_t > base_t else None,
            }
        summary[phase] = {
            "base_ms": 1000 * base_t,
            "by_adapters": rows,
            "lorakit_growth_1_to_max": med[f"lorakit-{counts[-1]}"] / med[f"lorakit-{counts[0]}"],
            "peft_growth_1_to_max": med[f"peft-{counts[-1]}"] / med[f"peft-{counts[0]}"],
        }

    print()
    for phase in phases:
        s = summary[phase]
        print(f"{phase}: base {s['base_ms']:.1f} ms")
        print(
            f"  {'adapters':>8s} {'lorakit ms':>11s} {'peft ms':>9s} {'lorakit/base':>13s} {'peft/base':>10s} "
            f"{'overhead lk/peft':>17s}"
        )
        for c, row in s["by_adapters"].items():
            ratio = row["overhead_ratio_lorakit_to_peft"]
            print(
                f"  {c:8d} {row['lorakit_ms']:11.1f} {row['peft_ms']:9.1f} {row['lorakit_over_base']:13.3f} "
                f"{row['peft_over_base']:10.3f} {'n/a' if ratio is None else f'{ratio:.3f}':>17s}"
            )
        print(
            f"  growth {counts[0]} -> {counts[-1]} adapters: lorakit {s['lorakit_growth_1_to_max']:.3f}x, "
            f"peft {s['peft_growth_1_to_max']:.3f}x"
        )
    bars = {}
    if "decode" in summary and max(counts) in summary["decode"]["by_adapters"]:
        row = summary["decode"]["by_adapters"][max(counts)]
        bars = {
            "decode lorakit/base <= 1.3": row["lorakit_over_base"] <= 1.3,
            "decode overhead lorakit/peft <= 1/3": row["overhead_ratio_lorakit_to_peft"] is not None
            and row["overhead_ratio_lorakit_to_peft"] <= 1 / 3,
            "decode growth 1->max <= 1.15": summary["decode"]["lorakit_growth_1_to_max"] <= 1.15,
        }
        print()
        for bar, ok in bars.items():
            print(f"{'PASS' if ok else 'FAIL'}  {bar}")

    record = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "settings": vars(args),
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "checks": checks,
        "summary": summary,
        "bars": bars,
        "times_s": times,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
