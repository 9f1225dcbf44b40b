"""Continuation log-probabilities fused with the LM head: log p(target) without [N, V] logits.

For each row i of ``hidden`` (final hidden states, after the final norm, at the positions that
predict a token) the logits ``hidden @ weightᵀ (+ bias)`` are computed BLOCK_V vocabulary columns
at a time in fp32, folded into an online max / sum of exponentials, and only

    logprob[i]   = logit[i, target_i] - logsumexp_j logit[i, j]        (fp32)
    is_argmax[i] = logit[i, target_i] == max_j logit[i, j]              (ties count as argmax)

are returned. Neither path ever holds the ``[N, V]`` fp32 logits: the Triton kernel holds one
``[BLOCK_N, BLOCK_V]`` tile per program, :func:`token_logprobs_reference` one ``[N, chunk_v]``
chunk.

- CUDA tensors run the Triton kernel; CPU tensors run :func:`token_logprobs_reference`.
- ``force_triton=True`` runs the kernel on any device (CPU tensors need ``TRITON_INTERPRET=1``
  set before this module is imported; the tests do this).

Kernel design. Grid ``(cdiv(N, BLOCK_N), splits)``: program (r, s) takes rows
``[r·BLOCK_N, (r+1)·BLOCK_N)`` and the s-th contiguous range of BLOCK_V-column chunks of the
vocabulary (ranges are whole chunks, so only the last range has a masked tail). For each chunk it
loops over d in BLOCK_D steps (hidden tile and weight tile re-read per chunk: the hidden rows of a
block, BLOCK_N·d elements, stay in L2; keeping them on chip would need BLOCK_N·d·2 bytes of shared
memory, 512 KiB at d = 4096), accumulating the ``[BLOCK_N, BLOCK_V]`` logits with ``tl.dot``,
then adds the bias, applies the soft cap, masks the tail with -inf, picks the target's logit out
of the tile if it lies there, and updates the running max m and sum s = Σ exp(logit - m). Each
program writes its (m, s) for its rows to a ``[splits, N]`` buffer and the target logit to
``[N]`` (exactly one program holds each row's target). A few torch ops on these small buffers
combine the splits: ``lse = M + log Σ_s S_s·exp(m_s - M)``, ``is_argmax = target_logit >= M``.
On CUDA the split count is ``min(chunks, cdiv(8·SMs, row blocks))``: at small N (one row block
at N <= 64) the vocabulary is spread over ~8 programs per SM, so the op is bound by reading the
weight once; at N = 4096 on 132 SMs it is 64 row blocks x 17 ranges (~59 chunks each). Row
blocks are the fastest grid axis, so the programs running together read the same weight chunks
(meant to hit L2 rather than DRAM; not yet measured on a GPU).

Numerics:
  - logits are fp32 accumulations of exact products for bf16/fp16 (tensor cores; equal to an
    fp32 matmul of the up-cast values up to summation order); fp32 inputs use
    ``input_precision="tf32x3"`` by default (near-fp32 error on tensor cores; ``"ieee"`` and
    ``"tf32"`` can be chosen; plain tf32 errs ~1e-3 relative per product, i.e. ~1e-2 on a
    logit of 20: too coarse to rank tokens). Under the interpreter tiles are up-cast to fp32
    before the dot (its bf16 arithmetic is wrong) and the precision is ignored.
  - The target's logit and the row max are taken from the same fp32 tile values, so
    ``is_argmax`` is exact with respect to the computed logits: a tie is a tie. It can differ
    from another implementation's argmax only where two logits differ by less than their fp32
    accumulation error (a different summation order can break or make a tie).
  - The log-sum-exp is an fp32 online sum with fp32 ``exp``: |error| of logprob is a few 1e-6
    relative to the row's log-sum-exp scale plus the logit error; logprob <= 0 up to that.
  - ``hidden`` is cast to ``weight``'s dtype when they differ (as ``F.linear`` in the model
    needs), on both paths. ``bias`` is added in fp32. ``softcap`` (Gemma-2 style final logit
    soft-capping) applies ``c·tanh(logit / c)`` after the bias; the kernel evaluates tanh as
    ``1 - 2 / (exp(2x) + 1)`` (absolute error ~1e-7·c), the reference with ``torch.tanh``.
  - Targets outside ``[0, V)`` (e.g. an ignore index of -100) give logprob ``-inf`` and
    is_argmax False on both paths. ``-inf`` logits (a bias that masks tokens) are fine, also
    when whole chunks or vocabulary ranges are masked; a target at a masked token gets ``-inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The configurations shipped for the GPU, one per dtype, no autotuning (Hopper: wgmma on
# 64x128 logit tiles, d in steps of 64, 3-stage pipeline of the d loop). Upper-case keys are the
# kernel's block sizes, the others Triton launch options (no FMA contraction: the same roundings
# as the interpreter). fp32 takes d in steps of 32: tf32x3 splits each operand in two and needs
# twice the registers and shared memory per element.
_CONFIG_16 = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, enable_fp_fusion=False)
GPU_CONFIG = {
    torch.bfloat16: _CONFIG_16,
    torch.float16: _CONFIG_16,
    torch.float32: dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3, enable_fp_fusion=False),
}
FP32_INPUT_PRECISION = "tf32x3"
PROGRAMS_PER_SM = 8  # split the vocabulary until about this many programs per SM exist
REFERENCE_CHUNK_V = 8192


@triton.jit
def _tanh(x):
    """tanh in exp: saturates cleanly to ±1 (exp overflow gives 1, underflow -1), no NaN."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _logprob_kernel(
    H, W, BIAS, T, MAX_OUT, SUM_OUT, TGT_OUT,
    N, V, d, stride_hn, stride_hd, stride_wv, stride_wd, chunks_per_split, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INTERPRETER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: rows block program_id(0), vocabulary range program_id(1) (whole chunks)."""
    split = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    tgt = tl.load(T + offs_n, mask=in_n, other=-1)  # int32, -1 for invalid targets (launcher)
    h_rows = H + offs_n[:, None].to(tl.int64) * stride_hn
    v_lo = split * chunks_per_split * BLOCK_V
    v_hi = tl.minimum(v_lo + chunks_per_split * BLOCK_V, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t_logit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_v = offs_v < v_hi
        w_rows = W + offs_v[:, None].to(tl.int64) * stride_wv
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < d
            h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=in_n[:, None] & in_d[None, :], other=0.0)
            w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=in_v[:, None] & in_d[None, :], other=0.0)
            if INTERPRETER:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_v, mask=in_v, other=0.0)[None, :]
        if HAS_SOFTCAP:
            acc = softcap * _tanh(acc / softcap)
        acc = tl.where(in_v[None, :], acc, float("-inf"))
        t_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(acc, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far (a bias mask): exp gives 0, no NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(acc - shift[:, None]), axis=1)
        m = m_new
    out = split * N + offs_n
    tl.store(MAX_OUT + out, m, mask=in_n)
    tl.store(SUM_OUT + out, s, mask=in_n)
    tl.store(TGT_OUT + offs_n, t_logit, mask=in_n & (tgt >= v_lo) & (tgt < v_hi))


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
           softcap: float | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError("hidden must be [N, d], weight [V, d], targets [N]")
    if hidden.shape[1] != weight.shape[1] or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"shapes do not match: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("empty vocabulary")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError("targets must be integer token ids")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float [{weight.shape[0]}] tensor")
    if softcap is not None and not softcap > 0:
        raise ValueError("softcap must be positive")


def token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, *, softcap: float | None = None,
                             chunk_v: int = REFERENCE_CHUNK_V) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` in plain torch (CPU path), ``chunk_v`` vocabulary columns at a time.

    Same contract and results as the kernel up to fp32 summation order; at most one
    ``[N, chunk_v]`` fp32 logits chunk and one ``[chunk_v, d]`` fp32 weight chunk exist at a time.
    """
    _check(hidden, weight, targets, bias, softcap)
    N, V = hidden.shape[0], weight.shape[0]
    dev = weight.device
    h = hidden.to(device=dev, dtype=weight.dtype).float()
    t = targets.to(dev, torch.int64)
    valid = (t >= 0) & (t < V)
    lse = torch.full((N,), float("-inf"), device=dev)
    row_max = torch.full((N,), float("-inf"), device=dev)
    t_logit = torch.full((N,), float("-inf"), device=dev)
    for v0 in range(0, V, chunk_v):
        v1 = min(v0 + chunk_v, V)
        logits = h @ weight[v0:v1].float().T
        if bias is not None:
            logits += bias[v0:v1].to(dev, torch.float32)
        if softcap is not None:
            logits = torch.tanh(logits / softcap).mul_(softcap)
        here = valid & (t >= v0) & (t < v1)
        picked = logits.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        t_logit = torch.where(here, picked, t_logit)
        chunk_max = logits.amax(dim=1)
        row_max = torch.maximum(row_max, chunk_max)
        shift = chunk_max.nan_to_num(0.0, 0.0, 0.0)  # a chunk of -inf logits (masked by the bias) adds exp(-inf) = 0
        chunk_lse = logits.sub_(shift[:, None]).exp_().sum(dim=1).log_().add_(shift)  # logits consumed
        lse = torch.logaddexp(lse, chunk_lse)
    return t_logit - lse, valid & (t_logit >= row_max)


def _num_splits(n_row_blocks: int, n_chunks: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_chunks, triton.cdiv(PROGRAMS_PER_SM * sms, n_row_blocks)))


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None, *, softcap: float | None = None, force_triton: bool = False,
                   block_n: int | None = None, block_v: int | None = None, block_d: int | None = None,
                   num_splits: int | None = None, input_precision: str | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log p(target) and whether the target is the argmax, without [N, V] logits.

    Contract:
      - ``hidden``: ``[N, d]`` fp32/fp16/bf16, any strides; N may be 0. Cast to ``weight``'s
        dtype if it differs.
      - ``weight``: ``[V, d]`` fp32/fp16/bf16 (LM head or tied embedding), any strides, V >= 1,
        same device as hidden.
      - ``targets``: ``[N]`` integer token ids; ids outside ``[0, V)`` give ``-inf`` / False.
      - ``bias``: optional float ``[V]``; ``softcap``: optional positive float, logits become
        ``softcap·tanh(logits / softcap)`` (after the bias).
      - Returns ``(logprob, is_argmax)``: fp32 ``[N]`` and bool ``[N]`` on hidden's device.
        is_argmax counts ties with the maximum as argmax.
      - ``block_*`` override the tile sizes, ``num_splits`` the number of vocabulary ranges
        (default: 1 off CUDA; on CUDA enough for ~8 programs per SM, at most one per chunk);
        ``input_precision`` applies to fp32 inputs only (default ``"tf32x3"``).
    """
    _check(hidden, weight, targets, bias, softcap)
    if not (force_triton or weight.is_cuda):
        return token_logprobs_reference(hidden, weight, targets, bias, softcap=softcap)
    dev = weight.device
    N, d = hidden.shape
    V = weight.shape[0]
    if N == 0:
        return torch.empty(0, device=dev), torch.empty(0, dtype=torch.bool, device=dev)
    h = hidden.to(device=dev, dtype=weight.dtype)
    t64 = targets.to(dev, torch.int64)
    t32 = torch.where((t64 >= 0) & (t64 < V), t64, -1).to(torch.int32).contiguous()
    b = bias.to(dev, torch.float32).contiguous() if bias is not None else None
    cfg = dict(GPU_CONFIG[weight.dtype])
    cfg.update(BLOCK_N=block_n or cfg["BLOCK_N"], BLOCK_V=block_v or cfg["BLOCK_V"], BLOCK_D=block_d or cfg["BLOCK_D"])
    n_row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_chunks = triton.cdiv(V, cfg["BLOCK_V"])
    splits = max(1, min(n_chunks, num_splits or _num_splits(n_row_blocks, n_chunks, dev)))
    chunks_per_split = triton.cdiv(n_chunks, splits)
    splits = triton.cdiv(n_chunks, chunks_per_split)  # every range non-empty
    part_max = torch.empty(splits, N, device=dev)
    part_sum = torch.empty(splits, N, device=dev)
    t_logit = torch.full((N,), float("-inf"), device=dev)
    precision = (input_precision or FP32_INPUT_PRECISION) if weight.dtype == torch.float32 else None
    _logprob_kernel[(n_row_blocks, splits)](
        h, weight, b if b is not None else t_logit, t32, part_max, part_sum, t_logit,
        N, V, d, h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), chunks_per_split,
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, INTERPRETER=not weight.is_cuda,
        INPUT_PRECISION=precision, **cfg,
    )
    row_max = part_max.amax(dim=0)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    lse = shift + (part_sum * torch.exp(part_max - shift)).sum(dim=0).log()
    return t_logit - lse, t_logit >= row_max
