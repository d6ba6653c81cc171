"""Which megatron-core the patch tests run against, and the supported range."""
from __future__ import annotations

import os

import pytest

import patches


@pytest.mark.megatron
def test_the_matrix_run_uses_the_requested_megatron_core():
    pytest.importorskip("megatron.core")
    expected = os.environ.get("GMM_EXPECT_MCORE")
    got = ".".join(map(str, patches.megatron_version()))
    if expected:
        assert got == expected, f"PYTHONPATH should have selected megatron-core {expected}, got {got}"
    assert patches.SUPPORTED[0] <= patches.megatron_version()[:2] < patches.SUPPORTED[1]


def test_no_megatron_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "megatron", None)
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(patches.UnsupportedMegatronVersion, match="megatron-core is not installed"):
        patches.megatron_version()
