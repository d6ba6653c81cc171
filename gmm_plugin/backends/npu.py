"""Ascend NPU backend: CANN's aclnn GroupedMatmul kernels through torch_npu.

    grouped_mm   (split M, group_type 0): torch_npu.npu_grouped_matmul([x], [w], group_list=gl,
                 split_item=3, group_type=0, group_list_type=0 | 1)[0]            -> [M, N]
    grouped_mm_k (split K, group_type 2): torch_npu.npu_grouped_matmul([a], [b], group_list=gl,
                 split_item=3, group_type=2, group_list_type=0 | 1)[0]            -> [E, P, N]
    grouped_mm_k with out (gemm_fusion): torch_npu.npu_grouped_matmul_add_(out, a^T, b, offsets,
                 transpose_x=True, transpose_weight=False, group_type=2, group_list_type=0)

group_list goes to the kernel in the form the caller gave it: npu_gmm_v2's counts as
group_list_type 1 (no cumsum), npu_gmm's cumulative sums as group_list_type 0. The one exception
is GMM+ADD: on Atlas A2/A3 torch_npu runs it on aclnnGroupedMatmulAdd, which reads group_list as
cumulative sums whatever group_list_type says, so fusion gets offsets (one small cumsum on the
device for v2 counts, as MindSpeed does).

The kernel limits are handled here, before any call (facts: aclnnGroupedMatmulV4 and
torch_npu docs, MindSpeed docs/zh/ops/gmm.md):
  * at most 1024 groups per call          -> several calls on consecutive slices of groups
  * a group_list of length 1 (rejected)   -> a plain matmul
  * the innermost dim of x / weight < 65536 -> the work is split into column blocks
  * every dim < 2**31 after 32-byte alignment -> ValueError (cannot be split)
  * uncovered rows stay uninitialised     -> host group_lists are checked exactly before any
    kernel runs; device group_lists are sanitised on the device (Groups.counts /
    safe_offsets) so every row is computed and nothing outside x is read
  * layouts: x contiguous for group_type 0; weight contiguous or a transposed view; for group_type 2
    x a transposed view and weight contiguous; anything else is copied into that layout first.

torch_npu is imported lazily, on first use: `import gmm_plugin` never imports it.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import sys

import torch

from .. import checks
from ..group_list import Groups

MAX_GROUPS_PER_CALL = 1024   # groupListOptional "第1维最大支持1024" (single-tensor x/weight/y)
LAST_DIM_LIMIT = 65536       # "x和weight中每一组tensor的最后一维大小都应小于65536"
_BLOCK = 32768               # column block used when a last dim reaches LAST_DIM_LIMIT
_INT32_MAX = 2**31 - 1       # every dim, 32-byte aligned, must stay below it
_FUSED_DTYPES = (torch.float16, torch.bfloat16)  # npu_grouped_matmul_add_: x/weight fp16|bf16, self fp32
REQUIREMENT = ("torch_npu (Ascend Extension for PyTorch) built for torch {torch}, version 2.9 or newer, "
               "whose npu_grouped_matmul takes a tensor group_list with group_type and group_list_type, "
               "on CANN 8.0.RC3 or newer (aclnnGroupedMatmulV4)")
_TEST_DOUBLE_FLAG = "__gmm_plugin_test_double__"  # set only by tests/torch_npu_double.py
_checked: dict[int, bool] = {}  # id(torch_npu module) -> it has npu_grouped_matmul_add_


def _requirement() -> str:
    return REQUIREMENT.format(torch=torch.__version__.split("+")[0])


def _arg_names(op) -> set[str] | None:
    """Argument names of a torch op (OpOverloadPacket) or a Python function; None if unknown."""
    overloads = getattr(op, "overloads", None)
    if callable(overloads):
        return {a.name for name in overloads() for a in getattr(op, name)._schema.arguments}
    try:
        return set(inspect.signature(op).parameters)
    except (TypeError, ValueError):
        return None


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
    if id(module) not in _checked:
        version = getattr(module, "__version__", "?")
        gmm = getattr(module, "npu_grouped_matmul", None)
        if gmm is None:
            raise RuntimeError(f"torch_npu {version} has no npu_grouped_matmul; the npu backend needs "
                               f"{_requirement()}.")
        names = _arg_names(gmm)
        missing = sorted({"group_list", "split_item", "group_type", "group_list_type"} - names) if names else []
        if missing:
            raise RuntimeError(f"torch_npu {version} is too old: its npu_grouped_matmul has no "
                               f"{', '.join(missing)} argument; the npu backend needs {_requirement()}.")
        _checked[id(module)] = hasattr(module, "npu_grouped_matmul_add_")
    return module


def is_test_double(module=None) -> bool:
    module = sys.modules.get("torch_npu") if module is None else module
    return bool(getattr(module, _TEST_DOUBLE_FLAG, False))


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
    fusion = "fusion via npu_grouped_matmul_add_" if _checked[id(module)] else \
        "no npu_grouped_matmul_add_: gemm_fusion computes then adds"
    double = " [test double]" if is_test_double(module) else ""
    return f"ready: torch_npu {getattr(module, '__version__', '?')}{double}, {fusion}"


# ---- layouts and limits -------------------------------------------------------------------------

def _transposed(t: torch.Tensor) -> bool:
    """A .transpose(-1, -2) view of a contiguous tensor (aclnn's "转置" layout)."""
    return t.transpose(-1, -2).is_contiguous()


def _as_plain(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _as_plain_or_transposed(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() or _transposed(t) else t.contiguous()


def _as_transposed(t: torch.Tensor) -> torch.Tensor:
    return t if _transposed(t) else t.transpose(-1, -2).contiguous().transpose(-1, -2)


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


def _chunks(groups: Groups, gl: torch.Tensor, gl_cumsum: bool):
    """(g0, g1, start, end, group_list) per kernel call, at most MAX_GROUPS_PER_CALL groups each.

    One call (the usual case) passes gl untouched. More groups than one call takes need the
    group boundaries on the host: for a device group_list that is one host read, only then.
    """
    e = groups.num_groups
    if e <= MAX_GROUPS_PER_CALL:
        yield 0, e, 0, groups.total, gl
        return
    offsets = groups.host_offsets()
    if offsets is None:
        offsets = tuple(groups.safe_offsets(torch.int64).tolist())
    for g0 in range(0, e, MAX_GROUPS_PER_CALL):
        g1 = min(g0 + MAX_GROUPS_PER_CALL, e)
        start = offsets[g0 - 1] if g0 else 0
        end = offsets[g1 - 1]
        if gl_cumsum:
            part = torch.tensor([o - start for o in offsets[g0:g1]], dtype=torch.int64, device=gl.device)
        else:
            part = gl[g0:g1]
        yield g0, g1, start, end, part


class NpuBackend:
    name = "npu"

    def supports(self, device: torch.device) -> bool:
        # CPU tensors only stand in for NPU ones under the test double of torch_npu.
        return device.type == "npu" or (device.type == "cpu" and is_test_double())

    # group_list exactly as the caller gave it when it was checked on the host; a device one sanitised
    def _group_list(self, groups: Groups) -> tuple[torch.Tensor, int]:
        if groups.cumsum:
            return groups.safe_offsets(torch.int64), 0
        return groups.counts(), 1

    @staticmethod
    def _call(torch_npu, x, w, gl, group_type, gl_type):
        checks.check_devices(x, weight=w, group_list=gl)
        try:
            return torch_npu.npu_grouped_matmul([x], [w], group_list=gl, split_item=3, group_type=group_type,
                                                group_list_type=gl_type)[0]
        except RuntimeError as e:
            if "group_type" in str(e) and group_type == 2:
                raise RuntimeError(f"torch_npu {getattr(torch_npu, '__version__', '?')} rejected group_type=2 "
                                   f"(grouping along K, used for weight gradients); the npu backend needs "
                                   f"{_requirement()} and group_type 2 support. Kernel error: {e}") from e
            raise

    # ---- split M (group_type 0) --------------------------------------------------------------

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor:
        torch_npu = load_torch_npu()
        m, k, n = x.shape[0], x.shape[1], w.shape[-1]
        _check_sizes(x, w)
        if m == 0 or n == 0 or k == 0:
            return x.new_zeros(m, n)
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

    # ---- split K (group_type 2), optionally accumulating into out ----------------------------

    def accumulate_k(self, out, a, b, groups: Groups, *, wgrad_dtype: str) -> None:
        self.grouped_mm_k(a, b, groups, out=out)

    def grouped_mm_k(self, a: torch.Tensor, b: torch.Tensor, groups: Groups, out: torch.Tensor | None = None):
        torch_npu = load_torch_npu()
        e, p, tokens, n = groups.num_groups, a.shape[0], a.shape[1], b.shape[1]
        _check_sizes(a, b)
        if out is not None:
            checks.check_devices(a, weight=b, out=out)
        if tokens == 0 or p == 0 or n == 0:
            return a.new_zeros(e, p, n) if out is None else out
        if out is not None and self._fuse(torch_npu, a, b, groups, out):
            return out
        gl, gl_type = self._group_list(groups)
        p_blocks, n_blocks = _blocks(p), _blocks(n)
        if out is None and len(p_blocks) == 1 and len(n_blocks) == 1:
            return self._mm_k_groups(torch_npu, _as_transposed(a), _as_plain(b), groups, gl, gl_type)
        result = a.new_empty(e, p, n) if out is None else out
        for p0, p1 in p_blocks:
            for n0, n1 in n_blocks:
                part = self._mm_k_groups(torch_npu, _as_transposed(a[p0:p1]), _as_plain(b[:, n0:n1]),
                                         groups, gl, gl_type)
                if out is None:
                    result[:, p0:p1, n0:n1] = part
                else:  # no fused kernel for this case: one block-sized temporary at a time
                    result[:, p0:p1, n0:n1].add_(part.to(out.dtype))
        return result

    def _mm_k_groups(self, torch_npu, a, b, groups, gl, gl_type):
        if groups.num_groups == 1:  # length-1 group_list: a plain matmul
            return torch.mm(a, b).unsqueeze(0)
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

    def _fuse(self, torch_npu, a, b, groups, out) -> bool:
        """GMM+ADD straight into out (main_grad) when the kernel takes this case; False otherwise."""
        if not _checked.get(id(torch_npu)) or a.dtype not in _FUSED_DTYPES or b.dtype != a.dtype \
                or out.dtype != torch.float32 or a.shape[0] >= LAST_DIM_LIMIT or b.shape[1] >= LAST_DIM_LIMIT:
            return False
        if out.is_contiguous():     # out[e] += a[:, seg] @ b[seg]
            target, left, right = out, a.t(), b
        elif _transposed(out):      # weight was a transposed view: out^T[e] += b[seg]^T @ a^T[seg]
            target, left, right = out.transpose(-1, -2), b, a.t()
        else:
            return False
        offsets = groups.safe_offsets(torch.int64)
        checks.check_devices(left, weight=right, group_list=offsets, out=target)
        for g0, g1, s, t, part in _chunks(groups, offsets, True):
            if t > s:
                torch_npu.npu_grouped_matmul_add_(target[g0:g1], left[s:t], right[s:t], part, transpose_x=True,
                                                  transpose_weight=False, group_type=2, group_list_type=0)
        return True
