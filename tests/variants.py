"""How the op suite runs through one backend: the backend's name, and what must stand in for it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Variant:
    id: str                 # the pytest id, e.g. "torch", "npu-7.3.0", "aclnn-v4only"
    backend: str            # the settings' backend name
    enter: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # the test double
    skip: dict = field(default_factory=dict)  # test name -> why this variant does not run it (deselected)
