"""torch_npu's storage formats on the double's CPU stand-ins.

On torch_npu a format belongs to the storage (NPUStorageImpl's npu_desc_: npu_format_, storage_sizes_), so
every view of a tensor has its format: `get_npu_format(Tensor self) -> int` reads it (Ascend/pytorch
torch_npu/csrc/aten/common/FormatCastKernelNpu.cpp, the same schema in npu_native_functions.yaml at every
release tag from v6.0.rc3-pytorch2.1.0 to v26.0.0-pytorch2.9.0), and `npu_format_cast(self, acl_format)`
returns a tensor with the same values in a storage of that format (a new one unless it has it already).

Here a format is recorded per storage (by its address; the double keeps the storage alive) and the values
stay in their ND order, as torch ops on torch_npu present them: what the double models is the metadata that
op-plugin hands CANN (format and storage dims), not the physical NZ layout. `storage_sizes` is torch_npu's
shape of that layout (FormatHelper.cpp InferShapeNDToNZ: [..., ceil(n/16), ceil(k/16), 16, 16], at v7.3.0),
recorded for the kernels' view checks.
"""
from __future__ import annotations

import torch

ND, FRACTAL_NZ = 2, 29
# storage address -> (aclFormat, storage_sizes, the tensor owning the storage: kept alive)
_formats: dict[int, tuple[int, tuple[int, ...], torch.Tensor]] = {}


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def get_npu_format(t: torch.Tensor) -> int:
    return _formats.get(_key(t), (ND,))[0]


def storage_sizes(t: torch.Tensor) -> tuple[int, ...]:
    """torch_npu's npu_desc_.storage_sizes_ (C++ only: at_npu::native::get_npu_storage_sizes; Python has only
    their product, torch_npu.get_storage_size)."""
    entry = _formats.get(_key(t))
    return entry[1] if entry else (t.untyped_storage().nbytes() // t.element_size(),)


def is_whole(t: torch.Tensor) -> bool:
    """Whether t is its whole storage from its start (possibly transposed): the only view of a private-format
    storage whose description op-plugin's ConvertType (view shape/strides/offset + storage desc) defines."""
    return t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()


def npu_format_cast(t: torch.Tensor, acl_format: int) -> torch.Tensor:
    if get_npu_format(t) == acl_format:
        return t
    out = t.contiguous().clone()  # a new storage, its values in ND order
    if acl_format == ND:
        return out
    if acl_format == FRACTAL_NZ and t.dim() >= 2:
        *batch, k, n = t.shape
        c0 = 32 // min(t.element_size(), 2)  # InferShapeNDToNZ: float32 is laid out as 16-bit
        sizes = (*batch, -(-n // c0), -(-k // 16), 16, c0)
    else:
        sizes = tuple(t.shape)
    _formats[_key(out)] = (acl_format, sizes, out)
    return out


def clear() -> None:
    _formats.clear()
