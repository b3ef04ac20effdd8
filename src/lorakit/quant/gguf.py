"""GGUF models in, for every architecture transformers' GGUF loader knows, with the blocks kept quantized.

    config, tokenizer   transformers' own GGUF metadata reader, once per file (gguf_meta.py)
    empty model         built with meta weights (accelerate), so no fp32 copy of the model ever exists
    tensor names        transformers' tables: `get_gguf_hf_weights_map` (gguf-py's per-architecture
                        names) and the architecture's TensorProcessor (e.g. Llama's q/k row order)
    tensor by tensor    (`base_dtype` None = keep the file's precision, nearest lorakit storage)
        Linear weight, Q4_0 / Q4_1 / Q4_K   -> Int4Weight, code for code (the processor's row
                                               permutation applied to rows of codes)
        Linear weight, other quantized      -> int4 up to 5 bits per weight, else int8 (Q5, Q6_K,
                                               Q8_0), dequantized and re-quantized one tensor at a time
        embedding / output head, quantized  -> int8 (a tied head shares the embedding's storage)
        F16 / BF16 Linear or embedding      -> 16-bit storage
        everything else (norms, biases, F32) -> the fp32 parameter
    With base_dtype given, every Linear / embedding goes to that format instead ("fp32"
    dequantizes all, still one tensor at a time).

The processor is probed with a matrix whose entries are their row numbers: if what comes back
is a row permutation of it (or its transpose, for GPT-2's Conv1D), the same permutation is applied
to the quantized rows; anything else a processor does (MoE stacking, norm offsets) runs on the
dequantized tensor, exactly as transformers would.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LorakitError
from ..layers.linear import is_gpt2_conv1d
from ..model_state import new_weights
from . import gguf_blocks, gguf_meta, int4
from .convert import base_format, storage_for
from .embedding import QuantEmbedding
from .int4 import Int4Weight
from .linear import QuantLinear

log = logging.getLogger("lorakit.gguf")


def find_gguf(path: Path) -> Path | None:
    """The .gguf file `path` names: the file itself, or the only .gguf in a folder."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise LorakitError(f"model folder {path} holds several GGUF files ({names}); give --model one of them")
    return found[0] if found else None


@contextlib.contextmanager
def _one_name_map_per_call():
    """transformers' get_gguf_hf_weights_map rebuilds gguf-py's name table for every submodule it
    recurses into (hundreds of times for a 30-layer model); the table depends only on its arguments."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


class _Loader:
    """Fills an empty model from a GGUF file, one tensor at a time."""

    def __init__(self, file: Path, model: nn.Module, fmt: str | None, meta: gguf_meta.GgufMeta):
        from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.file, self.model, self.fmt = file, model, fmt
        header = GgufHeader.from_file(str(file))
        self.tensors = load_gguf_state_dict(header)  # memory-mapped, read lazily
        self.shapes = {info.name: tuple(info.shape) for info in header.tensors}  # torch order: (rows, cols)
        self.processor = TENSOR_PROCESSORS.get(meta.architecture, TensorProcessor)(config=dict(meta.values))
        with _one_name_map_per_call():
            self.names = get_gguf_hf_weights_map(model, self.processor)
        self.extra: dict = {"tensors": {}}  # what processors write themselves (MoE stacks, GPT-2's head)
        self.extra_types: dict[str, str] = {}  # ... and the GGUF type each came from
        self.head = _output_head(model)
        self.counts: dict[str, int] = {}

    def run(self) -> None:
        from tqdm.auto import tqdm

        for name, tensor in tqdm(self.tensors.items(), desc=f"reading {self.file.name}", unit="tensor", leave=False):
            self._tensor(name, tensor)
        for name, value in self.extra["tensors"].items():
            self._assign(name, torch.as_tensor(value).float(), self.extra_types.get(name))

    def _tensor(self, name: str, tensor) -> None:
        from gguf import GGMLQuantizationType

        kind = GGMLQuantizationType(tensor.ggml_type).name
        shape = self.shapes[name]
        target = self._target(self.names.get(name))
        if target is not None and self._int4_direct(target, kind, shape):
            permutation = self._row_permutation(name, shape)
            if permutation is not None:
                codes, scale, zero = gguf_blocks.int4_codes(tensor.data, kind, *shape)
                if permutation is not True:
                    codes, scale, zero = codes[permutation], scale[permutation], zero[permutation]
                self._place(target, Int4Weight.from_codes(codes, scale, zero))
                return
        values = gguf_blocks.dequantize(tensor.data, kind, shape)
        before = set(self.extra["tensors"])
        result = self.processor.process(
            weights=values, name=name, tensor_key_mapping=self.names, parsed_parameters=self.extra
        )
        self.extra_types.update({key: kind for key in set(self.extra["tensors"]) - before})
        if result.name is None or result.name not in self.names:
            return  # handled by the processor (kept in self.extra) or not a model tensor
        # a copy: for F32 tensors `values` is a view of the memory-mapped file, which must not stay mapped
        self._assign(self.names[result.name], torch.tensor(np.asarray(result.weights), dtype=torch.float32), kind)

    # ----- where a tensor goes ----------------------------------------------------------------
    def _target(self, hf_name: str | None):
        """(module, attribute, hf_name) of a tensor's destination, or None."""
        if hf_name is None:
            return None
        owner, _, attribute = hf_name.rpartition(".")
        try:
            module = self.model.get_submodule(owner)
        except AttributeError:
            return None
        return module, attribute, hf_name

    def _role(self, module: nn.Module, attribute: str) -> str:
        if attribute != "weight":
            return "other"
        if isinstance(module, nn.Embedding) or module is self.head:
            return "table"
        if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
            return "linear"
        return "other"

    def _kind(self, role: str, gguf_type: str | None) -> str:
        """fp32, bf16, fp16, int8 or int4 for a tensor of `role` stored as `gguf_type` in the file."""
        if role == "other":
            return "fp32"
        if self.fmt is not None:
            return "int8" if role == "table" and self.fmt == "int4" else self.fmt
        if gguf_type in (None, "F32", "F64"):
            return "fp32"
        if gguf_type in ("F16", "BF16"):
            return gguf_type.lower()
        return "int8" if role == "table" else gguf_blocks.nearest_kind(gguf_type)

    def _int4_direct(self, target, gguf_type: str, shape) -> bool:
        module, attribute, _ = target
        return (
            gguf_type in gguf_blocks.EXACT_INT4
            and len(shape) == 2
            and self._role(module, attribute) == "linear"
            and self._kind("linear", gguf_type) == "int4"
            and int4.supports(*shape)
        )

    def _row_permutation(self, name: str, shape):
        """True (rows as they are), a row permutation, or None if the processor does more than that."""
        rows, cols = shape
        probe = np.repeat(np.arange(rows, dtype=np.float32)[:, None], cols, axis=1)
        result = self.processor.process(weights=probe, name=name, tensor_key_mapping=self.names, parsed_parameters={})
        out = np.asarray(result.weights)
        if result.name != name:
            return None
        if out.shape == (cols, rows) and (out == np.arange(rows, dtype=np.float32)[None, :]).all():
            return True  # transposed for a Conv1D: the QuantLinear keeps the file's (out x in) layout
        if out.shape != (rows, cols) or not (out == out[:, :1]).all():
            return None
        order = out[:, 0].astype(np.int64)
        if not np.array_equal(np.sort(order), np.arange(rows)):
            return None
        return True if np.array_equal(order, np.arange(rows)) else torch.from_numpy(order)

    # ----- putting it in ----------------------------------------------------------------------
    def _assign(self, hf_name: str, value: torch.Tensor, gguf_type: str | None) -> None:
        target = self._target(hf_name)
        if target is None:
            return
        module, attribute, _ = target
        role = self._role(module, attribute)
        kind = self._kind(role, gguf_type)
        if role in ("linear", "table") and kind != "fp32":
            weight = value.t() if is_gpt2_conv1d(module) else value
            self._place(target, storage_for(weight.float(), kind))
            return
        old = getattr(module, attribute, None)
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise LorakitError(
                f"GGUF tensor for {hf_name} has shape {tuple(value.shape)}, the model expects {tuple(old.shape)}; "
                "the file does not match its own architecture metadata"
            )
        if isinstance(old, nn.Parameter) or old is None:
            setattr(module, attribute, nn.Parameter(value.float(), requires_grad=False))
        else:
            module.register_buffer(attribute, value.float())
        self._count("fp32")

    def _place(self, target, storage: nn.Module) -> None:
        module, _, hf_name = target
        owner, _, _ = hf_name.rpartition(".")
        parent_name, _, child = owner.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        if isinstance(module, nn.Embedding):
            new = QuantEmbedding(storage, padding_idx=module.padding_idx)
        else:
            bias = getattr(module, "bias", None)
            new = QuantLinear(storage, bias=bias, from_conv1d=is_gpt2_conv1d(module))
        if module is self.head:
            self.head = new
        setattr(parent, child, new)
        self._count(storage.kind)

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def _finish(model: nn.Module, loader: _Loader, file: Path) -> None:
    """Tie the head to the embedding if the file has none, start any new head, refuse missing tensors."""
    head = loader.head
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and isinstance(head, nn.Linear) and head.weight.is_meta and embedding is not None:
        path = next(p for p, m in model.named_modules() if m is head)
        owner, _, child = path.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        if isinstance(embedding, QuantEmbedding):
            setattr(parent, child, QuantLinear(embedding.storage))
        else:
            head.weight = embedding.weight
    for path, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if hasattr(module, "reset_parameters") and path.split(".")[-1] in ("score", "classifier"):
                module.to_empty(device="cpu")
                module.reset_parameters()  # a new classification head: the GGUF file has none
                new_weights(model).extend(f"{path}.{n}" for n, _ in module.named_parameters())
                break
            raise LorakitError(
                f"GGUF file {file} has no tensor for {path}.{name}; it may be truncated or of another architecture"
            )


def load_model(file: Path, task: str = "causal-lm", base_dtype: str | None = None, **kwargs) -> nn.Module:
    """The model in `file`, its Linear / embedding weights stored per `base_dtype` (None: as in the file)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    fmt = None if base_dtype in (None, "auto") else base_format(base_dtype)
    meta = gguf_meta.read(file)
    config = gguf_meta.load_config(file)
    for key in ("num_labels", "id2label", "label2id"):
        if key in kwargs:
            setattr(config, key, kwargs.pop(key))
    kwargs.pop("ignore_mismatched_sizes", None)
    loader_class = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    torch.manual_seed(0)  # a new classification head starts the same every time
    with init_empty_weights():
        try:
            model = loader_class.from_config(config, dtype=torch.float32, **kwargs)
        except ValueError as err:
            raise LorakitError(f"cannot build a {task} model from {file}: {str(err).splitlines()[0]}") from None
    for param in model.parameters():
        param.requires_grad_(False)
    loader = _Loader(file, model, fmt, meta)
    loader.run()
    _finish(model, loader, file)
    model.__dict__["lorakit_base_format"] = fmt or "gguf"
    log.info(
        "loaded %s (%s): %s",
        file.name,
        config.model_type,
        ", ".join(f"{n} {k}" for k, n in sorted(loader.counts.items())),
    )
    return model.eval()
