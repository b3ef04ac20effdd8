"""The lean decode step and the preallocated cache give the tokens transformers' own generate gives.

Reference: the same model with each adapter merged by a plain matmul (W0 + s·B·A) on a copy,
decoded greedily by transformers' generate (its DynamicCache, its forward), one prompt at a time.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.model_state import lora_layers
from lorakit.quant import quantize_base
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.decode_step import lean_layers, shared_steps

VOCAB = 96


def tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    if kind == "qwen2":  # q/k/v biases, tied head
        return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True)).eval()
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).eval()


def with_adapters(model, count: int):
    """`count` random adapters (different ranks and targets) on `model`; plain-matmul merged copies of it."""
    base = copy.deepcopy(model)
    targets = [["q_proj", "v_proj"], "all-linear", ["k_proj", "o_proj", "down_proj"]]
    merged = {None: base}
    for i in range(count):
        name = f"a{i}"
        lorakit.inject(model, LoraConfig(r=2 + 2 * i, alpha=8, target_modules=targets[i % 3]), name, seed=i)
        reference = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for path, layer in lora_layers(model):
                if name in layer.specs:
                    layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.2)
                    delta = layer.specs[name].scale * layer.lora_B[name] @ layer.lora_A[name]
                    reference.get_submodule(path).weight += delta
        merged[name] = reference
    return merged


def hf_greedy(model, prompt: list[int], tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def run(engine: Engine, jobs: list[tuple[list[int], str | None, int]], joins: int = 2) -> list[list[int]]:
    """Submit the jobs in waves of `joins` between decode steps; every request's tokens."""
    requests = []
    for start in range(0, len(jobs), joins):
        for prompt, name, tokens in jobs[start : start + joins]:
            requests.append(engine.submit(prompt, name, SamplingParams(max_tokens=tokens, temperature=0)))
        engine.step()
    while engine.step():
        pass
    return [[v for k, v in r if k == "token"] for r in requests]


def jobs(names: list[str | None], seed: int = 0) -> list[tuple[list[int], str | None, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, name in enumerate(names):
        length = int(torch.randint(1, 20, (1,), generator=g))
        out.append((torch.randint(1, VOCAB, (length,), generator=g).tolist(), name, 5 + 3 * i % 11))
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lean_mixed_batches_match_transformers_generate_with_merged_adapters(kind):
    model = tiny(kind)
    merged = with_adapters(model, 3)
    engine = Engine(model, max_batch=4, max_prefill_tokens=40)
    assert engine.lean is not None
    work = jobs([None, "a0", "a1", "a2", "a1", None, "a0"], seed=1)
    got = run(engine, work)
    for (prompt, name, tokens), out in zip(work, got):
        assert out == hf_greedy(merged[name], prompt, tokens), (name, prompt)
    assert engine.cache is None and engine.stats["max_rows"] == 4


def test_fallback_forward_gives_the_same_tokens():
    """Models decode_step does not cover run the model's forward over the same static cache."""
    model = tiny("llama")
    merged = with_adapters(model, 2)
    engine = Engine(model, max_batch=3)
    engine.lean = None
    work = jobs(["a1", None, "a0", "a1", "a0"], seed=2)
    for (prompt, name, tokens), out in zip(work, run(engine, work, joins=3)):
        assert out == hf_greedy(merged[name], prompt, tokens)


def test_quantized_base_decodes_like_its_own_forward():
    model = tiny("llama")
    assert quantize_base(model, "int4")["int4"] > 0
    reference = copy.deepcopy(model)
    engine = Engine(model, max_batch=2)
    assert engine.lean is not None
    work = jobs([None, None, None], seed=3)
    for (prompt, _, tokens), out in zip(work, run(engine, work)):
        assert out == hf_greedy(reference, prompt, tokens)


def test_lean_layers_only_for_the_layers_it_reproduces():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert lean_layers(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))) is None
    model = tiny("llama")
    assert len(lean_layers(model)) == 2
    handle = model.model.layers[1].register_forward_hook(lambda *args: None)  # someone watches a layer
    assert lean_layers(model) is None
    handle.remove()
    model.config._attn_implementation = "eager"
    assert lean_layers(model) is None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_one_adapter_batches_skip_per_row_routing_and_match_generate(kind, monkeypatch):
    """Rows that all use one adapter (one stream) decode through shared_steps: no per-row routing."""
    import lorakit.serve.engine as engine_module

    model = tiny(kind)
    merged = with_adapters(model, 3)
    engine = Engine(model, max_batch=2)
    routed = []
    real_per_row = engine_module.per_row
    monkeypatch.setattr(engine_module, "per_row", lambda m, names: routed.append(names) or real_per_row(m, names))
    for name in ("a2", None, "a0", "a1"):  # two rows of one adapter at a time, joining at different steps
        work = jobs([name, name, name], seed=4)
        for (prompt, _, tokens), out in zip(work, run(engine, work, joins=1)):
            assert out == hf_greedy(merged[name], prompt, tokens), (name, prompt)
    assert len(routed) == engine.stats["prefills"]  # prefills route rows; no decode step did
    for name in (None, "a0", "a1", "a2"):
        assert shared_steps(model, engine.lean, name) is not None


def test_shared_steps_leave_what_they_cannot_reproduce_to_the_modules():
    model = tiny("llama")
    with_adapters(model, 1)
    layers = lean_layers(model)
    assert shared_steps(model, layers, "a0") is not None
    lorakit.inject(model, LoraConfig(r=2, target_modules=["v_proj"], use_dora=True), "dora", seed=1)
    assert shared_steps(model, layers, "dora") is None  # DoRA rescales: the module's own forward
    assert shared_steps(model, layers, "a0") is not None  # other adapters of the same layers still go direct
    handle = layers[1].mlp.up_proj.register_forward_hook(lambda *args: None)
    assert shared_steps(model, layers, "a0") is None  # a hook must see its call
    handle.remove()
    lorakit.set_adapter(model, "a0")
    lorakit.merge(model)
    assert shared_steps(model, layers, None) is None  # merged weights: per_row refuses with its own message
