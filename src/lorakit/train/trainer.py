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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..adapters import count_parameters
from ..io import read_json, write_json
from ..models import load_tokenizer
from . import checkpoint, distributed
from .batches import StepPlan, length_groups
from .build import (
    ADAPTER,
    autocast_for,
    build_model,
    check_out,
    check_resumable,
    clear_out,
    lr_factor,
    param_groups,
    rng_states,
)
from .config import TrainConfig
from .data import collate, prepare
from .methods import save_trained
from .metrics import MetricsLog
from .objective import evaluate, loss_sum, packed_loss_sum, packs
from .stop import StopOnCtrlC

log = logging.getLogger("lorakit.train")


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


def train(cfg: TrainConfig) -> TrainResult:
    """Run `cfg` to the end (or to Ctrl-C); rank 0 writes the adapter, run.json, metrics and plot."""
    started = time.perf_counter()
    dist = distributed.setup(cfg.device)
    try:
        return _train(cfg, dist, started)
    finally:
        distributed.teardown(dist)


@dataclass
class _Run:
    """Everything one run's steps, evaluations and checkpoints share."""

    cfg: TrainConfig
    dist: distributed.Dist
    started: float
    out: Path
    tokenizer: Any
    data: Any
    model: nn.Module
    ddp_model: nn.Module
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: StepPlan
    max_steps: int
    start_step: int
    eval_before: dict[str, float] | None
    metrics: MetricsLog | None
    autocast: Any
    trainable: int
    total: int


@dataclass
class _StepStats:
    loss: float
    grad_norm: float
    tokens: int
    seconds: float
    stop_votes: float


def _setup(cfg: TrainConfig, dist: distributed.Dist, started: float) -> _Run:
    """Check --out, read the data, build the model, optimizer and schedule; restore a checkpoint if resuming."""
    out = Path(cfg.out)
    resume_from = check_out(cfg)
    dist.barrier()  # every process has checked --out before rank 0 touches it
    if dist.main:
        clear_out(cfg)

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
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = StepPlan(len(data.train), cfg.batch_size, cfg.grad_accum, dist.world_size, cfg.seed)
    max_steps = cfg.max_steps or plan.steps_for_epochs(cfg.epochs or 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, max_steps, cfg.schedule)
    )

    start_step, eval_before = 0, None
    if resume_from is not None:
        saved = read_json(resume_from / checkpoint.STATE)
        check_resumable(saved.get("config", {}), cfg, resume_from)
        state = checkpoint.load(resume_from, model, optimizer, scheduler, dist.rank)
        start_step, eval_before = state["step"], state.get("eval_before")
        if dist.main:
            log.info("resuming from %s (step %d of %d)", resume_from, start_step, max_steps)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if resume_from else None) if dist.main else None
    return _Run(
        cfg,
        dist,
        started,
        out,
        tokenizer,
        data,
        model,
        distributed.wrap(model, dist),
        params,
        optimizer,
        scheduler,
        plan,
        max_steps,
        start_step,
        eval_before,
        metrics,
        autocast_for(cfg, dist.device),
        trainable,
        total,
    )


def _evaluate(run: _Run, step: int) -> dict[str, float] | None:
    """Held-out metrics at `step` (None without held-out data); rank 0 logs them."""
    if not run.data.eval:
        return None
    cfg, dist = run.cfg, run.dist
    with run.autocast():
        result = evaluate(
            run.model,
            run.data.eval,
            cfg.task,
            cfg.eval_batch_size or 2 * cfg.batch_size,
            run.tokenizer.pad_token_id,
            dist.device,
            dist.rank,
            dist.world_size,
        )
    if run.metrics is not None:
        run.metrics.append({"step": step, "split": "eval", **result})
        log.info("step %d: held-out %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def _checkpoint(run: _Run, step: int) -> Path | None:
    """Save a resumable checkpoint of `step` (collective; rank 0 writes it and returns its path)."""
    rng = rng_states(run.dist)  # collective: every process takes part
    if not run.dist.main:
        return None
    state = {
        "config": run.cfg.to_dict(),
        "epoch": run.plan.epoch(step),
        "examples_seen": step * run.plan.global_batch,
        "eval_before": run.eval_before,
        "lorakit_version": __version__,
    }
    return checkpoint.save(
        run.out,
        step,
        run.model,
        run.optimizer,
        run.scheduler,
        rng,
        state,
        ADAPTER,
        keep=run.cfg.keep_checkpoints,
        method=run.cfg.method,
    )


def _step(run: _Run, step: int, stop_requested: bool) -> _StepStats:
    """One optimizer step (0-based `step`): every micro-batch's length groups forward and backward, the
    gradient normalised by the step's target count, clipping, AdamW, the schedule."""
    cfg, dist, train = run.cfg, run.dist, run.data.train
    tick = time.perf_counter()
    n_targets = sum(train[i].n_targets for i in run.plan.step_indices(step))
    packed = packs(run.ddp_model, cfg.task)
    passes = [
        [train[i] for i in indices] if packed else [train[indices[j]] for j in group]
        for indices in run.plan.micro_batches(step, dist.rank)
        for group in ([indices] if packed else length_groups([len(train[i].input_ids) for i in indices]))
    ]
    loss_here, tokens_here = 0.0, 0
    for p, group in enumerate(passes):
        last = not dist.enabled or p == len(passes) - 1
        with contextlib.nullcontext() if last else run.ddp_model.no_sync():
            with run.autocast():
                loss = _pass_loss(run, group, packed)
            (loss * (dist.world_size / n_targets)).backward()
        loss_here += loss.item()
        tokens_here += sum(len(e.input_ids) for e in group)
    loss_all, tokens_all, stop_votes = dist.sum([loss_here, tokens_here, float(stop_requested)])
    step_loss = loss_all / n_targets
    grad_norm = float(
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    )
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        _diverged(run, step, step_loss, grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return _StepStats(step_loss, grad_norm, int(tokens_all), time.perf_counter() - tick, stop_votes)


def _pass_loss(run: _Run, examples: list, packed: bool) -> torch.Tensor:
    """The summed loss of one forward pass over `examples`: packed rows, or one padded batch."""
    if packed:
        return packed_loss_sum(run.ddp_model, examples, run.tokenizer.pad_token_id, run.dist.device)
    batch = {k: v.to(run.dist.device) for k, v in collate(examples, run.tokenizer.pad_token_id).items()}
    return loss_sum(run.ddp_model, batch, run.cfg.task)[0]


def _diverged(run: _Run, step: int, loss: float, grad_norm: float) -> None:
    kept = checkpoint.checkpoints(run.out)
    where = (
        f"the last good checkpoint is {kept[-1]} (continue with --resume and a lower --lr)"
        if kept
        else "no checkpoint had been saved yet (lower --lr and start again)"
    )
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    raise TrainingDiverged(f"{what} became {value} at step {step + 1}; training stopped: {where}")


def _log_step(run: _Run, step: int, stats: _StepStats) -> None:
    if run.metrics is not None and (step % run.cfg.log_every == 0 or step == run.max_steps):
        run.metrics.append(
            {
                "step": step,
                "split": "train",
                "loss": stats.loss,
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": stats.grad_norm,
                "tokens_per_s": stats.tokens / stats.seconds,
                "epoch": run.plan.epoch(step),
                "elapsed_s": time.perf_counter() - run.started,
            }
        )


def _train(cfg: TrainConfig, dist: distributed.Dist, started: float) -> TrainResult:
    run = _setup(cfg, dist, started)
    if run.start_step == 0:
        run.eval_before = _evaluate(run, 0)
    if dist.main:
        log.info(
            "training %d steps: %d examples, global batch %d (%d x %d accumulation x %d processes), %s trainable of "
            "%s parameters",
            run.max_steps,
            len(run.data.train),
            run.plan.global_batch,
            cfg.batch_size,
            cfg.grad_accum,
            dist.world_size,
            f"{run.trainable:,}",
            f"{run.total:,}",
        )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=run.max_steps,
        initial=run.start_step,
        desc="train",
        unit="step",
        disable=not (cfg.progress and dist.main),
        dynamic_ncols=True,
    )
    step, last_eval = run.start_step, None
    total_tokens, train_seconds = 0, 0.0
    with StopOnCtrlC() as stop:
        while step < run.max_steps:
            try:
                stats = _step(run, step, stop.requested)
            except TrainingDiverged:
                bar.close()
                raise
            step += 1
            train_seconds += stats.seconds
            total_tokens += stats.tokens
            _log_step(run, step, stats)
            bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{stats.tokens / stats.seconds:.0f}", refresh=False)
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < run.max_steps:
                last_eval = _evaluate(run, step)
            if stats.stop_votes > 0 and step < run.max_steps:
                bar.close()
                return _stopped(run, step, last_eval, _checkpoint(run, step))
            if cfg.save_every and step % cfg.save_every == 0 and step < run.max_steps:
                _checkpoint(run, step)
    bar.close()
    return _finish(run, step, train_seconds, total_tokens)


def _stopped(run: _Run, step: int, last_eval: dict[str, float] | None, saved: Path | None) -> TrainResult:
    """Ctrl-C: the checkpoint of `step` is written; say how to continue."""
    run.dist.barrier()  # rank 0 has written the checkpoint; leave together
    if run.dist.main:
        log.warning(
            "stopped at step %d of %d; checkpoint saved to %s; continue with the same command and --resume",
            step,
            run.max_steps,
            saved,
        )
    return TrainResult(
        run.out,
        None,
        step,
        True,
        run.eval_before,
        last_eval,
        time.perf_counter() - run.started,
        run.trainable,
        run.total,
        model=run.model,
        tokenizer=run.tokenizer,
    )


def _finish(run: _Run, step: int, train_seconds: float, total_tokens: int) -> TrainResult:
    """The end of a run: held-out metrics, a last checkpoint, the adapter, run.json and the loss plot."""
    cfg, dist, data = run.cfg, run.dist, run.data
    eval_after = _evaluate(run, step) if data.eval else None
    _checkpoint(run, step)  # lets a later --resume with a larger --max-steps carry on
    record: dict[str, Any] = {}
    adapter_dir = run.out / "adapter"
    if dist.main:
        record = {
            "lorakit_version": __version__,
            "model": cfg.model,
            "task": cfg.task,
            "data_format": data.kind,
            "labels": data.labels,
            "steps": step,
            "epochs": run.plan.epoch(step),
            "train_examples": len(data.train),
            "eval_examples": len(data.eval) if data.eval else 0,
            "trainable_params": run.trainable,
            "total_params": run.total,
            "eval_before": run.eval_before,
            "eval_after": eval_after,
            "train_seconds": train_seconds,
            "tokens_per_s": total_tokens / train_seconds if train_seconds else None,
            "world_size": dist.world_size,
            "device": str(dist.device),
            "config": cfg.to_dict(),
        }
        with checkpoint.atomic_directory(adapter_dir) as staging:
            save_trained(run.model, staging, cfg.method, ADAPTER)
            write_json(staging / "run.json", record)
        write_json(run.out / "run.json", record)
        if cfg.plot:
            run.metrics.plot(
                run.out / "loss.png", title=f"lorakit train: {Path(cfg.model).name} on {Path(cfg.data).name}"
            )
        log.info("adapter written to %s", adapter_dir)
    dist.barrier()  # nobody tears the process group down while rank 0 is still writing
    return TrainResult(
        run.out,
        adapter_dir,
        step,
        False,
        run.eval_before,
        eval_after,
        time.perf_counter() - run.started,
        run.trainable,
        run.total,
        run=record,
        model=run.model,
        tokenizer=run.tokenizer,
    )
