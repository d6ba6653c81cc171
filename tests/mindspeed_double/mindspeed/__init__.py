"""MindSpeed test double (see ../README.md). Which branch it models follows the installed
megatron-core (MINDSPEED_DOUBLE_BRANCH overrides): 26.0.0_core_r0.12.1 below 0.17, core_r0.18.0
from 0.17 on (or core_r0.17.0)."""
import os


def branch() -> str:
    forced = os.environ.get("MINDSPEED_DOUBLE_BRANCH")
    if forced:
        return forced
    import megatron.core
    major, minor = (int(x) for x in megatron.core.__version__.split(".")[:2])
    return "26.0.0_core_r0.12.1" if (major, minor) < (0, 17) else "core_r0.18.0"
