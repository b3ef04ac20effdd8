"""Integration: `lorakit train`'s engine on the real SmolLM2-135M-Instruct and real review sentences."""

import json

import pytest

from lorakit.train import TrainConfig, train
from lorakit_lab import real_data as lkd

SYSTEM = "Classify the sentiment of the movie review as positive or negative."


@pytest.mark.slow
def test_real_smollm2_held_out_loss_falls(tmp_path):
    rows = [r for r in lkd.movie_reviews() if len(r["text"]) < 120]
    train_rows, held_rows = lkd.split(rows, 0.1, seed=1)

    def chat(r):
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": r["text"]},
                {"role": "assistant", "content": r["label"]},
            ]
        }

    lkd.write_jsonl([chat(r) for r in train_rows[:32]], tmp_path / "train.jsonl")
    lkd.write_jsonl([chat(r) for r in held_rows[:16]], tmp_path / "held.jsonl")
    result = train(
        TrainConfig(
            model="smollm2-135m-instruct",
            data=str(tmp_path / "train.jsonl"),
            eval_data=str(tmp_path / "held.jsonl"),
            out=str(tmp_path / "run"),
            max_steps=4,
            batch_size=8,
            lr=1e-3,
            max_length=96,
            progress=False,
            plot=False,
        )
    )
    assert result.trainable == 30 * 8 * ((576 + 576) + (192 + 576))  # q_proj, v_proj in 30 layers: r·(d + k)
    assert result.eval_after["loss"] < 0.7 * result.eval_before["loss"], (result.eval_before, result.eval_after)
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"
