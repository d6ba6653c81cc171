#!/usr/bin/env python
"""Pretrain a small MoE GPT with Megatron-core on real text; gmm-plugin experts on a flag.

    python examples/pretrain_moe.py --config configs/pretrain_tiny_cpu.yaml --use-gmm-plugin
    python examples/pretrain_moe.py --config configs/pretrain_tiny_cpu.yaml      # Megatron's experts
    torchrun --nproc-per-node 2 examples/pretrain_moe.py --config configs/pretrain_tiny_cpu.yaml \
        --use-gmm-plugin --expert-parallel-size 2
    python examples/pretrain_moe.py --config ... --resume                        # after a crash

Megatron-core pieces: GPTModel with MoE layers (router, alltoall token dispatcher, experts),
DistributedDataParallel with fp32 main_grad buffers, get_megatron_optimizer (Adam) and
OptimizerParamScheduler, GPTDataset over an indexed dataset written by IndexedDatasetBuilder.
The device is picked automatically (cuda/nccl, npu/hccl, else cpu/gloo); on a CPU Megatron runs
through gmm-plugin's CPU platform shim (patches.cpu_platform).

Every parameter is initialized from (seed, parameter name), experts from (seed, layer, global
expert index), independently of the experts implementation and of the expert-parallel size. So a
run with the plugin, one without it and a 2-process expert-parallel run start from identical
weights and their loss curves can be compared step by step.

Outputs under output.dir: metrics.jsonl and metrics.csv (one row per step), loss.png,
summary.json, checkpoints/ (atomic, see moe_checkpoint.py), data/ (the tokenized dataset cache).
"""
from __future__ import annotations

import argparse
import copy
import csv
import difflib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):  # moe_data / moe_checkpoint, and patches/ from a source checkout
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy  # noqa: E402
import torch  # noqa: E402

import moe_checkpoint  # noqa: E402
import moe_data  # noqa: E402

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
PLUGIN_SECTION = "gmm_plugin"  # read by gmm_plugin.load_config when the plugin is on
CHOICES = {
    ("model", "dtype"): ("fp32", "bf16", "fp16"),
    ("model", "moe_token_dispatcher_type"): ("alltoall", "allgather"),
    ("train", "lr_decay_style"): ("constant", "linear", "cosine", "inverse-square-root"),
}
POSITIVE = {("model", k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_experts",
                                   "moe_router_topk", "moe_ffn_hidden_size", "seq_length")} | \
           {("train", k) for k in ("steps", "micro_batch_size", "global_batch_size", "expert_parallel_size")} | \
           {("data", "max_bytes"), ("output", "log_interval"), ("output", "keep_checkpoints")}
# Keys that must match between a checkpoint and the run resuming from it.
RESUME_MUST_MATCH = ("model", "train", "data")
VOCAB_MULTIPLE = 8


class ConfigError(ValueError):
    """A bad preset or flag; the message names the file (or flag) and the key."""


# ---------------------------------------------------------------- configuration

def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found" + (" (it is a directory)" if os.path.isdir(path) else ""))
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(DEFAULTS)}), got {type(data).__name__}")
    return data


def _unknown(key: str, known, where: str, prefix: str = "") -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}; known: {', '.join(prefix + k for k in known)}")


def _check_value(section: str, key: str, value, where: str):
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


def merge_preset(cfg: dict, data: dict, where: str) -> None:
    for section, values in data.items():
        if section == PLUGIN_SECTION:
            continue  # the plugin's own keys; validated by gmm_plugin.load_config
        if section not in DEFAULTS:
            raise _unknown(section, list(DEFAULTS) + [PLUGIN_SECTION], where)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping, got {type(values).__name__}")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise _unknown(key, DEFAULTS[section], where, prefix=section + ".")
            cfg[section][key] = _check_value(section, key, value, where)


def set_dotted(cfg: dict, dotted: str, value, where: str) -> None:
    section, _, key = dotted.partition(".")
    if section not in DEFAULTS:
        raise _unknown(section, DEFAULTS, where)
    if key not in DEFAULTS[section]:
        raise _unknown(key, DEFAULTS[section], where, prefix=section + ".")
    cfg[section][key] = _check_value(section, key, value, where)


def validate(cfg: dict, world_size: int, where: str) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain a small MoE GPT with Megatron-core (gmm-plugin example).")
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
    # Test hook (robustness tests): SIGKILL this process after step N, or during the save at step N.
    p.add_argument("--fault", help=argparse.SUPPRESS)
    import patches
    patches.add_arguments(p)  # --use-gmm-plugin, --gmm-plugin-config, --gemm-gradient-accumulation-fusion
    return p


def resolve_config(args, world_size: int) -> tuple[dict, dict]:
    """(resolved config, the preset file's raw contents)."""
    cfg = copy.deepcopy(DEFAULTS)
    preset = _read_yaml(args.config)
    merge_preset(cfg, preset, args.config)
    import yaml
    for item in args.sets:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_dotted(cfg, key.strip(), value, f"--set {item}")
    for flag, dotted in (("steps", "train.steps"), ("seed", "train.seed"),
                         ("expert_parallel_size", "train.expert_parallel_size"), ("data_path", "data.path"),
                         ("out_dir", "output.dir"), ("save_interval", "output.save_interval"),
                         ("log_interval", "output.log_interval")):
        value = getattr(args, flag)
        if value is not None:
            set_dotted(cfg, dotted, value, "--" + flag.replace("_", "-"))
    if args.no_plot:
        cfg["output"]["plot"] = False
    validate(cfg, world_size, args.config)
    return cfg, preset


# ---------------------------------------------------------------- device and processes

def pick_device(requested: str) -> str:
    if requested in ("auto", "npu"):
        try:
            import torch_npu  # noqa: F401
            if torch.npu.is_available():
                # Megatron-core calls torch.cuda.* and uses device="cuda"; Ascend's own adapter
                # maps those to the NPU (what MindSpeed relies on too).
                from torch_npu.contrib import transfer_to_npu  # noqa: F401
                return "npu"
        except Exception:  # no torch_npu, or no CANN runtime under it
            pass
        if requested == "npu":
            raise SystemExit("--device npu: torch_npu is not importable or no NPU is visible")
    if requested in ("auto", "cuda"):
        if torch.cuda.is_available():
            return "cuda"
        if requested == "cuda":
            raise SystemExit("--device cuda: no CUDA device is visible")
    return "cpu"


DIST_BACKEND = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str, ep: int):
    import torch.distributed as dist
    from megatron.core import parallel_state

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and "MASTER_ADDR" not in os.environ:  # plain `python`: a one-process group
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    elif device == "npu":
        torch.npu.set_device(local_rank)
    dist.init_process_group(DIST_BACKEND[device], rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                             expert_model_parallel_size=ep)
    return rank, world


def barrier():
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------- model

def megatron_grouped_gemm_usable(device: str) -> bool:
    """Can Megatron's *own* grouped-GEMM experts run here (without the plugin)?"""
    try:  # megatron-core <= 0.16: the legacy GroupedMLP needs the CUDA grouped_gemm package
        from megatron.core.transformer.moe import grouped_gemm_util as gg
        return device == "cuda" and gg.grouped_gemm_is_available()
    except ImportError:  # >= 0.17: only TEGroupedMLP, which this local-spec example does not build
        return False


def build_model(cfg: dict, device: str, use_plugin: bool, log):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, t = cfg["model"], cfg["train"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m["dtype"]]
    grouped = m["moe_grouped_gemm"]
    if grouped and not use_plugin and not megatron_grouped_gemm_usable(device):
        log("note: Megatron's own grouped-GEMM experts need the CUDA grouped_gemm package (or Transformer "
            "Engine); without --use-gmm-plugin this run uses Megatron's SequentialMLP experts")
        grouped = False
    config = TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        ffn_hidden_size=m["moe_ffn_hidden_size"], num_moe_experts=m["num_experts"],
        moe_router_topk=m["moe_router_topk"], moe_ffn_hidden_size=m["moe_ffn_hidden_size"],
        moe_grouped_gemm=grouped, moe_token_dispatcher_type=m["moe_token_dispatcher_type"],
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=m["moe_aux_loss_coeff"],
        expert_model_parallel_size=t["expert_parallel_size"],
        gated_linear_unit=m["swiglu"], activation_func=F.silu if m["swiglu"] else F.gelu,
        add_bias_linear=False, init_method_std=m["init_method_std"],
        hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=m["dtype"] == "bf16", fp16=m["dtype"] == "fp16",
        use_cpu_initialization=True,  # then canonical_init() and a move to the device
        # Fused kernels are CUDA-only extensions; the plain PyTorch paths run everywhere.
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        moe_permute_fusion=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=m["num_experts"], moe_grouped_gemm=grouped)
    vocab = -(-moe_data.VOCAB_SIZE // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                     max_sequence_length=m["seq_length"], position_embedding_type="rope",
                     share_embeddings_and_output_weights=True)
    canonical_init(model, cfg)
    if device != "cpu":
        model.to(device)
    return model, config


def _draw(seed: int, key: str, shape, std: float) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _expert_layouts(experts):
    """(local index, fc1 setter, fc2 setter) per local expert, for the experts classes we know.

    A setter takes the weight in Linear layout ([out, in]) and writes it in the class's layout.
    """
    def copy_to(dst):
        return lambda w: dst.copy_(w.to(dst.dtype))

    def copy_transposed(dst):  # dst is an [in, out] block
        return lambda w: dst.copy_(w.t().to(dst.dtype))

    if hasattr(experts, "local_experts"):  # SequentialMLP: one MLP per expert
        return [(i, copy_to(e.linear_fc1.weight), copy_to(e.linear_fc2.weight))
                for i, e in enumerate(experts.local_experts)]
    if hasattr(experts, "weight1") and hasattr(experts, "weight2"):  # legacy GroupedMLP: E [in, out] blocks
        n = experts.num_local_experts
        w1 = experts.weight1.view(n, experts.config.hidden_size, -1)
        w2 = experts.weight2.view(n, -1, experts.config.hidden_size)
        return [(i, copy_transposed(w1[i]), copy_transposed(w2[i])) for i in range(n)]
    fc1, fc2 = getattr(experts, "linear_fc1", None), getattr(experts, "linear_fc2", None)
    if fc1 is not None and hasattr(fc1, "weight0"):  # TE-style grouped linear: weight{i} [out, in]
        n = experts.num_local_experts
        return [(i, copy_to(getattr(fc1, f"weight{i}")), copy_to(getattr(fc2, f"weight{i}"))) for i in range(n)]
    return None


@torch.no_grad()
def canonical_init(model, cfg: dict) -> None:
    """Initialize every parameter from (seed, name), experts from (seed, layer, global expert).

    Same distributions as Megatron's defaults (normal(0, std); output projections std/sqrt(2L);
    norms ones, biases zeros, left as built), but independent of the experts class and of the
    expert-parallel size, so runs with and without the plugin, or with EP 1 and 2, are comparable.
    """
    from megatron.core import parallel_state

    m, seed = cfg["model"], cfg["train"]["seed"]
    std = m["init_method_std"]
    out_std = std / math.sqrt(2.0 * m["num_layers"])
    n_local = m["num_experts"] // cfg["train"]["expert_parallel_size"]
    first = parallel_state.get_expert_model_parallel_rank() * n_local
    for name, p in model.named_parameters():
        if ".mlp.experts." in name or "norm" in name or name.endswith("bias"):
            continue
        scaled = "linear_proj" in name or "linear_fc2" in name
        p.copy_(_draw(seed, name, p.shape, out_std if scaled else std).to(p.dtype))
    for layer in model.decoder.layers:
        experts = layer.mlp.experts
        layouts = _expert_layouts(experts)
        if layouts is None:
            raise RuntimeError(f"canonical_init: unknown experts class {type(experts).__name__}")
        h, f = m["hidden_size"], m["moe_ffn_hidden_size"]
        for i, set_fc1, set_fc2 in layouts:
            key = f"layer{layer.layer_number}/expert{first + i}"
            set_fc1(_draw(seed, key + "/fc1", (2 * f if m["swiglu"] else f, h), std))
            set_fc2(_draw(seed, key + "/fc2", (h, f), out_std))


def experts_description(model) -> str:
    experts = model.decoder.layers[0].mlp.experts
    cls = type(experts)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------- plugin

def enable_plugin(args, preset: dict, device: str, log):
    """Turn on the CPU shim (always on a CPU) and, with --use-gmm-plugin, the experts patch.

    Plugin settings: --gmm-plugin-config PATH if given, else the preset's own `gmm_plugin:`
    section, else the plugin's defaults; GMM_PLUGIN_* variables and the flags override them.
    """
    import patches
    from patches import cpu_platform

    if device == "cpu":
        cpu_platform.enable()
    if not args.use_gmm_plugin:
        return None
    if args.gmm_plugin_config is None and preset.get(PLUGIN_SECTION) is not None:
        args.gmm_plugin_config = args.config
    report = patches.apply(patches.config_from_args(args))
    for line in str(report).splitlines():
        log(line)
    return report.config


# ---------------------------------------------------------------- optimizer on a CPU

def optimizer_context(device: str):
    import contextlib

    from patches import cpu_platform
    return cpu_platform.cuda_literals_on_cpu() if device == "cpu" else contextlib.nullcontext()


# ---------------------------------------------------------------- training

class Batches:
    """Global step s, micro-batch j, data-parallel rank r -> the same samples whatever the
    number of processes: sample ids s*G + j*(b*D) + r*b + [0, b) (G global, b micro batch, D dp)."""

    def __init__(self, dataset, cfg, dp_rank: int, dp_size: int, device: str):
        t = cfg["train"]
        self.dataset, self.device = dataset, device
        self.gbs, self.mbs, self.dp_rank, self.dp = t["global_batch_size"], t["micro_batch_size"], dp_rank, dp_size
        self.num_micro = self.gbs // (self.mbs * dp_size)

    def get(self, step: int, micro: int):
        start = step * self.gbs + micro * self.mbs * self.dp + self.dp_rank * self.mbs
        items = [self.dataset[start + k] for k in range(self.mbs)]
        batch = {key: torch.stack([it[key] for it in items]) for key in ("tokens", "labels", "loss_mask", "position_ids")}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def rng_state(device: str) -> dict:
    from megatron.core import tensor_parallel
    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    elif device == "npu":
        state["npu"] = torch.npu.get_rng_state()
    return state


def set_rng_state(state: dict, device: str) -> None:
    from megatron.core import tensor_parallel
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if device == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    elif device == "npu":
        torch.npu.set_rng_state(state["npu"])


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def read_metrics(path: str, upto: int | None = None) -> list[dict]:
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if upto is None or row["step"] <= upto:
                rows.append(row)
    return rows


def loss_drop(losses: list[float]) -> dict:
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"first_10pct_mean": first, "last_10pct_mean": last, "drop": first - last,
            "drop_relative": (first - last) / first if first else 0.0, "window": k}


def plot_losses(rows: list[dict], path: str, title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); loss.png skipped"
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    w = max(1, len(losses) // 20)
    if w > 1:
        smooth = numpy.convolve(losses, numpy.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=2, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None


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


def main(argv=None) -> int:
    t_start = time.time()
    # Megatron's notices about optional packages this example does not use (Apex, Transformer
    # Engine, CUDA graphs, absl), about the classes the plugin patches, and torch's deprecation of
    # a collective Megatron calls.
    for message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "full scope is deprecated", "The legacy GroupedMLP will be deprecated",
                    "GPTModel IS DEPRECATED", "MimoModelConfig is experimental", "absl.logging is not installed",
                    "`torch.distributed.all_gather_into_tensor` is deprecated"):
        warnings.filterwarnings("ignore", message=".*" + message)
    parser = build_parser()
    args = parser.parse_args(argv)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, preset = resolve_config(args, world_env)
    except ConfigError as e:
        parser.exit(2, f"pretrain_moe.py: error: {e}\n")
    out_dir = os.path.abspath(cfg["output"]["dir"])
    data_path = cfg["data"]["path"]
    if data_path != "stdlib":
        data_path = os.path.abspath(data_path)
        if not (os.path.isfile(data_path) or moe_data.is_indexed_prefix(data_path)):
            what = "is a directory" if os.path.isdir(data_path) else "does not exist"
            parser.exit(2, f"pretrain_moe.py: error: data path {cfg['data']['path']!r} {what}; pass a .txt or "
                           ".jsonl file, a Megatron indexed-dataset prefix (PREFIX.bin + PREFIX.idx), or 'stdlib'\n")

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    resume_step = None
    if args.resume:
        try:
            resume_step = check_resume(cfg, ckpt_dir, world_env)
        except (ConfigError, RuntimeError) as e:
            parser.exit(2, f"pretrain_moe.py: error: {e}\n")

    device = pick_device(args.device)
    if device == "cpu":
        # Megatron wraps a few small functions in torch.compile (@jit_fuser); none is on this
        # example's hot path, and compiling them costs seconds per process on a CPU.
        import torch._dynamo
        torch._dynamo.config.disable = True
        if cfg["train"]["cpu_threads"]:
            torch.set_num_threads(cfg["train"]["cpu_threads"])
    ep = cfg["train"]["expert_parallel_size"]
    rank, world = init_distributed(device, ep)
    is_main = rank == 0

    def log(msg: str) -> None:
        if is_main and not args.quiet:
            print(msg, flush=True)

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    plugin_cfg = enable_plugin(args, preset, device, log)
    seed = cfg["train"]["seed"]
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    # Data: rank 0 tokenizes (once, cached), the others wait and read the same files.
    cache_dir = cfg["data"]["cache_dir"] or os.path.join(out_dir, "data")
    t = cfg["train"]

    def data():
        return moe_data.build_indexed_dataset(data_path, cache_dir, max_bytes=cfg["data"]["max_bytes"],
                                              json_key=cfg["data"]["json_key"])
    try:
        prefix = data() if is_main else None
        barrier()
        if not is_main:  # a cache hit: rank 0 has built it
            prefix = data()
        dataset = moe_data.build_gpt_dataset(prefix, seq_length=cfg["model"]["seq_length"],
                                             num_samples=t["steps"] * t["global_batch_size"], seed=seed)
    except moe_data.DataError as e:
        sys.stderr.write(f"pretrain_moe.py: error: {e}\n")
        sys.exit(2)  # under torchrun the launcher then stops the other ranks

    model, tconfig = build_model(cfg, device, plugin_cfg is not None, log)
    ddp_model = DistributedDataParallel(
        config=tconfig,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False),
        module=model)
    m = cfg["model"]
    with optimizer_context(device):
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t["lr"], min_lr=t["min_lr"], weight_decay=t["weight_decay"],
                            adam_beta1=t["adam_beta1"], adam_beta2=t["adam_beta2"], clip_grad=t["clip_grad"],
                            bf16=m["dtype"] == "bf16", fp16=m["dtype"] == "fp16", params_dtype=tconfig.params_dtype,
                            use_distributed_optimizer=False),
            [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t["lr"], min_lr=t["min_lr"], lr_warmup_steps=t["warmup_steps"],
        lr_decay_steps=t["steps"], lr_decay_style=t["lr_decay_style"], start_wd=t["weight_decay"],
        end_wd=t["weight_decay"], wd_incr_steps=t["steps"], wd_incr_style="constant")

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = Batches(dataset, cfg, dp_rank, dp_size, device)

    # Output folder: a fresh run starts clean; --resume continues from the last whole checkpoint.
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    start_step = 0
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        if not args.resume:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            for name in ("metrics.jsonl", "metrics.csv", "loss.png", "summary.json"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        moe_checkpoint.clean_partial(ckpt_dir)
    barrier()
    if resume_step is None:
        if args.resume:
            log(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
            if is_main and os.path.exists(metrics_path):
                os.remove(metrics_path)
    else:
        state = moe_checkpoint.load(ckpt_dir, resume_step, rank)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device)
        start_step = state["step"]
        del state
        if is_main:  # drop metric rows the killed run wrote after this checkpoint
            rows = read_metrics(metrics_path, upto=start_step)
            moe_checkpoint.atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        log(f"resumed from {moe_checkpoint.rank_file(ckpt_dir, start_step, rank)} (step {start_step})")

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = t["global_batch_size"] * m["seq_length"]
    log(f"device {device} ({DIST_BACKEND[device]}), {world} process(es), expert-parallel {ep}, "
        f"megatron-core {_mcore_version()}, torch {torch.__version__}")
    log(f"model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_experts']} experts top-{m['moe_router_topk']}, "
        f"{n_params / 1e6:.2f}M params on this rank, {m['dtype']}; experts: {experts_description(model)}"
        f"{' [gmm-plugin]' if plugin_cfg is not None else ' [Megatron]'}")
    log(f"data: {cfg['data']['path']} -> {prefix} ({len(dataset.dataset.sequence_lengths) if hasattr(dataset, 'dataset') else '?'} documents); "
        f"{t['steps']} steps x {tokens_per_step} tokens, {batches.num_micro} micro-batch(es) of {t['micro_batch_size']}")

    fault_kind, _, fault_step = (args.fault or "").partition(":")
    fault_step = int(fault_step) if fault_step else -1

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    metrics_file = open(metrics_path, "a", encoding="utf-8") if is_main else None
    dp_group = parallel_state.get_data_parallel_group()
    import torch.distributed as dist
    window_t, window_steps = time.time(), 0
    step_times = []
    loss_val = float("nan")
    for step in range(start_step, t["steps"]):
        t0 = time.time()
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad()
        # As Megatron's schedule does: the loss (fp16: times the dynamic loss scale; 1 otherwise)
        # is averaged over micro-batches, and the MoE aux loss's gradient gets the same scale.
        loss_scale = optimizer.get_loss_scale()
        MoEAuxLossAutoScaler.set_loss_scale(loss_scale / batches.num_micro)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for micro in range(batches.num_micro):
            b = batches.get(step, micro)
            per_token = ddp_model(b["tokens"], b["position_ids"], None, labels=b["labels"])
            loss = (per_token.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
            (loss / batches.num_micro * loss_scale).backward()
            loss_sum += loss.detach()
        finalize_grads(ddp_model)
        with optimizer_context(device):
            ok, grad_norm, _ = optimizer.step()
        if ok:  # an fp16 overflow skips the update, and the schedule waits too (as in Megatron)
            scheduler.step(increment=1)
        loss_mean = loss_sum / batches.num_micro
        if dp_size > 1:
            dist.all_reduce(loss_mean, group=dp_group)
            loss_mean /= dp_size
        loss_val = float(loss_mean)
        dt = time.time() - t0
        step_times.append(dt)
        window_steps += 1
        if is_main:
            row = {"step": step + 1, "loss": loss_val, "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not ok,
                   "step_time_s": round(dt, 4), "tokens_per_s": round(tokens_per_step / dt, 1)}
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        done = step + 1
        if not math.isfinite(loss_val):
            raise SystemExit(f"step {done}: loss is {loss_val}; stopping (lower train.lr?)")
        if done % cfg["output"]["log_interval"] == 0 or done in (start_step + 1, t["steps"]):
            now = time.time()
            tps = window_steps * tokens_per_step / max(now - window_t, 1e-9)
            recent = step_times[-20:]
            eta = (t["steps"] - done) * sum(recent) / len(recent)
            gn = "" if grad_norm is None else f" | grad {float(grad_norm):.3f}"
            log(f"step {done:>5}/{t['steps']} | loss {loss_val:.4f} | lr {optimizer.param_groups[0]['lr']:.2e}{gn} | "
                f"{tps:,.0f} tok/s | elapsed {fmt_time(now - t_start)} | ETA {fmt_time(eta)}")
            window_t, window_steps = now, 0
        if fault_kind == "kill-after-step" and done == fault_step:
            die()
        save_every = cfg["output"]["save_interval"]
        if save_every and (done % save_every == 0 or done == t["steps"]):
            state = {"step": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rng_state(device), "config": cfg,
                     "world_size": world, "plugin": None if plugin_cfg is None else plugin_cfg.to_dict()}
            hook = die if fault_kind == "kill-in-save" and done == fault_step else None
            moe_checkpoint.save(ckpt_dir, done, rank, state, barrier=barrier,
                                keep=cfg["output"]["keep_checkpoints"], before_rename=hook,
                                meta={"step": done, "config": cfg, "world_size": world})
    if metrics_file is not None:
        metrics_file.close()

    if is_main:
        rows = read_metrics(metrics_path)
        with open(os.path.join(out_dir, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        summary = {"steps": len(rows), "final_loss": rows[-1]["loss"] if rows else None,
                   "wall_time_s": round(time.time() - t_start, 1), "device": device, "processes": world,
                   "expert_parallel_size": ep, "plugin": plugin_cfg is not None,
                   "experts": experts_description(model), "megatron_core": _mcore_version()}
        if rows:
            summary.update(loss_drop([r["loss"] for r in rows]))
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        if cfg["output"]["plot"] and rows:
            title = (f"MoE GPT, {m['num_experts']} experts top-{m['moe_router_topk']}, "
                     f"{'gmm-plugin' if plugin_cfg is not None else 'Megatron'} experts, EP {ep}")
            note = plot_losses(rows, os.path.join(out_dir, "loss.png"), title)
            if note:
                print(f"note: {note}", flush=True)
        if rows:
            print(f"done: {len(rows)} steps in {fmt_time(summary['wall_time_s'])}; loss {summary['first_10pct_mean']:.4f} "
                  f"(first 10% of steps) -> {summary['last_10pct_mean']:.4f} (last 10%), drop {summary['drop']:.4f} "
                  f"({100 * summary['drop_relative']:.1f}%); outputs in {out_dir}", flush=True)
    barrier()
    dist.destroy_process_group()
    return 0


def finalize_grads(ddp_model) -> None:
    """Megatron's end-of-iteration gradient work: data-parallel (and expert-data-parallel)
    reduction of the main_grad buffers, plus the embedding/layernorm all-reduces it needs."""
    from megatron.core.distributed import finalize_model_grads
    finalize_model_grads([ddp_model])


def _mcore_version() -> str:
    try:
        import megatron.core
        return megatron.core.__version__
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
