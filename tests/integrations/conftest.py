"""Fixtures of the engine tests."""

import pytest
from tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()
