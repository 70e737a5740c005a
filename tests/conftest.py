"""Shared pytest setup.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton decorates any kernel, so it is set here, before any test module imports
rtmdet.kernels. `backend="auto"` never picks the interpreter.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
