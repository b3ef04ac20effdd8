"""Safe file I/O: atomic writes (temp file + rename) and reading only JSON and safetensors.

A write or delete that a crash (kill -9, power loss) can interrupt only ever leaves hidden names
beside its target: `.NAME.XXXX.tmp` (a file being written), `.NAME.tmp-XXXX` (a folder being
built), `.NAME.old-PID` (the folder being replaced), `.NAME.del-PID` (a folder being deleted).
`remove_leftovers` deletes exactly those names; the next run of the same job calls it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import LorakitError

# The hidden names the writers below leave behind when killed (see the module docstring).
LEFTOVER = re.compile(r"\..+(\.tmp|\.tmp-\w+|\.old-\d+|\.del-\d+)")


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes and deletes left in `directory` (not recursive); return it."""
    directory = Path(directory)
    found = [p for p in directory.iterdir() if LEFTOVER.fullmatch(p.name)] if directory.is_dir() else []
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def discard(path: str | os.PathLike) -> None:
    """Delete a folder so that a crash midway leaves it whole or gone, never half there: it is renamed
    to a hidden name first (one atomic step), then deleted."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.parent / f".{path.name}.del-{os.getpid()}"
    shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier process that had this pid
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target` whole (renames only, so
    `target` is always either the old folder or the complete new one); on error it vanishes."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise LorakitError(f"{target} exists and is a file; give a folder path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staging
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


# Caps on what lorakit reads from files a user hands it: far above any real adapter, far below
# what could exhaust memory or the parser's recursion.
MAX_JSON_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024


def inside(directory: str | os.PathLike, name: str) -> Path:
    """DIR/name as a regular file that resolves inside DIR (a symlink pointing elsewhere is refused)."""
    directory = Path(directory)
    path = directory / name
    if not path.is_file():
        raise LorakitError(f"{path} does not exist or is not a regular file; check the path")
    if not path.resolve().is_relative_to(directory.resolve()):
        raise LorakitError(f"{path} is a link to a file outside {directory}; copy the file into the folder instead")
    return path


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _json_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (checked before parsing, which recurses).

    Strings are cut out and the brackets found with regular expressions, so a few MB scan in ms."""
    depth = deepest = 0
    for char in _BRACKETS.findall(_STRING.sub("", text)):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) < len(pairs):  # linear: a request body may hold an object with 100,000 keys
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {repeated!r} appears twice")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON from bytes: UTF-8, nesting capped, no duplicate keys, no NaN/Infinity, no unpaired
    surrogates (they cannot be written back as UTF-8). Raises ValueError naming the problem."""
    try:
        text = data.decode("utf-8")
        if _json_depth(text) > max_depth:
            raise ValueError(f"it nests deeper than {max_depth} levels")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        if _SURROGATE.search(text):  # only escapes can make one: check the parsed strings then
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except RecursionError:
        raise ValueError(f"it nests deeper than {max_depth} levels") from None
    except UnicodeError as err:  # invalid UTF-8 in, or an unpaired surrogate escape (\ud800) out
        raise ValueError(f"it is not valid UTF-8 text ({err.reason})") from None


def read_capped(path: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; `what` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{what} does not exist or is not a file; check the path")
    size = path.stat().st_size
    if size > limit:
        raise LorakitError(f"{what} is {size:,} bytes; lorakit reads such files up to {limit:,} bytes")
    return path.read_bytes()


def read_json(path: str | os.PathLike) -> Any:
    """Strict JSON (see parse_json) from a file of at most MAX_JSON_BYTES."""
    data = read_capped(path, str(path), MAX_JSON_BYTES)
    try:
        return parse_json(data)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LorakitError(f"{path} is not valid JSON ({err}); re-create it") from None


MAX_YAML_BYTES = 1024 * 1024  # a settings file; far above any real one


def read_text(path: str | os.PathLike, what: str, limit: int) -> str:
    """A UTF-8 text file of at most `limit` bytes; `what` names it in errors (e.g. "--config run.yaml")."""
    data = read_capped(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LorakitError(f"{what} is not UTF-8 text (byte {err.start:,}); save it as UTF-8") from None


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """Strict YAML (yaml.SafeLoader, so no Python objects): UTF-8, size and nesting capped, no
    duplicate keys, no aliases (`*name`: a few lines of them expand to gigabytes, and a settings
    file never needs one). `what` names the file in errors, e.g. "--config run.yaml"."""
    import yaml

    from .strict_yaml import Refused, StrictLoader

    text = read_text(path, what, MAX_YAML_BYTES)
    loader = None
    try:
        loader = StrictLoader(text)  # the reader already refuses control characters
        return loader.get_single_data()
    except Refused as err:
        raise LorakitError(f"{what}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LorakitError(f"{what} is not valid YAML{where}: {problem}; fix the file") from None
    except RecursionError:
        raise LorakitError(f"{what} nests too deeply; settings are at most {MAX_JSON_DEPTH} levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def _header_size(path: Path) -> int:
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise LorakitError(f"{path} is not a readable safetensors file (too short); re-save it")
    size = int.from_bytes(head, "little")
    if size > MAX_SAFETENSORS_HEADER:
        raise LorakitError(
            f"{path} is not a readable safetensors file: it announces a {size:,}-byte header "
            f"(limit {MAX_SAFETENSORS_HEADER:,}); re-save it"
        )
    return size


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"{path} does not exist; check the path")
    _header_size(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LorakitError(f"{path} is not a readable safetensors file ({err}); re-save it") from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's __metadata__ (string to string), without reading the tensors."""
    path = Path(path)
    size = _header_size(path)
    try:
        with path.open("rb") as f:
            f.seek(8)
            header = json.loads(f.read(size).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:
        raise LorakitError(f"{path} has an unreadable safetensors header ({err}); re-save it") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}
