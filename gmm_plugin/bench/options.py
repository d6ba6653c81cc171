"""The bench's command line: `gmm-plugin bench --help`. Bad values exit with status 2 (argparse)."""
from __future__ import annotations

import argparse

from .cases import DTYPES

SUITES = ("gmm", "layer", "cuda", "example")
LAYER_GRADS = ("plain", "main_grad")


def _integer(minimum: int):
    def parse(s: str) -> int:
        try:
            value = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def _csv(kind, choices=None):
    """A comma-separated list of kind, each one of choices when given."""
    def parse(s: str) -> list:
        items = [kind(v.strip()) for v in s.split(",") if v.strip()]
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            what = f"unknown value {bad[0]!r}" if bad else "an empty list"
            raise argparse.ArgumentTypeError(what + (f" (choose from {', '.join(choices)})" if choices else ""))
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gmm-plugin bench",
                                 description="Grouped-matmul benchmark against dense GEMM, a per-group loop, "
                                             "torch._grouped_mm and Megatron's experts.")
    ap.add_argument("--suite", type=_csv(str, SUITES), default=["gmm", "layer", "cuda"],
                    help="comma list of gmm, layer, cuda (runs only when CUDA exists), example "
                         "(examples/pretrain_moe.py tokens/s, minutes) [gmm,layer,cuda]")
    ap.add_argument("--tokens", type=_integer(1), default=8192, help="GMM rows M [8192]")
    ap.add_argument("--hidden", type=_integer(1), default=1024, help="hidden size K [1024]")
    ap.add_argument("--ffn", type=_integer(1), default=2048, help="expert ffn size N [2048]")
    ap.add_argument("--experts", type=_csv(_integer(1)), default=[8, 64], help="expert counts [8,64]")
    ap.add_argument("--dtypes", type=_csv(str, tuple(DTYPES)), default=list(DTYPES), help="fp32,bf16,fp16")
    ap.add_argument("--layout", choices=("kn", "nk"), default="kn",
                    help="weight as [E,K,N] (kn) or a transposed [E,N,K] parameter (nk) [kn]")
    ap.add_argument("--layer-tokens", type=_integer(1), default=4096, help="MoE layer tokens [4096]")
    ap.add_argument("--topk", type=_integer(1), default=2, help="MoE layer router top-k [2]")
    ap.add_argument("--layer-grads", type=_csv(str, LAYER_GRADS), default=list(LAYER_GRADS),
                    help="layer gradients: plain (.grad, no DDP) and/or main_grad (Megatron's "
                         "DistributedDataParallel, fp32 grad buffers; the plugin fuses into them) [plain,main_grad]")
    ap.add_argument("--example-steps", type=_integer(1), default=40, help="training steps per example run [40]")
    ap.add_argument("--example-runs", type=_integer(1), default=2, help="example runs of each kind, alternating [2]")
    ap.add_argument("--example-config", metavar="PATH", help="example preset [configs/pretrain_tiny_cpu.yaml]")
    ap.add_argument("--example-threads", type=_integer(0), default=None,
                    help="train.cpu_threads for the example runs (0: torch's default) [the preset's]")
    ap.add_argument("--repeat", type=_integer(1), default=5, help="timed rounds; the minimum is reported [5]")
    ap.add_argument("--warmup", type=_integer(0), default=1, help="untimed rounds first [1]")
    ap.add_argument("--fp16-dense-rows", type=_integer(1), default=64,
                    help="rows the dense fp16 torch.mm is timed on before scaling to --tokens [64]")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    ap.add_argument("--threads", type=_integer(1), default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes and one round (a smoke test, not a measurement)")
    ap.add_argument("--json", metavar="PATH", help="write machine, settings, rows and targets as JSON")
    ap.add_argument("--png", metavar="PATH", help="draw a bar chart of time / dense (needs matplotlib)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.tiny:  # shapes that run in seconds; explicit expert counts are kept
        args.tokens, args.hidden, args.ffn = 64, 32, 48
        args.experts = [4] if args.experts == [8, 64] else args.experts
        args.layer_tokens = 32
        args.repeat, args.warmup, args.fp16_dense_rows = 1, 0, 8
        args.example_steps, args.example_runs = 3, 1
    return args
