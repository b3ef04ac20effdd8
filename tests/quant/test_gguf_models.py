"""GGUF models in: tiny files of several architectures and block types written here, checked against
transformers' own GGUF loader (which dequantizes everything), then trained and served from the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import tiny_model, write_gguf
from tiny_hf import tiny_tokenizer

from lorakit.errors import LorakitError
from lorakit.models import load_model, load_tokenizer, resolve
from lorakit.quant import ComputePlan, QuantEmbedding, QuantLinear, set_plan


@pytest.fixture(autouse=True)
def dequantized_arithmetic():
    old = set_plan(ComputePlan("test", {}))
    yield
    set_plan(old)


@pytest.fixture(scope="session")
def gguf_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tiny_tokenizer(root / "tokenizer")
    return root


@pytest.fixture
def gguf_dir(gguf_root, monkeypatch):
    """The tiny files' folder; their parsed metadata is cached under it, not in the user's cache."""
    monkeypatch.setenv("LORAKIT_CACHE", str(gguf_root / "cache"))
    return gguf_root


def tiny_file(root: Path, kind: str, qtype: str) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = tiny_model(kind, len(tokenizer), {**special, "pad_token_id": tokenizer.pad_token_id})
    folder = root / f"{kind}-{qtype}"
    folder.mkdir(exist_ok=True)
    return write_gguf(folder / f"tiny-{kind}.{qtype}.gguf", model, root / "tokenizer", qtype), model


def transformers_load(file: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    ("kind", "qtype", "layers"),
    [("llama", "Q4_0", "int4"), ("llama", "Q4_K", "int4"), ("qwen2", "Q4_1", "int4"), ("phi3", "Q8_0", "int8")]
    + [("gpt2", "Q4_0", "int4")],
)
def test_gguf_models_match_transformers_own_loader(gguf_dir, kind, qtype, layers):
    file, _ = tiny_file(gguf_dir, kind, qtype)
    ours, reference = load_model(str(file)), transformers_load(file)
    kinds = {type(m).__name__ + ":" + m.storage.kind for m in ours.modules() if hasattr(m, "storage")}
    assert kinds == {f"QuantLinear:{layers}", "QuantEmbedding:int8", "QuantLinear:int8"}  # head / table at 8 bits
    assert not any(p.is_meta for p in ours.parameters())
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = ours(ids).logits, reference(ids).logits
    # the codes are the file's; only scales rounded to bf16 (and Q8_0 re-quantized per row) differ
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()


def test_fp32_base_dtype_reads_every_tensor_as_transformers_does(gguf_dir):
    file, _ = tiny_file(gguf_dir, "llama", "Q4_K")
    ours, reference = load_model(str(file), base_dtype="fp32"), transformers_load(file)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in ours.modules())
    expected = reference.state_dict()
    got = ours.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_int4_codes_and_scales_are_the_files_own(gguf_dir):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict

    file, _ = tiny_file(gguf_dir, "llama", "Q4_1")
    ours = load_model(str(file))
    raw = load_gguf_state_dict(GgufHeader.from_file(str(file)))["blk.1.ffn_down.weight"]
    expected = torch.from_numpy(dequantize(np.asarray(raw.data), GGMLQuantizationType.Q4_1)).reshape(256, 512)
    got = ours.model.layers[1].mlp.down_proj.weight
    d = torch.from_numpy(np.ascontiguousarray(np.asarray(raw.data).reshape(256, 16, 20)[..., :2]).view(np.float16))
    bound = 16 * d.float().abs().amax() * 2**-8  # |q - 8| <= 8 steps, s and z rounded to bf16 (8 bits)
    assert (got - expected).abs().max() <= bound


def test_gguf_paths_and_bad_files_fail_with_one_line(gguf_dir, tmp_path):
    file, _ = tiny_file(gguf_dir, "llama", "Q4_0")
    assert resolve(str(file.parent)) == str(file.parent)  # a folder holding one .gguf is a model
    assert load_tokenizer(str(file.parent)).chat_template
    assert list((gguf_dir / "cache" / "gguf").glob("tiny-llama.Q4_0-*/tokenizer.json"))  # read once, kept
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(LorakitError, match="is a file but not a .gguf model"):
        resolve(str(tmp_path / "notes.txt"))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(file.read_bytes())
    with pytest.raises(LorakitError, match="holds several GGUF files"):
        load_model(str(two))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(LorakitError, match="cannot read GGUF model"):
        load_model(str(tmp_path / "bad.gguf"))


def test_train_generate_eval_merge_from_a_gguf_file(gguf_dir, data_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.cli.main import main

    file, _ = tiny_file(gguf_dir, "qwen2", "Q4_0")
    run = tmp_path / "run"
    argv = ["train", "--model", file, "--data", data_files["chat"], "--out", run, "--max-steps", 12]
    argv += ["--batch-size", 4, "--lr", 0.02, "--eval-fraction", 0.25, "--no-progress", "--no-plot"]
    assert main([str(a) for a in argv]) == 0  # no --targets: qwen2's q_proj, v_proj by default
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["loss"] < evals[0]["loss"]
    config = json.loads((run / "adapter/adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    # the adapter loads in PEFT on transformers' dequantized model and gives lorakit's outputs
    import lorakit

    ours = load_model(str(file))
    lorakit.load_adapter(ours, str(run / "adapter"))
    peft = PeftModel.from_pretrained(transformers_load(file), str(run / "adapter")).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = ours(ids).logits, peft(ids).logits
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()

    assert main(["generate", "--model", str(file), "--adapter", str(run / "adapter"), "--prompt", "the cat"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(file), "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, got, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_real_smollm2_trains_from_its_gguf_file_and_peft_loads_the_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.models import smollm2_gguf, smollm2_path
    from lorakit.train import TrainConfig, train
    from lorakit_lab import real_data as lkd

    system = "Classify the sentiment of the movie review as positive or negative."
    rows = [r for r in lkd.movie_reviews() if len(r["text"]) < 100]
    train_rows, held_rows = lkd.split(rows, 0.1, seed=2)

    def chat(r):
        turns = [("system", system), ("user", r["text"]), ("assistant", r["label"])]
        return {"messages": [{"role": role, "content": text} for role, text in turns]}

    lkd.write_jsonl([chat(r) for r in train_rows[:12]], tmp_path / "train.jsonl")
    lkd.write_jsonl([chat(r) for r in held_rows[:8]], tmp_path / "held.jsonl")
    gguf = smollm2_gguf()
    result = train(
        TrainConfig(
            model=str(gguf),  # the wheel's Q4_1 file itself, no --targets
            data=str(tmp_path / "train.jsonl"),
            eval_data=str(tmp_path / "held.jsonl"),
            out=str(tmp_path / "run"),
            max_steps=3,
            batch_size=4,
            lr=2e-3,
            max_length=80,
            progress=False,
            plot=False,
        )
    )
    assert result.eval_after["loss"] < 0.8 * result.eval_before["loss"], (result.eval_before, result.eval_after)
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    # PEFT on the dequantized model (the fp32 cache is the same GGUF dequantized by transformers)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path()), str(result.adapter))
    ours = load_model(str(gguf))
    lorakit.load_adapter(ours, str(result.adapter))
    ids = load_tokenizer(str(gguf))("This is one of Polanski's best films.", return_tensors="pt").input_ids
    with torch.no_grad():
        got, expected = ours(ids).logits, peft.eval()(ids).logits
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()
    assert got[0, -1].argmax() == expected[0, -1].argmax()
