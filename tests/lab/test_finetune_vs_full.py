"""finetune-vs-full --quick: real models train under every method; costs obey the expected order."""

import json

import pytest

from lorakit.cli.main import main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fvf") / "report"
    assert main(["experiment", "finetune-vs-full", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "quality_vs_params.png", "memory_checkpoint.png", "loss_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_costs(results):
    data, report = results
    for task in data["tasks"].values():
        runs = {r["variant"]: r for r in task["runs"]}
        full = runs["full"]
        assert full["trainable"] == full["params"]
        for key, r in runs.items():
            if key == "full":
                continue
            assert r["trainable"] < full["trainable"] / 50
            assert r["memory"]["optimizer"] < full["memory"]["optimizer"] / 50
            assert r["memory_accounted"] < full["memory_accounted"]
            assert r["checkpoint_bytes"] < full["checkpoint_bytes"] / 50
        # AdamW keeps two moments per trainable weight (fp32): exactly 8 bytes each
        assert full["memory"]["optimizer"] == 8 * full["trainable"]
    assert "Comparable quality" in report and "3x less memory" in report


def test_quality_is_a_real_metric(results):
    data, _ = results
    sentiment = data["tasks"]["sentiment"]
    assert all(0.0 <= r["held_out"]["accuracy"] <= 1.0 for r in sentiment["runs"])
    lm = data["tasks"]["shakespeare"]
    # SmolLM2 already knows English: its perplexity on unseen Shakespeare is far below the vocabulary size
    assert 1.0 < lm["base"]["perplexity"] < 500
    assert all(r["held_out"]["perplexity"] < 1000 for r in lm["runs"])
