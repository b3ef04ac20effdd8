"""Fixtures shared by the tests; the model builders live in tiny_models.py, the saved tiny
Hugging Face folders and data files (`tiny_models`, `data_files`) in tiny_hf.py."""

import pytest
from tiny_models import tiny_llama

pytest_plugins = ["tiny_hf"]


@pytest.fixture
def llama():
    return tiny_llama()
