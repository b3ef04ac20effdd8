"""image-styles --quick: a DDPM UNet with two lorakit style adapters, sampled through diffusers' pipeline."""

import json

import numpy as np
import pytest

from lorakit.cli.main import main
from lorakit_lab import image_styles

FILES = ("report.md", "results.json", "samples.png", "styles.png", "data.png", "losses.png")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("styles") / "report"
    assert main(["experiment", "image-styles", "--quick", "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_every_model_is_sampled_and_measured(results):
    data, report = results
    plan = image_styles.QUICK
    keys = [r["key"] for r in data["rows"]]
    assert keys == ["base", "heavy", "mix75", "mix50", "mix25", "slanted", "both"]
    for row in data["rows"]:
        assert row["n"] == plan.samples
        assert 0.0 <= row["ink"] <= 1.0 and np.isfinite(row["slant"])
        grid = np.array(data["grid"][row["key"]])
        assert grid.shape == (plan.columns, 8, 8) and grid.min() >= 0.0 and grid.max() <= 1.0
    base = data["rows"][0]
    assert base["ink_shift"] == 0.0 and base["slant_shift"] == 0.0
    # the sub-populations really differ in their own statistic, by construction
    assert data["data"]["heavy"]["ink"] > data["data"]["all"]["ink"] + 0.02
    assert data["data"]["slanted"]["slant"] > data["data"]["all"]["slant"] + 0.05
    assert "Mixes land in between" in report and "Exactness: holds" in report


def test_adapters_are_a_fraction_of_the_base(results):
    data, _ = results
    params = data["params"]
    for style in ("heavy", "slanted"):
        assert 0 < params[style] < params["base"] / 4
    assert data["checks"]["combine_rank"] == 2 * image_styles.QUICK.r  # exact: the ranks concatenate


def test_merge_combination_and_peft_are_exact(results):
    checks = results[0]["checks"]
    assert checks["merged_vs_unmerged_max_abs"] < 1e-4
    assert checks["combine_weight_max_rel_error"] < 1e-6
    assert checks["combine_vs_reference_max_abs"] < 1e-4
    assert checks["peft_vs_lorakit_max_abs"] < 1e-4
