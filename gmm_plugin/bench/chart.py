"""The PNG chart: time / the block's dense baseline for every GMM and layer case."""
from __future__ import annotations

from .measure import Row

_SHORT_OP = {"forward": "fwd", "forward+backward": "fwd+bwd", "fused backward": "fused bwd"}


def _label(r: Row) -> str:
    op = f"layer {r.extra['grads']}" if r.suite == "layer" else _SHORT_OP.get(r.op, r.op)
    return f"{op}\n{r.dtype} E={r.experts}"


def draw_png(rows: list[Row], path: str) -> str | None:
    """Bar charts of time / dense per case, one panel per suite; returns why not when it cannot draw."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    panels: dict[str, dict[tuple, list[Row]]] = {}
    for r in rows:
        if r.ratio_to_dense is None or r.suite in ("cuda", "example") or r.dtype == "fp16":
            continue
        panels.setdefault(r.suite, {}).setdefault((r.op, r.dtype, r.experts), []).append(r)
    if not panels:
        return "nothing to draw"
    impls = list(dict.fromkeys(r.impl for blocks in panels.values() for rs in blocks.values() for r in rs))
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4.2 * len(panels)), squeeze=False)
    for ax, (suite, blocks) in zip(axes[:, 0], panels.items()):
        for j, rs in enumerate(blocks.values()):
            width = 0.8 / len(rs)
            for i, r in enumerate(rs):
                ax.bar(j + (i - (len(rs) - 1) / 2) * width, r.ratio_to_dense, width, color=colors[r.impl],
                       label=r.impl)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels([_label(rs[0]) for rs in blocks.values()], fontsize=7)
        ax.set_ylabel("time / dense GEMM time")
        ax.set_title(f"{suite}: lower is better", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
