"""triton.language: names used in kernel signatures and bodies; only resolved at def time."""


class constexpr:  # noqa: N801 (triton's name)
    def __init__(self, value=None):
        self.value = value


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return constexpr
