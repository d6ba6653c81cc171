"""Determinism on CPU: the same inputs give bitwise-identical outputs and gradients, run after run,
on every backend, dtype, group_type, group_list form and with gemm_fusion; and in a fresh process."""
from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys

import pytest
import torch

from gmm_plugin import npu_gmm, npu_gmm_v2
from robust_support import DTYPES, bias_dtype, count, cpu_backends, expect, using_backend

HERE = os.path.dirname(os.path.abspath(__file__))
COUNTS = [19, 0, 31, 5, 41]            # uneven, with an empty group: 96 rows
K, N, REPEATS = 32, 24, 3


def run_once(dtype, group_type, api, form, fusion):
    """One forward + backward from fixed inputs; every result tensor, in a fixed order."""
    gen = torch.Generator().manual_seed(1234)
    e, m = len(COUNTS), sum(COUNTS)
    values = list(itertools.accumulate(COUNTS)) if api is npu_gmm else COUNTS
    gl = values if form == "list" else torch.tensor(values)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    if group_type == 0:
        x = rand(m, K).requires_grad_()
        original = torch.nn.Parameter(rand(e, N, K))          # Linear-style, weight is a transposed view
        w = original.transpose(-1, -2)
        bias = rand(e, N).to(bias_dtype(dtype)).requires_grad_()
        if fusion:
            original.main_grad = torch.randn(e, N, K, generator=gen)
        y = api(x, w, bias=bias, group_list=gl, gemm_fusion=fusion, original_weight=original if fusion else None)
        leaves = [x, original, bias]
    else:
        x = rand(K, m).requires_grad_()
        w = rand(m, N).requires_grad_()
        y = api(x, w, group_list=gl, group_type=2)
        leaves = [x, w]
    y.backward(rand(*y.shape))
    out = [y.detach()] + [t.grad for t in leaves if t.grad is not None]
    if fusion:
        out.append(original.main_grad)
    return out


CASES = [(dt, 0, api, form, fusion) for dt in DTYPES for api, form in ((npu_gmm, "list"), (npu_gmm_v2, "tensor"))
         for fusion in (False, True)] + [(dt, 2, npu_gmm_v2, "tensor", False) for dt in DTYPES]


@pytest.mark.parametrize("backend", cpu_backends())
def test_repeated_runs_are_bitwise_identical(backend):
    with using_backend(backend):
        for case in CASES:
            first = run_once(*case)
            for _ in range(REPEATS - 1):
                again = run_once(*case)
                count("determinism_repeats")
                expect(len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again)),
                       f"{backend} {case}: results differ between runs")


def digest(backend: str) -> str:
    with using_backend(backend):
        h = hashlib.sha256()
        for case in CASES:
            for t in run_once(*case):
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def test_fresh_process_gives_the_same_bits():
    """A new interpreter (new allocations, new thread pool) reproduces this process's bits."""
    here = {b: digest(b) for b in cpu_backends()}
    code = (f"import sys; sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]\n"
            "import test_robust_determinism as t, robust_support as s\n"
            "print(' '.join(f'{b}={t.digest(b)}' for b in s.cpu_backends()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    there = dict(item.split("=") for item in out.stdout.split())
    count("determinism_repeats", len(here))
    expect(there == here, f"a fresh process gives other bits: {there} != {here}")
