"""The served base model is never changed by any adapter: a sha256 of every base tensor, compared with
a fresh load of the model from disk (the independent reference), after a load / serve / unload cycle of
every adapter kind through the HTTP API, and with all of them served in one mixed batch.

Kinds: plain LoRA (attention + embedding), DoRA, rsLoRA, modules_to_save (a saved lm_head copy), an
adapter that trains biases (refused: it would change the shared base for everyone), and a PEFT
prefix-tuning adapter (refused: the server routes LoRA adapters only).
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serve_assets import build_model, build_tokenizer, randomize
from test_abuse import post

import lorakit
from lorakit import LoraConfig
from lorakit.adapters import owned_biases
from lorakit.formats.peft_prefix import save_prefix
from lorakit.model_state import saved_modules
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import create_server

BASE = "tiny-biased-llama"
KINDS = {  # name -> (config, served?)
    "plain": (LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), True),
    "dora": (LoraConfig(r=2, target_modules=["o_proj", "down_proj"], use_dora=True), True),
    "rslora": (LoraConfig(r=8, alpha=4, target_modules="all-linear", use_rslora=True), True),
    "saved_head": (LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]), True),
    "trains_bias": (LoraConfig(r=2, target_modules=["q_proj"], bias="all"), False),
}
PROMPT = "SELECT name FROM"
WRAPPER_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude.", ".copies.", ".lorakit")


def base_hashes(model) -> dict[str, str]:
    """sha256 of every base tensor (parameters and buffers), by its name in the unwrapped model."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(part in name for part in WRAPPER_PARTS):
            continue
        plain = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        out[plain] = hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()
    return out


def build(root):
    model_dir, adapters_dir = root / "model", root / "adapters"
    tokenizer = build_tokenizer(model_dir)
    model = build_model(len(tokenizer), tokenizer.eos_token_id)
    model.config.attention_bias = True  # biases in q/k/v/o, so a bias-training adapter has some to change
    model = type(model)(model.config).eval()
    model.save_pretrained(model_dir)
    for seed, (name, (config, _)) in enumerate(KINDS.items()):
        lorakit.inject(model, config, name=name)
        randomize(model, name, seed)
        with torch.no_grad():
            if config.modules_to_save:
                for _, holder in saved_modules(model):
                    holder.copies[name].weight.add_(torch.randn(holder.copies[name].weight.shape))
            if config.bias != "none":
                for param in owned_biases(model, config, {"model.layers.0.self_attn.q_proj"}).values():
                    param.add_(1.0)
        lorakit.save_adapter(model, adapters_dir / name, name=name)
        lorakit.delete_adapter(model, name)
    lorakit.add_prefix(model, lorakit.PrefixConfig(num_virtual_tokens=3), name="prefix")
    save_prefix(model, adapters_dir / "prefix", name="prefix")
    return model_dir, adapters_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir, adapters_dir = build(tmp_path_factory.mktemp("untouched"))
    model = load_model(str(model_dir))
    server = create_server(model, load_tokenizer(str(model_dir)), adapters_dir, name=BASE, port=0, max_adapters=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, model, base_hashes(load_model(str(model_dir)))
    server.close()


def complete(server, model: str) -> tuple[int, dict]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    status, answer, _ = post(server, "/v1/completions", json.dumps(body).encode())
    return status, answer


def test_every_adapter_kind_leaves_the_base_bitwise_unchanged(served):
    server, model, fresh = served
    assert base_hashes(model) == fresh
    status, base = complete(server, BASE)
    assert status == 200
    for name, (_, accepted) in [*KINDS.items(), ("prefix", (None, False))]:
        status, body, _ = post(server, "/v1/adapters/load", json.dumps({"name": name}).encode())
        if not accepted:
            assert status == 400 and body["error"]["param"] == "name", (name, body)
            assert complete(server, name)[0] == 400
            assert base_hashes(model) == fresh, name
            continue
        assert status == 200, (name, body)
        status, answer = complete(server, name)
        assert status == 200 and answer["choices"][0]["text"] != base["choices"][0]["text"], name  # it took effect
        assert post(server, "/v1/adapters/unload", json.dumps({"name": name}).encode())[0] == 200
        assert base_hashes(model) == fresh, name
        assert complete(server, BASE)[1]["choices"][0]["text"] == base["choices"][0]["text"]

    served_kinds = [n for n, (_, accepted) in KINDS.items() if accepted]
    with ThreadPoolExecutor(8) as pool:  # all kinds in mixed batches, LRU of 2 evicting as they go
        answers = list(pool.map(lambda n: complete(server, n), (served_kinds + [BASE]) * 3))
    assert all(status == 200 for status, _ in answers)
    for name in list(server.app.engine.adapters.in_memory()):
        assert post(server, "/v1/adapters/unload", json.dumps({"name": name}).encode())[0] == 200
    assert base_hashes(model) == fresh
    assert complete(server, BASE)[1]["choices"][0]["text"] == base["choices"][0]["text"]
