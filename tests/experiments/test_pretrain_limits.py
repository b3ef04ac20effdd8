"""pretrain-limits --quick: every method runs, and the numbers obey what each method must do."""

import json
import math

import pytest

from lorakit.cli.main import main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "report"
    assert main(["experiment", "pretrain-limits", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "loss_curves.png", "gap_vs_size.png", "memory_time.png", "update_rank.png", "longer_budget.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    return {r["method"]: r for r in data["runs"] if r["series"] == "main"}, (out / "report.md").read_text()


def test_every_method_learned_something(results):
    runs, report = results
    for key, r in runs.items():
        if key.endswith("+ckpt"):
            continue
        assert math.isfinite(r["held_out_loss"])
        assert r["held_out_loss"] < math.log(256)  # better than a uniform guess over bytes
        assert r["train_loss"][-1] < r["train_loss"][0]
    assert "Limited parameter space" in report and "Scalability" in report


def test_methods_differ_where_they_must(results):
    runs, _ = results
    full = runs["full"]
    lora = [r for k, r in runs.items() if r["kind"] == "lora"]
    galore = next(r for r in runs.values() if r["kind"] == "galore")
    assert all(r["trainable"] < full["trainable"] for r in lora)
    assert all(r["memory"]["optimizer"] < full["memory"]["optimizer"] for r in lora + [galore])
    assert galore["trainable"] == full["trainable"]
    # a LoRA adapter's update never exceeds its rank (embeddings are not block matrices)
    assert all(r["update_rank90_mean"] <= r["rank"] for r in lora)
    # checkpointing keeps fewer activations for the same model
    assert runs["full+ckpt"]["memory"]["activations"] < full["memory"]["activations"]
    relora = next(r for r in runs.values() if r["kind"] == "relora")
    assert relora["restarts"] >= 1
