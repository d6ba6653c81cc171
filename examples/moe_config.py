"""Configuration of the MoE pretraining example: every key with its default, presets and flags.

Precedence, lowest first: DEFAULTS < the preset (--config) < --set SECTION.KEY=VALUE < the
shortcut flags (--steps, --seed, ...). The preset's YAML is read, and unknown keys are reported
with a did-you-mean, by gmm_plugin.config's own machinery; its `gmm_plugin:` section belongs to
the plugin (gmm_plugin.load_config checks it). Every bad value is a ConfigError naming the file or
flag and the key.
"""
from __future__ import annotations

import argparse
import copy
import os

from gmm_plugin.config import SECTION as PLUGIN_SECTION  # the plugin's own keys; gmm_plugin.load_config reads them
from gmm_plugin.config import ConfigError, check_known_keys, read_yaml

import moe_checkpoint
import moe_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "pretrain_tiny_cpu.yaml")

# Every key a preset may set, with its default. A preset names only what it changes.
DEFAULTS = {
    "model": {
        "num_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_experts": 8,
        "moe_router_topk": 2,
        "moe_ffn_hidden_size": 256,
        "moe_grouped_gemm": True,      # the grouped-GEMM experts (the plugin's path)
        "moe_token_dispatcher_type": "alltoall",
        "moe_aux_loss_coeff": 0.01,
        "swiglu": True,
        "seq_length": 128,
        "init_method_std": 0.02,
        "dtype": "fp32",               # fp32 | bf16 | fp16
    },
    "train": {
        "steps": 200,
        "micro_batch_size": 8,
        "global_batch_size": 16,
        "lr": 3.0e-3,
        "min_lr": 3.0e-4,
        "warmup_steps": 10,
        "lr_decay_style": "cosine",    # constant | linear | cosine | inverse-square-root
        "weight_decay": 0.01,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "clip_grad": 1.0,
        "seed": 1234,
        "expert_parallel_size": 1,
        "cpu_threads": 0,              # torch threads per process on a CPU; 0: PyTorch's default
    },
    "data": {
        "path": "stdlib",              # stdlib | a .txt / .jsonl file | an indexed-dataset prefix
        "max_bytes": 4_000_000,
        "json_key": "text",
        "cache_dir": None,             # default: <output.dir>/data
    },
    "output": {
        "dir": "runs/pretrain_moe",
        "log_interval": 10,
        "save_interval": 50,           # 0: no checkpoints
        "keep_checkpoints": 2,
        "plot": True,
    },
}
CHOICES = {
    ("model", "dtype"): ("fp32", "bf16", "fp16"),
    ("model", "moe_token_dispatcher_type"): ("alltoall", "allgather"),
    ("train", "lr_decay_style"): ("constant", "linear", "cosine", "inverse-square-root"),
}
POSITIVE = {("model", k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_experts",
                                   "moe_router_topk", "moe_ffn_hidden_size", "seq_length")} | \
           {("train", k) for k in ("steps", "micro_batch_size", "global_batch_size", "expert_parallel_size")} | \
           {("data", "max_bytes"), ("output", "log_interval"), ("output", "keep_checkpoints")}
# Sections that must match between a checkpoint and the run resuming from it.
RESUME_MUST_MATCH = ("model", "train", "data")
# Shortcut flag (argparse dest) -> the key it sets.
SHORTCUTS = (("steps", "train.steps"), ("seed", "train.seed"),
             ("expert_parallel_size", "train.expert_parallel_size"), ("data_path", "data.path"),
             ("out_dir", "output.dir"), ("save_interval", "output.save_interval"),
             ("log_interval", "output.log_interval"))

__all__ = ["ConfigError", "DEFAULTS", "build_parser", "resolve_config", "check_resume"]


def build_parser() -> argparse.ArgumentParser:
    import patches

    p = argparse.ArgumentParser(prog="pretrain_moe.py",
                                description="Pretrain a small MoE GPT with Megatron-core (gmm-plugin example).")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML preset (default: configs/pretrain_tiny_cpu.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one preset key (value in YAML syntax); repeatable")
    p.add_argument("--steps", type=int, help="train.steps")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--expert-parallel-size", type=int, help="train.expert_parallel_size")
    p.add_argument("--data-path", help="data.path: a .txt or .jsonl file, an indexed-dataset prefix, or 'stdlib'")
    p.add_argument("--out-dir", help="output.dir")
    p.add_argument("--save-interval", type=int, help="output.save_interval (0: no checkpoints)")
    p.add_argument("--log-interval", type=int, help="output.log_interval")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in the output dir (fresh start if none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto")
    p.add_argument("--quiet", action="store_true", help="only the final summary")
    patches.add_arguments(p)  # --use-gmm-plugin, --gmm-plugin-config, --gemm-gradient-accumulation-fusion
    return p


def resolve_config(args, world_size: int) -> tuple[dict, dict]:
    """(resolved config, the preset file's raw contents)."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    preset = read_yaml(args.config)
    if preset is None:
        preset = {}
    if not isinstance(preset, dict):
        raise ConfigError(f"{args.config}: expected a mapping of sections ({', '.join(DEFAULTS)}), "
                          f"got {type(preset).__name__}")
    merge_preset(cfg, preset, args.config)
    for item in args.sets:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_dotted(cfg, key.strip(), value, f"--set {item}")
    for flag, dotted in SHORTCUTS:
        value = getattr(args, flag)
        if value is not None:
            set_dotted(cfg, dotted, value, "--" + flag.replace("_", "-"))
    if args.no_plot:
        cfg["output"]["plot"] = False
    validate(cfg, world_size, args.config)
    return cfg, preset


def merge_preset(cfg: dict, data: dict, where: str) -> None:
    check_known_keys(data, [*DEFAULTS, PLUGIN_SECTION], where)
    for section, values in data.items():
        if section == PLUGIN_SECTION or values is None:
            continue  # the plugin's own keys are validated by gmm_plugin.load_config
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping, got {type(values).__name__}")
        check_known_keys(values, DEFAULTS[section], where, prefix=section + ".")
        for key, value in values.items():
            cfg[section][key] = check_value(section, key, value, where)


def set_dotted(cfg: dict, dotted: str, value, where: str) -> None:
    section, _, key = dotted.partition(".")
    check_known_keys({section: None}, DEFAULTS, where)
    check_known_keys({key: None}, DEFAULTS[section], where, prefix=section + ".")
    cfg[section][key] = check_value(section, key, value, where)


def check_value(section: str, key: str, value, where: str):
    """The value, type-checked against the key's default (an int is accepted for a float)."""
    default = DEFAULTS[section][key]
    name = f"{section}.{key}"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str, or None meaning "optional string"
        ok = isinstance(value, str) or (default is None and value is None)
    if not ok:
        want = "a string" if default is None or isinstance(default, str) else type(default).__name__
        raise ConfigError(f"{where}: '{name}' must be {want}, got {value!r} ({type(value).__name__})")
    if (section, key) in CHOICES and value not in CHOICES[(section, key)]:
        raise ConfigError(f"{where}: '{name}' must be one of {', '.join(CHOICES[(section, key)])}, got {value!r}")
    if (section, key) in POSITIVE and value <= 0:
        raise ConfigError(f"{where}: '{name}' must be positive, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"{where}: '{name}' must not be negative, got {value!r}")
    return value


def validate(cfg: dict, world_size: int, where: str) -> None:
    """The checks between keys (divisibility, ranges)."""
    m, t = cfg["model"], cfg["train"]
    ep = t["expert_parallel_size"]

    def bad(msg):
        raise ConfigError(f"{where}: {msg}")

    if m["hidden_size"] % m["num_attention_heads"]:
        bad(f"'model.hidden_size' ({m['hidden_size']}) must be divisible by 'model.num_attention_heads' "
            f"({m['num_attention_heads']})")
    if m["moe_router_topk"] > m["num_experts"]:
        bad(f"'model.moe_router_topk' ({m['moe_router_topk']}) exceeds 'model.num_experts' ({m['num_experts']})")
    if m["num_experts"] % ep:
        bad(f"'model.num_experts' ({m['num_experts']}) must be divisible by 'train.expert_parallel_size' ({ep})")
    if world_size % ep:
        bad(f"'train.expert_parallel_size' ({ep}) must divide the number of processes ({world_size})")
    dp = world_size  # tensor and pipeline parallel sizes are 1 in this example
    if t["global_batch_size"] % (t["micro_batch_size"] * dp):
        bad(f"'train.global_batch_size' ({t['global_batch_size']}) must be a multiple of "
            f"'train.micro_batch_size' x data-parallel size ({t['micro_batch_size']} x {dp}); "
            "lower the micro batch size or raise the global one")
    if t["min_lr"] > t["lr"]:
        bad(f"'train.min_lr' ({t['min_lr']}) exceeds 'train.lr' ({t['lr']})")
    if t["warmup_steps"] >= t["steps"]:
        bad(f"'train.warmup_steps' ({t['warmup_steps']}) must be smaller than 'train.steps' ({t['steps']})")


def check_data_path(path: str) -> str:
    """data.path as the data pipeline takes it: 'stdlib', or an absolute path that exists."""
    if path == "stdlib":
        return path
    full = os.path.abspath(path)
    if not (os.path.isfile(full) or moe_data.is_indexed_prefix(full)):
        what = "is a directory" if os.path.isdir(full) else "does not exist"
        raise ConfigError(f"data path {path!r} {what}; pass a .txt or .jsonl file, a Megatron indexed-dataset "
                          "prefix (PREFIX.bin + PREFIX.idx), or 'stdlib'")
    return full


def check_resume(cfg: dict, ckpt_dir: str, world: int) -> int | None:
    """The step to resume from (None: no checkpoint yet). A checkpoint of a different run
    (model, data, training settings or number of processes) is an error listing the differences."""
    step = moe_checkpoint.latest_step(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if step is None:
        return None
    meta = moe_checkpoint.load_meta(ckpt_dir, step)
    saved = meta["config"]
    diffs = [f"{s}.{k}: checkpoint {saved[s].get(k)!r}, now {cfg[s][k]!r}"
             for s in RESUME_MUST_MATCH for k in cfg[s] if k != "cache_dir" and saved[s].get(k) != cfg[s][k]]
    if meta["world_size"] != world:
        diffs.append(f"processes: checkpoint {meta['world_size']}, now {world}")
    if diffs:
        raise ConfigError(f"--resume: {os.path.join(ckpt_dir, moe_checkpoint.step_dir_name(step))} belongs to a "
                          "different run (use another --out-dir, or drop --resume to start over):\n  "
                          + "\n  ".join(diffs))
    return step
