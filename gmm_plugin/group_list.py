"""group_list in one canonical form: every conversion of group_list lives here.

`Groups` keeps what the caller gave (cumsum or counts, list or tensor) so a backend whose
kernel takes that form (the NPU kernel takes both) passes it through untouched, and derives the
other forms on demand. Host data (a list, or a CPU tensor) is checked strictly on the host with
errors naming the rule; device data is checked with an asynchronous device assert (no host sync)
and its offsets are clamped so no kernel can address outside x whatever the assert says.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

from . import checks


@dataclass
class Groups:
    cumsum: bool                 # True: values are cumulative end offsets (npu_gmm); False: counts (v2)
    values: torch.Tensor         # int64, 1-D, on the compute device, exactly as the caller meant them
    total: int                   # size of the grouped axis
    host: tuple[int, ...] | None  # values on the host, when the caller gave host data
    given_as_list: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_groups(self) -> int:
        return self.values.shape[0]

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

    def counts(self) -> torch.Tensor:
        """Per-group sizes covering exactly `total`: int64 on the compute device, no host sync.

        Host values are exact already (counts are returned as given). Device values are
        sanitised on the device: counts are clamped to [0, total], rows they leave uncovered go
        to the last group, and if they overrun `total` every row goes to the last group; cumsums
        are the differences of safe_offsets(). Whatever the (asynchronous) group_list assert
        says, a kernel fed these neither reads past x nor leaves output rows uninitialised.
        """
        if "counts" not in self._cache:
            if self.host is not None:
                c = self.values if not self.cumsum else torch.tensor(
                    self.host_counts(), dtype=torch.int64, device=self.values.device)
            elif self.cumsum:
                c = torch.diff(self.safe_offsets(torch.int64), prepend=self.values.new_zeros(1))
            else:
                c = self.values.clamp(0, self.total)  # clamped first: the sum cannot wrap int64
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
                offs = self.values if self.cumsum and dtype == torch.int64 else torch.tensor(
                    self.host_offsets(), dtype=dtype, device=self.values.device)
            elif self.cumsum:
                ends = torch.cummax(self.values.clamp(0, self.total), 0).values
                offs = torch.cat([ends[:-1], ends.new_full((1,), self.total)]).to(dtype)
            else:
                offs = torch.cumsum(self.counts(), 0).to(dtype)
            self._cache[key] = offs
        return self._cache[key]

    def row_group_ids(self) -> torch.Tensor:
        """Group index of each of the `total` rows (int64, on the device, no host sync)."""
        if "ids" not in self._cache:
            ids = torch.arange(self.num_groups, device=self.values.device)
            self._cache["ids"] = torch.repeat_interleave(ids, self.counts(), output_size=self.total)
        return self._cache["ids"]


def make_groups(group_list, *, cumsum: bool, total: int, device: torch.device, axis: str,
                check_device: bool = True) -> Groups:
    """Validate group_list (type already checked) and build its canonical form."""
    if isinstance(group_list, torch.Tensor) and group_list.device.type != "cpu":
        values = group_list.to(device, non_blocking=True)
        if check_device:
            checks.assert_group_list_async(values, cumsum=cumsum, total=total)
        return Groups(cumsum, values, total, host=None)
    host = tuple(group_list.tolist() if isinstance(group_list, torch.Tensor) else group_list)
    checks.check_group_list_values(list(host), cumsum=cumsum, total=total, axis=axis)
    values = torch.tensor(host, dtype=torch.int64, device=device)
    return Groups(cumsum, values, total, host=host, given_as_list=not isinstance(group_list, torch.Tensor))
