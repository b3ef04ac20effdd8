"""params --quick: the documents' arithmetic, and counts on the real models checked against PEFT."""

import json

import pytest

from lorakit.cli.main import main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("params") / "report"
    assert main(["experiment", "params", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "trainable_vs_rank.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_document_examples_match_the_documents(results):
    data, report = results
    by_shape = {e["shape"]: e for e in data["document_examples"]}
    assert by_shape["4096 x 4096"]["counted"] == 65_536 and round(by_shape["4096 x 4096"]["ratio"]) == 256
    assert by_shape["1000 x 1000"]["counted"] == 4_000 and round(by_shape["1000 x 1000"]["ratio"]) == 250
    assert "agrees exactly" in report


def test_gpt3_arithmetic():
    from lorakit_lab.params import gpt3_rows

    r4 = {row["r"]: row for row in gpt3_rows()}[4]
    # LoRA paper: W_q, W_v of 96 layers, d_model 12288 -> about 10,000x fewer, 350 GB -> ~35 MB
    assert r4["trainable"] == 96 * 2 * 4 * (12288 + 12288)
    assert 9_000 < r4["reduction"] < 10_000
    assert 30e6 < r4["adapter_fp16_bytes"] < 40e6


def test_minilm_counts_match_peft(results):
    peft = pytest.importorskip("peft")
    from lorakit.models import load_model
    from lorakit_lab.params import minilm_path

    data, _ = results
    sweep = {(row["targets"], row["r"]): row for row in data["models"]["all-MiniLM-L6-v2"]["sweep"]}
    model = load_model(str(minilm_path()), task="seq-cls", num_labels=2)
    reference = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert sweep[("q,v", 8)]["trainable"] == trainable == sweep[("q,v", 8)]["formula"]
    # the adapter file is the float32 tensors plus a small header
    assert 4 * trainable < sweep[("q,v", 8)]["adapter_bytes"] < 4 * trainable + 20_000


def test_smollm2_counts(results):
    data, _ = results
    sweep = {(row["targets"], row["r"]): row for row in data["models"]["SmolLM2-135M-Instruct"]["sweep"]}
    # 30 layers; q is 576x576, v is 192x576 (3 key/value heads of 64)
    assert sweep[("q,v", 8)]["trainable"] == 30 * 8 * ((576 + 576) + (192 + 576))
    assert sweep[("q,v", 1)]["reduction"] > sweep[("q,v", 8)]["reduction"] > sweep[("all-linear", 8)]["reduction"]
    assert sweep[("q,v", 1)]["full_bytes"] > 500e6
