import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from gmm_plugin import settings  # noqa: E402
from variants import Variant  # noqa: E402

# Backends the whole op suite runs through. Test-double modules for hardware this machine lacks
# add their own variants (their module-level VARIANTS): torch_npu's ops per release, the CANN ABI.
BACKEND_VARIANTS = [Variant("torch", "torch"), Variant("reference", "reference")]
for _double in ("torch_npu_double", "cann_double"):
    try:
        BACKEND_VARIANTS += __import__(_double).VARIANTS
    except ImportError:
        pass
_BY_ID = {v.id: v for v in BACKEND_VARIANTS}
OP_BACKENDS = [v.id for v in BACKEND_VARIANTS]


@pytest.fixture(params=OP_BACKENDS)
def backend(request):
    """The backend name for the test; the variant's test double is in place while it runs."""
    variant = _BY_ID[request.param]
    reason = variant.skip.get(request.node.originalname)
    if reason:
        pytest.skip(reason)
    with variant.enter():
        previous = settings.configure(backend=variant.backend)
        try:
            yield variant.backend
        finally:
            settings.configure(previous)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _settings_unchanged():
    """Every test leaves the process-wide settings as it found them."""
    before = settings.configure()
    yield
    after = settings.configure(before)
    assert after == before, f"the test left the settings changed: {after} (was {before})"
