"""GGUF export for llama.cpp, read back with the `gguf` package and checked against independent computations:
tensor names from an explicit table, llama.cpp's update alpha / r · B·A with its q/k row order undone by explicit
index arithmetic, and the merged model loaded by transformers' own GGUF reader."""

import gguf
import numpy as np
import pytest
import torch
from tiny_hf import save_tiny
from tiny_models import randomize_adapter, tiny_gpt2, tiny_llama

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.formats.gguf import write_adapter, write_merged

NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "up_proj": "ffn_up"}
NAMES |= {"gate_proj": "ffn_gate", "down_proj": "ffn_down"}


def field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def unpermute(rows, heads):
    """llama.cpp keeps row h·hd + 2i + t where the checkpoint has row h·hd + t·hd/2 + i: put them back."""
    hd = rows.shape[0] // heads
    original = np.empty_like(rows)
    for h in range(heads):
        for i in range(hd // 2):
            for t in range(2):
                original[h * hd + t * (hd // 2) + i] = rows[h * hd + 2 * i + t]
    return original


def gguf_name(path):
    layer, proj = path.split(".")[2], path.split(".")[-1]
    return f"blk.{layer}.{NAMES[proj]}.weight"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, alpha=8, target_modules="all-linear"),
        dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], use_rslora=True, rank_pattern={"k_proj": 2}),
    ],
)
def test_adapter_reads_back_as_llama_cpp_applies_it(kwargs, tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(**kwargs))
    randomize_adapter(model, "default")
    reader = gguf.GGUFReader(write_adapter(model, tmp_path / "a.gguf"))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    alpha = field(reader, "adapter.lora.alpha")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    layers = dict(lorakit.model_state.lora_layers(model))
    assert set(tensors) == {f"{gguf_name(p)}.lora_{x}" for p in layers for x in "ab"}
    heads = {"q_proj": 4, "k_proj": 2}  # tiny_llama: 4 attention heads, 2 KV heads
    for path, layer in layers.items():
        a, b = tensors[f"{gguf_name(path)}.lora_a"], tensors[f"{gguf_name(path)}.lora_b"]
        assert a.shape == (a.shape[0], layer.in_dim) and b.shape == (layer.out_dim, a.shape[0])
        delta = alpha / a.shape[0] * b.astype(np.float64) @ a.astype(np.float64)  # llama.cpp: alpha / rank
        proj = path.rsplit(".", 1)[-1]
        if proj in heads:
            delta = unpermute(delta, heads[proj])
        np.testing.assert_allclose(delta, layer.delta_weight("default").detach().double().numpy(), atol=1e-6)


def test_what_a_gguf_adapter_cannot_hold_is_refused(tmp_path):
    dora = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="DoRA.*--merged"):
        write_adapter(dora, tmp_path / "d.gguf")
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    head = lorakit.inject(tied, LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(LorakitError, match="ties to the token embeddings.*--merged"):
        write_adapter(head, tmp_path / "h.gguf")
    gpt = lorakit.inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(LorakitError, match="GGUF export supports"):
        write_adapter(gpt, tmp_path / "g.gguf")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def merged_llama(tmp_path_factory):
    """A saved tiny llama with a tokenizer, an adapter on every linear layer, its logits, and the merged model."""
    from lorakit.models import load_model

    folder = save_tiny(tmp_path_factory.mktemp("llama"), "llama")
    model = lorakit.inject(load_model(str(folder)), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapter(model, "default")
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    return folder, lorakit.merge_and_unload(model), ids, expected


def test_merged_model_loads_in_transformers_gguf_reader(merged_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, merged, ids, expected = merged_llama
    write_merged(merged, tmp_path / "m.gguf", folder, dtype="f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    text = "the cat sat on the mat. what is the answer? <|im_end|>"
    ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert ours(text).input_ids == AutoTokenizer.from_pretrained(folder)(text).input_ids


@pytest.mark.parametrize("dtype,tolerance", [("f16", 1e-3), ("q8_0", 2e-2)])
def test_merged_weights_read_back_within_the_format_precision(merged_llama, tmp_path, dtype, tolerance):
    folder, merged, _, _ = merged_llama
    reader = gguf.GGUFReader(write_merged(merged, tmp_path / "m.gguf", folder, dtype=dtype))
    tensors = {t.name: t for t in reader.tensors}
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        t = tensors[gguf_name(path)]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        proj = path.rsplit(".", 1)[-1]
        data = unpermute(data, {"q_proj": 4, "k_proj": 2}[proj]) if proj in ("q_proj", "k_proj") else data
        weight = merged.get_submodule(path).weight.detach().numpy()
        assert np.abs(data - weight).max() <= tolerance * np.abs(weight).max()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
