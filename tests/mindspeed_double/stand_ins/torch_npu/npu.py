"""torch_npu.npu: device-module names MindSpeed binds at import (see the package docstring)."""
import contextlib

import torch


def _lazy_call(callable_, **kwargs):
    callable_()


class device(contextlib.ContextDecorator):
    def __init__(self, idx):
        self.idx = idx

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


def is_available():
    return False


def device_count():
    return 0


def current_device():
    return 0


def stream(s=None):
    return contextlib.nullcontext()


def current_stream(device=None):
    return Stream()


def get_device_name(device=None):
    return "Ascend910B2 (stand-in)"


def synchronize(device=None):
    pass


def manual_seed(seed):
    torch.manual_seed(seed)


def manual_seed_all(seed):
    torch.manual_seed(seed)


def empty_cache():
    pass
