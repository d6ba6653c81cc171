"""Count device-to-host reads on a machine that has only a CPU.

Every tensor stands for accelerator memory except the ones the test declares host data (the
dispatcher's tokens_per_expert, say) and what the host makes from host data alone (no device
named: `torch.tensor(list)`, `counts.long()`). A tensor made with a device named (`device=...`,
`.to(device)`) is device data, even when that device is this CPU.
A read of anything else on the host — .item(), .tolist(), .cpu(), .numpy(), bool()/int()/float(),
.to("cpu") — is what would block on a real accelerator, and is counted; so are calls of
`fallback_ops` with device data (ops the accelerator has no kernel for, which its runtime runs
on the CPU after a blocking copy: torch._assert_async under torch_npu).

    with count_host_reads(host=[counts]) as reads:
        out, _ = experts(x, counts, probs)
        out.sum().backward()
    assert reads.total == 0, reads.report()

`.to(cpu)` of device data counts as a read: on this machine it cannot be told from a copy to the
stand-in device, so the counter errs on the side of failing. Seen through a TorchFunctionMode:
Python-level calls only. What C++ does inside one op
(torch._grouped_mm's own fallback loop, say) is invisible here; on CUDA that is checked with
torch.cuda.set_sync_debug_mode("error") instead (tests that need a GPU).
"""
from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu",
         torch.Tensor.numpy: "numpy", torch.Tensor.__bool__: "bool", torch.Tensor.__int__: "int",
         torch.Tensor.__float__: "float", torch.Tensor.__index__: "index"}


def _is_cpu(device) -> bool:
    return device is not None and str(device).split(":")[0] == "cpu"


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


class HostReads(TorchFunctionMode):
    def __init__(self, host=(), fallback_ops=()):
        super().__init__()
        # Host data, and what the host computed from it alone; by identity (tensors compare
        # elementwise), kept alive so an id is never reused for another tensor.
        self._host_refs = list(host)
        self._host = {id(t) for t in self._host_refs}
        self.fallback_ops = tuple(fallback_ops)
        self.calls: collections.Counter = collections.Counter()
        self.where: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def report(self) -> str:
        return f"{self.total} device-to-host reads {dict(self.calls)}:\n" + "\n".join(self.where[:5])

    def _count(self, what: str) -> None:
        self.calls[what] += 1
        self.where.append(f"{what} at:\n" + "".join(traceback.format_stack(limit=8)[:-2]))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(_tensors(args, kwargs))
        device_data = [t for t in tensors if id(t) not in self._host]
        if func in READS and device_data:
            self._count(READS[func])
        elif func in self.fallback_ops and device_data:
            self._count(f"{getattr(func, '__name__', func)} (CPU fallback)")
        elif func is torch.Tensor.to and device_data and (
                any(_is_cpu(a) for a in args[1:] if isinstance(a, (str, torch.device)))
                or _is_cpu(kwargs.get("device"))):
            self._count("to(cpu)")
        out = func(*args, **kwargs)
        # Host in (or no tensor in), no device named: computed on the host, host data. A named
        # device, even "cpu" on this machine, stands for the accelerator: a copy to the device.
        named = "device" in kwargs or (func is torch.Tensor.to and any(
            isinstance(a, (str, torch.device)) for a in args[1:]))
        if not device_data and not named and isinstance(out, torch.Tensor):
            self._host_refs.append(out)
            self._host.add(id(out))
        return out


@contextlib.contextmanager
def count_host_reads(host=(), fallback_ops=()):
    mode = HostReads(host, fallback_ops)
    with mode:
        yield mode
