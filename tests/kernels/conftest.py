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


def _fast_interpreted_device_calls():
    """Under the interpreter, every call of a @triton.jit helper from inside a kernel patches triton.language
    again for the helper's module (Triton 3.6's InterpretedFunction.__call__ -> _patch_lang walks the module's
    globals and re-installs every builtin: 0.6 ms a call, four times a multiply's cost). Within one launch the
    second patch of a module sets the same values again, so it is done once a module a launch here: the GLU
    kernels' row step calls ~70 helpers, and their tests run about twice as fast. If Triton renames what this
    relies on, the interpreter is left as it is."""
    try:
        from triton.runtime import interpreter
        cls, grid_cls, patch = interpreter.InterpretedFunction, interpreter.GridExecutor, interpreter._patch_lang
        error = interpreter.InterpreterError
    except (ImportError, AttributeError):
        return
    if not hasattr(cls, "rewrite"):
        return
    patched: set[int] = set()  # modules (their globals' ids) patched in the current launch
    launch = grid_cls.__call__

    def run(self, *args, **kwargs):
        patched.clear()
        return launch(self, *args, **kwargs)

    def call(self, *args, **kwargs):
        if id(self.fn.__globals__) not in patched:
            patch(self.fn)
            patched.add(id(self.fn.__globals__))
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise error(repr(e)) from e

    grid_cls.__call__ = run
    cls.__call__ = call


if INTERPRET:
    _fast_interpreted_device_calls()


def pytest_collection_modifyitems(config, items):
    if ON_GPU or INTERPRET:
        return
    skip = pytest.mark.skip(reason="kernel tests need a CUDA GPU or TRITON_INTERPRET=1 (make test sets it)")
    here = Path(__file__).parent
    for item in items:  # this hook sees the whole session's items: mark only the ones in this folder
        if here in Path(item.path).parents:
            item.add_marker(skip)
