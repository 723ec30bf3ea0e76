"""Kernel tests run in two modes from the same test code:

- on a CUDA GPU (plain `pytest tests/kernels`), at real shapes;
- on the CPU under Triton's interpreter (`TRITON_INTERPRET=1 pytest tests/kernels`, which `make test` runs as
  its own pytest process: the variable must be set before triton is imported), at small shapes.

Without either, every test here is skipped with the reason. Tests pick shapes with `pick(small, real)`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernels.modes import INTERPRET, ON_GPU


def pytest_collection_modifyitems(config, items):
    if ON_GPU or INTERPRET:
        return
    skip = pytest.mark.skip(reason="kernel tests need a CUDA GPU or TRITON_INTERPRET=1 (make test sets it)")
    here = Path(__file__).parent
    for item in items:  # this hook sees the whole session's items: mark only the ones in this folder
        if here in Path(item.path).parents:
            item.add_marker(skip)
