"""What the MoE pretraining example records: per-step metrics, progress lines, summary and plot.

Outputs under output.dir (rank 0 writes them):
    metrics.jsonl   one JSON row per step, flushed as it is written (a killed run keeps its rows)
    metrics.csv     the same rows, written at the end
    summary.json    steps, final loss, first/last-10% means and the drop, wall time, the run's setup
    loss.png        the loss curve and its moving mean (needs matplotlib)
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time

import numpy
import torch

import moe_checkpoint

METRICS = "metrics.jsonl"
OUTPUTS = (METRICS, "metrics.csv", "loss.png", "summary.json")


class MetricsLog:
    """metrics.jsonl of one run; only the rank that writes outputs (rank 0) creates one."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, METRICS)
        self._file = None

    def start_over(self) -> None:
        """A fresh run: drop every output of an earlier run in this folder."""
        for name in OUTPUTS:
            path = os.path.join(self.out_dir, name)
            if os.path.exists(path):
                os.remove(path)

    def keep_upto(self, step: int) -> None:
        """A resumed run: drop the rows a killed run wrote after its last checkpoint."""
        rows = self.rows(upto=step)
        moe_checkpoint.atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write(self, row: dict) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def rows(self, upto: int | None = None) -> list[dict]:
        return read_metrics(self.path, upto)


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


class RoutingRecord:
    """Each training step's routing, for comparing two runs step by step.

    digest: a hash of the step's routing decisions, for every token of every micro-batch on every
    data-parallel rank, in sample order, in every MoE layer: the experts the router sent it to, and
    the top-k experts by fp32 softmax score that Megatron's load-balancing loss counts (megatron-core
    >= 0.13 takes that top-k apart from the dispatch; a flip there alone already changes the
    gradients). The same samples give the same digest whatever the number of processes.
    margin: the step's closest call, the smallest gap between a token's k-th and (k+1)-th largest
    router logit. Rounding-level differences between two runs can flip a decision only where
    this gap is about as small as they are.

    Two runs with equal digests up to a step have trained on identical routing, so their losses
    differ only by fp32 summation order; after the first difference they follow different
    trajectories (tests/examples/test_pretrain_moe.py). The hooks recompute the router's logits
    (a [tokens, hidden] x [hidden, experts] GEMM) and keep small maps on the device; step()
    reads them back once per step, after the step's loss was read (that read waits anyway).
    """

    def __init__(self, routers, dp_group=None, dp_size: int = 1):
        self.layers = len(routers)
        self.dp_group, self.dp_size = dp_group, dp_size
        self._maps: list[torch.Tensor] = []
        self._margins: list[torch.Tensor] = []
        for router in routers:
            router.register_forward_hook(self._record)

    @torch.no_grad()
    def _record(self, router, inputs, output) -> None:
        dispatch = output[1]  # [tokens, experts] bool
        k = router.config.moe_router_topk
        logits = router.gating(inputs[0]).view(dispatch.shape)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        counted = torch.zeros_like(dispatch).scatter(1, scores.topk(k, dim=1).indices, True)
        self._maps.append(torch.cat([dispatch.flatten(), counted.flatten()]).to(torch.uint8))
        if k < logits.shape[1]:
            top = logits.float().topk(k + 1, dim=1).values
            self._margins.append((top[:, k - 1] - top[:, k]).min())

    def step(self) -> tuple[str, float | None]:
        """(digest, margin) of the step since the last call; margin None when every expert is
        chosen (top-k = experts)."""
        maps, self._maps = self._maps, []
        host = torch.cat(maps).cpu().numpy() if maps else numpy.zeros(0, numpy.uint8)  # the one read
        margin = float(torch.stack(self._margins).min()) if self._margins else None
        self._margins = []
        blocks, at = [], 0
        for i in range(0, len(maps), self.layers):  # one micro-batch: its layers' maps, in layer order
            n = sum(m.numel() for m in maps[i:i + self.layers])
            blocks.append(hashlib.sha256(host[at:at + n].tobytes()).digest())
            at += n
        if self.dp_size > 1:
            import torch.distributed as dist
            gathered = [None] * self.dp_size
            dist.all_gather_object(gathered, (blocks, margin), group=self.dp_group)
            # Samples of micro-batch j on rank r come before those of rank r + 1 (moe_data.Batches).
            blocks = [gathered[r][0][j] for j in range(len(blocks)) for r in range(self.dp_size)]
            margin = min((g[1] for g in gathered if g[1] is not None), default=None)
        return hashlib.sha256(b"".join(blocks)).hexdigest()[:16], margin


class Progress:
    """The periodic progress line: loss, lr, grad norm, tokens/s over the window, ETA."""

    def __init__(self, total_steps: int, tokens_per_step: int, t_start: float):
        self.total, self.tokens_per_step, self.t_start = total_steps, tokens_per_step, t_start
        self.window_t, self.window_steps = time.time(), 0
        self.step_times: list[float] = []

    def step_done(self, seconds: float) -> None:
        self.step_times.append(seconds)
        self.window_steps += 1

    def line(self, step: int, loss: float, lr: float, grad_norm) -> str:
        now = time.time()
        tps = self.window_steps * self.tokens_per_step / max(now - self.window_t, 1e-9)
        recent = self.step_times[-20:]
        eta = (self.total - step) * sum(recent) / len(recent)
        self.window_t, self.window_steps = now, 0
        gn = "" if grad_norm is None else f" | grad {float(grad_norm):.3f}"
        return (f"step {step:>5}/{self.total} | loss {loss:.4f} | lr {lr:.2e}{gn} | {tps:,.0f} tok/s | "
                f"elapsed {fmt_time(now - self.t_start)} | ETA {fmt_time(eta)}")


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def loss_drop(losses: list[float]) -> dict:
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"first_10pct_mean": first, "last_10pct_mean": last, "drop": first - last,
            "drop_relative": (first - last) / first if first else 0.0, "window": k}


def write_outputs(out_dir: str, rows: list[dict], summary: dict, plot_title: str | None) -> dict:
    """metrics.csv, summary.json (summary plus the loss drop) and, given a title, loss.png.
    Returns the summary as written."""
    with open(os.path.join(out_dir, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    summary = {"steps": len(rows), "final_loss": rows[-1]["loss"] if rows else None, **summary}
    if rows:
        summary.update(loss_drop([r["loss"] for r in rows]))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    if plot_title is not None and rows:
        note = plot_losses(rows, os.path.join(out_dir, "loss.png"), plot_title)
        if note:
            print(f"note: {note}", flush=True)
    return summary


def done_line(summary: dict, out_dir: str) -> str:
    s = summary
    return (f"done: {s['steps']} steps in {fmt_time(s['wall_time_s'])}; loss {s['first_10pct_mean']:.4f} (first 10% "
            f"of steps) -> {s['last_10pct_mean']:.4f} (last 10%), drop {s['drop']:.4f} "
            f"({100 * s['drop_relative']:.1f}%); outputs in {out_dir}")


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
