"""Ascend NPU backend: CANN's aclnn GroupedMatmul kernels through torch_npu's ops.

    grouped_mm   (split M, group_type 0): torch_npu.npu_grouped_matmul([x], [w], group_list=gl,
                 split_item=3, group_type=0, group_list_type=0 | 1)[0]            -> [M, N]
    grouped_mm_k (split K, group_type 2): torch_npu.npu_grouped_matmul([a], [b], group_list=gl,
                 split_item=3, group_type=2, group_list_type=0 | 1)[0]            -> [E, P, N]
    accumulate_k (gemm_fusion):           torch_npu.npu_grouped_matmul_add_(out, a^T, b, gl,
                 transpose_x=True, transpose_weight=False, group_type=2[, group_list_type=1])

What the installed torch_npu takes is read once from its ops' schemas (`TorchNpuOps`, cached per
module), because torch_npu.__version__ is the torch version it was built for, not its release.
Release by release (op-plugin's op_plugin_functions.yaml and GroupedMatmul*NpuOpApi.cpp at each
release; docs/npu.md has the table):
  * 6.0.x: npu_grouped_matmul takes a host int[] group_list, no group_type -> a clear error.
  * 7.0.0: group_type 2 is accepted but op-plugin allocates a 2-D output, which CANN rejects; no
    add op -> split-K products are per-expert matmuls (host segment bounds), fusion adds them.
  * 7.1.0 / 7.2.0 (one schema): 7.1.0 rejects group_type 2 ("group_type currently only support -1
    and 0"), 7.2.0 runs it: the first split-K call finds out, then the per-expert path or the kernel.
    npu_grouped_matmul_add_ has no group_list_type and always reads cumulative sums.
  * 7.3.0: as 7.2.0, split K known to work (it is told apart by its new npu_grouped_matmul_add op).
  * 26.0.0: npu_grouped_matmul_add_ takes group_list_type, but op-plugin passes it on
    (aclnnGroupedMatmulAddV2) only on aclnn-only SoCs (Ascend950 and later) whose CANN exports
    AddV2; elsewhere it runs V1, which reads cumulative sums. The backend asks the same questions
    (torch_npu.npu.utils.get_soc_version(), the CANN library's exports) and sends counts only then.

group_list goes to the GMM kernel in the form the caller gave it: npu_gmm_v2's counts as
group_list_type 1 (no cumsum), npu_gmm's cumulative sums as group_list_type 0. Device group_lists
arrive sanitised (Groups.counts / safe_offsets: no kernel reads outside x, no row uninitialised).

The kernel limits are handled here, before any call (facts: aclnnGroupedMatmulV4 and torch_npu docs,
MindSpeed docs/zh/ops/gmm.md):
  * at most 1024 groups per call          -> several calls on consecutive slices of groups
  * a group_list of length 1 (rejected)   -> a plain matmul
  * the innermost dim of x / weight < 65536 -> the work is split into column blocks
  * every dim < 2**31 after 32-byte alignment -> ValueError (cannot be split)
  * layouts: x contiguous for group_type 0; weight contiguous or a transposed view; for group_type 2
    x a transposed view and weight contiguous; anything else is copied into that layout first.

Host reads: none when the caller's group_list is host data (the dispatcher's tokens_per_expert).
A group_list that lives only on the device is read back once (Groups.segments) only where the work
must be cut at group bounds on the host: more than 1024 groups, or split K / fusion on 7.0.0-7.1.0.

Tensors in a private NPU format (FRACTAL_NZ from torch_npu.npu_format_cast; torch_npu.get_npu_format) go
to torch_npu's ops only whole, where op-plugin describes them by their storage desc (an NZ weight runs on
aclnnGroupedMatmulWeightNz from 7.1.0); where this backend would slice or regroup them: a ValueError naming
the tensor (check_formats; docs/npu.md).

torch_npu is imported lazily, on first use: `import gmm_plugin` never imports torch_npu.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import importlib.metadata
import inspect
import os
import sys
import weakref

import torch

from .. import checks
from ..group_list import Groups
from ..layout import is_transposed

MAX_GROUPS_PER_CALL = 1024   # groupListOptional "第1维最大支持1024" (single-tensor x/weight/y)
LAST_DIM_LIMIT = 65536       # "x和weight中每一组tensor的最后一维大小都应小于65536"
_BLOCK = 32768               # column block used when a last dim reaches LAST_DIM_LIMIT
_INT32_MAX = 2**31 - 1       # every dim, 32-byte aligned, must stay below it
_LOOP_ROWS = 4096            # rows per matmul on the per-expert path (bounds its fp32 temporaries)
_FUSED_DTYPES = (torch.float16, torch.bfloat16)  # npu_grouped_matmul_add_: x/weight fp16|bf16, self fp32
ASCEND950 = 260              # c10_npu::SocVersion::Ascend950; op-plugin's IsAclnnOnly() is `>= Ascend950`
REQUIREMENT = ("torch_npu (Ascend Extension for PyTorch) 7.0.0 or newer built for torch {torch} (torch >= 2.9: "
               "torch_npu 7.3.0 or 26.0.0 and later), whose npu_grouped_matmul takes a tensor group_list with "
               "group_type and group_list_type, on CANN 8.0.RC3 or newer (aclnnGroupedMatmulV4)")
_K_SPLIT_REJECTED = "group_type currently only support -1 and 0"  # op-plugin 7.1.0's TORCH_CHECK
_TEST_DOUBLE_FLAG = "__gmm_plugin_test_double__"  # set only by the test double (tests/torch_npu_double)


def _requirement() -> str:
    return REQUIREMENT.format(torch=torch.__version__.split("+")[0])


# ---- what the installed torch_npu takes ---------------------------------------------------------

def _arguments(op) -> dict[str, str] | None:
    """{name: type} of an op's default overload (torch_npu's ops are torch.ops.npu packets); for a
    plain Python function the names only (types ""); None when neither can be read."""
    schema = getattr(getattr(op, "default", None), "_schema", None)
    if schema is not None:
        return {a.name: str(a.type) for a in schema.arguments}
    try:
        return {name: "" for name in inspect.signature(op).parameters}
    except (TypeError, ValueError):
        return None


@functools.cache
def cann_exports(kernel: str, ascend_home: str | None) -> bool:
    """Whether CANN's op libraries export `kernel` and `kernel`GetWorkspaceSize: op-plugin's
    check_aclnn_kernel_available, narrowed to $ASCEND_HOME_PATH/lib64/libopapi_*.so and libopapi.so
    (custom-op libraries are not searched). False when nothing can be loaded."""
    paths = sorted(glob.glob(os.path.join(ascend_home, "lib64", "libopapi_*.so"))) if ascend_home else []
    paths += [os.path.join(ascend_home, "lib64", "libopapi.so")] if ascend_home else []
    paths.append("libopapi.so")  # op-plugin dlopens it by name (LD_LIBRARY_PATH from CANN's set_env.sh)
    for path in paths:
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LAZY", 1))
        except OSError:
            continue
        if hasattr(lib, kernel) and hasattr(lib, kernel + "GetWorkspaceSize"):
            return True
    return False


def _soc_version(torch_npu) -> int | None:
    """The c10_npu::SocVersion number torch_npu reports (what op-plugin's IsAclnnOnly() compares)."""
    try:
        return int(torch_npu.npu.utils.get_soc_version())
    except Exception:  # an older torch_npu without it, or no device: treat as unknown
        return None


class TorchNpuOps:
    """What one torch_npu module's grouped-matmul ops take (read once, see the module docstring)."""

    def __init__(self, torch_npu):
        self.version = getattr(torch_npu, "__version__", "?")
        gmm = getattr(torch_npu, "npu_grouped_matmul", None)
        if gmm is None:
            raise RuntimeError(f"torch_npu {self.version} has no npu_grouped_matmul; the npu backend needs "
                               f"{_requirement()}.")
        args = _arguments(gmm)
        group_list_type = args.get("group_list", "") if args else ""  # "" when only names are known
        if args is not None and ("group_type" not in args or (group_list_type and "Tensor" not in group_list_type)):
            missing = sorted({"group_type", "group_list_type"} - set(args))
            raise RuntimeError(
                f"torch_npu {self.version} is too old: its npu_grouped_matmul is the 6.0-era one (aclnnGroupedMatmul "
                f"V1: a host int[] group_list{', no ' + ', '.join(missing) if missing else ''}), which cannot take "
                f"the group_list on the device nor group along K. Upgrade to {_requirement()}, or use "
                "backend 'aclnn' (gmm-plugin's own binding of CANN's aclnnGroupedMatmulV4).")
        add = getattr(torch_npu, "npu_grouped_matmul_add_", None)
        add_args = _arguments(add) if add is not None else None
        self.add = add is not None
        # group_type 2: 7.0.0's schema (no tuning_config) allocates a 2-D output for it; 7.1.0 and 7.2.0 share
        # one schema and only 7.2.0 accepts it (learnt on the first call); 7.3.0 adds npu_grouped_matmul_add.
        if args is not None and "tuning_config" not in args:
            self.k_split: bool | None = False
        elif hasattr(torch_npu, "npu_grouped_matmul_add") or (add_args and "group_list_type" in add_args):
            self.k_split = True
        else:
            self.k_split = None
        self.add_takes_counts = bool(
            add_args and "group_list_type" in add_args and (_soc_version(torch_npu) or 0) >= ASCEND950
            and cann_exports("aclnnGroupedMatmulAddV2", os.environ.get("ASCEND_HOME_PATH")))

    def describe(self) -> str:
        k = {True: "group_type 2", False: "split K per expert", None: "group_type 2 if accepted"}[self.k_split]
        if not self.add:
            fusion = "no npu_grouped_matmul_add_: gemm_fusion computes then adds"
        else:
            fusion = "fusion via npu_grouped_matmul_add_ (" + (
                "counts, AddV2)" if self.add_takes_counts else "cumulative sums)")
        return f"{k}, {fusion}"


_ops_cache: "weakref.WeakKeyDictionary[object, TorchNpuOps]" = weakref.WeakKeyDictionary()


def load_torch_npu():
    """The torch_npu module, imported on first use, checked to have what this backend calls."""
    module = sys.modules.get("torch_npu")
    if module is None:
        try:
            import torch_npu as module  # noqa: F401  (registers the NPU device with torch)
        except Exception as e:  # ImportError, or OSError/RuntimeError when CANN libraries are missing
            raise ImportError(f"the npu backend needs {_requirement()}; importing torch_npu failed: "
                              f"{type(e).__name__}: {e}. If installing torch_npu without CANN breaks "
                              "`import torch`, set TORCH_DEVICE_BACKEND_AUTOLOAD=0.") from e
    ops_of(module)
    return module


def ops_of(torch_npu) -> TorchNpuOps:
    try:
        return _ops_cache[torch_npu]
    except KeyError:
        ops = _ops_cache[torch_npu] = TorchNpuOps(torch_npu)
        return ops


def is_test_double(module=None) -> bool:
    module = sys.modules.get("torch_npu") if module is None else module
    return bool(getattr(module, _TEST_DOUBLE_FLAG, False))


# ---- NPU storage formats ------------------------------------------------------------------------

# aclFormat (hicann/runtime acl_base_rt.h; torch_npu.npu._format.Format). op-plugin's ConvertType describes a
# tensor by its rank only in the base formats (FormatHelper::IsOpInputBaseFormat: ND, NCHW, NHWC, NCDHW); a
# tensor in any other (e.g. FRACTAL_NZ from torch_npu.npu_format_cast) is described by torch_npu's storage
# desc: its own format and physical storage dims.
BASE_FORMATS = (0, 1, 2, 30)
ND = 2
FORMAT_NAMES = {-1: "UNDEFINED", 0: "NCHW", 1: "NHWC", 2: "ND", 3: "NC1HWC0", 4: "FRACTAL_Z", 12: "NC1HWC0_C04",
                16: "HWCN", 27: "NDHWC", 29: "FRACTAL_NZ", 30: "NCDHW", 32: "NDC1HWC0", 33: "FRACTAL_Z_3D",
                35: "NC", 47: "NCL", 50: "FRACTAL_NZ_C0_16", 51: "FRACTAL_NZ_C0_32", 52: "FRACTAL_NZ_C0_2",
                53: "FRACTAL_NZ_C0_4", 54: "FRACTAL_NZ_C0_8"}


def private_format(t: torch.Tensor) -> int | None:
    """The private NPU format torch_npu records for t's storage, or None (a base format, or a tensor torch_npu
    does not hold). torch_npu's query, the same on every release: `get_npu_format(Tensor self) -> int`
    (npu_native_functions.yaml; 7.1.0+ wraps the result in the IntEnum torch_npu.Format)."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is None or not (t.device.type == "npu" or is_test_double(torch_npu)):
        return None
    fmt = int(torch_npu.get_npu_format(t))
    return None if fmt in BASE_FORMATS else fmt


def check_formats(why: str | None, **tensors) -> None:
    """ValueError naming the first tensor in a private NPU format, with `why` it cannot be taken; why=None: all
    may be."""
    for name, t in tensors.items():
        fmt = private_format(t) if why else None
        if fmt is not None:
            raise ValueError(f"{name} is in NPU format {FORMAT_NAMES.get(fmt, 'private')} ({fmt}); {why}. Cast it to "
                             f"ND first: torch_npu.npu_format_cast({name}, {ND}).")


def status(import_module: bool = False) -> str:
    """One line for `gmm-plugin info`."""
    module = sys.modules.get("torch_npu")
    if module is None:
        try:
            version = importlib.metadata.version("torch_npu")
        except importlib.metadata.PackageNotFoundError:
            return f"unavailable: torch_npu is not installed (needs {_requirement()})"
        if not import_module:
            return (f"torch_npu {version} installed, not imported (it needs CANN; "
                    "`gmm-plugin info --import-npu` tries it)")
    try:
        module = load_torch_npu()
    except (ImportError, RuntimeError) as e:
        return f"unavailable: {e}"
    double = " [test double]" if is_test_double(module) else ""
    return f"ready: torch_npu {getattr(module, '__version__', '?')}{double}, {ops_of(module).describe()}"


# ---- layouts and limits -------------------------------------------------------------------------

def _as_plain(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _as_plain_or_transposed(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() or is_transposed(t) else t.contiguous()


def _as_transposed(t: torch.Tensor) -> torch.Tensor:
    """t with the layout aclnn reads as transposed (its transpose contiguous), copied only if needed."""
    return t if t.transpose(-1, -2).is_contiguous() else t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _check_sizes(*tensors: torch.Tensor) -> None:
    for t in tensors:
        for d, size in enumerate(t.shape):
            aligned = -(-size * t.element_size() // 32) * 32 // t.element_size()
            if aligned >= _INT32_MAX:
                raise ValueError(f"dimension {d} of a grouped-matmul operand is {size}, too large for the aclnn "
                                 f"GroupedMatmul kernel (every dim must stay below {_INT32_MAX} after "
                                 "32-byte alignment).")


def _blocks(size: int):
    """Column ranges: the whole dim when it is below the kernel limit, else blocks of _BLOCK."""
    if size < LAST_DIM_LIMIT:
        return [(0, size)]
    return [(i, min(i + _BLOCK, size)) for i in range(0, size, _BLOCK)]


def _host_offsets(groups: Groups) -> tuple[int, ...]:
    """Cumulative end offsets on the host: the caller's host data, else Groups.segments() (its one
    read of a device-only group_list)."""
    offsets = groups.host_offsets()
    return offsets if offsets is not None else tuple(end for _, _, end in groups.segments())


def _chunks(groups: Groups, gl: torch.Tensor, gl_cumsum: bool):
    """(g0, g1, start, end, group_list) per kernel call, at most MAX_GROUPS_PER_CALL groups each.

    One call (the usual case) passes gl untouched. More groups than one call takes need the
    group boundaries on the host (for a device group_list that is its one read back).
    """
    e = groups.num_groups
    if e <= MAX_GROUPS_PER_CALL:
        yield 0, e, 0, groups.total, gl
        return
    offsets = _host_offsets(groups)
    for g0 in range(0, e, MAX_GROUPS_PER_CALL):
        g1 = min(g0 + MAX_GROUPS_PER_CALL, e)
        start = offsets[g0 - 1] if g0 else 0
        yield g0, g1, start, offsets[g1 - 1], (gl[g0:g1] - start if gl_cumsum else gl[g0:g1])


def _reshaped(groups: Groups, k: int, n: int, layout_kept: bool) -> str | None:
    """What grouped_mm does to x and weight other than one kernel call on them whole (None: nothing)."""
    if groups.num_groups == 1:
        return "one expert is a plain matmul of weight[0]"
    if groups.num_groups > MAX_GROUPS_PER_CALL:
        return f"more than {MAX_GROUPS_PER_CALL} experts go to the kernel in slices"
    if k >= LAST_DIM_LIMIT or n >= LAST_DIM_LIMIT:
        return f"a last dim of {LAST_DIM_LIMIT} or more is cut into column blocks"
    return None if layout_kept else "this layout (neither contiguous nor a transposed view) would be copied"


# aclnnGroupedMatmulWeightNz does not group along K ("Not support split k dim now", ops-transformer
# aclnn_grouped_matmul.cpp), and split-K operands are transposed views, sliced per chunk or per expert.
_SPLIT_K = "split-K products (group_type 2, the weight gradient) are made here from views and slices of them"


def _segments(groups: Groups):
    """(e, start, end) of every non-empty group, on the host (Groups.segments)."""
    return [(e, s, t) for e, s, t in groups.segments() if t > s]


class _KSplitRejected(Exception):
    """torch_npu 7.1.0 turned group_type 2 down: take the per-expert path instead."""


class NpuBackend:
    name = "npu"
    # Tensors in a private NPU format (check_formats): torch_npu's ops describe an operand they get whole by its
    # storage desc (op-plugin's ConvertType), and npu_grouped_matmul runs a FRACTAL_NZ weight on
    # aclnnGroupedMatmulWeightNz (op-plugin 7.1.0+; 7.0.0 hands it to V4, whose CheckFormat takes NZ weights).
    # What this backend slices, copies or regroups would be a view into that private layout, which neither
    # op-plugin nor CANN defines. None: whole operands in a private format go on to torch_npu.
    _private_whole: str | None = None

    def _private_reason(self, detail: str | None) -> str | None:
        """Why operands in a private format cannot be taken here (None: they can); detail: what the call would
        do to them, or None when they reach the kernel whole."""
        if self._private_whole or detail is None:
            return self._private_whole
        return f"the {self.name} backend passes tensors in a private format to the kernel only whole, and {detail}"

    def supports(self, device: torch.device) -> bool:
        # CPU tensors only stand in for NPU ones under the test double of torch_npu.
        return device.type == "npu" or (device.type == "cpu" and is_test_double())

    # What runs the kernels, and what it takes (the aclnn backend, a subclass, puts its binding here).
    _runtime = staticmethod(load_torch_npu)
    _ops = staticmethod(ops_of)

    @staticmethod
    def _group_list(groups: Groups) -> tuple[torch.Tensor, int]:
        """The group_list in the caller's form (exact host data, or sanitised device data) and its type."""
        if groups.cumsum:
            return groups.safe_offsets(torch.int64), 0
        return groups.counts(), 1

    @staticmethod
    def _call(torch_npu, x, w, gl, group_type, gl_type):
        checks.check_devices(x, weight=w, group_list=gl)
        ops = ops_of(torch_npu)
        try:
            y = torch_npu.npu_grouped_matmul([x], [w], group_list=gl, split_item=3, group_type=group_type,
                                             group_list_type=gl_type)[0]
        except RuntimeError as e:
            if group_type == 2 and ops.k_split is None and _K_SPLIT_REJECTED in str(e):
                ops.k_split = False
                raise _KSplitRejected() from e
            raise
        if group_type == 2 and ops.k_split is None:
            ops.k_split = True
        return y

    # ---- split M (group_type 0) --------------------------------------------------------------

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor:
        torch_npu = self._runtime()
        m, k, n = x.shape[0], x.shape[1], w.shape[-1]
        _check_sizes(x, w)
        if m == 0 or n == 0 or k == 0:
            return x.new_zeros(m, n)
        check_formats(self._private_reason(_reshaped(groups, k, n, x.is_contiguous() and (
            w.is_contiguous() or is_transposed(w)))), x=x, weight=w)
        if groups.num_groups == 1:  # the kernel rejects a group_list of length 1: a plain matmul
            return torch.mm(x, w[0])
        gl, gl_type = self._group_list(groups)
        k_blocks, n_blocks = _blocks(k), _blocks(n)
        if len(k_blocks) == 1 and len(n_blocks) == 1:
            x, w = _as_plain(x), _as_plain_or_transposed(w)
            if groups.num_groups <= MAX_GROUPS_PER_CALL:
                return self._call(torch_npu, x, w, gl, 0, gl_type)
        y = x.new_empty(m, n)
        for n0, n1 in n_blocks:
            acc = None
            for k0, k1 in k_blocks:
                part = self._mm_groups(torch_npu, _as_plain(x[:, k0:k1]),
                                       _as_plain_or_transposed(w[:, k0:k1, n0:n1]), groups, gl, gl_type)
                # K blocks are partial sums: add them in float32, round once.
                acc = part if len(k_blocks) == 1 else part.float() if acc is None else acc.add_(part.float())
            y[:, n0:n1] = acc
        return y

    def _mm_groups(self, torch_npu, x, w, groups, gl, gl_type):
        if groups.num_groups <= MAX_GROUPS_PER_CALL:
            return self._call(torch_npu, x, w, gl, 0, gl_type)
        y = x.new_empty(x.shape[0], w.shape[-1])
        for g0, g1, s, t, part in _chunks(groups, gl, gl_type == 0):
            if t == s:
                continue
            if g1 - g0 == 1:
                y[s:t] = torch.mm(x[s:t], w[g0])
            else:
                y[s:t] = self._call(torch_npu, x[s:t], w[g0:g1], part, 0, gl_type)
        return y

    # ---- split K (group_type 2) ----------------------------------------------------------------

    def grouped_mm_k(self, a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor:
        torch_npu = self._runtime()
        e, p, tokens, n = groups.num_groups, a.shape[0], a.shape[1], b.shape[1]
        _check_sizes(a, b)
        if tokens == 0 or p == 0 or n == 0:
            return a.new_zeros(e, p, n)
        check_formats(self._private_reason(_SPLIT_K), x=a, weight=b)
        if groups.num_groups == 1:  # the kernel rejects a group_list of length 1; the group covers every row
            return torch.mm(a, b).unsqueeze(0)
        if self._ops(torch_npu).k_split is not False:
            try:
                return self._mm_k_kernel(torch_npu, a, b, groups)
            except _KSplitRejected:
                pass
        return self._mm_k_per_expert(a, b, groups)

    def _mm_k_kernel(self, torch_npu, a, b, groups):
        gl, gl_type = self._group_list(groups)
        p_blocks, n_blocks = _blocks(a.shape[0]), _blocks(b.shape[1])
        if len(p_blocks) == 1 and len(n_blocks) == 1:
            return self._mm_k_groups(torch_npu, _as_transposed(a), _as_plain(b), groups, gl, gl_type)
        result = a.new_empty(groups.num_groups, a.shape[0], b.shape[1])
        for p0, p1 in p_blocks:
            for n0, n1 in n_blocks:
                result[:, p0:p1, n0:n1] = self._mm_k_groups(torch_npu, _as_transposed(a[p0:p1]),
                                                            _as_plain(b[:, n0:n1]), groups, gl, gl_type)
        return result

    def _mm_k_groups(self, torch_npu, a, b, groups, gl, gl_type):
        if groups.num_groups <= MAX_GROUPS_PER_CALL:
            return self._call(torch_npu, a, b, gl, 2, gl_type)
        result = a.new_empty(groups.num_groups, a.shape[0], b.shape[1])
        for g0, g1, s, t, part in _chunks(groups, gl, gl_type == 0):
            if t == s:
                result[g0:g1] = 0
            elif g1 - g0 == 1:
                result[g0] = torch.mm(a[:, s:t], b[s:t])
            else:
                result[g0:g1] = self._call(torch_npu, a[:, s:t], b[s:t], part, 2, gl_type)
        return result

    @staticmethod
    def _mm_k_per_expert(a, b, groups):
        """Split K without the grouped kernel (7.0.0, 7.1.0): one matmul per non-empty expert."""
        result = a.new_zeros(groups.num_groups, a.shape[0], b.shape[1])
        for e, s, t in _segments(groups):
            result[e] = torch.mm(a[:, s:t], b[s:t])
        return result

    # ---- out[e] += a[:, seg e] @ b[seg e] (gemm_fusion) -----------------------------------------

    def accumulate_k(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: Groups, *,
                     wgrad_dtype: str) -> None:
        torch_npu = self._runtime()
        _check_sizes(a, b)
        checks.check_devices(a, weight=b, out=out)
        if a.shape[1] == 0 or a.shape[0] == 0 or b.shape[1] == 0:
            return
        check_formats(self._private_reason(_SPLIT_K), main_grad=out, x=a, weight=b)
        ops = self._ops(torch_npu)
        if wgrad_dtype == "fp32" and self._fuse(torch_npu, ops, a, b, groups, out):
            return
        if ops.k_split is not False and (wgrad_dtype == "input" or a.dtype == torch.float32):
            # The grouped kernel's product in a's dtype (float32 accumulation, one rounding), then the add:
            # one temporary of out's shape in a's dtype.
            out.add_(self.grouped_mm_k(a, b, groups))
            return
        self._accumulate_per_expert(out, a, b, groups, fp32=wgrad_dtype == "fp32")

    def _fuse(self, torch_npu, ops, a, b, groups, out) -> bool:
        """GMM+ADD straight into out (main_grad) when the kernel takes this case; False otherwise."""
        if not ops.add or a.dtype not in _FUSED_DTYPES or b.dtype != a.dtype or out.dtype != torch.float32 \
                or a.shape[0] >= LAST_DIM_LIMIT or b.shape[1] >= LAST_DIM_LIMIT:
            return False
        if out.is_contiguous():     # out[e] += a[:, seg] @ b[seg]
            target, left, right = out, a.t(), b
        elif is_transposed(out):    # weight was a transposed view: out^T[e] += b[seg]^T @ a^T[seg]
            target, left, right = out.transpose(-1, -2), b, a.t()
        else:
            return False
        if ops.add_takes_counts and not groups.cumsum:
            gl, extra = groups.counts(), {"group_list_type": 1}
        else:  # aclnnGroupedMatmulAdd (V1) reads cumulative sums, whatever group_list_type says
            gl, extra = groups.safe_offsets(torch.int64), {}
        checks.check_devices(left, weight=right, group_list=gl, out=target)
        for g0, g1, s, t, part in _chunks(groups, gl, not extra):
            if t > s:
                torch_npu.npu_grouped_matmul_add_(target[g0:g1], left[s:t], right[s:t], part, transpose_x=True,
                                                  transpose_weight=False, group_type=2, **extra)
        return True

    @staticmethod
    def _accumulate_per_expert(out, a, b, groups, *, fp32: bool):
        """out[e] += a[:, seg] @ b[seg], one expert at a time: float32 products (fp32) rounded once into
        out, or a product in a's dtype then the add; temporaries bounded by _LOOP_ROWS rows."""
        for e, s, t in _segments(groups):
            if not fp32:
                out[e].add_(torch.mm(a[:, s:t], b[s:t]))
                continue
            in_place = out.dtype == torch.float32
            acc = out[e] if in_place else torch.zeros(out.shape[1:], dtype=torch.float32, device=out.device)
            for lo in range(s, t, _LOOP_ROWS):
                hi = min(lo + _LOOP_ROWS, t)
                acc.addmm_(a[:, lo:hi].float(), b[lo:hi].float())
            if not in_place:
                out[e].add_(acc)
