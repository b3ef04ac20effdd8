"""Adapter file formats. PEFT's layout is lorakit's own on-disk format."""

from .peft import adapter_state, save_adapter
from .peft_read import load_adapter, read_adapter, read_adapter_file

__all__ = ["adapter_state", "load_adapter", "read_adapter", "read_adapter_file", "save_adapter"]
