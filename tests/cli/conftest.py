"""Tiny Hugging Face model folders and data files (see tests/tiny_hf.py)."""

from tiny_hf import data_files, tiny_models  # noqa: F401
