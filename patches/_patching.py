"""Reversible attribute patching: one record per replaced attribute, restored in reverse order.

A record is put back only where the attribute still holds the object this set installed (the
identity check MindSpeed's own `Patch.remove_patch` makes, mindspeed/patch_utils.py:103-105):
when someone patched over ours afterwards (MindSpeed imported after gmm-plugin), theirs stays, and
ours, buried in their chain, must be inert by then (the patch layer's wrappers check that the
plugin is still applied)."""
from __future__ import annotations

import sys

_MISSING = object()


class PatchSet:
    """Replaces attributes and remembers exactly what was there (or that nothing was)."""

    def __init__(self) -> None:
        self._records: list[tuple[object, str, object, object]] = []

    def __bool__(self) -> bool:
        return bool(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def set(self, owner, name: str, value) -> None:
        # Only the owner's own attribute is saved: an inherited one is restored by deleting ours.
        own = vars(owner).get(name, _MISSING) if hasattr(owner, "__dict__") else getattr(owner, name, _MISSING)
        self._records.append((owner, name, own, value))
        setattr(owner, name, value)

    def holds(self, owner, name: str) -> bool:
        """True while owner.name is still the value this set installed last there."""
        for o, n, _, value in reversed(self._records):
            if o is owner and n == name:
                return _current(owner, name) is value
        return False

    def replace_everywhere(self, original, value, prefixes: tuple[str, ...]) -> int:
        """Rebind every module-level alias of `original` (`from x import f`) in modules under prefixes."""
        count = 0
        for mod_name, module in list(sys.modules.items()):
            if module is None or not mod_name.startswith(prefixes):
                continue
            for name, attr in list(vars(module).items()):
                if attr is original:
                    self.set(module, name, value)
                    count += 1
        return count

    def restore(self) -> list[str]:
        """Put every original back where ours is still installed; returns the attributes left as
        someone else set them over ours ("owner.name"), most recent first."""
        kept = []
        while self._records:
            owner, name, original, value = self._records.pop()
            if _current(owner, name) is not value:
                kept.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{name}")
                continue
            if original is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, original)
        return kept


def _current(owner, name):
    if hasattr(owner, "__dict__"):
        return vars(owner).get(name, _MISSING)
    return getattr(owner, name, _MISSING)


def define_missing_te_general_gemm(patches: PatchSet) -> bool:
    """megatron-core 0.16.x without Transformer Engine reads `te_general_gemm` in the router's
    gating linear but never defines it (NameError); None is what its own check expects. Both the
    plugin's patches and the CPU shim need it, so it lives here. True when it was missing."""
    from megatron.core.transformer.moe import moe_utils
    if "te_general_gemm" in vars(moe_utils):
        return False
    patches.set(moe_utils, "te_general_gemm", None)
    return True
