"""Ascend NPU backend through gmm-plugin's own binding of CANN's aclnn grouped matmul.

The binding (gmm_plugin/csrc/aclnn_gmm.cpp) calls, without torch_npu's ops:

    grouped_mm   (group_type 0): aclnnGroupedMatmulV5 (V4 where V5 is not exported), splitItem 3,
                 groupListType = the caller's form (1: npu_gmm_v2's counts, 0: npu_gmm's cumsums)
    grouped_mm_k (group_type 2): the same op, x a transposed view, y [E, P, N]
    accumulate_k (gemm_fusion):  aclnnGroupedMatmulAddV2 with the caller's form into fp32 main_grad where
                 CANN exports it and (on an NPU) the SoC is Ascend950 or later, op-plugin's rule; else
                 aclnnGroupedMatmulAdd, which reads cumulative sums only (Groups.safe_offsets)

Everything above the kernel calls is the npu backend's (NpuBackend: the 1024-group and 65536
inner-axis limits, layouts, one-group calls, the per-expert fallback when no Add op is exported).

It is built on first use with torch.utils.cpp_extension.load into GMM_PLUGIN_BUILD_DIR (default
~/.cache/gmm_plugin/aclnn-torch<version>) and finds CANN's libraries in the order op-plugin searches
them (libcust_opapi.so, $ASCEND_HOME_PATH/lib64/libopapi_*.so, libopapi.so, libaclnn_ops_infer/train.so,
libaclnn_math.so; libnnopbase.so for the tensor objects and libascendcl.so for aclGetRecentErrMsg).
GMM_PLUGIN_CANN_LIB (a library file, or a directory searched for those names) replaces that search:
the test double of the ABI (tests/cann_double) is selected this way, and with it the backend runs on
CPU tensors with a null stream. On an NPU the stream is torch_npu's current one
(`torch.npu.current_stream().npu_stream`, which first drains torch_npu's task queue, so the kernel
runs after everything queued before it).

Tensors are described as op-plugin describes base formats; one in a private NPU format (its storage dims are
not readable from Python) is refused with a ValueError naming it.

Host reads: none. The group_list goes to the kernel as a device tensor (Groups.counts /
safe_offsets); only the npu backend's host-bounded paths (more than 1024 groups, no Add op) use
Groups.segments().
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import shutil
import sys

import torch

from .. import checks
from ..group_list import Groups
from ..layout import is_transposed
from .npu import (_FUSED_DTYPES, ASCEND950, LAST_DIM_LIMIT, NpuBackend, _as_plain, _chunks, _soc_version,
                  check_formats)

SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc", "aclnn_gmm.cpp")
CANN_LIB_ENV = "GMM_PLUGIN_CANN_LIB"
BUILD_DIR_ENV = "GMM_PLUGIN_BUILD_DIR"
# op-plugin's search order (reference §3), then the libraries of the objects and of the error text.
_OP_LIBRARIES = ("libcust_opapi.so", "libopapi_*.so", "libopapi.so", "libaclnn_ops_infer.so",
                 "libaclnn_ops_train.so", "libaclnn_math.so", "libnnopbase.so", "libascendcl.so")
_DOUBLE_SYMBOL = "cann_double_count"  # exported by the test double only
_ACL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 27, torch.int64: 9}  # aclDataType
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# The binding describes every tensor as op-plugin's ConvertType does for a base format; torch_npu's Python API
# gives a private format (get_npu_format) but not its storage dims (only their product, get_storage_size).
PRIVATE_FORMAT_REFUSED = ("the aclnn backend describes tensors as op-plugin does for base formats (ND, NCHW, NHWC, "
                          "NCDHW) only and cannot read torch_npu's storage desc of a private one, so CANN would "
                          "read its memory wrongly; backend 'npu' (torch_npu's npu_grouped_matmul) takes FRACTAL_NZ "
                          "weights")


class _Desc(ctypes.Structure):  # aclnn_gmm.cpp's Desc
    _fields_ = [("base", ctypes.c_void_p), ("offset", ctypes.c_int64), ("dtype", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("dims", ctypes.c_int64 * 8), ("strides", ctypes.c_int64 * 8),
                ("storage_elems", ctypes.c_int64)]


_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint64)


def _describe(t: torch.Tensor, name: str) -> _Desc:
    """t as op-plugin's ConvertType gives a base-format tensor to aclCreateTensor: the storage base and the
    element offset, sizes and strides, the storage as one dim of elements (the format follows the rank, in C++).
    group_list is INT64 (groupListOptional, groupList of the Add ops); the others float16, bfloat16 or float32."""
    if name == "group_list" and t.dtype != torch.int64:
        raise TypeError(f"group_list must be int64 for the aclnn backend (aclnnGroupedMatmul's groupListOptional "
                        f"is INT64), got {t.dtype}.")
    if name != "group_list" and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for the aclnn backend, got {t.dtype}.")
    check_formats(PRIVATE_FORMAT_REFUSED, **{name: t})
    if t.dim() > 8:
        raise ValueError(f"{name} has {t.dim()} dims; the aclnn backend takes at most 8.")
    d = _Desc()
    storage = t.untyped_storage()
    d.base, d.offset, d.dtype, d.ndim = storage.data_ptr(), t.storage_offset(), _ACL_DTYPES[t.dtype], t.dim()
    d.dims[:t.dim()], d.strides[:t.dim()] = t.shape, t.stride()
    d.storage_elems = storage.nbytes() // t.element_size()
    return d


def library_paths(environ=os.environ) -> list[str]:
    """The libraries the binding opens, in search order (GMM_PLUGIN_CANN_LIB, else CANN's)."""
    chosen = environ.get(CANN_LIB_ENV)
    if chosen and os.path.isfile(chosen):
        return [chosen]
    if chosen:
        dirs = [chosen]
    elif environ.get("ASCEND_HOME_PATH"):
        dirs = [os.path.join(environ["ASCEND_HOME_PATH"], "lib64")]
    else:
        dirs = []
    paths = []
    for name in _OP_LIBRARIES:
        found = [p for d in dirs for p in sorted(glob.glob(os.path.join(d, name)))]
        # Without a directory, a plain name is found by the loader (LD_LIBRARY_PATH from CANN's set_env.sh).
        paths += found if found or chosen or "*" in name else [name]
    if chosen and not paths:
        raise ImportError(f"{CANN_LIB_ENV}={chosen!r}: no CANN library ({', '.join(_OP_LIBRARIES)}) there.")
    return paths


def _build_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gmm_plugin",
                           f"aclnn-torch{torch.__version__}")
    return os.environ.get(BUILD_DIR_ENV) or default


def _put_pip_ninja_on_path() -> None:
    """pip's ninja (the npu and test extras) sits in the venv's bin, which PATH need not name;
    cpp_extension runs `ninja` from PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, os.environ.get("PATH")) if p)


def _loaded_library(before: set, directory: str) -> str:
    """The file cpp_extension.load just loaded, where it returns None (torch < 2.6): it loads it
    with torch.ops.load_library, under a name with a _v<N> suffix after an earlier build in this
    process (another build directory or source), so the file name cannot be guessed."""
    ours = [p for p in torch.ops.loaded_libraries
            if os.path.dirname(os.path.abspath(p)) == os.path.abspath(directory)]
    new = [p for p in ours if p not in before]
    return max(new or ours, key=os.path.getmtime, default=os.path.join(directory, "gmm_plugin_aclnn.so"))


@functools.cache
def _compiled() -> ctypes.CDLL:
    """The binding's shared library, built once per source version into the build dir."""
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler):
        raise ImportError(f"the aclnn backend builds its binding ({SOURCE}) on first use and needs a C++ compiler: "
                          f"{compiler!r} (the CXX environment variable, default c++) was not found.")
    _put_pip_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise ImportError("the aclnn backend builds its binding with torch.utils.cpp_extension, which needs ninja "
                          "(pip install ninja).")
    directory = _build_dir()
    os.makedirs(directory, exist_ok=True)
    built = glob.glob(os.path.join(directory, "gmm_plugin_aclnn*.so"))
    if not built or max(map(os.path.getmtime, built)) < os.path.getmtime(SOURCE):
        print(f"gmm-plugin: building the aclnn binding in {directory}", file=sys.stderr, flush=True)
    loaded = set(torch.ops.loaded_libraries)
    try:
        path = cpp_extension.load("gmm_plugin_aclnn", [SOURCE], build_directory=directory, is_python_module=False,
                                  extra_cflags=["-O2"], extra_ldflags=["-ldl"])
    except Exception as e:  # a compiler error: its output is in the message
        raise ImportError(f"building the aclnn binding ({SOURCE}) failed: {e}") from e
    lib = ctypes.CDLL(path or _loaded_library(loaded, directory))
    desc, ptr, i64, buf, size = ctypes.POINTER(_Desc), ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_size_t
    lib.gmm_aclnn_open.restype = ptr
    lib.gmm_aclnn_open.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, buf, size]
    lib.gmm_aclnn_has.argtypes = [ptr, buf]
    lib.gmm_aclnn_grouped_matmul.argtypes = [ptr, desc, desc, desc, desc, i64, i64, ptr, _ALLOC, buf, size]
    lib.gmm_aclnn_grouped_matmul_add.argtypes = [ptr, desc, desc, desc, desc, i64, ptr, _ALLOC, buf, size]
    return lib


class Binding:
    """The binding opened on one set of CANN libraries: which ops they export, and the two calls."""

    k_split = True  # what NpuBackend asks of its runtime: aclnnGroupedMatmulV4 takes group_type 2

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._lib = _compiled()
        err = ctypes.create_string_buffer(4096)
        names = (ctypes.c_char_p * len(paths))(*(p.encode() for p in paths))
        self._handle = self._lib.gmm_aclnn_open(names, len(paths), err, len(err))
        if not self._handle:
            raise ImportError(f"the aclnn backend cannot use CANN's libraries: {err.value.decode(errors='replace')}. "
                              f"Source CANN's set_env.sh (ASCEND_HOME_PATH, LD_LIBRARY_PATH) or set {CANN_LIB_ENV}.")
        self.exports = {w for w in ("V5", "V4", "AddV2", "Add", "ErrMsg") if self._lib.gmm_aclnn_has(self._handle,
                                                                                                   w.encode())}
        self.add = bool(self.exports & {"AddV2", "Add"})
        self.is_double = any(hasattr(ctypes.CDLL(p), _DOUBLE_SYMBOL) for p in paths if os.path.isabs(p))

    def _run(self, fn, *args, device: torch.device) -> None:
        keep = []  # the workspace buffers, alive until the call returns

        def alloc(nbytes):
            try:
                keep.append(torch.empty(nbytes, dtype=torch.uint8, device=device))
            except Exception:  # reported by the binding as a failed workspace allocation
                return None
            return keep[-1].data_ptr()

        err = ctypes.create_string_buffer(4096)
        if fn(self._handle, *args, _stream(device), _ALLOC(alloc), err, len(err)):
            raise RuntimeError(f"aclnn backend: {err.value.decode(errors='replace')}")

    def grouped_matmul(self, x, w, gl, group_type: int, gl_type: int) -> torch.Tensor:
        shape = (x.shape[0], w.shape[-1]) if group_type == 0 else (gl.shape[0], x.shape[0], w.shape[-1])
        y = x.new_empty(shape)
        descs = [_describe(t, n) for t, n in ((x, "x"), (w, "weight"), (gl, "group_list"), (y, "y"))]
        self._run(self._lib.gmm_aclnn_grouped_matmul, *map(ctypes.byref, descs), group_type, gl_type, device=x.device)
        return y

    def grouped_matmul_add(self, y, x, w, gl, gl_type: int) -> None:
        descs = [_describe(t, n) for t, n in ((x, "x"), (w, "weight"), (gl, "group_list"), (y, "out"))]
        self._run(self._lib.gmm_aclnn_grouped_matmul_add, *map(ctypes.byref, descs), gl_type, device=x.device)

    def describe(self) -> str:
        gmm = "V5" if "V5" in self.exports else "V4"
        add = "AddV2" if "AddV2" in self.exports else "Add" if "Add" in self.exports else "no Add (per expert)"
        return f"aclnnGroupedMatmul{gmm}, fusion: {add}" + (" [test double]" if self.is_double else "")


def _stream(device: torch.device):
    """torch_npu's current stream on an NPU; a null stream for host tensors (the test double)."""
    if device.type != "npu":
        return None
    return torch.npu.current_stream(device).npu_stream


_bindings: dict[tuple[str, ...], Binding] = {}


def binding() -> Binding:
    """The binding for the libraries the environment names now (one per set of libraries)."""
    paths = tuple(library_paths())
    if paths not in _bindings:
        _bindings[paths] = Binding(list(paths))
    return _bindings[paths]


def _import_torch_npu() -> None:
    if "torch_npu" in sys.modules:
        return
    try:
        import torch_npu  # noqa: F401  (NPU tensors and streams)
    except Exception as e:
        raise ImportError(f"the aclnn backend on an NPU needs torch_npu (for NPU tensors and its current stream); "
                          f"importing it failed: {type(e).__name__}: {e}") from e


def _add_v2_on(device: torch.device) -> bool:
    """Whether AddV2 may run: op-plugin calls it only on aclnn-only SoCs (Ascend950 and later), so on an NPU
    that torch_npu reports as older (Atlas A2/A3) the binding keeps to V1 Add; host tensors (the double): yes."""
    if device.type != "npu":
        return True
    return (_soc_version(sys.modules["torch_npu"]) or 0) >= ASCEND950


class AclnnBackend(NpuBackend):
    name = "aclnn"
    _private_whole = PRIVATE_FORMAT_REFUSED

    def supports(self, device: torch.device) -> bool:
        # CPU tensors stand in for NPU ones only with the test double of CANN selected.
        if device.type == "npu":
            return True
        return device.type == "cpu" and bool(os.environ.get(CANN_LIB_ENV)) and binding().is_double

    @staticmethod
    def _runtime() -> Binding:
        return binding()

    @staticmethod
    def _ops(runtime: Binding) -> Binding:
        return runtime

    @staticmethod
    def _call(runtime: Binding, x, w, gl, group_type, gl_type):
        checks.check_devices(x, weight=w, group_list=gl)
        if x.device.type == "npu":
            _import_torch_npu()
        return runtime.grouped_matmul(x, w, gl, group_type, gl_type)

    def _fuse(self, runtime: Binding, ops, a, b, groups: Groups, out) -> bool:
        """out[e] += a[:, seg e] @ b[seg e] by aclnnGroupedMatmulAdd(V2) when the kernel takes the case."""
        if not runtime.add or a.dtype not in _FUSED_DTYPES or b.dtype != a.dtype or out.dtype != torch.float32 \
                or a.shape[0] >= LAST_DIM_LIMIT or b.shape[1] >= LAST_DIM_LIMIT:
            return False
        if out.is_contiguous():     # out[e] += a[:, seg] @ b[seg]
            target, left, right = out, a.t(), b
        elif is_transposed(out):    # the weight was a transposed view: out^T[e] += b[seg]^T @ a^T[seg]
            target, left, right = out.transpose(-1, -2), b, a.t()
        else:
            return False
        if out.device.type == "npu":
            _import_torch_npu()
        if "AddV2" in runtime.exports and _add_v2_on(out.device):  # the caller's form
            gl, gl_type = self._group_list(groups)
        else:                                                       # V1 reads cumulative sums
            gl, gl_type = groups.safe_offsets(torch.int64), 0
        checks.check_devices(left, weight=right, group_list=gl, out=target)
        for g0, g1, s, t, part in _chunks(groups, gl, gl_type == 0):
            if t > s:
                runtime.grouped_matmul_add(target[g0:g1], _as_plain(left[s:t]), _as_plain(right[s:t]), part, gl_type)
        return True


def status() -> str:
    """One line for `gmm-plugin info`; it never builds the binding."""
    if not glob.glob(os.path.join(_build_dir(), "gmm_plugin_aclnn*.so")):
        return (f"binding not built yet (built on first use into {_build_dir()}: needs a C++ compiler, ninja, and "
                f"CANN's libraries or {CANN_LIB_ENV})")
    try:
        return f"ready: {binding().describe()}"
    except ImportError as e:
        return f"unavailable: {e}"
