"""pytest-benchmark suites for the kernels, on the current device (not collected by the test suite).

    python -m pytest bench/test_bench_kernels.py                      # CPU: torch paths, small sizes
    python -m pytest bench/test_bench_kernels.py -m gpu               # CUDA: Triton at real sizes

Each editfast benchmark has its baseline in the same group, so the report shows the ratio:
second moment vs ``X.T @ X`` (bf16 in, fp32 out), low-rank update vs ``W.add_(U @ V.T)`` and
vs a plain copy of W (the bandwidth bound).
"""

import pytest
import torch

from bench.kernel_rows import gram_fp32
from editfast.kernels.lowrank_update import lowrank_update_
from editfast.kernels.second_moment import second_moment_accumulate_

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
cpu = pytest.mark.skipif(CUDA, reason="CPU sizes; the gpu-marked cases cover CUDA")

SM_SIZES = [pytest.param(16384, d, marks=gpu, id=f"N16384-d{d}") for d in (6400, 11008, 16384)]
SM_SIZES += [pytest.param(1024, 512, marks=cpu, id="N1024-d512")]
LU_SIZES = [pytest.param(4096, 11008, r, marks=gpu, id=f"4096x11008-r{r}") for r in (1, 64, 1024)]
LU_SIZES += [pytest.param(1024, 2752, 8, marks=cpu, id="1024x2752-r8")]


def synced(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("n,d", SM_SIZES)
@pytest.mark.parametrize("impl", ["editfast", "torch"])
def test_second_moment(benchmark, impl, n, d):
    benchmark.group = f"second_moment N={n} d={d} {DEVICE}"
    X = torch.randn(n, d, device=DEVICE).to(torch.bfloat16)
    C = torch.zeros(d, d, device=DEVICE)
    fn = (lambda: second_moment_accumulate_(C, X)) if impl == "editfast" else (lambda: gram_fp32(X))
    benchmark(synced(fn))


@pytest.mark.parametrize("m,k,r", LU_SIZES)
@pytest.mark.parametrize("which", ["editfast", "torch_add", "copy"])
def test_lowrank_update(benchmark, which, m, k, r):
    benchmark.group = f"lowrank_update W={m}x{k} bf16 r={r} {DEVICE}"
    W = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    W2 = torch.empty_like(W)
    U, V = torch.randn(m, r, device=DEVICE) * 1e-3, torch.randn(k, r, device=DEVICE) * 1e-3
    fn = {"editfast": lambda: lowrank_update_(W, U, V), "torch_add": lambda: W.add_(U @ V.T),
          "copy": lambda: W2.copy_(W)}[which]
    benchmark(synced(fn))
