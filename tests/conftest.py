import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import gmm_plugin  # noqa: E402

# Backends the whole op suite runs through. The npu backend is added by tests/npu_double.py
# when its test double of torch_npu is importable.
OP_BACKENDS = ["torch", "reference"]


@pytest.fixture(params=OP_BACKENDS)
def backend(request):
    gmm_plugin.set_backend(request.param)
    yield request.param
    gmm_plugin.set_backend(None)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
