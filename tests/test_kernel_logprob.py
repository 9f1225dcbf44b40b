"""Fused continuation log-probabilities (``editfast.kernels.logprob``) against float64.

- Interpreter tests (any machine): the Triton kernel on CPU tensors (``force_triton=True``,
  ``TRITON_INTERPRET=1`` from conftest) with small row blocks, so grids stay at a few dozen
  programs; odd vocabularies (1237, 4099: masked tails), vocabulary splits, ties, strides.
- The CPU production path (the chunked torch reference) at a real vocabulary size (49152).
- ``gpu`` tests: real sizes (N 4096, V 128256, d 4096 bf16), on CUDA only.
- AOT tests (no GPU needed): the shipped configurations compiled for Hopper (sm_90) in a child
  process (the harness of ``helpers.kernels``): wgmma for 16-bit inputs, no local memory.
"""

import json
import sys

import pytest
import torch
from helpers.kernels import (
    DTYPES,
    aot_child_report,
    aot_compile,
    aot_facts,
    aot_unavailable,
    assert_no_spills,
    cuda,
    exact,
    randn,
)

from editfast.kernels import logprob as lp
from editfast.kernels.logprob import token_logprobs, token_logprobs_reference

SMALL = dict(block_n=16, block_v=128, block_d=64)  # interpreter blocks: N = 37 is 3 row blocks


def reference64(h, W, t, b=None, softcap=None):
    """float64 log_softmax over the full logits; (logprob, is_argmax); invalid targets -inf / False."""
    logits = h.double() @ W.double().T
    if b is not None:
        logits = logits + b.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    V = W.shape[0]
    valid = (t >= 0) & (t < V)
    tc = t.clamp(0, V - 1)[:, None]
    lp64 = torch.log_softmax(logits, -1).gather(1, tc).squeeze(1)
    top = logits.gather(1, tc).squeeze(1) == logits.amax(1)
    return torch.where(valid, lp64, float("-inf")), valid & top, logits


def targets_for(logits, seed):
    """Random targets, every third one the row's argmax (is_argmax True), row 0 the last column."""
    N, V = logits.shape
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed))
    t[2::3] = logits[2::3].argmax(1)
    t[0] = V - 1
    return t


def check(out, want, atol=2e-5, rtol=2e-6):
    (lp_, am), (lp64, am64) = out, want[:2]
    assert lp_.dtype == torch.float32 and am.dtype == torch.bool and lp_.shape == am.shape == lp64.shape
    finite = torch.isfinite(lp64)
    assert torch.equal(torch.isfinite(lp_), finite) and (lp_[~finite] == float("-inf")).all()
    torch.testing.assert_close(lp_.double()[finite], lp64[finite], atol=atol, rtol=rtol)
    assert torch.equal(am, am64), f"is_argmax differs in rows {(am != am64).nonzero().flatten().tolist()}"


# ---------------------------------------------------------------- interpreter

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,d", [(1, 1000, 64), (5, 1237, 100), (37, 4099, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_exact_inputs(dtype, n, v, d, with_bias):
    """Multiples of 1/4: exact in every dtype, logits exact in fp32, so is_argmax matches exactly."""
    h, W = exact(n, d, dtype=dtype, seed=n), exact(v, d, dtype=dtype, seed=v)
    b = exact(v, seed=d) * 4 if with_bias else None
    t = targets_for(reference64(h, W, torch.zeros(n, dtype=torch.long), b)[2], seed=n + v)
    want = reference64(h, W, t, b)
    check(token_logprobs(h, W, t, b, force_triton=True, **SMALL), want)
    check(token_logprobs(h, W, t, b), want)  # CPU dispatch: the reference path


@pytest.mark.parametrize("splits", [1, 4, 10**6])
def test_ties_across_chunks_and_splits(splits):
    """Only 12 distinct weight rows: each row's maximum is attained in many chunks and splits,
    the tail included; a target at any of them is an argmax, a target one below the max is not."""
    V, d = 1237, 64
    g = torch.Generator().manual_seed(1)
    W = exact(12, d, dtype=torch.bfloat16, seed=2)[torch.randint(0, 12, (V,), generator=g)]
    W[-1] = W[0]
    h = exact(20, d, dtype=torch.bfloat16, seed=3)
    logits = h.double() @ W.double().T
    t = torch.empty(20, dtype=torch.long)
    for i in range(20):
        top = (logits[i] == logits[i].max()).nonzero().flatten()
        below = (logits[i] < logits[i].max()).nonzero().flatten()
        t[i] = top[-1] if i % 2 else below[torch.randint(0, len(below), (1,), generator=g)]
    want = reference64(h, W, t)
    assert want[1].sum() == 10 and (logits.max(1, keepdim=True).values == logits).sum(1).min() > 10
    check(token_logprobs(h, W, t, force_triton=True, num_splits=splits, **SMALL), want)
    check(token_logprobs_reference(h, W, t, chunk_v=100), want)


def test_shipped_blocks_split_tail():
    """The GPU block sizes (64 x 128 tiles, d steps of 64) under the interpreter: 2 row blocks,
    10 chunks in 3 vocabulary ranges (4, 4, 2), last chunk masked."""
    h, W = exact(70, 100, dtype=torch.bfloat16, seed=4), exact(1237, 100, dtype=torch.bfloat16, seed=5)
    t = targets_for(h.double() @ W.double().T, seed=6)
    check(token_logprobs(h, W, t, force_triton=True, num_splits=3), reference64(h, W, t))


def test_strided_hidden_and_weight():
    """A strided slice of hidden (strides (2·203, 2)) and a transposed weight view (stride_wd = V)."""
    big = exact(2 * 9 + 1, 2 * 100 + 3, dtype=torch.float16, seed=7)
    h = big[1::2, 1:201:2]
    W = exact(100, 1237, dtype=torch.float16, seed=8).T
    assert h.shape == (9, 100) and not h.is_contiguous() and W.stride() == (1, 1237)
    t = targets_for(h.double() @ W.double().T, seed=9)
    check(token_logprobs(h, W, t, force_triton=True, num_splits=2, **SMALL), reference64(h, W, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_randn_softcap_bias(dtype):
    """Gaussian inputs (logits ~ ±30), a fp32 bias, soft-capping at 30 and at 5 (saturating)."""
    h, W = randn(11, 100, dtype=dtype, seed=10) * 2, randn(1237, 100, dtype=dtype, seed=11)
    b = randn(1237, seed=12)
    t = targets_for(h.double() @ W.double().T + b.double(), seed=13)  # softcap keeps the argmax
    for cap in (None, 30.0, 5.0):
        lp64, _, logits = reference64(h, W, t, b, cap)
        out = token_logprobs(h, W, t, b, softcap=cap, force_triton=True, num_splits=3, **SMALL)
        ref = token_logprobs_reference(h, W, t, b, softcap=cap, chunk_v=500)
        for lp_, am in (out, ref):
            torch.testing.assert_close(lp_.double(), lp64, atol=5e-5, rtol=1e-5)
            # argmax: exact unless the top two logits are within fp32 accumulation error
            top2 = logits.topk(2, dim=1).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-3
            tgt_is_top = logits.gather(1, t[:, None]).squeeze(1) == top2[:, 0]
            assert torch.equal(am[clear], tgt_is_top[clear]) and am[2::3].all()


def test_masking_bias():
    """-inf bias on the first 300 columns (whole chunks and a whole vocabulary range) and one
    target inside the masked part: no NaN, that target gets -inf."""
    h, W = exact(9, 64, seed=21), exact(1237, 64, seed=22)
    b = torch.zeros(1237)
    b[:300] = float("-inf")
    t = targets_for(reference64(h, W, torch.zeros(9, dtype=torch.long), b)[2], seed=23)
    t = torch.where(t < 300, t + 300, t)
    t[1] = 150
    want = reference64(h, W, t, b)
    assert want[0][1] == float("-inf") and torch.isfinite(want[0][2:]).all()
    check(token_logprobs(h, W, t, b, force_triton=True, num_splits=4, **SMALL), want)
    check(token_logprobs_reference(h, W, t, b, chunk_v=128), want)


def test_hidden_cast_to_weight_dtype():
    h = randn(6, 64, seed=14)  # fp32 hidden, bf16 head: hidden is rounded to bf16 first, as F.linear needs
    W = exact(1000, 64, dtype=torch.bfloat16, seed=15)
    t = torch.tensor([0, 999, 5, 17, 500, 128])
    want = reference64(h.to(torch.bfloat16), W, t)
    check(token_logprobs(h, W, t, force_triton=True, **SMALL), want)
    check(token_logprobs(h, W, t), want)


def test_invalid_targets_and_edges():
    h, W = exact(4, 64, seed=16), exact(1000, 64, seed=17)
    t = torch.tensor([-100, 1000, 2**40, 3])
    for out in (token_logprobs(h, W, t, force_triton=True, **SMALL), token_logprobs(h, W, t)):
        assert torch.equal(out[0][:3], torch.full((3,), float("-inf"))) and not out[1][:3].any()
        check((out[0][3:], out[1][3:]), reference64(h[3:], W, t[3:]))
    # V = 1: log p = 0, always the argmax; N = 0: empty results
    for force in (True, False):
        lp1, am1 = token_logprobs(h, W[:1], torch.zeros(4, dtype=torch.long), force_triton=force, **SMALL)
        assert torch.equal(lp1, torch.zeros(4)) and am1.all()
        lp0, am0 = token_logprobs(h[:0], W, t[:0], force_triton=force)
        assert lp0.shape == am0.shape == (0,) and am0.dtype == torch.bool


def test_errors():
    h, W, t = torch.zeros(2, 8), torch.zeros(5, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="shapes"):
        token_logprobs(h, torch.zeros(5, 9), t)
    with pytest.raises(ValueError, match="shapes"):
        token_logprobs(h, W, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden must be fp32"):
        token_logprobs(h.double(), W, t)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(h, W, t.float())
    with pytest.raises(ValueError, match="bias"):
        token_logprobs(h, W, t, torch.zeros(4))
    with pytest.raises(ValueError, match="softcap"):
        token_logprobs(h, W, t, softcap=0.0)
    with pytest.raises(ValueError, match="empty"):
        token_logprobs(h, W[:0], t)


def test_reference_real_vocabulary():
    """The CPU path at V = 49152 (6 chunks of 8192), targets at chunk edges and the last column."""
    V, d = 49152, 64
    h, W = randn(8, d, seed=18), randn(V, d, seed=19) / 2
    b = randn(V, seed=20)
    t = torch.tensor([0, 8191, 8192, 16383, V - 1, 12345, 40000, 3])
    lp64, am64, logits = reference64(h, W, t, b)
    t[5] = logits[5].argmax()
    lp64, am64, _ = reference64(h, W, t, b)
    out = token_logprobs(h, W, t, b)
    assert torch.equal(out[0], token_logprobs_reference(h, W, t, b)[0])
    check(out, (lp64, am64), atol=5e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU (real sizes)

def exact_cuda(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=g, device="cuda") / 4).to(dtype)


def argmax_cuda(h, W, b=None, rows=256):
    """Row argmax of the fp32 logits, ``rows`` rows at a time."""
    out = []
    Wf = W.float()
    for i in range(0, h.shape[0], rows):
        logits = h[i:i + rows].float() @ Wf.T
        out.append((logits if b is None else logits + b).argmax(1))
    return torch.cat(out)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n,v,d", [(4096, 128256, 4096), (5, 152064, 8192), (300, 50257, 2048)])
def test_gpu_real_sizes_bf16(n, v, d):
    """Exact-valued bf16 (multiples of 1/32): logits exact in fp32, so is_argmax equals the
    reference's; logprob within fp32 log-sum-exp error; no [N, V] buffer (peak extra memory far
    below N·V·4 bytes)."""
    h, W = exact_cuda(n, d, seed=n) / 8, exact_cuda(v, d, seed=v) / 8
    b = exact_cuda(v, dtype=torch.float32, seed=d)
    t = torch.randint(0, v, (n,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    t[2::3] = argmax_cuda(h, W, b)[2::3]
    t[0] = v - 1
    if n > 1:
        t[1] = -100
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = token_logprobs(h, W, t, b)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < max(n * v * 4 // 64, 64 << 20), f"{peak / 2**20:.0f} MiB extra"
    ref = token_logprobs_reference(h, W, t, b)  # fp32 chunks on the GPU
    ok = t >= 0
    torch.testing.assert_close(out[0][ok], ref[0][ok], atol=1e-4, rtol=1e-5)
    assert torch.equal(out[1], ref[1]) and out[1][2::3].all()
    assert (out[0][~ok] == float("-inf")).all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_gpu_ties(splits):
    """64 distinct weight rows over V = 128256: every row maximum is attained many times."""
    V, d = 128256, 4096
    g = torch.Generator(device="cuda").manual_seed(3)
    h = exact_cuda(512, d, seed=2) / 8
    W = exact_cuda(64, d, seed=3)[torch.randint(0, 64, (V,), device="cuda", generator=g)] / 8
    t = torch.randint(0, V, (512,), device="cuda", generator=g)
    t[::2] = argmax_cuda(h, W)[::2]
    lp_, am = token_logprobs(h, W, t, num_splits=splits)
    ref = token_logprobs_reference(h, W, t)
    assert torch.equal(am, ref[1]) and am[::2].all() and (~am).any()
    torch.testing.assert_close(lp_, ref[0], atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,precision,atol", [(torch.float32, None, 2e-4), (torch.float16, None, 2e-4),
                                                   (torch.float32, "ieee", 2e-4)])
def test_gpu_randn_vs_float64(dtype, precision, atol):
    n, v, d = 256, 50257, 2048
    g = torch.Generator(device="cuda").manual_seed(4)
    h = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    W = (torch.randn(v, d, device="cuda", generator=g) / d**0.5 * 4).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    for cap in (None, 30.0):
        lp64, _, _ = reference64(h, W, t, softcap=cap)
        lp_, _ = token_logprobs(h, W, t, softcap=cap, input_precision=precision)
        torch.testing.assert_close(lp_.double(), lp64, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- AOT compile for Hopper (no GPU)

AOT_CASES = [(dt, variant) for dt in ("bf16", "fp16", "fp32") for variant in ("plain", "bias_softcap")]


def _aot_report():
    if why := aot_unavailable():
        return {"skip": why}
    out = {}
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dt, variant in AOT_CASES:
        args = dict(H=f"*{dt}:16", W=f"*{dt}:16", BIAS="*fp32:16", T="*i32:16", MAX_OUT="*fp32:16",
                    SUM_OUT="*fp32:16", TGT_OUT="*fp32:16", N="i32", V="i32", d="i32:16", stride_hn="i32:16",
                    stride_wv="i32:16", chunks_per_split="i32", softcap="fp32")
        extra = variant == "bias_softcap"
        out[f"{dt}-{variant}"] = aot_facts(aot_compile(lp._logprob_kernel, args, lp.GPU_CONFIG[dtypes[dt]], dict(
            stride_hd=1, stride_wd=1, HAS_BIAS=extra, HAS_SOFTCAP=extra, INTERPRETER=False,
            INPUT_PRECISION=lp.FP32_INPUT_PRECISION if dt == "fp32" else None)))
    return out


@pytest.fixture(scope="module")
def aot():
    return aot_child_report(__file__)


@pytest.mark.parametrize("dtype,variant", AOT_CASES)
def test_aot_logprob_hopper(aot, dtype, variant):
    facts = aot[f"{dtype}-{variant}"]
    assert facts["wgmma"]  # 16-bit dots and the fp32 tf32x3 default run on Hopper's tensor cores
    assert facts["shared"] <= 232448
    assert_no_spills(facts)


if __name__ == "__main__" and sys.argv[1:] == ["--aot"]:
    print(json.dumps(_aot_report()))
