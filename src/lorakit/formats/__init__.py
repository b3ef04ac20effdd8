"""Adapter file formats. PEFT's layout is lorakit's own on-disk format."""

from .detect import load_adapter  # any format, base fingerprint checked, through the one attach path
from .peft import adapter_state, save_adapter
from .peft_read import read_adapter, read_adapter_file

__all__ = ["adapter_state", "load_adapter", "read_adapter", "read_adapter_file", "save_adapter"]
