"""Worker for test_expert_parallel.py, launched by torch.distributed.run with 2 processes (gloo, CPU).

On each rank: the same MoELayer (4 experts, top-2, patched grouped experts), the same full set of
weights, and the rank's own tokens. Run with expert parallelism 2 (each rank holds 2 experts; the
dispatcher moves tokens between ranks) and with expert parallelism 1 (each rank holds all 4), and
compare: per rank the output, the token gradient and the router gradient; and the expert weight
gradients summed over ranks (EP=1: each rank's gradient from its own tokens; EP=2: the owner's
gradient from everyone's tokens). Also with rank 1's experts starved of tokens (a zero-token rank).
Prints one "OK ..." line per case on rank 0; exits 1 on any mismatch.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mcore_helpers as h  # noqa: E402
import patches  # noqa: E402

E, HIDDEN, FFN, SEQ, BATCH = 4, 16, 12, 6, 2
TOL = 1e-5


def full_weights(starve):
    g = torch.Generator().manual_seed(0)
    router = torch.randn(E, HIDDEN, generator=g) * 0.5
    if starve:
        router[2:, 0] = -5.0  # feature 0 is 3 for every token: experts 2, 3 (rank 1 at EP=2) never win
    w1 = torch.randn(E, HIDDEN, 2 * FFN, generator=g) * 0.2
    w2 = torch.randn(E, FFN, HIDDEN, generator=g) * 0.2
    return router, w1, w2


def run(ep, dispatcher, starve):
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=ep)
    config = h.make_config(experts=E, topk=2, hidden=HIDDEN, ffn=FFN, dispatcher=dispatcher,
                           expert_model_parallel_size=ep)
    layer = h.moe_layer(config, grouped=True)
    assert type(layer.experts).__name__ in ("GroupedMLP", "GmmGroupedMLP"), type(layer.experts)
    local = E // ep
    first = ps.get_expert_model_parallel_rank() * local
    router, w1, w2 = full_weights(starve)
    experts = layer.experts
    with torch.no_grad():
        layer.router.weight.copy_(router)
        experts.weight1.view(local, HIDDEN, -1).copy_(w1[first:first + local])
        experts.weight2.view(local, -1, HIDDEN).copy_(w2[first:first + local])

    g = torch.Generator().manual_seed(100 + dist.get_rank())
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    x[..., 0] = 3.0
    dy = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    x.requires_grad_()
    out, _ = layer(x)
    (out * dy).sum().backward()

    assert experts.weight1.grad is not None and experts.weight2.grad is not None
    g1 = torch.zeros_like(w1)
    g2 = torch.zeros_like(w2)
    g1[first:first + local] = experts.weight1.grad.view(local, HIDDEN, -1)
    g2[first:first + local] = experts.weight2.grad.view(local, -1, HIDDEN)
    if starve and ep == 2 and dist.get_rank() == 1:
        assert experts.weight1.grad.abs().max() == 0 and experts.weight2.grad.abs().max() == 0
    dist.all_reduce(g1)
    dist.all_reduce(g2)
    return {"output": out.detach(), "grad x": x.grad, "grad router": layer.router.weight.grad.clone(),
            "grad weight1 (sum over ranks)": g1, "grad weight2 (sum over ranks)": g2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    dist.init_process_group("gloo")
    patches.apply({"backend": "torch"})
    rank = dist.get_rank()
    if rank == 0:
        print("megatron-core", ".".join(map(str, patches.megatron_version())), flush=True)
    failures = 0
    for dispatcher in ("alltoall", "allgather"):
        for starve in (False, True):
            ep2 = run(2, dispatcher, starve)
            ep1 = run(1, dispatcher, starve)
            errs = {k: rel_err(ep2[k], ep1[k]) for k in ep1}
            bad = {k: e for k, e in errs.items() if not e <= TOL}
            failures += bool(bad)
            case = f"{dispatcher} {'rank 1 without tokens' if starve else 'all ranks with tokens'}"
            if bad:
                print(f"FAIL rank {rank} {case}: {bad}", flush=True)
            elif rank == 0:
                print(f"OK EP2==EP1 {case}: max rel err {max(errs.values()):.2e}", flush=True)
    total = torch.tensor([failures])
    dist.all_reduce(total)
    patches.revert()
    dist.destroy_process_group()
    sys.exit(1 if total.item() else 0)


if __name__ == "__main__":
    main()
