"""`lorakit train --method lora|prefix|lora+prefix` end to end on the tiny Llama: what trains, what is
saved, and that PEFT, loading the saved folders itself, computes the same logits as the model
`lorakit generate` / `eval` build (cli.common.load_with_adapters)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_commands import cli, train_args  # noqa: F401  (cli is a fixture)
from tiny_hf import reference_text_loss

import lorakit
from lorakit.cli.common import load_with_adapters
from lorakit.train.methods import METHODS

TOKENS = 4
PROBE = "the cat sat on the mat"


def _train(cli, tiny_models, data_files, out, method, *extra):  # noqa: F811
    code, out_text, err = cli(
        *train_args(
            tiny_models["llama"],
            data_files["text"],
            out,
            "--max-steps",
            3,
            "--method",
            method,
            "--prefix-tokens",
            TOKENS,
            "--schedule",
            "constant",
            *extra,
        )
    )
    assert code == 0, err
    return out_text


def _peft_model(model_dir, adapter, method):
    """The reference: PEFT loading the saved folder(s) on its own (LoRA merged first, then the prefix)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if method == "prefix":
        return PeftModel.from_pretrained(base, adapter).eval()
    lora = PeftModel.from_pretrained(base, adapter).eval()
    if method == "lora":
        return lora
    return PeftModel.from_pretrained(lora.merge_and_unload(), adapter / "prefix").eval()


def test_each_method_trains_and_loads_like_peft(cli, tiny_models, data_files, tmp_path):  # noqa: F811
    from transformers import AutoConfig, AutoTokenizer

    model_dir = tiny_models["llama"]
    config = AutoConfig.from_pretrained(model_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    prefix_params = TOKENS * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim
    probe = AutoTokenizer.from_pretrained(model_dir)(PROBE, return_tensors="pt")
    trainable, logits = {}, {}
    for method in METHODS:
        out = tmp_path / method.replace("+", "_")
        _train(cli, tiny_models, data_files, out, method)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r["split"] == "train"]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        trainable[method] = json.loads((out / "run.json").read_text())["trainable_params"]
        adapter = out / "adapter"
        assert (adapter / "prefix").is_dir() == (method == "lora+prefix")

        model, _, task, _ = load_with_adapters(str(model_dir), [str(adapter)])
        assert task == "causal-lm"
        with torch.no_grad():
            logits[method] = model(**probe).logits
            reference = _peft_model(model_dir, adapter, method)(**probe).logits
        assert torch.allclose(logits[method], reference, atol=1e-5), method
        if method == "lora+prefix":  # both parts act: turning either off changes the output
            with torch.no_grad():
                lorakit.set_prefix(model, None)
                lora_only = model(**probe).logits
                lorakit.set_prefix(model, "default_prefix")
                with lorakit.disabled(model):
                    prefix_only = model(**probe).logits
            assert not torch.allclose(logits[method], lora_only, atol=1e-4)
            assert not torch.allclose(logits[method], prefix_only, atol=1e-4)

    # only the prefix (and LoRA) train: the counts add up exactly
    assert trainable["prefix"] == prefix_params
    assert trainable["lora+prefix"] == trainable["lora"] + prefix_params
    assert not torch.allclose(logits["lora"], logits["prefix"], atol=1e-4)


def test_prefix_generate_and_eval_match_peft(cli, tiny_models, data_files, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    model_dir = tiny_models["llama"]
    _train(cli, tiny_models, data_files, tmp_path / "run", "prefix", "--prefix-projection")
    adapter = tmp_path / "run/adapter"
    peft_model = _peft_model(model_dir, adapter, "prefix")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    code, out, err = cli("eval", "--model", model_dir, "--adapter", adapter, "--data", data_files["text"], "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(
        reference_text_loss(peft_model, tokenizer, data_files["text"]), rel=1e-4
    )

    code, out, err = cli(
        "generate", "--model", model_dir, "--adapter", adapter, "--prompt", PROBE, "--raw", "--max-new-tokens", 6
    )
    assert code == 0, err
    # the reference: greedy decoding by PEFT's full forward on the whole sequence at each step (PEFT's own
    # generate does not pass its prefix to this transformers version's cache argument)
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    prompt_length = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, peft_model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert out.strip() == tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True).strip()


def test_prefix_run_resumes_exactly(cli, tiny_models, data_files, tmp_path):  # noqa: F811
    _train(cli, tiny_models, data_files, tmp_path / "straight", "lora+prefix")
    _train(cli, tiny_models, data_files, tmp_path / "cut", "lora+prefix", "--max-steps", 2)
    _train(cli, tiny_models, data_files, tmp_path / "cut", "lora+prefix", "--resume")
    for part in ("adapter", "adapter/prefix"):
        a, b = (load_file(tmp_path / run / part / "adapter_model.safetensors") for run in ("straight", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("init", ["tokens", "random"])
def test_a_trained_prefix_starts_as_the_default_texts_tokens(tiny_models, data_files, tmp_path, init):  # noqa: F811
    """--prefix-init tokens (the default): before any step, the model with its prefix computes what the plain
    model computes with DEFAULT_TEXT's first tokens written in front; --prefix-init random does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.prefix_init import DEFAULT_TEXT
    from lorakit.train.build import build_model
    from lorakit.train.config import TrainConfig

    model_dir = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chosen = {} if init == "tokens" else {"prefix_init": init}
    cfg = TrainConfig(
        model=str(model_dir), data=str(data_files["text"]), out=str(tmp_path), method="prefix", prefix_tokens=TOKENS
    )
    cfg = TrainConfig(**{**cfg.to_dict(), **chosen})
    model = build_model(cfg, tokenizer, None).eval()
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer(PROBE, return_tensors="pt").input_ids
    start = torch.tensor([tokenizer(DEFAULT_TEXT)["input_ids"][:TOKENS]])
    with torch.no_grad():
        got = model(input_ids=text).logits
        joined = plain(input_ids=torch.cat([start, text], dim=1)).logits[:, TOKENS:]
    assert torch.allclose(got, joined, atol=1e-5) is (init == "tokens")


@pytest.mark.parametrize(
    "extra, expect",
    [
        (("--method", "bogus"), "--method"),
        (("--method", "prefix", "--prefix-tokens", "0"), "prefix_tokens"),
        (("--method", "prefix", "--prefix-init", "words"), "--prefix-init"),
        (("--method", "prefix", "--prefix-init-text", " "), "prefix_init_text"),
        (("--method", "prefix", "--prefix-init", "random", "--prefix-init-text", "hi"), "prefix_init_text"),
        (("--method", "prefix", "--task", "seq-cls"), "causal-lm"),
    ],
)
def test_bad_method_settings_are_one_line(cli, tiny_models, data_files, tmp_path, extra, expect):  # noqa: F811
    code, _, err = cli(*train_args(tiny_models["llama"], data_files["text"], tmp_path / "run", *extra))
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "run/adapter").exists()
