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


def _variant_of(item) -> Variant | None:
    callspec = getattr(item, "callspec", None)
    return _BY_ID.get(callspec.params.get("backend")) if callspec else None


def pytest_collection_modifyitems(config, items):
    """Cases a variant does not run by design (Variant.skip: the full sweep runs on one torch_npu
    release, float64 where a kernel has none) are deselected, not skipped: skips stay for the
    machine lacking something. The count and the reasons go to the terminal summary."""
    keep, dropped, summary = [], [], {}
    for item in items:
        variant = _variant_of(item)
        reason = variant.skip.get(item.originalname) if variant else None
        if reason:
            dropped.append(item)
            summary.setdefault(reason, {}).setdefault(variant.id, 0)
            summary[reason][variant.id] += 1
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        config._gmm_variant_deselected = summary


def pytest_terminal_summary(terminalreporter, config):
    for reason, per_variant in getattr(config, "_gmm_variant_deselected", {}).items():
        where = ", ".join(f"{vid} {n}" for vid, n in per_variant.items())
        terminalreporter.write_line(f"deselected op-suite cases ({where}): {reason}")
    cann_double = sys.modules.get("cann_double")
    for line in cann_double.summary() if cann_double else ():
        terminalreporter.write_line(line)


@pytest.fixture(params=OP_BACKENDS)
def backend(request):
    """The backend name for the test; the variant's test double is in place while it runs."""
    variant = _BY_ID[request.param]
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
