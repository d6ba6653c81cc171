"""A stand-in triton for the core_r0.18.0 run only: Megatron 0.18 imports triton at module level
(`megatron/core/transformer/moe/paged_stash.py:8`) and MindSpeed core_r0.18.0 decorates kernels at
import (`mindspeed/ops/triton/cumsum.py:17`, `@triton.autotune(key=[...'BT'])`, which the real
triton 3.9 rejects: "key contains names that are not kernel arguments"). Decorators return the
function unchanged; no kernel can run (there is no GPU/NPU here). Reports 3.2.0, the triton that
MindSpeed's NPU builds pin."""
from . import language  # noqa: F401

__version__ = "3.2.0"


class Config:
    def __init__(self, *args, **kwargs):
        self.kwargs, self.args = kwargs, args


def _decorator_factory(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


jit = autotune = heuristics = _decorator_factory


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
