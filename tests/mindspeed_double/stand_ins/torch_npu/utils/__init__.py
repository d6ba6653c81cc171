from . import collect_env  # noqa: F401
