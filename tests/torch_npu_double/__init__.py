"""A test double of torch_npu's grouped-matmul ops, one per release, on CPU tensors.

Each release in `releases.RELEASES` (6.0.0, 7.0.0, 7.1.0, 7.2.0, 7.3.0, 26.0.0) gets its ops
registered with torch.library under its own namespace (`torch.ops.gmm_double_7_3_0....`), with the
release's exact schema strings (cited in releases.py). So torch's dispatcher parses the arguments
as the real op would: an argument the release lacks fails the way it fails on hardware, e.g.
`npu_grouped_matmul_add_() expected at most 7 argument(s) but received 8 argument(s)` for
group_list_type on 7.3.0. Below the parsing, kernels.py models op-plugin's C++ of that release and
CANN's aclnn kernels (checks, limits, arithmetic, KernelContractViolation for what the real kernel
would silently mishandle).

`module(release, soc=..., cann_kernels=...)` is a fake `torch_npu` for one release: `__version__`
is that release's (torch_npu reports the torch version it was built for), the ops are attributes as
in torch_npu (`torch_npu.npu_grouped_matmul is torch.ops.npu.npu_grouped_matmul` there), and
`torch_npu.npu.utils.get_soc_version()` answers the settable SoC the way torch_npu does (the
c10_npu::SocVersion number; op-plugin's IsAclnnOnly() is `>= Ascend950`). `cann_kernels` is the set
of aclnn kernels the simulated CANN exports (op-plugin's check_aclnn_kernel_available); on an
aclnn-only SoC `installed()` also points ASCEND_HOME_PATH at a stub library exporting them
(cann.py), which is where the backend looks.

Storage formats (formats.py): `npu_format_cast(t, 29)` gives a stand-in in FRACTAL_NZ, which
`get_npu_format` reports (both registered with each release's schema); the kernels route an NZ weight
as that release's op-plugin does (aclnnGroupedMatmulWeightNz from 7.1.0) and raise
KernelContractViolation for a view into a private-format storage.

`with installed("7.3.0"): ...` stands it in for torch_npu (sys.modules) for a block; `calls`
records every op call with its bound arguments, the release and (for the add op) the aclnn kernel
op-plugin would run. `VARIANTS` are the op-suite variants (tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import types

import torch

from . import cann, formats, kernels, releases
from .kernels import LAST_DIM_LIMIT, MAX_GROUPS, KernelContractViolation  # noqa: F401
from .releases import ASCEND950, RELEASES, SOC_VERSIONS  # noqa: F401
from variants import Variant

calls: list[tuple[str, dict]] = []
DEFAULT_RELEASE = "7.3.0"   # the torch 2.9.0 build the plugin's requirement names first
_libraries: dict[str, torch.library.Library] = {}
_states: dict[str, kernels.State] = {}
_modules: dict[tuple, types.ModuleType] = {}


def _register(release: releases.Release) -> kernels.State:
    """The release's ops under its own namespace, once per process."""
    if release.name in _states:
        return _states[release.name]
    state = kernels.State(release)
    lib = torch.library.Library(release.namespace, "DEF")
    for schema in release.schemas:
        lib.define(schema)
        qualified = schema.split("(")[0]
        parsed = torch._C.parse_schema(schema)
        impl = kernels.IMPLS[qualified]

        def kernel(*args, _impl=impl, _schema=parsed, **kwargs):
            return _impl(state, kernels.bind(_schema, args, kwargs), calls)

        lib.impl(qualified, kernel, "CPU")
    _libraries[release.name] = lib
    _states[release.name] = state
    return state


def module(release: str = DEFAULT_RELEASE, *, soc: str = "Ascend910B3",
           cann_kernels: frozenset[str] | None = None, fresh: bool = False) -> types.ModuleType:
    """A fake torch_npu of one release on one SoC; the same object for the same arguments (what the
    backend learnt about it stays), or with fresh=True a new one (as in a new process)."""
    if release not in RELEASES:
        raise KeyError(f"no torch_npu release {release!r} in the double; known: {', '.join(RELEASES)}")
    key = (release, soc, cann_kernels)
    if key in _modules and not fresh:
        return _modules[key]
    rel = RELEASES[release]
    state = _register(rel)
    m = types.ModuleType("torch_npu")
    m.__version__ = rel.torch_npu_version
    m.__gmm_plugin_test_double__ = True   # lets the npu backend run on CPU tensors (NpuBackend.supports)
    m.double_release = rel
    m.double_config = dict(soc=SOC_VERSIONS[soc], cann_kernels=cann_kernels)
    namespace = getattr(torch.ops, rel.namespace)
    for name in rel.op_names:
        setattr(m, name, getattr(namespace, name))
    npu = types.ModuleType("torch_npu.npu")
    npu.utils = types.ModuleType("torch_npu.npu.utils")
    npu.utils.get_soc_version = lambda: state.soc
    m.npu = npu
    if not fresh:
        _modules[key] = m
    return m


@contextlib.contextmanager
def installed(release: str = DEFAULT_RELEASE, *, soc: str = "Ascend910B3", cann_kernels: frozenset[str] | None = None,
              fresh: bool = False):
    """Stand the double of one release in for torch_npu (sys.modules['torch_npu']) inside the block."""
    m = module(release, soc=soc, cann_kernels=cann_kernels, fresh=fresh)
    state = _states[release]
    saved_state = (state.soc, set(state.cann_kernels))
    state.soc = m.double_config["soc"]
    if cann_kernels is not None:
        state.cann_kernels = set(cann_kernels)
    saved_home = os.environ.get("ASCEND_HOME_PATH")
    if state.soc >= ASCEND950:  # the backend asks CANN's libraries only on an aclnn-only SoC
        home = cann.ascend_home(frozenset(state.cann_kernels))
        if home:
            os.environ["ASCEND_HOME_PATH"] = home
        else:
            os.environ.pop("ASCEND_HOME_PATH", None)
    previous = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = m
    try:
        yield m
    finally:
        state.soc, state.cann_kernels = saved_state
        if saved_home is None:
            os.environ.pop("ASCEND_HOME_PATH", None)
        else:
            os.environ["ASCEND_HOME_PATH"] = saved_home
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous


# ---- op-suite variants (tests/conftest.py) ---------------------------------------------------------

NOT_APPLICABLE = {
    "test_gradcheck_float64": "aclnn GroupedMatmul has no float64 (the public API never passes it)",
}
# The full value sweep (384 cases) runs on DEFAULT_RELEASE only; every other release runs the rest of
# the op suite, and test_npu_releases.py runs each release-specific path (forward, dX, dW, fused add,
# >1024 groups, transposed weight) and a slice of the same sweep on every release.
FOCUSED = dict(NOT_APPLICABLE, test_against_reference=(
    f"the full value sweep runs on torch_npu {DEFAULT_RELEASE}; test_npu_releases.py runs its per-release slice"))


@contextlib.contextmanager
def as_on_an_npu(release: str, **config):
    """The double of `release` installed, and `fused_wgrad_dtype: auto` resolved as on an NPU (fp32
    products, the fused kernel's): the stand-in tensors are CPU ones, where auto means "input"."""
    from gmm_plugin import settings
    with installed(release, **config):
        previous = settings.configure(fused_wgrad_dtype="fp32") if settings.configure().fused_wgrad_dtype == "auto" \
            else None
        try:
            yield
        finally:
            if previous is not None:
                settings.configure(previous)


# variant id -> (release, installed() arguments)
RELEASE_VARIANTS = {
    "npu-7.3.0": ("7.3.0", {}),
    "npu-7.0.0": ("7.0.0", {}),
    "npu-7.1.0": ("7.1.0", {}),
    "npu-7.2.0": ("7.2.0", {}),
    "npu-26.0.0-a2": ("26.0.0", {}),
    "npu-26.0.0-950": ("26.0.0", {"soc": "Ascend950"}),
}
VARIANTS = [Variant(vid, "npu", functools.partial(as_on_an_npu, rel, **config),
                    NOT_APPLICABLE if vid == f"npu-{DEFAULT_RELEASE}" else FOCUSED)
            for vid, (rel, config) in RELEASE_VARIANTS.items()]
