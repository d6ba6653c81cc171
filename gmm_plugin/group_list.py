"""group_list in one canonical form: every conversion of group_list lives here.

`Groups` keeps what the caller gave (cumsum or counts) so a backend whose kernel takes that form
(the NPU kernels take both) passes it through untouched, and derives the other forms on demand.

Host data (a list, or a CPU tensor, which is what Megatron's dispatchers hand over) is checked
strictly on the host with errors naming the rule, and its values stay on the host beside the
device copy: a backend that needs group sizes on the host (a loop of GEMMs) never reads them
back from an accelerator. Data that lives only on an accelerator is checked there with an
asynchronous assert where the device has one (no host sync), and its offsets are clamped so no
kernel can address outside x whatever the assert says.
"""
from __future__ import annotations

from itertools import accumulate

import torch

from . import checks

# Devices with a native asynchronous assert kernel. torch_npu registers none: torch._assert_async
# on an NPU tensor runs through the CPU fallback, a blocking device-to-host copy.
_ASYNC_ASSERT_DEVICES = ("cpu", "cuda")


class Groups:
    """The groups of one call: sizes along the grouped axis (M for group_type 0, K' for 2)."""

    def __init__(self, cumsum: bool, values: torch.Tensor | None, total: int, host=None,
                 given_as_list: bool = False, *, device: torch.device | None = None):
        self.cumsum = cumsum        # True: cumulative end offsets (npu_gmm); False: counts (v2)
        self._values = values       # the caller's values on the compute device (None: made on demand)
        self.total = total          # size of the grouped axis
        self.host = host            # the caller's values as a tuple of int, or None (device-only data)
        self.given_as_list = given_as_list
        self.device = values.device if device is None else device  # the compute device
        self._cache: dict = {}

    @property
    def num_groups(self) -> int:
        return len(self.host) if self.host is not None else self._values.shape[0]

    @property
    def values(self) -> torch.Tensor:
        """The caller's values (int64, 1-D, its form) on the compute device; for host data a copy
        made on first use (host to device: never a sync)."""
        if self._values is None:
            self._values = torch.tensor(self.host, dtype=torch.int64).to(self.device, non_blocking=True)
        return self._values

    def host_counts(self) -> tuple[int, ...] | None:
        """Per-group sizes as Python ints, or None when group_list lives on an accelerator."""
        if self.host is None:
            return None
        if not self.cumsum:
            return self.host
        return tuple(b - a for a, b in zip((0,) + self.host[:-1], self.host))

    def host_offsets(self) -> tuple[int, ...] | None:
        """Cumulative end offsets as Python ints (no leading 0), or None for device data."""
        if self.host is None:
            return None
        return self.host if self.cumsum else tuple(accumulate(self.host))

    def segments(self) -> list[tuple[int, int, int]]:
        """(group, start, end) of every group, on the host, for backends that loop over groups.

        Host data costs nothing. A group_list that lives only on an accelerator is read back here,
        once per call (its sanitised offsets): the one place any backend can cause a host sync,
        and only for a caller who handed device data to a loop-based kernel.
        """
        if "segments" not in self._cache:
            ends = self.host_offsets()
            if ends is None:
                ends = tuple(self.safe_offsets(torch.int64).tolist())
            self._cache["segments"] = [(e, s, t) for e, (s, t) in enumerate(zip((0,) + ends[:-1], ends))]
        return self._cache["segments"]

    def counts(self) -> torch.Tensor:
        """Per-group sizes covering exactly `total`: int64 on the compute device, no host sync.

        Host values are exact already. Device values are sanitised on the device: counts are
        clamped to [0, total], rows they leave uncovered go to the last group, and if they overrun
        `total` every row goes to the last group; cumsums are the differences of safe_offsets().
        Whatever the (asynchronous) group_list assert says, a kernel fed these neither reads past x
        nor leaves output rows uninitialised.
        """
        if "counts" not in self._cache:
            if self.host is not None:
                c = self.values if not self.cumsum else self._on_device(self.host_counts(), torch.int64)
            elif self.cumsum:
                c = torch.diff(self.safe_offsets(torch.int64), prepend=self._values.new_zeros(1))
            else:
                c = self._values.clamp(0, self.total)  # clamped first: the sum cannot wrap int64
                deficit = self.total - c.sum()
                last = torch.zeros_like(c)
                last[-1] = 1
                c = torch.where(deficit >= 0, c + last * deficit, last * self.total)
            self._cache["counts"] = c
        return self._cache["counts"]

    def safe_offsets(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Cumulative end offsets (no leading 0) for offset-based kernels, on the device.

        torch._grouped_mm wants int32. Device cumsums are forced non-decreasing, inside
        [0, total] and ending at total; device counts give the cumsum of counts().
        """
        key = ("offsets", dtype)
        if key not in self._cache:
            if self.host is not None:
                offs = self.values if self.cumsum and dtype == torch.int64 else \
                    self._on_device(self.host_offsets(), dtype)
            elif self.cumsum:
                ends = torch.cummax(self._values.clamp(0, self.total), 0).values
                offs = torch.cat([ends[:-1], ends.new_full((1,), self.total)]).to(dtype)
            else:
                offs = torch.cumsum(self.counts(), 0).to(dtype)
            self._cache[key] = offs
        return self._cache[key]

    def row_group_ids(self) -> torch.Tensor:
        """Group index of each of the `total` rows (int64, on the device, no host sync)."""
        if "ids" not in self._cache:
            ids = torch.arange(self.num_groups, device=self.device)
            self._cache["ids"] = torch.repeat_interleave(ids, self.counts(), output_size=self.total)
        return self._cache["ids"]

    def _on_device(self, host_values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(host_values, dtype=dtype).to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        form = "cumsum" if self.cumsum else "counts"
        shown = self.host if self.host is not None else f"<on {self._values.device}>"
        return f"Groups({form}={shown}, total={self.total})"


def make_groups(group_list, *, cumsum: bool, total: int, device: torch.device, axis: str,
                check_device: bool = True) -> Groups:
    """Validate group_list (type and device already checked) and build its canonical form.

    A list or a CPU tensor is host data, whatever the compute device; a tensor on an accelerator
    is device data, checked there with an asynchronous assert when check_device is set and the
    device has one.
    """
    if isinstance(group_list, torch.Tensor) and group_list.device.type != "cpu":
        if check_device and group_list.device.type in _ASYNC_ASSERT_DEVICES:
            checks.assert_group_list_async(group_list, cumsum=cumsum, total=total)
        return Groups(cumsum, group_list, total)
    as_list = not isinstance(group_list, torch.Tensor)
    host = tuple(group_list if as_list else group_list.tolist())
    checks.check_group_list_values(host, cumsum=cumsum, total=total, axis=axis)
    return Groups(cumsum, None, total, host, as_list, device=device)
