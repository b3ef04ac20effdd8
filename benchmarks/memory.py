"""Peak training memory: LoRA (lorakit and PEFT) against full fine-tuning, the documents' "3x less".

Model: the core benchmark's Llama-style ~150M model built from a config (hidden 768, 12 layers,
intermediate 2560, vocab 32000, untied head), batch 4 x seq 256, AdamW, loss from transformers.
LoRA: r=8, alpha=16 on q_proj, v_proj.

Cases, each in a fresh subprocess:
  full-fp32            full fine-tuning: every weight trains, fp32 weights + grads + AdamW moments
  full-fp32-ckpt       the same with gradient checkpointing
  peft-fp32            PEFT LoRA, fp32
  lorakit-fp32         lorakit LoRA, fp32
  peft-bf16-ckpt       PEFT LoRA, base cast to bf16 (adapters fp32), gradient checkpointing
  lorakit-bf16-ckpt    lorakit.inject(..., base_dtype=torch.bfloat16), gradient checkpointing
                       (= `lorakit train --base-dtype bf16 --gradient-checkpointing`)

Memory on the CPU is the process's resident set: "training memory" is the peak RSS while the
steps run (the kernel's high-water mark, reset with /proc/self/clear_refs once the model is
ready, so building the fp32 model before casting it is not counted) minus the RSS of the same
process before the model existed (Python + torch + transformers). Every case runs with the same
fixed glibc mmap threshold, so freed tensors go back to the OS the same way in all of them.
On CUDA (--device cuda) it is torch.cuda.max_memory_allocated over the steps.

    python benchmarks/memory.py                      # the run recorded in RESULTS.md
    python benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CASES = ["full-fp32", "full-fp32-ckpt", "peft-fp32", "lorakit-fp32", "peft-bf16-ckpt", "lorakit-bf16-ckpt"]
TARGETS = ["q_proj", "v_proj"]


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


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


def run_case(case: str, steps: int, batch: int, seq: int, device: str) -> dict:
    import torch

    cuda = device == "cuda"
    bare_mb = rss_mb()
    model = build_model()
    kind = case.split("-")[0]
    bf16, ckpt = "bf16" in case, case.endswith("-ckpt")
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        if bf16:
            model = model.to(torch.bfloat16)  # PEFT's recipe: load the base in bf16; adapters stay fp32
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    elif kind == "lorakit":
        import lorakit

        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        lorakit.inject(
            model,
            lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS),
            base_dtype=torch.bfloat16 if bf16 else None,
            seed=0,
        )
    elif ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32000, (batch, seq), generator=generator).to(device) for _ in range(steps)]

    ready_mb = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark to "now"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ready_cuda = torch.cuda.memory_allocated() / 2**20
    times, losses = [], []
    for ids in batches:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    result = {
        "case": case,
        "trainable": trainable,
        "total": sum(p.numel() for p in model.parameters()),
        "bare_rss_mb": bare_mb,
        "ready_rss_mb": ready_mb,
        "peak_rss_mb": rss_mb("VmHWM"),
        "train_mb": rss_mb("VmHWM") - bare_mb,
        "times": times,
        "losses": losses,
    }
    if cuda:
        result.update({"cuda_ready_mb": ready_cuda, "train_mb": torch.cuda.max_memory_allocated() / 2**20})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the peak comes in step 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default=None, help="default benchmarks/results/memory-<device>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_case(args.child, args.steps, args.batch, args.seq, args.device)))
        return

    from tqdm import tqdm

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    results = {}
    cases = args.cases.split(",")
    for case in tqdm(cases, desc="cases", unit="case"):
        command = [
            sys.executable,
            __file__,
            "--child",
            case,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--device",
            args.device,
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
        tqdm.write(
            f"{case:18s} training memory {results[case]['train_mb']:7.0f} MB  step {results[case]['times'][-1]:.2f} s"
        )

    base = results.get("full-fp32", {}).get("train_mb")
    unit = "peak CUDA MB" if args.device == "cuda" else "train MB"
    print(
        f"\n{'case':18s} {'trainable':>12s} {unit:>12s} {'/ full-fp32':>11s} {'peak RSS MB':>12s} {'s/step':>7s} "
        f"{'loss@last':>9s}"
    )
    ratios = {}
    for case, r in results.items():
        ratio = r["train_mb"] / base if base else None
        ratios[case] = ratio
        print(
            f"{case:18s} {r['trainable']:12,d} {r['train_mb']:12.0f} "
            f"{ratio if ratio is not None else float('nan'):11.3f} "
            f"{r['peak_rss_mb']:12.0f} {r['times'][-1]:7.2f} {r['losses'][-1]:9.4f}"
        )
    pairs = [("lorakit-fp32", "peft-fp32"), ("lorakit-bf16-ckpt", "peft-bf16-ckpt")]
    side_by_side = {
        f"{a} / {b}": results[a]["train_mb"] / results[b]["train_mb"] for a, b in pairs if a in results and b in results
    }
    for name, value in side_by_side.items():
        print(f"{name:38s} {value:.3f}")
    if "lorakit-bf16-ckpt" in ratios and base:
        verdict = "meets" if ratios["lorakit-bf16-ckpt"] <= 1 / 3 else "MISSES"
        print(
            f"lorakit --base-dtype bf16 + gradient checkpointing uses {ratios['lorakit-bf16-ckpt']:.3f} of full "
            "fine-tuning's "
            f"training memory: {verdict} the <= 1/3 claim"
        )

    path = Path(args.json or f"benchmarks/results/memory-{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                "settings": {k: v for k, v in vars(args).items() if k != "child"},
                "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                "ratios_to_full_fp32": ratios,
                "side_by_side": side_by_side,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
