"""Fused continuation log-probabilities vs the naive full-logits path (pytest-benchmark suite and
rows for ``bench/run.py``; not collected by the test suite).

    python -m pytest bench/test_bench_logprob.py                      # CPU: the torch reference path
    python -m pytest bench/test_bench_logprob.py -m gpu               # CUDA: Triton at real sizes
    python -c "from bench.test_bench_logprob import logprob_rows; print(logprob_rows(True))"

Baseline: ``torch.log_softmax(logits, -1).gather(1, t)`` on the full ``[N, V]`` fp32 logits
(CUDA: one bf16 GEMM with fp32 output, :func:`bench.kernel_rows.gram_fp32`'s fallback rule; CPU:
an fp32 matmul); it returns only the log-probabilities, the fused op also returns is_argmax.
"""

from __future__ import annotations

import pytest
import torch

from bench.kernel_rows import (  # sets TRITON_INTERPRET first without CUDA
    INTERP,
    device_name,
    median_time,
    row,
)
from bench.test_bench_kernels import CUDA, DEVICE, cpu, gpu, synced
from editfast.kernels import logprob as lp
from editfast.kernels.logprob import token_logprobs

GPU_SIZES = [(4096, 128256, 4096), (512, 152064, 8192), (16, 128256, 4096)]  # N, V, d (bf16)
CPU_SIZES = [(64, 32000, 256), (256, 50257, 512)]  # fp32


def logits_fp32(h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    if h.is_cuda:
        try:
            return torch.mm(h, W.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    return (h @ W.T).float() if h.is_cuda else h.float() @ W.float().T


def naive_logprobs(h: torch.Tensor, W: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits_fp32(h, W), -1).gather(1, t[:, None]).squeeze(1)


def _inputs(n, v, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g).to(dtype)
    W = (torch.randn(v, d, device=device, generator=g) / d**0.5 * 4).to(dtype)
    t = torch.randint(0, v, (n,), device=device, generator=g)
    return h, W, t


# ---------------------------------------------------------------- pytest-benchmark

SIZES = [pytest.param(*s, torch.bfloat16, marks=gpu, id=f"N{s[0]}-V{s[1]}-d{s[2]}-bf16") for s in GPU_SIZES]
SIZES += [pytest.param(*s, torch.float32, marks=cpu, id=f"N{s[0]}-V{s[1]}-d{s[2]}-fp32") for s in CPU_SIZES[:1]]


@pytest.mark.parametrize("n,v,d,dtype", SIZES)
@pytest.mark.parametrize("impl", ["editfast", "torch"])
def test_token_logprobs(benchmark, impl, n, v, d, dtype):
    benchmark.group = f"token_logprobs N={n} V={v} d={d} {str(dtype)[6:]} {DEVICE}"
    h, W, t = _inputs(n, v, d, dtype, DEVICE)
    fn = (lambda: token_logprobs(h, W, t)) if impl == "editfast" else (lambda: naive_logprobs(h, W, t))
    benchmark(synced(fn))


# ---------------------------------------------------------------- rows for bench/run.py

def _peak_extra(fn) -> int:
    """Bytes allocated on the CUDA device by ``fn()`` beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def _rows(device, sizes, dtype, repeats, interpreted=False):
    rows = []
    peak = None
    if device.type == "cuda" and not interpreted:  # roofline: a square bf16 GEMM, measured now
        a = torch.randn(8192, 8192, device=device).to(torch.bfloat16)
        peak = 2 * 8192**3 / median_time(lambda: a @ a, repeats)
        del a
    for n, v, d in sizes:
        h, W, t = _inputs(n, v, d, dtype, device)
        kw = dict(force_triton=True, block_n=16, block_v=64, block_d=32) if interpreted else {}
        base = median_time(lambda: naive_logprobs(h, W, t), repeats)
        ours = median_time(lambda: token_logprobs(h, W, t, **kw), repeats)
        err = (token_logprobs(h, W, t, **kw)[0] - naive_logprobs(h, W, t)).abs().max().item()
        name = "token_logprobs" + ("[triton-interpreter]" if interpreted else "")
        if interpreted:
            extra = INTERP
        elif peak is not None:
            mem_b, mem_o = _peak_extra(lambda: naive_logprobs(h, W, t)), _peak_extra(lambda: token_logprobs(h, W, t))
            extra = (f"TFLOP/s {2 * n * v * d / ours / 1e12:.0f} of {peak / 1e12:.0f} measured bf16 mm roofline; "
                     f"weight GB/s {W.numel() * W.element_size() / ours / 1e9:.0f}; peak extra memory "
                     f"{mem_o / 2**20:.1f} MiB vs {mem_b / 2**20:.0f} MiB; max |Δ logprob| {err:.2g}; "
                     "baseline log_softmax(mm fp32 out).gather, no argmax")
        else:
            extra = (f"CPU path (chunked torch reference, 8192 columns) vs full fp32 logits; max |Δ logprob| "
                     f"{err:.2g}; logits {n * v * 4 / 2**20:.0f} MiB avoided")
        rows.append(row(name, device_name(device), f"N={n} V={v} d={d}", str(dtype)[6:], base, ours, extra))
    return rows


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(lp._logprob_kernel, InterpretedFunction)


def logprob_rows(quick: bool) -> list[dict]:
    """Measure the token_logprobs rows on the current device (CUDA if available, else CPU).

    Rows as :func:`bench.kernel_rows.kernel_rows`. ``quick``: fewer sizes and repeats (CPU: a few
    seconds on 2 cores; CUDA: well under a minute).
    """
    if CUDA:
        dev = torch.device("cuda")
        return _rows(dev, GPU_SIZES[:1] if quick else GPU_SIZES, torch.bfloat16, 5 if quick else 20)
    dev = torch.device("cpu")
    rows = _rows(dev, CPU_SIZES[:1] if quick else CPU_SIZES, torch.float32, 3 if quick else 7)
    if _interpreted():  # else the kernel was imported compiled on a machine without CUDA: no row
        rows += _rows(dev, [(8, 300, 64)], torch.bfloat16, 1, interpreted=True)
    return rows


if __name__ == "__main__":
    for r in logprob_rows(quick=True):
        print(r)
