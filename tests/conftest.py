"""Shared fixtures. Megatron needs torch.distributed and model-parallel state even for one
process."""

import os

import pytest
import torch  # noqa: F401 -- loaded before OMP_NUM_THREADS is set below, as it always was

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def megatron_single():
    """A one-rank gloo job with Megatron's parallel state at tp=pp=ep=1 (shared by the session)."""
    from megaquant.megatron.dist import init_distributed, init_model_parallel

    init_distributed()
    return init_model_parallel(1, 1, 1)
