"""Low-rank weight update in place: W ← W + α A Bᵀ, fp32 math, one rounding.

A ROME/MEMIT update is kept as factors until it is applied; this applies it without
materialising the dense ΔW: each program loads one tile of W, adds the fp32 product of its rows
of A and B, and rounds once on the store. W may have any strides, so both weight orientations
work without copies:

- ``nn.Linear`` (W stored ``[out, in]``, ΔW = U Vᵀ): ``lowrank_update_(W, U, V)``
- GPT-2 ``Conv1D`` (W stored ``[in, out]``): ``lowrank_update_(W, V, U)`` or, equivalently,
  ``lowrank_update_(W.T, U, V)`` (a transposed view is fine).

CUDA tensors run the Triton kernel; CPU tensors run :func:`lowrank_update_reference_`;
``force_triton=True`` runs the kernel on any device (CPU tensors need ``TRITON_INTERPRET=1``).

Numerics: the factors are cast to fp32 by the launcher (fp64 included) and ``tl.dot`` runs with
``input_precision="ieee"``: exact fp32 products accumulated in fp32 (no tensor cores, so no
wgmma; the op is memory-bound for the ranks of a MEMIT batch up to a few hundred, and the FMA
path is still far cheaper than a dense ΔW round trip). ``input_precision="tf32x3"`` is available
for very large ranks. The result differs from the float64 value by at most the one rounding to
W's dtype plus fp32 accumulation error. (Under the interpreter, whose fp32 → bf16 cast
truncates, the bf16 rounding is done with integer ops; the GPU uses its native cvt.rn.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The one configuration shipped for the GPU, no autotuning: a 64x128 tile of W per program, the
# rank in chunks of 16 (32 spills registers for fp32 W seen through a transposed view). Upper-case
# keys are the kernel's block sizes, the others Triton launch options (no FMA contraction:
# W + α·acc rounds like the interpreter and torch).
GPU_CONFIG = dict(BLOCK_M=64, BLOCK_K=128, BLOCK_R=16, num_warps=8, num_stages=2, enable_fp_fusion=False)


@triton.jit
def _bf16_rtne(x):
    """fp32 → bf16, round to nearest even, in integer ops (the interpreter's own cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _lowrank_update_kernel(
    W, A, B, M, K, R, alpha,
    stride_wm, stride_wk, stride_am, stride_ar, stride_bk, stride_br,
    INTERPRETER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program: the tile (pid0, pid1) of W, over the whole rank."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_r = offs_r < R
        a = tl.load(A + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar,
                    mask=in_m[:, None] & in_r[None, :], other=0.0)
        b = tl.load(B + offs_k[:, None] * stride_bk + offs_r[None, :] * stride_br,
                    mask=in_k[:, None] & in_r[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    w_ptr = W + offs_m[:, None].to(tl.int64) * stride_wm + offs_k[None, :].to(tl.int64) * stride_wk
    keep = in_m[:, None] & in_k[None, :]
    w = tl.load(w_ptr, mask=keep, other=0.0).to(tl.float32)
    out = w + alpha * acc
    if INTERPRETER and W.dtype.element_ty == tl.bfloat16:
        tl.store(w_ptr, _bf16_rtne(out), mask=keep)
    else:
        tl.store(w_ptr, out.to(W.dtype.element_ty), mask=keep)


def _check(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError("W, A and B must be 2-D")
    if A.shape[0] != W.shape[0] or B.shape[0] != W.shape[1] or A.shape[1] != B.shape[1]:
        raise ValueError(f"shapes do not match W {tuple(W.shape)} = A {tuple(A.shape)} · B{tuple(B.shape)}ᵀ")
    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"W must be fp32, fp16 or bf16, got {W.dtype}")
    if not (A.dtype.is_floating_point and B.dtype.is_floating_point):
        raise ValueError("A and B must be floating point")


def lowrank_update_reference_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """W += α A Bᵀ in place with fp32 math and one rounding (torch reference, CPU path)."""
    _check(W, A, B)
    delta = A.to(W.device, torch.float32) @ B.to(W.device, torch.float32).T
    # An in-place add of an fp32 tensor into a 16-bit W computes in fp32 and rounds once on store.
    return W.add_(delta, alpha=alpha)


def lowrank_update_(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float = 1.0, *,
                    force_triton: bool = False, block_m: int | None = None, block_k: int | None = None,
                    block_r: int | None = None, input_precision: str = "ieee") -> torch.Tensor:
    """W += α A Bᵀ in place; returns W.

    Contract:
      - ``W``: ``[M, K]`` fp32/fp16/bf16, any strides (no overlapping elements).
      - ``A``: ``[M, r]``, ``B``: ``[K, r]``, any float dtype, any strides, same device as W;
        r >= 0 (r = 0 leaves W unchanged).
      - fp32 math, W is read once and rounded once to its dtype on the store. A and B must not
        overlap W.
      - ``input_precision`` (Triton path): ``"ieee"`` (default, true fp32 products) or
        ``"tf32x3"`` (tensor cores, near-fp32 error; for ranks in the thousands).
      - ``block_*`` override the tile sizes (tests use small ones under the interpreter).
    """
    _check(W, A, B)
    if not (force_triton or W.is_cuda):
        return lowrank_update_reference_(W, A, B, alpha)
    M, K = W.shape
    R = A.shape[1]
    if M == 0 or K == 0 or R == 0:
        return W
    A, B = A.to(torch.float32), B.to(torch.float32)
    cfg = dict(GPU_CONFIG, BLOCK_M=block_m or GPU_CONFIG["BLOCK_M"], BLOCK_K=block_k or GPU_CONFIG["BLOCK_K"],
               BLOCK_R=block_r or GPU_CONFIG["BLOCK_R"])
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
    _lowrank_update_kernel[grid](
        W, A, B, M, K, R, float(alpha),
        W.stride(0), W.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        INTERPRETER=not W.is_cuda, INPUT_PRECISION=input_precision, **cfg,
    )
    return W
