"""Shared fixtures: the tiny offline model zoo, an offline, quiet environment and a seeded RNG for every test."""
import os
import random

import numpy as np
import pytest
import torch

# Set at import so that libraries imported by test modules already see them; model hubs are unreachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test draws from seeded generators, so a result never depends on test order or luck. A test
    parametrised over `seed` (the reference tests run several seeds in one go) gets that seed instead of 0."""
    callspec = getattr(request.node, "callspec", None)
    seed = callspec.params.get("seed", 0) if callspec is not None else 0
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(scope="session")
def zoo():
    """Every tiny model the pipeline needs (built once per cache folder, see sana_core.zoo)."""
    from sana_core.zoo import ensure_zoo

    return ensure_zoo()
