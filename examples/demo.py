"""`make demo`: LoRA-fine-tune the real SmolLM2-135M-Instruct on real movie-review sentiment, on a CPU.

Data: 10,605 Rotten-Tomatoes review sentences rated by ~20 people each (Hutto & Gilbert, ICWSM
2014, shipped in the vaderSentiment 3.3.2 sdist); the LoRA paper's SST-2 comes from the same
reviews. Kept: mean rating above +0.5 ("positive") or below -0.5 ("negative"). Each example is a
chat: system instruction, the review, and the label as the assistant's answer; the loss is on the
answer only. Held-out sentences are never trained on.

Prints trainable vs total parameters, held-out loss / perplexity / accuracy before and after,
the same prompts answered before and after, adapter size vs model size, a merged-vs-unmerged
check, and where everything was written. The training is `lorakit train` (same engine, same files).

    python examples/demo.py [--steps 32] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.cli.common import quiet_transformers
from lorakit.cli.generate import build_prompt, generate_text
from lorakit.models import SMOLLM2, smollm2_path
from lorakit.train import TrainConfig, train
from lorakit_lab import real_data as lkd

SYSTEM = "Classify the sentiment of the movie review as positive or negative."
SHOWN = 3  # held-out reviews answered before and after


def chat(row: dict) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": row["text"]},
            {"role": "assistant", "content": row["label"]},
        ]
    }


@torch.no_grad()
def label_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 32) -> float:
    """Share of reviews where the first answer token of the true label outscores the other label's."""
    choices = {label: tokenizer(label, add_special_tokens=False).input_ids[0] for label in ("positive", "negative")}
    tokenizer.padding_side = "right"  # the last real token of each row is then at mask.sum() - 1
    prompts = [build_prompt(tokenizer, r["text"], SYSTEM) for r in rows]
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        logits = model(**batch).logits
        last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token predicts the answer
        scores = logits[torch.arange(len(last)), last]
        for row, score in zip(rows[start : start + batch_size], scores):
            predicted = max(choices, key=lambda label: score[choices[label]].item())
            correct += predicted == row["label"]
    return correct / len(rows)


def mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=160)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()
    started = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # show each line as it comes, also through a pipe
    quiet_transformers()
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stdout)
    out = Path(args.out)

    print("== lorakit demo: LoRA on SmolLM2-135M-Instruct, movie-review sentiment, CPU ==")
    model_dir = smollm2_path()  # logs a line when it converts the wheel's GGUF (first run only)
    reviews = lkd.movie_reviews()
    train_rows, held_rows = lkd.split(reviews, eval_fraction=0.1, seed=0)
    train_rows = train_rows[: args.steps * args.batch_size]  # one pass, each example seen once
    held_rows = held_rows[: args.held_out]
    data_dir = out / "data"
    lkd.write_jsonl([chat(r) for r in train_rows], data_dir / "train.jsonl")
    lkd.write_jsonl([chat(r) for r in held_rows], data_dir / "held_out.jsonl")
    print(
        f"data: {len(reviews):,} labelled review sentences; training on {len(train_rows)}, held out {len(held_rows)} "
        f"(written to {data_dir})"
    )
    print(f"model: {model_dir}")

    print("\n-- training (the engine behind `lorakit train`) --")
    config = TrainConfig(
        model=SMOLLM2,
        data=str(data_dir / "train.jsonl"),
        eval_data=str(data_dir / "held_out.jsonl"),
        out=str(out),
        r=8,
        alpha=16,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        warmup_steps=3,
        max_length=128,
        eval_batch_size=32,
        overwrite=True,
        seed=0,
    )
    print(
        f"  same as: lorakit train --model {SMOLLM2} --data {config.data} --eval-data {config.eval_data} --out {out} "
        f"--r 8 --alpha 16 --lr 1e-3 --max-steps {args.steps} --batch-size {args.batch_size} --warmup-steps 3 "
        "--max-length 128"
    )
    result = train(config)
    model, tokenizer = result.model.eval(), result.tokenizer

    print("\n-- scoring the held-out reviews and answering prompts, with the adapter off (base) and on --")
    with lorakit.disabled(model):
        accuracy_before = label_accuracy(model, tokenizer, held_rows)
        prompts = [build_prompt(tokenizer, r["text"], SYSTEM) for r in held_rows[:SHOWN]]
        answers_before = [generate_text(model, tokenizer, p, max_new_tokens=24) for p in prompts]
    accuracy_after = label_accuracy(model, tokenizer, held_rows)
    answers_after = [generate_text(model, tokenizer, p, max_new_tokens=24) for p in prompts]

    trainable, total = result.trainable, result.total
    print("\n== results ==")
    print(
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%, {total / trainable:.0f}x "
        "fewer)"
    )
    before, after = result.eval_before, result.eval_after
    print(f"held-out ({len(held_rows)} reviews)   loss    perplexity  accuracy")
    print(f"  before (base model)    {before['loss']:6.3f}  {before['perplexity']:10.2f}  {accuracy_before:8.1%}")
    print(
        f"  after  (LoRA, {result.steps} steps) {after['loss']:6.3f}  {after['perplexity']:10.2f}  "
        f"{accuracy_after:8.1%}"
    )
    print("  (loss on the answer tokens; accuracy: the true label's first token outscores the other label's)")
    print("\nsame prompts, before -> after:")
    for row, a, b in zip(held_rows, answers_before, answers_after):
        text = row["text"] if len(row["text"]) < 90 else row["text"][:87] + "..."
        print(f"  review: {text}\n    truth: {row['label']}\n    before: {a!r}\n    after:  {b!r}")

    adapter_file = result.adapter / "adapter_model.safetensors"
    model_file = model_dir / "model.safetensors"
    print(
        f"\nadapter file: {mb(adapter_file):.2f} MB vs model file {mb(model_file):.1f} MB "
        f"({mb(model_file) / mb(adapter_file):.0f}x smaller)"
    )

    probe = tokenizer(
        [build_prompt(tokenizer, r["text"], SYSTEM) for r in held_rows[:8]],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.no_grad():
        unmerged = model(**probe).logits
        lorakit.merge(model)
        merged = model(**probe).logits
        merged_answer = generate_text(model, tokenizer, prompts[0], max_new_tokens=24)
        lorakit.unmerge(model)
    difference = (merged - unmerged).abs().max().item()
    same = merged_answer == answers_after[0]
    print(
        f"merged vs unmerged: max |logit difference| {difference:.1e} over {probe['input_ids'].numel()} tokens; "
        f"greedy answer identical: {same}  ->  {'OK' if difference < 1e-3 and same else 'MISMATCH'}"
    )
    print(
        f"  (a standalone merged model: lorakit merge --model {SMOLLM2} --adapter {result.adapter} --out "
        f"{out / 'merged'})"
    )

    print(f"\nadapter:  {result.adapter}/ (PEFT format: adapter_config.json + adapter_model.safetensors, run.json)")
    print(f"metrics:  {out / 'metrics.jsonl'}")
    print(f"plot:     {out / 'loss.png'}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0 if difference < 1e-3 and same else 1


if __name__ == "__main__":
    sys.exit(main())
