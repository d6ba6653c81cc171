"""Backend registry and selection.

The backend of a call is the settings' `backend` (gmm_plugin.settings): `auto` chooses by the
device of x, any other name is used for every device it supports. Backends are imported lazily,
so `import gmm_plugin` never imports torch_npu or builds the aclnn binding.
"""
from __future__ import annotations

import importlib

import torch

from .base import Backend

_MODULES = {
    "reference": ("gmm_plugin.backends.reference", "ReferenceBackend"),
    "torch": ("gmm_plugin.backends.torch_backend", "TorchBackend"),
    "npu": ("gmm_plugin.backends.npu", "NpuBackend"),
    "aclnn": ("gmm_plugin.backends.aclnn", "AclnnBackend"),
}
NAMES = ("auto",) + tuple(_MODULES)
_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(_MODULES)}, got {name!r}.")
    if name not in _instances:
        module, cls = _MODULES[name]
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def auto_backend_name(device: torch.device) -> str:
    return "npu" if device.type == "npu" else "torch" if device.type in ("cpu", "cuda") else "reference"


def select_backend(device: torch.device, name: str = "auto") -> Backend:
    """The backend `name` (from the settings) for tensors on `device`."""
    if name == "auto":
        name = auto_backend_name(device)
    backend = get_backend(name)
    if not backend.supports(device):
        raise ValueError(f"backend {name!r} cannot run on device {device}; choose 'auto' or one that "
                         f"supports {device.type}.")
    return backend
