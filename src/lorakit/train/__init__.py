"""Fine-tuning an adapter on a real model and data: the engine behind `lorakit train`.

    from lorakit.train import TrainConfig, train
    result = train(TrainConfig(model="smollm2-135m-instruct", data="train.jsonl", out="runs/x", max_steps=50))

config.py (settings, YAML + flags) · data.py (files -> token ids) · batches.py (which examples
each step sees, length groups) · objective.py (loss, evaluation) · head_loss.py (the output head
fused with the loss) · packing.py (training micro-batches as packed rows, each example attending to
itself) · shared_prefix.py (leading tokens all rows share, computed once) · build.py
(model, optimizer, schedule, --out / --resume checks) · trainer.py (the loop: step, evaluate,
checkpoint, finish) · checkpoint.py (atomic, resumable) · distributed.py (DDP) · metrics.py
"""

from .config import TrainConfig
from .objective import evaluate
from .trainer import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "evaluate", "train"]
