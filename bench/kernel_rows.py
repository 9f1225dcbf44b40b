"""Kernel benchmark rows: editfast's kernels against the torch baselines, measured in one run.

    python -c "from bench.kernel_rows import kernel_rows; print(kernel_rows(True))"

Each row: ``{name, device, sizes, dtype, baseline_s, editfast_s, ratio, extra}`` with median
times and ``ratio = baseline_s / editfast_s`` (> 1: editfast is faster).

- CUDA: the Triton kernels at real sizes (bf16 X, N = 16384, d ∈ {6400, 11008, 16384}; W
  4096 x 11008) against ``X.T @ X`` (bf16 in, fp32 out), ``W.add_(U @ V.T)`` and a plain copy of W
  (the bandwidth bound of an in-place update); ``extra`` gives TFLOP/s against a bf16 matmul
  measured in the same run, or GB/s against the copy.
- CPU: the production CPU path (the torch references) against the same baselines at small sizes,
  plus the Triton kernels under the interpreter on tiny shapes, which only proves that the
  harness runs (``extra = "interpreter: harness check only"``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

if not torch.cuda.is_available():  # the Triton kernels can only run interpreted; set before importing them
    os.environ.setdefault("TRITON_INTERPRET", "1")

from editfast.kernels import second_moment  # noqa: E402
from editfast.kernels.lowrank_update import lowrank_update_  # noqa: E402
from editfast.kernels.second_moment import second_moment_accumulate_  # noqa: E402

INTERP = "interpreter: harness check only"


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` calls.

    When CUDA is available each call is timed with CUDA events (device time of the work it
    enqueues, synchronised), otherwise with ``time.perf_counter``.
    """
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interpreted() -> bool:
    """Whether the Triton kernels were imported interpreted (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(second_moment._second_moment_kernel, InterpretedFunction)


def row(name, device, sizes, dtype, baseline_s, editfast_s, extra):
    return dict(name=name, device=device, sizes=sizes, dtype=dtype, baseline_s=baseline_s, editfast_s=editfast_s,
                ratio=baseline_s / editfast_s, extra=extra)


def gram_fp32(X: torch.Tensor) -> torch.Tensor:
    """Baseline XᵀX, fp32 out: one bf16 GEMM with fp32 output on CUDA, an fp32 GEMM on CPU."""
    if X.is_cuda:
        try:
            return torch.mm(X.T, X, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=): up-cast first
            pass
    x = X.float()
    return x.T @ x


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _second_moment_rows(device, ds, n, repeats, interpreted=False):
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    peak = None
    if device.type == "cuda":  # roofline: a square bf16 GEMM, measured now
        a = torch.randn(8192, 8192, device=device, generator=g).to(torch.bfloat16)
        peak = 2 * 8192**3 / median_time(lambda: a @ a, repeats)
        del a
    for d in ds:
        X = torch.randn(n, d, device=device, generator=g).to(torch.bfloat16)
        C = torch.zeros(d, d, device=device)
        kw = dict(force_triton=True, block_d=32, block_n=32) if interpreted else {}
        base = median_time(lambda: gram_fp32(X), repeats)
        ours = median_time(lambda: second_moment_accumulate_(C, X, **kw), repeats)
        if interpreted:
            extra = INTERP
        elif peak is not None:
            eff = 2 * n * d * d / ours
            extra = (f"TFLOP/s {eff / 1e12:.0f} (full XᵀX-equivalent; half are computed) of "
                     f"{peak / 1e12:.0f} measured bf16 mm roofline; baseline torch.mm(out_dtype=fp32)")
        else:
            extra = "CPU path (torch reference: fp32 addmm) vs fp32 X.T @ X"
        name = "second_moment" + ("[triton-interpreter]" if interpreted else "")
        rows.append(row(name, device_name(device), f"N={n} d={d}", "bf16 in, fp32 out", base, ours, extra))
    return rows


def _lowrank_rows(device, shape, ranks, repeats, dtype=torch.bfloat16, interpreted=False):
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    M, K = shape
    W = torch.randn(M, K, device=device, generator=g).to(dtype)
    W2 = torch.empty_like(W)
    kw = dict(force_triton=True, block_m=32, block_k=32) if interpreted else {}
    copy_s = median_time(lambda: W2.copy_(W), repeats)
    nbytes = 2 * W.numel() * W.element_size()  # read W once, write it once
    for r in ranks:
        U = torch.randn(M, r, device=device, generator=g) * 1e-3
        V = torch.randn(K, r, device=device, generator=g) * 1e-3
        base = median_time(lambda: W.add_(U @ V.T), repeats)
        ours = median_time(lambda: lowrank_update_(W, U, V, **kw), repeats)
        name = "lowrank_update" + ("[triton-interpreter]" if interpreted else "")
        dev, sizes, dt = device_name(device), f"W={M}x{K} r={r}", f"W {str(dtype)[6:]}, U/V fp32"
        if interpreted:
            rows.append(row(name, dev, sizes, dt, base, ours, INTERP))
            continue
        where = "" if device.type == "cuda" else "CPU path (torch reference); "
        gbs = f"{where}GB/s {nbytes / ours / 1e9:.3g} (copy {nbytes / copy_s / 1e9:.3g}, {100 * copy_s / ours:.0f}%)"
        rows.append(row(name, dev, sizes, dt, base, ours, gbs + "; baseline W.add_(U @ V.T)"))
        rows.append(row(name + "_vs_copy", dev, sizes, dt, copy_s, ours, gbs + "; baseline W2.copy_(W)"))
    return rows


def kernel_rows(quick: bool) -> list[dict]:
    """Measure the kernel rows on the current device (CUDA if available, else CPU).

    ``quick``: fewer sizes and repeats (CPU: a few seconds; CUDA: under a minute).
    """
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        reps = 5 if quick else 20
        rows = _second_moment_rows(dev, [11008] if quick else [6400, 11008, 16384], 16384, reps)
        rows += _lowrank_rows(dev, (4096, 11008), [64] if quick else [1, 64, 256, 1024], reps)
        return rows
    dev = torch.device("cpu")
    reps = 3 if quick else 7
    rows = _second_moment_rows(dev, [256] if quick else [512, 1024], 512 if quick else 2048, reps)
    rows += _lowrank_rows(dev, (512, 1376) if quick else (1024, 2752), [8] if quick else [8, 64], reps)
    if _interpreted():  # else the kernels were imported compiled on a machine without CUDA: no rows
        rows += _second_moment_rows(dev, [64], 64, 1, interpreted=True)
        rows += _lowrank_rows(dev, (64, 96), [4], 1, interpreted=True)
    return rows


if __name__ == "__main__":
    for row in kernel_rows(quick=True):
        print(row)
