import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import gmm_plugin  # noqa: E402

# Backends the whole op suite runs through. "npu" runs on CPU tensors through the test double
# of torch_npu's grouped-matmul ops (tests/torch_npu_double.py), installed for those tests only.
OP_BACKENDS = ["torch", "reference"]
try:
    import torch_npu_double  # noqa: E402
except ImportError:  # pragma: no cover
    torch_npu_double = None
else:
    OP_BACKENDS.append("npu")


@pytest.fixture(params=OP_BACKENDS)
def backend(request):
    gmm_plugin.set_backend(request.param)
    yield request.param
    gmm_plugin.set_backend(None)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Tests that cannot run on the NPU kernels by their nature (skipped for backend "npu" only).
NPU_NOT_APPLICABLE = {
    "test_gradcheck_float64": "aclnn GroupedMatmul has no float64 (the public API never passes it)",
}


@pytest.fixture(autouse=True)
def _torch_npu_double_for_npu_backend(request):
    """Stand the torch_npu test double in while a test runs with backend == "npu"."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "npu":
        reason = NPU_NOT_APPLICABLE.get(request.node.originalname)
        if reason:
            pytest.skip(reason)
        with torch_npu_double.installed():
            yield
    else:
        yield
