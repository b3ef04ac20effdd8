"""Adapter file formats. PEFT's layout is lorakit's own on-disk format."""

from .peft import adapter_state, load_adapter, read_adapter, save_adapter

__all__ = ["adapter_state", "load_adapter", "read_adapter", "save_adapter"]
