"""Tiny GGUF files written here the way llama.cpp's converter writes them, for the loader tests.

Names come from gguf-py's own tensor-name table (HF -> GGUF, the converter's direction), Llama-style
q/k rows are permuted as convert_hf_to_gguf.py permutes them, and blocks are quantized by gguf-py
(Q4_0, Q4_1, Q8_0, ...) or, for Q4_K (which gguf-py only decodes), packed by `q4_k_blocks` below.
The loader under test reads these files; transformers' own GGUF loader is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCHS = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3", "gpt2": "gpt2"}
PERMUTED = ("llama",)  # converters that permute q/k rows for llama.cpp's rope layout


def tiny_model(kind: str, vocab: int, special: dict, hidden: int = 256):
    """A seeded tiny causal LM of `kind` whose Linear inputs fit Q4_K's 256-blocks."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=128, **special)
    if kind == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=1024, **special)
        return tf.GPT2LMHeadModel(config).eval()
    config_class, model_class = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[kind]
    config = config_class(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2 if kind != "phi3" else 4,
        tie_word_embeddings=kind == "qwen2",
        **common,
    )
    model = model_class(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrongly mapped one shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _permute(weights: np.ndarray, heads: int, kv_heads: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if kv_heads is not None and heads != kv_heads:
        heads = kv_heads
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def q4_k_blocks(weights: np.ndarray) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 inputs) for a (rows, cols) fp32 matrix, ggml's layout."""
    rows, cols = weights.shape
    groups = weights.reshape(-1, 8, 32).astype(np.float32)  # super-blocks of 8 groups of 32
    low = np.minimum(groups.min(-1), 0.0)
    step = (groups.max(-1) - low) / 15
    d = np.maximum(step.max(-1), 1e-8) / 63
    dmin = np.maximum((-low).max(-1), 1e-8) / 63
    sc = np.clip(np.round(step / d[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(-low / dmin[:, None]), 0, 63).astype(np.uint8)
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    scale = d16.astype(np.float32)[:, None] * sc
    offset = dmin16.astype(np.float32)[:, None] * mn
    q = np.clip(np.round((groups + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    packed_scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] & 0x30) << 2),
            mn[:, :4] | ((mn[:, 4:] & 0x30) << 2),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    q = q.reshape(-1, 4, 2, 32)  # chunk i: groups 2i (low nibbles) and 2i + 1 (high nibbles)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate(
        [d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2), packed_scales, qs], axis=1
    )
    return blocks.reshape(rows, cols // 256 * 144)


def _tokenizer_metadata(writer, tokenizer_dir: Path) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {t["content"] for t in data["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<pad>"])
    template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def write_gguf(path: Path, model, tokenizer_dir: Path, qtype: str, embedding_qtype: str = "Q8_0") -> Path:
    """`model` as a GGUF file: 2-D Linear weights in `qtype`, the embedding / head in `embedding_qtype`,
    everything else F32 (as llama.cpp writes norms and biases)."""
    import gguf

    kind = model.config.model_type
    arch = ARCHS[kind]
    config = model.config
    blocks = config.num_hidden_layers
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{kind}")
    writer.add_block_count(blocks)
    writer.add_context_length(getattr(model.config, "n_positions", 128))
    hidden = config.hidden_size
    writer.add_embedding_length(hidden)
    writer.add_head_count(config.num_attention_heads)
    if kind == "gpt2":
        writer.add_feed_forward_length(4 * hidden)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(hidden // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    _tokenizer_metadata(writer, tokenizer_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], blocks)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    for hf_name, tensor in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None or (kind == "qwen2" and hf_name == "lm_head.weight"):
            continue  # rotary buffers; a tied head is not written
        data = tensor.detach().float().numpy()
        if kind == "gpt2" and data.ndim == 2 and not name.startswith(("token_embd", "position_embd", "output")):
            data = np.ascontiguousarray(data.T)  # HF's Conv1D stores (in, out); GGUF (out, in)
        if arch in PERMUTED and base.endswith("q_proj"):
            data = _permute(data, heads, heads)
        elif arch in PERMUTED and base.endswith("k_proj"):
            data = _permute(data, heads, kv_heads)
        table = name.startswith(("token_embd", "output", "position_embd")) and name != "output_norm"
        wanted = embedding_qtype if table else qtype
        if data.ndim != 2 or name.startswith("position_embd"):
            wanted = "F32"
        kind_enum = gguf.GGMLQuantizationType[wanted]
        if wanted == "Q4_K":
            writer.add_tensor(f"{name}.{suffix}", q4_k_blocks(data), raw_dtype=kind_enum)
        elif wanted in ("F32", "F16"):
            writer.add_tensor(f"{name}.{suffix}", data.astype(np.float16 if wanted == "F16" else np.float32))
        else:
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data, kind_enum), raw_dtype=kind_enum)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
