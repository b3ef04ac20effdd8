"""The training loop behind `lorakit train`: AdamW on the adapter, one process or DDP.

Per optimizer step: the step's global batch (batches.py) is run as grad_accum micro-batches per
process; each micro-batch adds sum(loss) * world_size / N to the gradient, N = target tokens in
the whole global batch, and DDP averages over processes, so the update is that of one batch's
token-mean loss no matter how it was cut. Then clipping, AdamW, and the warmup + cosine/linear
schedule. Ctrl-C finishes the current step, saves a checkpoint and stops (a second Ctrl-C stops
at once); a non-finite loss stops the run and leaves the last good checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..adapters import count_parameters
from ..errors import LorakitError
from ..formats import save_adapter
from ..inject import inject
from ..io import read_json, write_json
from ..layers.saved_module import SavedModule
from ..models import load_model, load_tokenizer
from . import checkpoint, distributed
from .batches import StepPlan, length_groups
from .config import RESUME_FIXED, TrainConfig
from .data import collate, prepare
from .metrics import MetricsLog
from .objective import evaluate, loss_sum

log = logging.getLogger("lorakit.train")
ADAPTER = "default"
CLASSIFIER_HEADS = ("pre_classifier", "classifier", "score")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient) stopped being a finite number."""


@dataclass
class TrainResult:
    out: Path
    adapter: Path | None
    steps: int
    interrupted: bool
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    seconds: float
    trainable: int
    total: int
    run: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for 0-based `step`: linear warmup from 0, then decay to 0
    (the same numbers as transformers' get_{cosine,linear,constant}_schedule_with_warmup)."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def classifier_heads(model: nn.Module) -> list[str]:
    heads = [name for name, _ in model.named_children() if name in CLASSIFIER_HEADS]
    if not heads:
        raise LorakitError(
            f"{type(model).__name__} has no classifier head named {' or '.join(CLASSIFIER_HEADS)}; name it with "
            "--modules-to-save"
        )
    return heads


class _StopFlag:
    """First Ctrl-C asks for a clean stop at the end of the step; the second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_out(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to overwrite a run by accident."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; give a directory for the run")
    found = checkpoint.checkpoints(out)
    if cfg.resume:
        if not found:
            log.info("--resume: no checkpoint in %s yet, starting from step 0", out / checkpoint.FOLDER)
        return found[-1] if found else None
    if (found or (out / "adapter").exists()) and not cfg.overwrite:
        raise LorakitError(
            f"--out {out} already holds a run; pass --resume to continue it, --overwrite to replace it, or pick "
            "another --out"
        )
    return None


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    for key in RESUME_FIXED:
        before, now = saved.get(key), getattr(cfg, key)
        if before != now:
            raise LorakitError(
                f"--resume: {key} was {before!r} in {path} but is {now!r} now; use the same setting or a fresh --out"
            )


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.base_dtype == "bf16":
        return contextlib.nullcontext  # inject(base_dtype=bf16) already runs the forward under autocast
    wanted = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not wanted:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _rng_states(dist: distributed.Dist) -> dict[str, list[torch.Tensor]]:
    states = {"cpu": dist.gather_tensors(torch.get_rng_state())}
    if dist.device.type == "cuda":
        states["cuda"] = dist.gather_tensors(torch.cuda.get_rng_state(dist.device))
    return states


def build_model(cfg: TrainConfig, tokenizer, labels: list | None) -> nn.Module:
    """The base model for the task, with a fresh adapter injected (trainable) and everything else frozen."""
    torch.manual_seed(cfg.seed)  # a new classifier head starts the same in every process and run
    extra: dict[str, Any] = {}
    if labels is not None:
        extra = {
            "id2label": {i: str(v) for i, v in enumerate(labels)},
            "label2id": {str(v): i for i, v in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    model = load_model(cfg.model, task=cfg.task, num_labels=len(labels) if labels else None, **extra)
    if cfg.task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # Llama-style classifiers find the last token by it
    heads = classifier_heads(model) if cfg.task == "seq-cls" and not cfg.modules_to_save else None
    inject(
        model,
        cfg.lora_config(default_modules_to_save=heads),
        name=ADAPTER,
        base_dtype=torch.bfloat16 if cfg.base_dtype == "bf16" else None,
        seed=cfg.seed,
    )
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise LorakitError(
                f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The adapter's tensors at --lr; fully trained copies of saved / new heads at --head-lr (if given)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.head_lr is None:
        return [{"params": trainable}]
    heads = {id(p) for m in model.modules() if isinstance(m, SavedModule) for p in m.copies.parameters()}
    groups = [
        {"params": [p for p in trainable if id(p) not in heads]},
        {"params": [p for p in trainable if id(p) in heads], "lr": cfg.head_lr},
    ]
    return [g for g in groups if g["params"]]


def train(cfg: TrainConfig) -> TrainResult:
    """Run `cfg` to the end (or to Ctrl-C); rank 0 writes the adapter, run.json, metrics and plot."""
    started = time.perf_counter()
    dist = distributed.setup(cfg.device)
    try:
        return _train(cfg, dist, started)
    finally:
        distributed.teardown(dist)


def _train(cfg: TrainConfig, dist: distributed.Dist, started: float) -> TrainResult:
    out = Path(cfg.out)
    resume_from = _check_out(cfg)
    dist.barrier()  # every process has checked --out before rank 0 touches it
    if dist.main and not cfg.resume and cfg.overwrite:
        for stale in (out / checkpoint.FOLDER, out / "adapter"):
            shutil.rmtree(stale, ignore_errors=True)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg, tokenizer)
    if data.dropped and dist.main:
        log.warning(
            "%d training examples had no target token within --max-length %d and were skipped",
            data.dropped,
            cfg.max_length,
        )
    model = build_model(cfg, tokenizer, data.labels)
    trainable, total = count_parameters(model)
    model.to(dist.device).train()
    torch.manual_seed(cfg.seed + 1 + dist.rank)  # dropout differs per process, repeatably

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = StepPlan(len(data.train), cfg.batch_size, cfg.grad_accum, dist.world_size, cfg.seed)
    max_steps = cfg.max_steps or plan.steps_for_epochs(cfg.epochs or 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, max_steps, cfg.schedule)
    )

    start_step, eval_before = 0, None
    if resume_from is not None:
        saved = read_json(resume_from / "trainer_state.json")
        _check_resumable(saved.get("config", {}), cfg, resume_from)
        state = checkpoint.load(resume_from, model, optimizer, scheduler, dist.rank)
        start_step, eval_before = state["step"], state.get("eval_before")
        if dist.main:
            log.info("resuming from %s (step %d of %d)", resume_from, start_step, max_steps)
    ddp_model = distributed.wrap(model, dist)
    autocast = _autocast(cfg, dist.device)
    pad_id = tokenizer.pad_token_id
    eval_batch = cfg.eval_batch_size or 2 * cfg.batch_size
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if resume_from else None) if dist.main else None

    def run_eval(step: int) -> dict[str, float] | None:
        if not data.eval:
            return None
        with autocast():
            result = evaluate(model, data.eval, cfg.task, eval_batch, pad_id, dist.device, dist.rank, dist.world_size)
        if metrics is not None:
            metrics.append({"step": step, "split": "eval", **result})
            log.info("step %d: held-out %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def save_checkpoint(step: int) -> Path | None:
        rng = _rng_states(dist)  # collective: every process takes part
        if not dist.main:
            return None
        state = {
            "config": cfg.to_dict(),
            "epoch": plan.epoch(step),
            "examples_seen": step * plan.global_batch,
            "eval_before": eval_before,
            "lorakit_version": __version__,
        }
        return checkpoint.save(out, step, model, optimizer, scheduler, rng, state, ADAPTER, keep=cfg.keep_checkpoints)

    if start_step == 0:
        eval_before = run_eval(0)
    if dist.main:
        log.info(
            "training %d steps: %d examples, global batch %d (%d x %d accumulation x %d processes), %s trainable of "
            "%s parameters",
            max_steps,
            len(data.train),
            plan.global_batch,
            cfg.batch_size,
            cfg.grad_accum,
            dist.world_size,
            f"{trainable:,}",
            f"{total:,}",
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (cfg.progress and dist.main),
        dynamic_ncols=True,
    )
    step, interrupted, last_eval, last_saved = start_step, False, None, None
    total_tokens, train_seconds = 0, 0.0
    with _StopFlag() as stop:
        while step < max_steps:
            tick = time.perf_counter()
            examples = [data.train[i] for i in plan.step_indices(step)]
            n_targets = sum(e.n_targets for e in examples)
            loss_here, tokens_here = 0.0, 0
            passes = [
                [[data.train[i] for i in indices][j] for j in group]
                for indices in plan.micro_batches(step, dist.rank)
                for group in length_groups([len(data.train[i].input_ids) for i in indices])
            ]
            for p, group in enumerate(passes):
                batch = {k: v.to(dist.device) for k, v in collate(group, pad_id).items()}
                sync = contextlib.nullcontext() if (not dist.enabled or p == len(passes) - 1) else ddp_model.no_sync()
                with sync:
                    with autocast():
                        loss, _, _ = loss_sum(ddp_model, batch, cfg.task)
                    (loss * (dist.world_size / n_targets)).backward()
                loss_here += loss.item()
                tokens_here += int(batch["attention_mask"].sum())
            loss_all, tokens_all, stop_votes = dist.sum([loss_here, tokens_here, float(stop.requested)])
            step_loss = loss_all / n_targets
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            )
            if not (math.isfinite(step_loss) and math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                kept = checkpoint.checkpoints(out)
                where = (
                    f"the last good checkpoint is {kept[-1]} (continue with --resume and a lower --lr)"
                    if kept
                    else "no checkpoint had been saved yet (lower --lr and start again)"
                )
                what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                raise TrainingDiverged(
                    f"{what} became {step_loss if what == 'loss' else float(grad_norm)} at step {step + 1}; training "
                    f"stopped: {where}"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - tick
            train_seconds += seconds
            total_tokens += tokens_all
            if metrics is not None and (step % cfg.log_every == 0 or step == max_steps):
                metrics.append(
                    {
                        "step": step,
                        "split": "train",
                        "loss": step_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": tokens_all / seconds,
                        "epoch": plan.epoch(step),
                        "elapsed_s": time.perf_counter() - started,
                    }
                )
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_all / seconds:.0f}", refresh=False)
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
                last_eval = run_eval(step)
            if stop_votes > 0 and step < max_steps:
                last_saved = save_checkpoint(step)
                interrupted = True
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
                last_saved = save_checkpoint(step)
    bar.close()

    if interrupted:
        dist.barrier()  # rank 0 has written the checkpoint; leave together
        if dist.main:
            log.warning(
                "stopped at step %d of %d; checkpoint saved to %s; continue with the same command and --resume",
                step,
                max_steps,
                last_saved,
            )
        return TrainResult(
            out,
            None,
            step,
            True,
            eval_before,
            last_eval,
            time.perf_counter() - started,
            trainable,
            total,
            model=model,
            tokenizer=tokenizer,
        )

    eval_after = run_eval(step) if data.eval else None
    save_checkpoint(step)  # lets a later --resume with a larger --max-steps carry on
    run: dict[str, Any] = {}
    adapter_dir = out / "adapter"
    if dist.main:
        run = {
            "lorakit_version": __version__,
            "model": cfg.model,
            "task": cfg.task,
            "data_format": data.kind,
            "labels": data.labels,
            "steps": step,
            "epochs": plan.epoch(step),
            "train_examples": len(data.train),
            "eval_examples": len(data.eval) if data.eval else 0,
            "trainable_params": trainable,
            "total_params": total,
            "eval_before": eval_before,
            "eval_after": eval_after,
            "train_seconds": train_seconds,
            "tokens_per_s": total_tokens / train_seconds if train_seconds else None,
            "world_size": dist.world_size,
            "device": str(dist.device),
            "config": cfg.to_dict(),
        }
        with checkpoint.atomic_directory(adapter_dir) as staging:
            save_adapter(model, staging, name=ADAPTER)
            write_json(staging / "run.json", run)
        write_json(out / "run.json", run)
        if cfg.plot:
            metrics.plot(out / "loss.png", title=f"lorakit train: {Path(cfg.model).name} on {Path(cfg.data).name}")
        log.info("adapter written to %s", adapter_dir)
    dist.barrier()  # nobody tears the process group down while rank 0 is still writing
    return TrainResult(
        out,
        adapter_dir,
        step,
        False,
        eval_before,
        eval_after,
        time.perf_counter() - started,
        trainable,
        total,
        run=run,
        model=model,
        tokenizer=tokenizer,
    )
