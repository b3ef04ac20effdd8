"""Fixtures shared by the top-level tests; the model builders live in tiny_models.py."""

import pytest
from tiny_models import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()
