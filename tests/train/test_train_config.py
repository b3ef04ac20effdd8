"""TrainConfig's default rates are the ones the recorded sweep chose (docs/default-rates/results.json)."""

import json
from pathlib import Path

from lorakit.train.config import TrainConfig

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "default-rates" / "results.json"


def test_default_rates_are_the_sweeps_choice_for_each_task_kind():
    chosen = json.loads(RESULTS.read_text())["chosen"]
    assert set(chosen) == {"causal-lm", "seq-cls"}
    for kind, pick in chosen.items():
        cfg = TrainConfig(model="m", data="d", out="o", task=kind)
        assert cfg.lr == pick["lr"], kind
        if kind == "seq-cls":  # only seq-cls trains a new head by default
            assert cfg.head_lr == pick["head_lr"]
