"""Backend registry and selection.

The backend is chosen per call from the device of x, unless one is forced by
`set_backend(name)` (the YAML config does this) or the environment variable GMM_PLUGIN_BACKEND.
Backends are imported lazily, so `import gmm_plugin` never imports torch_npu.
"""
from __future__ import annotations

import importlib
import os

import torch

from .base import Backend

ENV_VAR = "GMM_PLUGIN_BACKEND"
_MODULES = {
    "reference": ("gmm_plugin.backends.reference", "ReferenceBackend"),
    "torch": ("gmm_plugin.backends.torch_backend", "TorchBackend"),
    "npu": ("gmm_plugin.backends.npu", "NpuBackend"),
}
NAMES = ("auto",) + tuple(_MODULES)
_instances: dict[str, Backend] = {}
_forced: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in NAMES:
        raise ValueError(f"{source} must be one of {', '.join(NAMES)}, got {name!r}.")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every call ('auto' or None: choose by device)."""
    global _forced
    _forced = None if name in (None, "auto") else _check_name(name, "backend")


def get_backend(name: str) -> Backend:
    _check_name(name, "backend")
    if name not in _instances:
        module, cls = _MODULES[name]
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def select_backend(device: torch.device) -> Backend:
    name = _forced or os.environ.get(ENV_VAR) or "auto"
    _check_name(name, f"{ENV_VAR}" if not _forced and os.environ.get(ENV_VAR) else "backend")
    if name == "auto":
        name = "npu" if device.type == "npu" else "torch" if device.type in ("cpu", "cuda") else "reference"
    backend = get_backend(name)
    if not backend.supports(device):
        raise ValueError(f"backend {name!r} cannot run on device {device}; choose 'auto' or one that "
                         f"supports {device.type}.")
    return backend
