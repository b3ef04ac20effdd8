"""llama.cpp's GGUF, written with the `gguf` package: a LoRA adapter, or the whole merged model.

An adapter file is what llama.cpp's convert_lora_to_gguf.py writes and llama_adapter_lora_init reads:

    general.architecture = llama | qwen2 | qwen3,  general.type = adapter,  adapter.type = lora,
    adapter.lora.alpha = α
    <tensor>.lora_a   A (r x k)    e.g. blk.0.attn_q.weight.lora_a    (GGUF lists dims reversed: k, r)
    <tensor>.lora_b   B (d x r)         blk.0.attn_q.weight.lora_b

llama.cpp adds (α / r)·B·A with r each tensor's own rank, so one α is written (the most common α_m = s_m·r_m)
and any other module's scale is folded into its B: then every module's update is exactly s_m·B·A, whatever
rsLoRA, alpha_pattern or rank_pattern said.

Llama-family checkpoints (llama, mistral) store W_q and W_k with rows reordered for llama.cpp's RoPE: within
each head the two halves of the rotary pairs are interleaved, W' = P·W (convert_hf_to_gguf's LlamaModel.permute,
with the KV head count for W_k). Since P·(W + s·B·A) = P·W + s·(P·B)·A, the adapter's B gets the same rows P.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from ..errors import LorakitError
from .fold import factor_keys, module_scales, one_alpha

# model_type -> (GGUF architecture, q/k rows permuted for llama.cpp's RoPE)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
DTYPES = ("f32", "f16", "q8_0")


def architecture(model: nn.Module) -> tuple[str, bool]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise LorakitError(
            f"GGUF export supports {', '.join(sorted(ARCHS))} models, not {model_type or type(model).__name__}; "
            "use lorakit merge for a Hugging Face folder instead"
        )
    return ARCHS[model_type]


def llama_permute(rows: Tensor, n_head: int) -> Tensor:
    """Reorder the rows of W_q (n_head = heads) or W_k (n_head = KV heads) as llama.cpp stores them."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def row_heads(model: nn.Module, param: str) -> int | None:
    """The head count to permute a q/k projection's rows with, or None when its rows stay as they are."""
    _, permute = architecture(model)
    config = model.config
    if permute and param.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if permute and param.endswith("self_attn.k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def tensor_name(model: nn.Module, param: str) -> str:
    """The GGUF name of a parameter (model.layers.0.self_attn.q_proj.weight -> blk.0.attn_q.weight)."""
    import gguf

    arch = architecture(model)[0]
    enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name = gguf.get_tensor_name_map(enum, model.config.num_hidden_layers).get_name(
        param, try_suffixes=(".weight", ".bias")
    )
    if name is None:
        raise LorakitError(f"'{param}' has no GGUF tensor name for {arch}; llama.cpp cannot hold it")
    return name


def adapter_tensors(model: nn.Module, name: str) -> tuple[float, dict[str, Tensor]]:
    """(α, {gguf name: tensor}) for adapter `name`: .lora_a / .lora_b pairs as llama.cpp reads them."""
    from ..model_state import adapter_configs, require_adapter
    from .peft import adapter_state, require_modules_only

    require_adapter(model, name)
    require_modules_only(model, name, "a llama.cpp LoRA adapter (use --merged)")
    config = adapter_configs(model)[name]
    if config.use_dora or config.modules_to_save or config.bias != "none":
        what = "DoRA magnitudes" if config.use_dora else "modules_to_save" if config.modules_to_save else "biases"
        raise LorakitError(
            f"adapter '{name}' has {what}, which a llama.cpp LoRA adapter cannot hold; export the merged model "
            "instead (--merged)"
        )
    tensors, peft_config = adapter_state(model, name, pure=True)
    pairs = factor_keys(tensors)
    if any(k["A"].endswith("lora_embedding_A") for k in pairs.values()):
        raise LorakitError(f"adapter '{name}' adapts an embedding; export the merged model instead (--merged)")
    if "lm_head" in pairs and getattr(model.config, "tie_word_embeddings", False):
        raise LorakitError(
            "the adapter adapts lm_head, which llama.cpp ties to the token embeddings of this model (llama.cpp#9065); "
            "export the merged model instead (--merged)"
        )
    scales = module_scales(peft_config, tensors)
    alpha, factors = one_alpha(scales)  # llama.cpp applies alpha / r per tensor: B·factor makes it exactly s·B·A
    out = {}
    for path in sorted(scales):
        a, b = tensors[pairs[path]["A"]].float(), tensors[pairs[path]["B"]].float() * factors[path]
        heads = row_heads(model, f"{path}.weight")
        if heads is not None:
            b = llama_permute(b, heads)
        base = tensor_name(model, f"{path}.weight")
        out[f"{base}.lora_a"], out[f"{base}.lora_b"] = a, b
    return float(alpha), out


def _array(tensor: Tensor, dtype: str) -> tuple[np.ndarray, object | None]:
    """numpy data and its GGML type for `dtype` (1-d tensors, e.g. norms, stay f32 as llama.cpp expects)."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if dtype == "f32" or data.ndim == 1:
        return data.astype(np.float32), None
    if dtype == "f16":
        return data.astype(np.float16), None
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return data.astype(np.float16), None  # a row q8_0 blocks cannot tile stays f16, as the converter does
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _write(path: Path, arch: str, fill) -> Path:
    """Write a GGUF file atomically: `fill(writer)` adds KV pairs and tensors."""
    import gguf

    path = Path(path)
    if path.is_dir():
        raise LorakitError(f"--out {path} is a folder; give the .gguf file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _base_model(writer, model: nn.Module) -> None:
    from .peft import hub_id

    repo = hub_id(model)
    if repo:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, repo.split("/")[-1])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{repo}")


def write_adapter(model: nn.Module, out: str | Path, name: str = "default", dtype: str = "f32") -> Path:
    """Adapter `name` as a llama.cpp GGUF LoRA adapter at `out`."""
    import gguf

    if dtype not in DTYPES[:2]:
        raise LorakitError(f"dtype={dtype!r}: a GGUF adapter is written as f32 or f16")
    arch = architecture(model)[0]
    alpha, tensors = adapter_tensors(model, name)

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"lorakit adapter {name}")
        _base_model(writer, model)
        for key, tensor in tensors.items():
            writer.add_tensor(key, _array(tensor, dtype)[0])

    return _write(Path(out), arch, fill)


def _hyperparameters(writer, config, dtype: str) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LorakitError(f"RoPE scaling {rope.get('rope_type')!r} is not supported by lorakit's GGUF writer")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_type.get(dtype, gguf.LlamaFileType.MOSTLY_Q8_0))


def _vocabulary(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" tokenizer model."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    specials = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(vocab[i])
            kind = gguf.TokenType.CONTROL if i in specials else gguf.TokenType.USER_DEFINED
            types.append(kind if vocab[i] in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write_merged(model: nn.Module, out: str | Path, tokenizer_dir: str | Path, dtype: str = "f16") -> Path:
    """The whole model (adapters already merged into its weights) as a llama.cpp GGUF model for llama-cli."""
    import gguf

    from ..layers import LoraWrapper

    if dtype not in DTYPES:
        raise LorakitError(f"dtype={dtype!r} is not one lorakit writes; use one of {', '.join(DTYPES)}")
    if any(isinstance(m, LoraWrapper) for m in model.modules()):
        raise LorakitError("the model still holds LoRA layers; call lorakit.merge_and_unload(model) first")
    arch, _ = architecture(model)
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise LorakitError(f"{tokenizer_dir} has no tokenizer.json; a GGUF model needs the model's fast tokenizer")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name("lorakit merged model")
        _base_model(writer, model)
        _hyperparameters(writer, model.config, dtype)
        _vocabulary(writer, Path(tokenizer_dir), model.config.vocab_size)
        for param, tensor in model.state_dict().items():
            if param == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd for a tied output head
            heads = row_heads(model, param)
            if heads is not None:
                tensor = llama_permute(tensor, heads)
            data, raw = _array(tensor, dtype)
            writer.add_tensor(tensor_name(model, param), data, raw_dtype=raw)

    return _write(Path(out), arch, fill)
