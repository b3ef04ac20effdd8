"""Training-step speed and memory: lorakit vs PEFT vs the "floor", fp32 and bf16.

Model: a Llama-style ~150M model built from a config (hidden 768, 12 layers, intermediate 2560,
vocab 32000), batch 4 x seq 256, AdamW, LoRA r=8 alpha=16 on q_proj,v_proj, dropout 0.

Cases (each in a fresh subprocess, alternating, so none inherits another's allocator state):
  peft-fp32       PEFT, fp32
  lorakit-fp32    lorakit, fp32
  floor-fp32      same model, every weight frozen, backward to the input embeddings only:
                  the full backward pass of activations with no weight gradients, so no LoRA
                  implementation can be faster
  peft-bf16       PEFT under torch.autocast(bfloat16)
  lorakit-bf16    lorakit.inject(..., base_dtype=torch.bfloat16): base stored in bf16, adapters fp32
  floor-bf16      the floor under torch.autocast(bfloat16)

Prints a table (median s/step, ratios, peak RSS, loss after the last step) and writes JSON.

    python benchmarks/train_step.py                  # the full run recorded in RESULTS.md
    python benchmarks/train_step.py --steps 4 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ["peft-fp32", "lorakit-fp32", "floor-fp32", "peft-bf16", "lorakit-bf16", "floor-bf16"]


def build_model():
    import torch
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
    return LlamaForCausalLM(config)


def run_case(case: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    """One case in this process: returns step times, the losses and peak RSS."""
    import contextlib

    import torch

    torch.manual_seed(0)
    model = build_model()
    model.train()
    kind, precision = case.split("-")
    targets = ["q_proj", "v_proj"]
    autocast = contextlib.nullcontext
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
        if precision == "bf16":
            autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    elif kind == "lorakit":
        import lorakit

        base_dtype = torch.bfloat16 if precision == "bf16" else None
        lorakit.inject(
            model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=targets), base_dtype=base_dtype, seed=0
        )
    else:  # floor
        model.requires_grad_(False)
        if precision == "bf16":
            autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32000, (batch, seq), generator=generator) for _ in range(4)]
    embed = model.get_input_embeddings()

    times, losses = [], []
    for step in range(warmup + steps):
        ids = batches[step % len(batches)]
        start = time.perf_counter()
        with autocast():
            if kind == "floor":
                inputs = embed(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=inputs, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step >= warmup:
            times.append(elapsed)
        losses.append(loss.item())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": case, "times": times, "losses": losses, "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per case (the loss bar uses the last)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="how many times the alternating sequence of cases runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.child, args.steps, args.warmup, args.batch, args.seq)))
        return

    cases = args.cases.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for round_index in range(args.rounds):
        for case in cases:
            command = [
                sys.executable,
                __file__,
                "--child",
                case,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[case].append(result)
            print(
                f"round {round_index + 1}/{args.rounds} {case:13s} median {statistics.median(result['times']):.3f} "
                "s/step  "
                f"loss {result['losses'][-1]:.4f}  peak {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    summary = {}
    for case, results in runs.items():
        all_times = [t for r in results for t in r["times"]]
        summary[case] = {
            "median_s_per_step": statistics.median(all_times),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "final_loss": results[-1]["losses"][-1],
            "losses": results[-1]["losses"],
        }

    def ratio(a: str, b: str) -> float | None:
        if a in summary and b in summary:
            return summary[a]["median_s_per_step"] / summary[b]["median_s_per_step"]
        return None

    ratios = {
        "lorakit-fp32 / floor-fp32": ratio("lorakit-fp32", "floor-fp32"),
        "peft-fp32 / floor-fp32": ratio("peft-fp32", "floor-fp32"),
        "lorakit-fp32 / peft-fp32": ratio("lorakit-fp32", "peft-fp32"),
        "lorakit-bf16 / floor-bf16": ratio("lorakit-bf16", "floor-bf16"),
        "peft-bf16 / floor-bf16": ratio("peft-bf16", "floor-bf16"),
        "lorakit-bf16 / peft-fp32": ratio("lorakit-bf16", "peft-fp32"),
    }
    if "lorakit-bf16" in summary and "lorakit-fp32" in summary:
        fp32, bf16 = summary["lorakit-fp32"]["final_loss"], summary["lorakit-bf16"]["final_loss"]
        ratios["|loss bf16 - loss fp32| / loss fp32"] = abs(bf16 - fp32) / fp32

    print()
    print(f"{'case':14s} {'s/step':>8s} {'peak RSS MB':>12s} {'loss@last':>10s}")
    for case, row in summary.items():
        print(f"{case:14s} {row['median_s_per_step']:8.3f} {row['peak_rss_mb']:12.0f} {row['final_loss']:10.4f}")
    print()
    for name, value in ratios.items():
        if value is not None:
            print(f"{name:38s} {value:.3f}")

    record = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
