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
        """Per-group sizes as an int64 tensor on the compute device (no host sync).

        For device data these are the sizes of the clamped groups (from safe_offsets), never the
        raw values: a consumer that slices by them cannot overrun x whatever the caller sent.
        """
        if "counts" not in self._cache:
            if not self.cumsum and self.host is not None:
                c = self.values
            elif self.host is not None:
                c = torch.tensor(self.host_counts(), dtype=torch.int64, device=self.values.device)
            else:
                c = torch.diff(self.safe_offsets().to(torch.int64), prepend=self.values.new_zeros(1))
            self._cache["counts"] = c
        return self._cache["counts"]

    def safe_offsets(self, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """End offsets for offset-based kernels (torch._grouped_mm wants int32), on the device.

        Computed from host values when there are any; for device values they are forced
        non-decreasing and inside [0, total], so a bad group_list can fail its assert but never
        make a kernel read or write out of bounds.
        """
        key = ("offsets", dtype)
        if key not in self._cache:
            if self.host is not None:
                offs = torch.tensor(self.host_offsets(), dtype=dtype, device=self.values.device)
            else:
                if self.cumsum:
                    ends = torch.cummax(self.values.clamp(0, self.total), 0).values
                    # The last group ends at `total` so no row is left uninitialised.
                    ends = torch.cat([ends[:-1], ends.new_full((1,), self.total)])
                else:  # the groups of safe_counts, so every backend sees the same ones
                    ends = torch.cumsum(self.safe_counts(), 0)
                offs = ends.to(dtype)
            self._cache[key] = offs
        return self._cache[key]

    def safe_counts(self) -> torch.Tensor:
        """Per-group sizes covering exactly `total`, for count-based kernels (no host sync, no cumsum).

        Host values are already exact and are returned as they are. Device values are clamped
        to [0, total]; rows they leave uncovered go to the last group, and if they overrun
        `total` every row goes to the last group: the kernel neither reads past x nor leaves
        output rows uninitialised, whatever the (asynchronous) group_list assert says.
        """
        if self.cumsum:
            return torch.diff(self.safe_offsets(torch.int64), prepend=self.values.new_zeros(1))
        if self.host is not None:
            return self.values
        if "safe_counts" not in self._cache:
            # Clamped to [0, total] first: their sum cannot wrap around int64.
            c = self.values.clamp(0, self.total)
            deficit = self.total - c.sum()
            last = torch.zeros_like(c)
            last[-1] = 1
            self._cache["safe_counts"] = torch.where(deficit >= 0, c + last * deficit, last * self.total)
        return self._cache["safe_counts"]

    def row_group_ids(self) -> torch.Tensor:
        """Group index of each of the `total` rows (int64, on the device, no host sync)."""
        if "ids" not in self._cache:
            ids = torch.arange(self.num_groups, device=self.values.device)
            counts = self.host_counts()
            if counts is not None:
                ids = torch.repeat_interleave(ids, torch.tensor(counts, device=ids.device), output_size=self.total)
            else:
                safe = torch.diff(self.safe_offsets(torch.int64), prepend=self.values.new_zeros(1))
                ids = torch.repeat_interleave(ids, safe, output_size=self.total)
            self._cache["ids"] = ids
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
