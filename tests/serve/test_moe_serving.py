"""Serving a mixture-of-experts model: adapters on the 3-D expert parameters, mixed in one batch.

Each request's greedy tokens must equal what its adapter generates alone (HF generate on a separate
model with only that adapter set), while the engine runs rows of different adapters together.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from serve_assets import build_tokenizer

import lorakit
from lorakit import LoraConfig
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import AdapterCache, Engine, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny_moe import EXPERT_PARAMETERS, tiny_moe  # noqa: E402

ADAPTERS = {
    "experts_only": LoraConfig(r=2, alpha=8, target_modules=[], target_parameters=EXPERT_PARAMETERS),
    "experts_and_attention": LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERT_PARAMETERS
    ),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    model_dir, adapters_dir = root / "tiny-mixtral", root / "adapters"
    tokenizer = build_tokenizer(model_dir)
    model = tiny_moe("mixtral", vocab=len(tokenizer), eos=tokenizer.eos_token_id)
    model.save_pretrained(model_dir)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        lorakit.inject(model, config, name=name)
        g = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for _, layer in lorakit.model_state.lora_layers(model):
                if name in layer.specs:
                    layer.lora_B[name].copy_(0.5 * torch.randn(layer.lora_B[name].shape, generator=g))
        lorakit.save_adapter(model, adapters_dir / name, name=name)
    return model_dir, adapters_dir


def alone(model_dir, adapters_dir, name, prompt, max_tokens):
    model = load_model(str(model_dir))
    if name is not None:
        lorakit.load_adapter(model, adapters_dir / name, name=name)
    eos = load_tokenizer(str(model_dir)).eos_token_id
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
        )  # fmt: skip
    return [t for t in out[0, len(prompt) :].tolist() if t != eos]


def test_mixed_adapters_on_expert_weights_match_each_alone(assets):
    model_dir, adapters_dir = assets
    tokenizer = load_tokenizer(str(model_dir))
    cache = AdapterCache(load_model(str(model_dir)), adapters_dir, capacity=4)
    engine = Engine(cache.model, cache, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.eos_token_id)
    g = torch.Generator().manual_seed(0)
    jobs = []
    for i, name in enumerate([None, *ADAPTERS, "experts_only", "experts_and_attention"]):
        prompt = torch.randint(0, 300, (3 + 2 * i,), generator=g).tolist()
        jobs.append((name, prompt, engine.submit(prompt, name, SamplingParams(max_tokens=6, temperature=0))))
    while engine.step():
        pass
    outputs = {}
    for name, prompt, request in jobs:
        got = [v for k, v in request.events.queue if k == "token"]
        assert got == alone(model_dir, adapters_dir, name, prompt, 6), name
        outputs.setdefault(name, []).append(got)
    assert len({tuple(v[0]) for v in outputs.values()}) > 1  # the adapters change what is generated
    assert engine.stats["max_rows"] > 1  # rows of different adapters ran together
