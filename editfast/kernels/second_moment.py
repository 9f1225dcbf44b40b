"""Second-moment statistics: C += Xᵀ X over selected rows, upper triangle only.

C = Σ x xᵀ over the MLP keys of a corpus is symmetric, so the kernel computes only the tiles
on and above the diagonal (half the flops of ``X.T @ X``) and writes only elements with
col >= row; :func:`mirror_upper_` copies the upper triangle onto the lower one once, when the
statistics are read.

- CUDA tensors run the Triton kernel; CPU tensors run :func:`second_moment_reference_` (a full
  ``addmm_``: after :func:`mirror_upper_` both paths give the same matrix).
- ``force_triton=True`` runs the kernel on any device (CPU tensors need ``TRITON_INTERPRET=1``
  set before this module is imported; the tests do this).

Numerics: products are accumulated in fp32 by ``tl.dot``. bf16/fp16 X is fed to the tensor
cores as loaded (the products of 16-bit floats are exact in fp32, so this equals an fp32 matmul
of the up-cast values up to summation order). fp32 X uses ``input_precision="tf32x3"`` by
default: three tf32 tensor-core products per dot, error close to an fp32 matmul (plain
``"tf32"`` is ~1e-3 relative per product; ``"ieee"``, true fp32 products, has no tensor-core
path and is several times slower; both can be chosen with ``input_precision``). Under the interpreter the tiles are up-cast to fp32 before the dot
(the interpreter's bf16 arithmetic is wrong) and the precision argument is ignored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The configurations shipped for the GPU, one per X dtype, no autotuning (Hopper: wgmma on
# 128x128 tiles). Upper-case keys are the kernel's block sizes, the others Triton launch options
# (no FMA contraction: the same roundings as the interpreter and torch). fp32 X takes 32 rows per
# step: tf32x3 needs more registers, and 64 rows spill with gathered rows.
_CONFIG_16 = dict(BLOCK_D=128, BLOCK_N=64, num_warps=8, num_stages=3, enable_fp_fusion=False)
GPU_CONFIG = {
    torch.bfloat16: _CONFIG_16,
    torch.float16: _CONFIG_16,
    torch.float32: dict(BLOCK_D=128, BLOCK_N=32, num_warps=8, num_stages=4, enable_fp_fusion=False),
}
FP32_INPUT_PRECISION = "tf32x3"


@triton.jit
def _second_moment_kernel(
    X, ROWS, C, TILE_I, TILE_J,
    n_rows, d, stride_xn, stride_xd, stride_c,
    HAS_ROWS: tl.constexpr, INTERPRETER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: the upper-triangular tile (TILE_I[pid], TILE_J[pid]) of C, all rows of X."""
    pid = tl.program_id(0)
    ti = tl.load(TILE_I + pid)
    tj = tl.load(TILE_J + pid)
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    in_i = offs_i < d
    in_j = offs_j < d
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_n = offs_n < n_rows
        if HAS_ROWS:
            r = tl.load(ROWS + offs_n, mask=in_n, other=0).to(tl.int64)
        else:
            r = offs_n.to(tl.int64)
        row_ptr = X + r[:, None] * stride_xn
        a = tl.load(row_ptr + offs_i[None, :] * stride_xd, mask=in_n[:, None] & in_i[None, :], other=0.0)
        b = tl.load(row_ptr + offs_j[None, :] * stride_xd, mask=in_n[:, None] & in_j[None, :], other=0.0)
        if INTERPRETER:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    c_ptr = C + offs_i[:, None].to(tl.int64) * stride_c + offs_j[None, :]
    keep = in_i[:, None] & in_j[None, :] & (offs_j[None, :] >= offs_i[:, None])
    acc += tl.load(c_ptr, mask=keep, other=0.0)
    tl.store(c_ptr, acc, mask=keep)


def _selected(X: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """X as [N, d] and rows as int indices into it (None: all rows)."""
    if X.dim() != 2:
        if rows is not None and rows.dtype == torch.bool and rows.shape == X.shape[:-1]:
            rows = rows.reshape(-1)
        X = X.reshape(-1, X.shape[-1])
    if rows is not None:
        if rows.dtype == torch.bool:
            if rows.shape != X.shape[:1]:
                raise ValueError(f"bool rows mask of shape {tuple(rows.shape)} does not match X {tuple(X.shape)}")
            rows = rows.nonzero().squeeze(1)
        elif rows.dtype.is_floating_point or rows.dim() != 1:
            raise ValueError("rows must be a 1-D integer index tensor or a bool mask")
    return X, rows


def second_moment_reference_(C: torch.Tensor, X: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """C += Xᵀ X over the selected rows, in fp32, full matrix (torch reference, CPU path)."""
    X, rows = _selected(X, rows)
    x = X if rows is None else X[rows.to(X.device)]
    x = x.to(C.dtype)
    return C.addmm_(x.T, x)


def second_moment_accumulate_(C: torch.Tensor, X: torch.Tensor, rows: torch.Tensor | None = None, *,
                              force_triton: bool = False, block_d: int | None = None,
                              block_n: int | None = None, input_precision: str | None = None) -> torch.Tensor:
    """C += Xᵀ X over the selected rows of X; returns C.

    Contract:
      - ``C``: fp32 ``[d, d]``, contiguous, same device as X. On the Triton path only the
        elements with col >= row are read and written (the lower triangle is left as it was);
        call :func:`mirror_upper_` before reading C. The CPU path writes the full matrix.
      - ``X``: ``[N, d]`` (or ``[..., d]``, flattened) fp32/fp16/bf16, any strides; N may be 0.
      - ``rows``: None (all rows), 1-D integer indices in [0, N) (not checked; repeats count
        again), or a bool mask of shape ``X.shape[:-1]`` (e.g. an attention mask), so padding
        never counts.
      - ``block_d``/``block_n`` override the tile sizes (tests use small ones under the
        interpreter); ``input_precision`` applies to fp32 X only (default ``"tf32x3"``).
    """
    X, rows = _selected(X, rows)
    d = X.shape[1]
    if C.shape != (d, d) or C.dtype != torch.float32 or not C.is_contiguous():
        raise ValueError(f"C must be a contiguous fp32 [{d}, {d}] tensor, got {C.dtype} {tuple(C.shape)}")
    if X.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"X must be fp32, fp16 or bf16, got {X.dtype}")
    if not (force_triton or X.is_cuda):
        return second_moment_reference_(C, X, rows)
    n_rows = X.shape[0] if rows is None else rows.numel()
    if n_rows == 0 or d == 0:
        return C
    cfg = dict(GPU_CONFIG[X.dtype])
    cfg.update(BLOCK_D=block_d or cfg["BLOCK_D"], BLOCK_N=block_n or cfg["BLOCK_N"])
    n_tiles = triton.cdiv(d, cfg["BLOCK_D"])
    tile_i, tile_j = torch.triu_indices(n_tiles, n_tiles, device=X.device).to(torch.int32)
    if rows is not None:
        rows = rows.to(device=X.device, dtype=torch.int32).contiguous()
    precision = (input_precision or FP32_INPUT_PRECISION) if X.dtype == torch.float32 else None
    _second_moment_kernel[(tile_i.numel(),)](
        X, rows if rows is not None else tile_i, C, tile_i, tile_j,
        n_rows, d, X.stride(0), X.stride(1), C.stride(0),
        HAS_ROWS=rows is not None, INTERPRETER=not X.is_cuda, INPUT_PRECISION=precision, **cfg,
    )
    return C


def mirror_upper_(C: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of square C onto its lower one, in place; returns C.

    Any device (torch; one d x d temporary, once per statistics read).
    """
    lower = C.T.tril(-1)
    return C.triu_().add_(lower)
