"""The adapters a server can use: folders under one directory, loaded lazily, kept in an LRU cache.

    DIR/<name>/adapter_config.json + adapter_model.safetensors   (PEFT's layout)

A request naming adapter `name` loads DIR/name on first use. At most `capacity` adapters stay
in memory; the least recently used one that no running request holds is deleted when another is
needed (held adapters may push the count over the limit until their requests finish). Loading
adds A and B to the LoRA layers and copies them into each layer's slot stack; deleting frees the
slots. The base weights are never written, so adapters that train biases (which would change the
base for every request) are refused.

Names are plain identifiers (letters, digits, '_' and '-'), and a name whose folder resolves
outside DIR (a symlink pointing elsewhere) is refused, so a request can never reach other files.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..adapters import delete_adapter
from ..errors import LorakitError
from ..formats import load_adapter
from ..formats.peft import CONFIG_FILE, WEIGHTS_FILE
from ..model_state import adapter_configs, check_adapter_name, lora_layers

log = logging.getLogger("lorakit.serve")


class UnknownAdapter(LorakitError):
    """No adapter folder with that name (HTTP 404)."""


class AdapterBusy(LorakitError):
    """The adapter is in use by running requests (HTTP 409)."""


class AdapterCache:
    """Lazy, LRU-bounded adapter loading on one shared model; every model change holds `lock`."""

    def __init__(
        self, model: nn.Module, directory: str | Path, capacity: int = 32, lock: threading.RLock | None = None
    ):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise LorakitError(f"adapter cache size {capacity!r} is invalid: use an integer >= 1")
        self.model = model.requires_grad_(False)  # once, so each hot load need only freeze its own tensors
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise LorakitError(
                f"adapters directory {directory} does not exist; create it or point --adapters at the folder of "
                "adapter folders"
            )
        self.capacity = capacity
        self.lock = lock or threading.RLock()
        self.loaded: OrderedDict[str, float] = OrderedDict()  # name -> load time (ms), least recently used first
        self.holds: dict[str, int] = {}

    # ----- names and folders ------------------------------------------------------------------
    def folder(self, name: object) -> Path:
        """DIR/name, checked: a plain identifier, inside DIR, holding an adapter."""
        check_adapter_name(name)
        path = self.directory / name
        if not path.resolve().is_relative_to(self.directory):
            raise LorakitError(f"adapter '{name}' resolves outside the adapters directory; refused")
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise UnknownAdapter(f"adapter '{name}' does not exist: no {CONFIG_FILE} and {WEIGHTS_FILE} in {path}")
        return path

    def available(self) -> list[str]:
        """Every adapter folder in DIR that a request could name."""
        names = []
        for entry in sorted(self.directory.iterdir()):
            try:
                self.folder(entry.name)
            except LorakitError:
                continue
            names.append(entry.name)
        return names

    def in_memory(self) -> list[str]:
        """The loaded adapters, least recently used first."""
        with self.lock:
            return list(self.loaded)

    # ----- loading ----------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Load `name` if needed and hold it until `release`; it is not evicted while held."""
        with self.lock:
            self._ensure(name)
            self.holds[name] = self.holds.get(name, 0) + 1
            self._evict()

    def release(self, name: str) -> None:
        with self.lock:
            self.holds[name] -= 1
            if not self.holds[name]:
                del self.holds[name]
            self._evict()

    def load(self, name: str) -> float:
        """Explicit load (or refresh of the LRU order); returns the time the load took in ms."""
        with self.lock:
            self._ensure(name)
            self._evict(keep=name)
            return self.loaded[name]

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.loaded:
                self.folder(name)  # a bad or unknown name gets its own clear error first
                raise UnknownAdapter(f"adapter '{name}' is not loaded")
            if self.holds.get(name):
                raise AdapterBusy(
                    f"adapter '{name}' is in use by {self.holds[name]} running request(s); retry when they finish"
                )
            self._delete(name)

    def _ensure(self, name: str) -> None:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        path = self.folder(name)
        start = time.perf_counter()
        load_adapter(self.model, path, name=name, activate=False, freeze=False, allow_base_changes=False)
        with torch.no_grad():  # copy the new factors into each layer's slot stack now, not on first use
            for _, layer in lora_layers(self.model):
                if name in layer.specs:
                    layer.reserve_slots(self.capacity + 1)  # sized once for the cache: no growth on later loads
                    layer.stacked([name])
        self.loaded[name] = 1000 * (time.perf_counter() - start)
        log.info("loaded adapter %s in %.1f ms (%d in memory)", name, self.loaded[name], len(self.loaded))

    def _evict(self, keep: str | None = None) -> None:
        while len(self.loaded) > self.capacity:
            victim = next((n for n in self.loaded if not self.holds.get(n) and n != keep), None)
            if victim is None:
                return  # all held; the extra ones go once their requests finish
            self._delete(victim)

    def _delete(self, name: str) -> None:
        del self.loaded[name]
        if name in adapter_configs(self.model):
            delete_adapter(self.model, name)
        log.info("unloaded adapter %s (%d in memory)", name, len(self.loaded))
