"""The CPU shim and Megatron's jit_fuser: a no-op where the installed JIT cannot decorate what
Megatron decorates, the original everywhere else, and put back by disable().

megatron-core 0.12's `jit_fuser` is `torch.jit.script` on torch < 2.2: `import
megatron.core.models.gpt` raised there (L2Norm.forward reads self.eps) and GroupedMLP's closures
could not be built. The subprocess below gives any megatron-core that same jit_fuser before its
models are imported, as on torch 2.1, so the installed torch reproduces it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("megatron.core")

from gmm_plugin import torch_caps  # noqa: E402
from patches import cpu_platform  # noqa: E402

pytestmark = pytest.mark.skipif(cpu_platform.accelerator_present(), reason="the shim stays off with an accelerator")

_AS_ON_TORCH_2_1 = textwrap.dedent("""
    import inspect, sys, torch
    sys.path.insert(0, "tests/patches")
    from megatron.core import jit
    jit.jit_fuser = torch.jit.script          # megatron-core 0.12's choice on torch < 2.2
    import patches
    if sys.argv[1] == "shim":
        patches.apply({"backend": "torch", "cpu_shim": "on"})
    import megatron.core.models.gpt           # L2Norm: decorated at import
    import mcore_helpers as h
    h.ensure_world()
    config = h.make_config(experts=2)
    experts = h.build_grouped(2, config)      # 0.12-0.16 GroupedMLP: closures decorated in __init__
    x = torch.randn(6, config.hidden_size)
    probs = [torch.ones(6)] if len(inspect.signature(experts.forward).parameters) > 2 else []  # 0.12+: permuted_probs
    assert experts(x, torch.tensor([2, 4]), *probs)[0].shape == x.shape
    patches.revert()
    assert jit.jit_fuser is torch.jit.script, "revert() must put jit_fuser back"
    print("built", type(experts).__name__)
""")


def _run(mode: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-c", _AS_ON_TORCH_2_1, mode], capture_output=True, text=True,
                          timeout=300, cwd=root)


def test_unscriptable_jit_fuser_becomes_a_no_op_while_the_shim_is_on():
    # The premise: without the shim the same process fails in Megatron's TorchScript compile. From
    # megatron-core 0.17 on (no legacy GroupedMLP, nothing TorchScript cannot compile decorated on
    # this path) it builds without the shim too, and there is nothing for the shim to show.
    without = _run("none")
    if without.returncode == 0:
        pytest.skip("this megatron-core builds these modules under torch.jit.script: nothing to fix here")
    assert "RuntimeError" in without.stderr, without.stderr[-3000:]
    with_shim = _run("shim")
    assert with_shim.returncode == 0, with_shim.stderr[-3000:]
    assert "built" in with_shim.stdout


def test_jit_fuser_kept_where_the_jit_can_decorate_methods():
    from megatron.core import jit
    original = jit.jit_fuser
    try:
        assert cpu_platform.enable()
        assert (jit.jit_fuser is original) == torch_caps.jit_decorates_methods(original)
    finally:
        cpu_platform.disable()
    assert jit.jit_fuser is original
