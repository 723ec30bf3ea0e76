"""Shared fixtures: the tiny offline model zoo, and an offline, quiet environment for every test."""
import os

import pytest

# Set at import so that libraries imported by test modules already see them; model hubs are unreachable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def zoo():
    """Every tiny model the pipeline needs (built once per cache folder, see sana_core.zoo)."""
    from sana_core.zoo import ensure_zoo

    return ensure_zoo()
