"""Fine-tuning runs on the real models, measured the same way for every method.

One `Task` = a real pretrained model plus real data split into training and held-out parts:

* sentiment: all-MiniLM-L6-v2 (BERT, 22.7M) classifying movie-review sentences (positive above
  +0.5, negative below -0.5 of the human mean rating), scored by held-out accuracy;
* shakespeare: SmolLM2-135M-Instruct (Llama) adapting to Shakespeare's speeches, scored by
  held-out perplexity on plays it never trained on.

One `Variant` = how it trains: every weight (full), only the classifier head, or a LoRA / DoRA
adapter on q,v or on every linear layer. Each run reports held-out quality, trainable
parameters, memory (accounted and measured, see meter.py), time per step and the size of the
checkpoint it would ship. Batching, the loss and evaluation are lorakit.train's.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.formats import save_adapter
from lorakit.inject import inject
from lorakit.io import write_safetensors
from lorakit.models import load_model, load_tokenizer
from lorakit.train.data import Example, collate, encode
from lorakit.train.objective import evaluate, loss_sum

from . import real_data as datasets
from .meter import PeakMemory, accounted_total, activation_bytes, state_bytes


@dataclass(frozen=True)
class Variant:
    key: str
    kind: str  # full | head | lora
    r: int | None = None
    targets: str = "qv"  # qv | all
    dora: bool = False


def lora_variants(ranks, all_linear_ranks=(8,), dora_ranks=(8,)) -> list[Variant]:
    out = [Variant(f"lora-qv-r{r}", "lora", r, "qv") for r in ranks]
    out += [Variant(f"lora-all-r{r}", "lora", r, "all") for r in all_linear_ranks]
    out += [Variant(f"dora-qv-r{r}", "lora", r, "qv", dora=True) for r in dora_ranks]
    return out


@dataclass
class Task:
    name: str
    task: str  # causal-lm | seq-cls
    model_id: str
    qv: list[str]
    head: list[str] | None
    train: list[Example]
    held_out: list[Example]
    pad_id: int
    batch: int
    lr_full: float
    lr_lora: float
    num_labels: int | None = None
    metric: str = "accuracy"
    description: str = ""

    def load(self) -> nn.Module:
        return load_model(self.model_id, task=self.task, num_labels=self.num_labels)


def sentiment_task(max_train: int | None, max_eval: int, max_length: int = 64, batch: int = 16) -> Task:
    from .params import minilm_path

    path = str(minilm_path())
    tokenizer = load_tokenizer(path)
    rows = [{"text": r["text"], "label": r["label"]} for r in datasets.movie_reviews()]
    train_rows, held_rows = datasets.split(rows, eval_fraction=0.15, seed=0)
    train_rows, held_rows = train_rows[:max_train], held_rows[:max_eval]
    labels = ["negative", "positive"]
    train, _ = encode(train_rows, tokenizer, "seq-cls", max_length, labels, "movie reviews")
    held, _ = encode(held_rows, tokenizer, "seq-cls", max_length, labels, "movie reviews")
    return Task(
        "sentiment",
        "seq-cls",
        path,
        ["query", "value"],
        ["classifier"],
        train,
        held,
        tokenizer.pad_token_id,
        batch=batch,
        lr_full=2e-4,
        lr_lora=1e-3,
        num_labels=2,
        metric="accuracy",
        description=f"all-MiniLM-L6-v2 + a new 2-way head on movie-review sentences ({len(train):,} train / "
        f"{len(held):,} held-out, "
        f"max {max_length} tokens); metric: held-out accuracy",
    )


def shakespeare_task(max_train: int | None, max_eval: int, max_length: int = 128, batch: int = 8) -> Task:
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    plays = list(datasets.shakespeare_plays())
    held_plays = plays[9::10]  # whole plays held out: perplexity on unseen text
    speeches = datasets.shakespeare_speeches(min_chars=200)
    train_rows = [{"text": s["text"]} for s in speeches if s["play"] not in held_plays]
    held_rows = [{"text": s["text"]} for s in speeches if s["play"] in held_plays]
    random.Random(0).shuffle(train_rows)
    random.Random(1).shuffle(held_rows)
    train, _ = encode(train_rows[:max_train], tokenizer, "causal-lm", max_length, None, "shakespeare")
    held, _ = encode(held_rows[:max_eval], tokenizer, "causal-lm", max_length, None, "shakespeare")
    return Task(
        "shakespeare",
        "causal-lm",
        "smollm2-135m-instruct",
        ["q_proj", "v_proj"],
        None,
        train,
        held,
        tokenizer.pad_token_id,
        batch=batch,
        lr_full=1e-4,
        lr_lora=3e-3,
        metric="perplexity",
        description=f"SmolLM2-135M-Instruct on Shakespeare speeches of 200+ characters ({len(train):,} train / "
        f"{len(held):,} held-out "
        f"from the unseen plays {', '.join(held_plays)}; max {max_length} tokens); metric: held-out perplexity",
    )


def prepare(model: nn.Module, task: Task, variant: Variant, seed: int) -> list[nn.Parameter]:
    """Make `variant`'s weights trainable (injecting its adapter); return them."""
    if variant.kind == "lora":
        targets = task.qv if variant.targets == "qv" else "all-linear"
        config = LoraConfig(
            r=variant.r,
            alpha=16.0,
            target_modules=targets,
            use_dora=variant.dora,
            exclude_modules=task.head,
            modules_to_save=task.head,
        )
        inject(model, config, seed=seed)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(variant.kind == "full" or any(f"{h}." in f"{name}" for h in task.head or []))
    return [p for p in model.parameters() if p.requires_grad]


def checkpoint_bytes(model: nn.Module, variant: Variant) -> int:
    """Size of what this method ships: the adapter folder, the head, or the whole model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        if variant.kind == "lora":
            save_adapter(model, folder)
        elif variant.kind == "head":
            write_safetensors(
                folder / "head.safetensors", {n: p for n, p in model.named_parameters() if p.requires_grad}
            )
        else:
            model.save_pretrained(folder)  # safetensors, tied weights stored once
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def batch_at(task: Task, step: int, seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed * 1_000_003 + step)  # same batches for every variant
    return collate([task.train[i] for i in rng.sample(range(len(task.train)), task.batch)], task.pad_id)


def train_variant(
    task: Task,
    variant: Variant,
    steps: int,
    seed: int = 0,
    bar=None,
    keep_model: bool = False,
    measure_costs: bool = True,
) -> dict:
    """Train, evaluate on the held-out part and (with measure_costs) measure memory and checkpoint size."""
    torch.manual_seed(seed)
    model = task.load()
    total = sum(p.numel() for p in model.parameters())
    params = prepare(model, task, variant, seed)
    lr = task.lr_full if variant.kind == "full" else task.lr_lora
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses, times = [], []
    with PeakMemory() as peak:
        for step in range(steps):
            batch = batch_at(task, step, seed)
            began = time.perf_counter()
            loss, _, count = loss_sum(model, batch, task.task)
            (loss / count).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=False)  # keep grads allocated: what a training step really holds
            times.append(time.perf_counter() - began)
            losses.append(loss.item() / count)
            if bar is not None:
                bar.update(1)
    memory = state_bytes(model, optimizer)
    if measure_costs:
        probe = batch_at(task, 0, seed)
        memory["activations"] = activation_bytes(model, lambda: loss_sum(model, probe, task.task)[0])
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    metrics = evaluate(model, task.held_out, task.task, 32, task.pad_id, torch.device("cpu"))
    result = {
        "task": task.name,
        "variant": variant.key,
        "kind": variant.kind,
        "r": variant.r,
        "targets": variant.targets,
        "dora": variant.dora,
        "steps": steps,
        "lr": lr,
        "params": total,
        "trainable": sum(p.numel() for p in params),
        "train_loss": losses,
        "held_out": metrics,
        "step_seconds": sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0],
        "memory": memory,
        "memory_accounted": accounted_total(memory),
        "measured_rss_rise": peak.rise,
        "checkpoint_bytes": checkpoint_bytes(model, variant) if measure_costs else None,
    }
    if keep_model:
        result["model"] = model
    return result


def evaluate_base(task: Task) -> dict:
    """The pretrained model before any training (a random head, for the classifier)."""
    torch.manual_seed(0)
    model = task.load()
    return evaluate(model, task.held_out, task.task, 32, task.pad_id, torch.device("cpu"))
