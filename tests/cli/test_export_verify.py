"""`lorakit export` and `lorakit verify` end to end on tiny saved models (a llama with a tokenizer, a diffusers
UNet): files the runtimes load with lorakit's numbers, drift and dropped modules reported, exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.models import load_model

sys.path.insert(0, str(Path(__file__).parents[1] / "formats"))
from tiny_diffusion import UNET_TARGETS, run_unet, tiny_unet  # noqa: E402
from tiny_models import randomize_adapter, token_ids  # noqa: E402


@pytest.fixture
def cli(capsys):
    def run(*argv) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def llama_adapter(folder: Path, out: Path, **kwargs) -> Path:
    model = lorakit.inject(load_model(str(folder)), LoraConfig(**kwargs))
    randomize_adapter(model, "default", std=0.1)
    return lorakit.save_adapter(model, out)


DRIFTING = dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True, rank_pattern={"v_proj": 2})


def test_verify_reports_drift_and_folding_removes_it(cli, tiny_models, tmp_path):
    adapter = llama_adapter(tiny_models["llama"], tmp_path / "a", **DRIFTING)
    code, out, err = cli("verify", "--model", tiny_models["llama"], "--adapter", adapter)
    assert code == 1, err
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows["PEFT"].rstrip().endswith("yes") and rows["GGUF export"].rstrip().endswith("yes")
    assert "v_proj: 4 vs 5.657" in rows["vLLM (scale rule)"] and rows["vLLM (scale rule)"].endswith("NO")
    assert "--fold-scales" in out
    code, out, err = cli(
        "export", "--model", tiny_models["llama"], "--adapter", adapter, "--format", "peft", "--fold-scales",
        "--out", tmp_path / "folded",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = cli("verify", "--model", tiny_models["llama"], "--adapter", tmp_path / "folded", "--json")
    assert code == 0, out
    assert all(c["agrees"] in (True, None) for c in json.loads(out))
    # the folded folder gives PEFT the adapter's outputs
    model = lorakit.load_adapter(load_model(str(tiny_models["llama"])), adapter)
    peft = PeftModel.from_pretrained(load_model(str(tiny_models["llama"])), tmp_path / "folded").eval()
    ids = token_ids(vocab=200)
    torch.testing.assert_close(peft(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_export_gguf_adapter_and_merged(cli, tiny_models, tmp_path):
    adapter = llama_adapter(tiny_models["llama"], tmp_path / "a", r=2, alpha=4, target_modules=["q_proj", "k_proj"])
    model = ["--model", tiny_models["llama"], "--adapter", adapter, "--format", "gguf"]
    code, out, err = cli("export", *model, "--out", tmp_path / "a.gguf")
    assert code == 0, err
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert len(reader.tensors) == 2 * 2 * 2  # 2 layers x (q, k) x (lora_a, lora_b)
    code, out, err = cli("export", *model, "--merged", "--dtype", "q8_0", "--out", tmp_path / "m.gguf")
    assert code == 0, err
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    code, _, err = cli("export", *model, "--out", tmp_path / "a.gguf")
    assert code == 2 and "already exists" in err
    code, _, err = cli("export", *model[:-2], "--format", "kohya", "--fold-scales", "--out", tmp_path / "k.safetensors")
    assert code == 2 and "--fold-scales is for --format peft" in err
    gpt2 = llama_adapter(tiny_models["gpt2"], tmp_path / "g", r=2, target_modules=["c_attn"])
    gpt2_model = ["--model", tiny_models["gpt2"], "--adapter", gpt2, "--format", "gguf"]
    code, _, err = cli("export", *gpt2_model, "--out", tmp_path / "g.gguf")
    assert code == 2 and "GGUF export supports" in err and not (tmp_path / "g.gguf").exists()


def test_verify_a_diffusers_unet_and_a_kohya_file(cli, tmp_path):
    tiny_unet().save_pretrained(tmp_path / "unet")
    model = lorakit.inject(tiny_unet(), LoraConfig(r=2, alpha=4, target_modules=UNET_TARGETS))
    randomize_adapter(model, "default", std=0.3)
    lorakit.save_adapter(model, tmp_path / "k.safetensors", format="kohya")
    code, out, err = cli("verify", "--model", tmp_path / "unet", "--adapter", tmp_path / "k.safetensors")
    assert code == 0, out + err
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows["diffusers"].rstrip().endswith("yes") and rows["PEFT"].rstrip().endswith("yes")
    assert "n/a" in rows["GGUF export"]
    code, out, err = cli(
        "export", "--model", tmp_path / "unet", "--adapter", tmp_path / "k.safetensors", "--format", "diffusers",
        "--out", tmp_path / "d",
    )  # fmt: skip
    assert code == 0, err
    unet = tiny_unet()
    unet.load_lora_adapter(tmp_path / "d", prefix="unet", use_safetensors=True)
    torch.testing.assert_close(run_unet(unet), run_unet(model), atol=1e-5, rtol=1e-5)


def test_verify_warns_or_refuses_another_base(cli, tiny_models, tmp_path):
    adapter = llama_adapter(tiny_models["llama"], tmp_path / "a", r=2, target_modules=["q_proj"])
    other = tmp_path / "other"
    model = load_model(str(tiny_models["llama"]))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.1)
    model.save_pretrained(other)
    for f in Path(tiny_models["llama"]).glob("*token*"):
        (other / f.name).write_bytes(f.read_bytes())
    code, out, err = cli("verify", "--model", other, "--adapter", adapter)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "1 of 2 adapted modules differ" in warned[0]
    code, out, err = cli("verify", "--model", other, "--adapter", adapter, "--strict")
    assert code == 2 and "trained on other base weights" in err and "model.layers.0.self_attn.q_proj" in err


def test_verify_names_runtimes_that_refuse_dora(cli, tiny_models, tmp_path):
    adapter = llama_adapter(tiny_models["llama"], tmp_path / "a", r=2, target_modules=["q_proj"], use_dora=True)
    code, out, err = cli("verify", "--model", tiny_models["llama"], "--adapter", adapter)
    assert code == 1, err
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows["PEFT"].rstrip().endswith("yes") and "refuses DoRA" in rows["vLLM (scale rule)"]
    assert "n/a" in rows["GGUF export"] and "lorakit merge" in out
