"""LoRA fine-tuning on a CPU: `lorakit train` vs TRL's SFTTrainer + a PEFT LoraConfig, side by side.

Task (default, `make demo`'s): SmolLM2-135M-Instruct (the `smollm2-135m-instruct` alias), real
movie-review sentiment as chat (system instruction, review, one-word answer), loss on the answer
only; TRL gets the same rows as conversational prompt / completion data with completion-only loss.
LoRA r=8 alpha=16 dropout 0 on q_proj,v_proj; AdamW lr 1e-3, 3 warm-up steps, cosine, batch 8,
max length 128, 32 steps, fp32, no evaluation while training; both save the adapter at the end.
`--task text`: Shakespeare speeches as plain text, every token supervised (the head cannot be
skipped there). `--targets all-linear`, `--gradient-checkpointing`: the same with those settings
on both sides (TRL's own default turns gradient checkpointing on; here it follows the flag).

Cases run alternately, each in a fresh subprocess (lorakit's runs `lorakit train` through the
CLI's own entry point), for `--rounds` rounds. Per case: steady step (median over the steps after
the first 3, in CPU seconds of the process and in wall seconds), end to end (the training
process's whole life: start, imports, load, data, all steps, save; CPU seconds user + system and
wall seconds), peak RSS of that process (kernel high-water mark via wait4), and the held-out loss
on the supervised tokens,
computed afterwards for both adapters by one evaluator outside both libraries' training code
(transformers + PEFT's loader on the saved PEFT-format adapter, plain cross-entropy).
On a machine shared with other jobs wall times follow the load; with one thread (--threads 1) the
CPU seconds measure the work itself, so compare those there.

    python benchmarks/sft_vs_trl.py                        # the demo task, 2 rounds
    python benchmarks/sft_vs_trl.py --targets all-linear
    python benchmarks/sft_vs_trl.py --gradient-checkpointing
    python benchmarks/sft_vs_trl.py --task text
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "Classify the sentiment of the movie review as positive or negative."
CASES = ("trl", "lorakit")


# ----- data (the same rows for both) ---------------------------------------------------------
def write_data(task: str, work: Path, n_train: int, n_held: int) -> dict[str, Path]:
    from lorakit_lab import real_data

    if task == "demo":
        reviews = real_data.movie_reviews()
        train, held = real_data.split(reviews, eval_fraction=0.1, seed=0)  # as examples/demo.py

        def chat(r):
            return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["text"]}]

        answer = lambda r: [{"role": "assistant", "content": r["label"]}]  # noqa: E731
        lorakit_rows = [{"messages": chat(r) + answer(r)} for r in train[:n_train]]
        trl_rows = [{"prompt": chat(r), "completion": answer(r)} for r in train[:n_train]]
        held_rows = [{"prompt": chat(r), "completion": answer(r)} for r in held[:n_held]]
    else:
        speeches = real_data.shakespeare_speeches(min_chars=120, max_chars=500)
        train, held = real_data.split(speeches, eval_fraction=0.1, seed=0)
        lorakit_rows = trl_rows = [{"text": s["text"]} for s in train[:n_train]]
        held_rows = [{"text": s["text"]} for s in held[:n_held]]
    return {
        "lorakit": real_data.write_jsonl(lorakit_rows, work / "lorakit_train.jsonl"),
        "trl": real_data.write_jsonl(trl_rows, work / "trl_train.jsonl"),
        "held": real_data.write_jsonl(held_rows, work / "held_out.jsonl"),
    }


# ----- the TRL case (child process) -----------------------------------------------------------
def run_trl(args, data: Path, out: Path) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit.models import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(data), split="train")
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    times: list[float] = []
    cpu: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.tick, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.tick)
            cpu.append(time.process_time() - self.cpu)

    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-3,
        warmup_steps=3,
        lr_scheduler_type="cosine",
        max_length=128,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=args.gradient_checkpointing,
        completion_only_loss=True if args.task == "demo" else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepTimes()],
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    (out / "steps.json").write_text(json.dumps({"step_seconds": times, "step_cpu_seconds": cpu, "losses": losses}))


def run_lorakit(args, data: Path, out: Path) -> None:
    """`lorakit train` through the CLI's own entry point, timing each optimizer step's CPU seconds."""
    from lorakit.cli import main as cli_main
    from lorakit.train import trainer

    times, cpu, step = [], [], trainer._step

    def timed(*a, **k):
        tick, tock = time.perf_counter(), time.process_time()
        stats = step(*a, **k)
        times.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - tock)
        return stats

    trainer._step = timed
    code = cli_main(lorakit_args(args, data, out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    (out / "steps.json").write_text(json.dumps({"step_seconds": times, "step_cpu_seconds": cpu, "losses": losses}))
    sys.exit(code)


def lorakit_args(args, data: Path, out: Path) -> list[str]:
    command = ["train", "--model", "smollm2-135m-instruct"]
    command += ["--data", str(data), "--out", str(out), "--r", "8", "--alpha", "16", "--dropout", "0"]
    command += ["--targets", args.targets, "--lr", "1e-3", "--warmup-steps", "3", "--schedule", "cosine"]
    command += ["--batch-size", str(args.batch_size), "--max-length", "128", "--max-steps", str(args.steps)]
    command += ["--seed", "0", "--no-progress", "--no-plot", "--overwrite"]
    return command + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


# ----- one evaluator for both adapters (child process) ----------------------------------------
def held_out_loss(held: Path, adapter: Path) -> float:
    """Token-mean cross-entropy on the supervised tokens of the held-out rows (answer / every token)."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter)
    model.eval()
    total, count = 0.0, 0
    for line in held.read_text().splitlines():
        row = json.loads(line)
        if "prompt" in row:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            ids = tokenizer(full, add_special_tokens=False).input_ids[:128]
            start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        else:
            ids = (tokenizer(row["text"]).input_ids + [tokenizer.eos_token_id])[:128]
            start = 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(ids[1:])
        keep = torch.arange(len(targets)) >= start - 1
        total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


# ----- parent: alternate cases, measure, tabulate ---------------------------------------------
def measure(command: list[str], env: dict) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system), peak RSS MB) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({child.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def write_summary(args, runs: dict[str, list[dict]], json_path: Path, rounds_done: int) -> None:
    """Medians over the finished rounds: print the table, write the JSON (rewritten after every round)."""
    summary = {}
    for case, results in runs.items():
        summary[case] = {
            "steady_step_s": statistics.median(t for r in results for t in r["step_seconds"][3:]),
            "steady_step_cpu_s": statistics.median(t for r in results for t in r["step_cpu_seconds"][3:]),
            "end_to_end_s": statistics.median(r["end_to_end_s"] for r in results),
            "end_to_end_cpu_s": statistics.median(r["end_to_end_cpu_s"] for r in results),
            "held_out_loss": statistics.mean(r["held_out_loss"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        }
    ratio = {k: summary["lorakit"][k] / summary["trl"][k] for k in summary["trl"]}
    import peft
    import torch
    import transformers
    import trl

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }
    print(f"\n{args.task} task, targets {args.targets}, gradient checkpointing {args.gradient_checkpointing}, ")
    done = f"{rounds_done} of {args.rounds} rounds"
    print(f"{args.steps} steps x batch {args.batch_size}, {args.threads} threads, {done}; {versions}")
    print(
        "| | steady step (CPU s) | steady step (wall s) | end to end (CPU s) | end to end (wall s) | held-out loss "
        "| peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    keys = ("steady_step_cpu_s", "steady_step_s", "end_to_end_cpu_s", "end_to_end_s", "held_out_loss", "peak_rss_mb")
    for case in CASES:
        s = summary[case]
        print(
            f"| {case} | {s[keys[0]]:.2f} | {s[keys[1]]:.2f} | {s[keys[2]]:.0f} | {s[keys[3]]:.0f} | "
            f"{s[keys[4]]:.4f} | {s[keys[5]]:,.0f} MB |"
        )
    print("| lorakit / TRL | " + " | ".join(f"{ratio[k]:.3f}" for k in keys) + " |")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "args": vars(args),
        "rounds_done": rounds_done,
        "versions": versions,
        "summary": summary,
        "lorakit_over_trl": ratio,
        "runs": runs,
    }
    json_path.write_text(json.dumps(record, indent=1))
    print(f"wrote {json_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["demo", "text"], default="demo")
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/sft_vs_trl")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/sft_vs_trl[-variant].json")
    parser.add_argument("--child", choices=["trl", "lorakit", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child in ("trl", "lorakit"):
        (run_trl if args.child == "trl" else run_lorakit)(args, Path(args.data), Path(args.out))
        return
    if args.child == "eval":
        print(json.dumps({"loss": held_out_loss(Path(args.data), Path(args.out))}))
        return

    variant = "-".join(
        v
        for v in (
            "text" if args.task == "text" else "",
            "all-linear" if args.targets == "all-linear" else "",
            "gc" if args.gradient_checkpointing else "",
        )
        if v
    )
    json_path = Path(args.json or f"benchmarks/results/sft_vs_trl{'-' + variant if variant else ''}.json")
    work = Path(args.work) / (variant or "demo")
    data = write_data(args.task, work, args.steps * args.batch_size, args.held_out)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONWARNINGS"] = "ignore"
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    for round_index in range(args.rounds):
        for case in CASES:
            out = work / f"{case}-{round_index}"
            command = [sys.executable, __file__, "--child", case, "--data", str(data[case]), "--out", str(out)]
            command += ["--task", args.task, "--targets", args.targets, "--steps", str(args.steps)]
            command += ["--batch-size", str(args.batch_size)]
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            out.mkdir(parents=True, exist_ok=True)
            load_before = os.getloadavg()[0]  # the machine may be shared: keep its load beside the numbers
            wall, cpu, rss = measure(command, env)
            load = [load_before, os.getloadavg()[0]]
            steps = json.loads((out / "steps.json").read_text())
            evaluated = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "eval",
                    "--data",
                    str(data["held"]),
                    "--out",
                    str(out / "adapter"),
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            loss = json.loads(evaluated.stdout.strip().splitlines()[-1])["loss"]
            result = {
                "steady_step_s": statistics.median(steps["step_seconds"][3:]),
                "steady_step_cpu_s": statistics.median(steps["step_cpu_seconds"][3:]),
                "end_to_end_s": wall,
                "end_to_end_cpu_s": cpu,
                "held_out_loss": loss,
                "peak_rss_mb": rss,
                "load_avg_1min": load,
                "train_losses": steps["losses"],
                "step_seconds": steps["step_seconds"],
                "step_cpu_seconds": steps["step_cpu_seconds"],
            }
            runs[case].append(result)
            print(
                f"round {round_index + 1}/{args.rounds} {case:8s} step {result['steady_step_s']:.2f} s "
                f"({result['steady_step_cpu_s']:.2f} CPU s)  end to end {wall:.0f} s ({cpu:.0f} CPU s)  held-out loss "
                f"{loss:.4f}  peak RSS {rss:,.0f} MB  load {load[0]:.1f} -> {load[1]:.1f}",
                flush=True,
            )
            if case == CASES[-1]:  # after each round: a run cut short keeps the rounds it finished
                write_summary(args, runs, json_path, round_index + 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
