"""delta-rank --quick: spectra and subspace similarities of real (briefly) fine-tuned MiniLM updates."""

import json

import pytest
import torch

from lorakit.cli.main import main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("delta") / "report"
    assert main(["experiment", "delta-rank", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "spectra.png", "subspace_similarity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def test_layers_and_bounds(results):
    layers = results["layers"]
    assert len(layers) == 12  # 6 BERT layers x (query, value)
    small, big = results["plan"]["ranks"]
    for row in layers:
        assert 1 <= row["rank50_full"] <= row["rank90_full"] <= 384
        # Eckart-Young: no rank-r subspace captures more than the best rank-r approximation
        for key, share in row["lora_capture"].items():
            r = int(key[1:].split("-")[0])
            assert 0 <= share <= row["best_capture"][str(r)] + 1e-9
        # a rank-r adapter's update has rank <= r
        assert all(v <= int(k[1:].split("-")[0]) for k, v in row["lora_rank90"].items())
        phi = torch.tensor(row["phi_rank"])
        assert phi.shape == (small, big) and float(phi.min()) >= -1e-9 and float(phi.max()) <= 1 + 1e-9


def test_singular_values_match_numpy(results):
    np = pytest.importorskip("numpy")
    s = results["layers"][0]["singular_values"]
    assert s == sorted(s, reverse=True)
    # energy rank recomputed independently from the stored spectrum
    energy = np.cumsum(np.square(s)) / np.sum(np.square(s))
    assert int(np.searchsorted(energy, 0.9) + 1) == results["layers"][0]["rank90_full"]
