"""`mindspeed/args_utils.py:40-52` (26.0.0_core_r0.12.1): MindSpeed's arguments are parsed from
sys.argv AT IMPORT of mindspeed.megatron_adaptor, with parse_known_args; every unknown flag becomes
an attribute (`parser_unknown_args`, :22-37: a bare flag is True, `--k v` / `--k=v` a value), so
Megatron's own `--moe-grouped-gemm` reads as True. Cached for the process (:41-43, :50-51)."""
import argparse

_MINDSPEED_ARGS = None


def _unknown(args: dict, unknown: list) -> dict:
    key, value = None, None

    def flush():
        if key is not None:
            args[key[2:].replace("-", "_")] = True if value is None else (value[0] if len(value) == 1 else value)

    for item in unknown:
        if item.startswith("-"):
            flush()
            name, sep, val = item.partition("=")
            key, value = name, ([val] if sep else None)
        else:
            value = [item] if value is None else value + [item]
    flush()
    return args


def get_mindspeed_args():
    global _MINDSPEED_ARGS
    if _MINDSPEED_ARGS is None:
        from mindspeed.features import register_features_args
        parser = argparse.ArgumentParser(description="MindSpeed Arguments", allow_abbrev=False)
        register_features_args(parser)
        args, unknown = parser.parse_known_args()
        _MINDSPEED_ARGS = argparse.Namespace(**_unknown(vars(args), unknown))
    return _MINDSPEED_ARGS
