"""The problems every suite times: MoE group sizes and a GMM problem (x, w, dy, group_list)."""
from __future__ import annotations

import torch

from ..function import compute_dtype

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
MB = 2.0 ** 20


def moe_group_sizes(tokens: int, experts: int, seed: int = 0) -> list[int]:
    """Uneven per-expert token counts summing to `tokens`, with every 8th expert (from #3) empty.

    Log-normal loads (sigma 0.6) look like a real router's imbalance; rounding by largest
    remainder keeps the sum exact. Deterministic in (tokens, experts, seed).
    """
    g = torch.Generator().manual_seed(seed * 1000 + experts)
    load = torch.exp(torch.randn(experts, generator=g, dtype=torch.float64) * 0.6)
    if experts > 1:
        load[3 % experts::8] = 0.0
    raw = load / load.sum() * tokens
    sizes = raw.floor().long()
    rest = tokens - int(sizes.sum())
    sizes[torch.argsort(raw - sizes, descending=True)[:rest]] += 1
    return sizes.tolist()


class GmmProblem:
    """x [M, K], w [E, K, N] (or an [E, N, K] parameter seen transposed), dy [M, N].

    counts is Megatron's tokens_per_expert: host data on a CPU, a device tensor on an
    accelerator (the harder case for host syncs); offs are torch._grouped_mm's int32 offsets.
    """

    def __init__(self, tokens, hidden, ffn, experts, dtype, device, layout="kn", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.M, self.K, self.N, self.E = tokens, hidden, ffn, experts
        self.dtype, self.device, self.layout = dtype, device, layout
        self.sizes = moe_group_sizes(tokens, experts, seed)
        self.host_counts = torch.tensor(self.sizes, dtype=torch.int64)
        self.counts = self.host_counts.to(device)
        self.offs = self.host_counts.cumsum(0).to(torch.int32).to(device)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

        self.x = rand(tokens, hidden)
        if layout == "kn":
            self.param = rand(experts, hidden, ffn, scale=hidden ** -0.5)
        else:  # Linear-style [E, out, in] parameter, used as its transpose
            self.param = rand(experts, ffn, hidden, scale=hidden ** -0.5)
        self.w = self.weight_view(self.param)
        self.dy = rand(tokens, ffn)
        self.w_dense = self.w[0].contiguous()

    def weight_view(self, param: torch.Tensor) -> torch.Tensor:
        """The [E, K, N] weight the GMM takes, seen through param's layout."""
        return param if self.layout == "kn" else param.transpose(-1, -2)

    def flops(self) -> float:
        return 2.0 * self.M * self.K * self.N

    def wgrad_mb(self) -> float:
        return self.param.numel() * self.param.element_size() / MB


def loop_forward(x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """What a per-expert loop (Megatron's SequentialMLP) does: mm per group, then cat."""
    parts = [torch.mm(xe, we) for xe, we in zip(torch.split(x, sizes), w.unbind(0))]  # unbind: one stack in backward
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def wgrad_dtype_matters(dtype: torch.dtype, device: torch.device) -> bool:
    """fused_wgrad_dtype changes the GEMM only where the operands stay 16-bit (not fp16 on a CPU,
    which is computed in fp32 throughout)."""
    return compute_dtype(torch.empty(0, dtype=dtype, device=device)) != torch.float32
