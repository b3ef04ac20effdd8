"""What a GGUF file says about its model (architecture, transformers config, tokenizer), read once.

transformers reads a GGUF file's metadata with gguf-py's reader, which builds a Python object for
every vocabulary entry and merge (SmolLM2: ~100k strings): seconds of work and tens of MB that stay
resident, for a config of a few dozen numbers. So the first load of a file keeps what it found in
LORAKIT_CACHE (default ~/.cache/lorakit)/gguf/<name>-<key>/:

    metadata.json   the GGUF architecture and transformers' parsed config values (what its
                    TensorProcessors read)
    config.json     the transformers config (as AutoConfig.from_pretrained(gguf_file=...) builds it)
    tokenizer files the tokenizer transformers converts from the file, saved with save_pretrained

The key is the file's resolved path, size and modification time, so a changed file is read again.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorakitError
from ..io import atomic_directory


@dataclass
class GgufMeta:
    architecture: str  # GGUF's general.architecture (keys transformers' TENSOR_PROCESSORS)
    values: dict  # transformers' parsed config values for this file
    folder: Path  # the cache folder: config.json and the tokenizer


def _cache_folder(file: Path) -> Path:
    from ..models import cache_dir

    stat = file.stat()
    key = hashlib.sha1(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{file.stem}-{key}"


def _parse(file: Path, staging: Path) -> None:
    from transformers import CONFIG_MAPPING, AutoTokenizer
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        metadata, _ = read_gguf_metadata(str(file))
        parsed = load_gguf_checkpoint(str(file), return_tensors=False)
    except (ValueError, KeyError, OSError, struct.error) as err:
        raise LorakitError(f"cannot read GGUF model {file}: {str(err).splitlines()[0]}") from None
    values = dict(parsed["config"])
    if values.get("model_type") not in CONFIG_MAPPING:
        raise LorakitError(f"transformers has no model type {values.get('model_type')!r} for GGUF file {file}")
    CONFIG_MAPPING[values["model_type"]].from_dict(values).save_pretrained(staging)
    meta = {"architecture": metadata["general.architecture"], "values": values}
    (staging / "metadata.json").write_text(json.dumps(meta, default=str))
    try:
        AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(staging)
    except (ValueError, KeyError, OSError) as err:
        raise LorakitError(f"cannot read the tokenizer of GGUF model {file}: {str(err).splitlines()[0]}") from None


def read(file: Path) -> GgufMeta:
    """The file's metadata, parsed on first use and cached."""
    folder = _cache_folder(file)
    if not (folder / "metadata.json").is_file():
        with atomic_directory(folder) as staging:
            _parse(file, Path(staging))
    meta = json.loads((folder / "metadata.json").read_text())
    return GgufMeta(meta["architecture"], meta["values"], folder)


def load_config(file: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(read(file).folder)


def load_tokenizer(file: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(read(file).folder)
