"""Triton kernels against float64 references.

- Interpreter tests (any machine): the Triton kernels run on CPU tensors (``force_triton=True``,
  ``TRITON_INTERPRET=1`` from conftest) with small blocks so grids stay at a few dozen programs.
- ``gpu`` tests: bf16/tf32 numerics and the real sizes, on CUDA only.
- AOT tests (no GPU needed): each kernel compiled for Hopper (sm_90) with the shipped
  configuration; the PTX must use wgmma where a tensor-core dot is expected, and neither the PTX
  nor the SASS may touch local memory (no register spills).
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

from editfast.kernels import lowrank_update as lu
from editfast.kernels import second_moment as sm
from editfast.kernels.lowrank_update import lowrank_update_, lowrank_update_reference_
from editfast.kernels.second_moment import (
    mirror_upper_,
    second_moment_accumulate_,
    second_moment_reference_,
)


def poisoned_c(d, seed=1):
    """Exact values to accumulate onto; strictly below the diagonal a sentinel (-1000 + noise) that
    any write or read by the kernel would change or leak into the upper triangle."""
    lower = torch.ones(d, d, dtype=torch.bool).tril(-1)
    return torch.where(lower, exact(d, d, seed=seed + 1) - 1000, exact(d, d, seed=seed))


def check_upper(C, C0, x64):
    """C's upper triangle == C0 + xᵀx exactly; its strict lower triangle untouched; mirror fills it."""
    upper = torch.ones_like(C, dtype=torch.bool).triu()
    want = C0.double() + x64.T @ x64
    assert torch.equal(C.double()[upper], want[upper])
    assert torch.equal(C[~upper], C0[~upper])
    mirror_upper_(C)
    assert torch.equal(C.double(), want.triu() + want.triu(1).T)


# ---------------------------------------------------------------- second moment (interpreter)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,n", [(100, 70), (1, 5), (33, 0), (40, 3)])
def test_second_moment_exact(dtype, d, n):
    X = exact(n, d, dtype=dtype, seed=d + n)
    C = poisoned_c(d)
    C0 = C.clone()
    second_moment_accumulate_(C, X, force_triton=True, block_d=32, block_n=16)
    check_upper(C, C0, X.double())


def test_second_moment_shipped_blocks_d1000():
    """The GPU block sizes (128x128 tiles, 64 rows) under the interpreter; partial tiles."""
    X = exact(70, 1000, dtype=torch.bfloat16, seed=3)
    C = poisoned_c(1000)
    C0 = C.clone()
    second_moment_accumulate_(C, X, force_triton=True)
    check_upper(C, C0, X.double())


def test_second_moment_d333_strided_x():
    big = exact(81, 2 * 333 + 3, dtype=torch.float16, seed=4)
    X = big[1::2, 1 : 2 * 333 + 1 : 2]  # strides (2 * 669, 2)
    assert X.shape == (40, 333) and not X.is_contiguous()
    C = poisoned_c(333)
    C0 = C.clone()
    second_moment_accumulate_(C, X, force_triton=True, block_d=64, block_n=16)
    check_upper(C, C0, X.double())


def test_second_moment_rows_index_and_mask():
    X = exact(3, 9, 50, dtype=torch.bfloat16, seed=5)
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(5)) > 0.4
    C = poisoned_c(50)
    C0 = C.clone()
    second_moment_accumulate_(C, X, rows=mask, force_triton=True, block_d=32, block_n=16)
    check_upper(C, C0, X[mask].double())  # padding never counts

    X2 = X.reshape(27, 50)
    idx = torch.tensor([5, 0, 5, 26, 7])  # repeats count twice
    C = poisoned_c(50)
    second_moment_accumulate_(C, X2, rows=idx, force_triton=True, block_d=32, block_n=16)
    check_upper(C, C0, X2[idx].double())

    C = poisoned_c(50)
    second_moment_accumulate_(C, X2, rows=torch.zeros(27, dtype=torch.bool), force_triton=True, block_d=32)
    check_upper(C, C0, X2[:0].double())


def test_second_moment_randn_fp32_tolerance():
    X = randn(50, 70, seed=6) * 3
    C = torch.zeros(70, 70)
    second_moment_accumulate_(C, X, force_triton=True, block_d=32, block_n=16)
    mirror_upper_(C)
    x = X.double()
    torch.testing.assert_close(C.double(), x.T @ x, rtol=0, atol=50 * 2**-23 * (x.abs().T @ x.abs()).max().item())


def test_second_moment_cpu_dispatch_matches_kernel():
    X = exact(30, 45, dtype=torch.bfloat16, seed=7)
    rows = torch.arange(0, 30, 2)
    ref = second_moment_accumulate_(torch.ones(45, 45), X, rows)  # CPU → torch reference, full matrix
    assert torch.equal(ref, second_moment_reference_(torch.ones(45, 45), X, rows))
    tri = mirror_upper_(second_moment_accumulate_(torch.ones(45, 45), X, rows, force_triton=True, block_d=32))
    assert torch.equal(ref, tri)


def test_second_moment_errors():
    with pytest.raises(ValueError, match="fp32"):
        second_moment_accumulate_(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="C must"):
        second_moment_accumulate_(torch.zeros(5, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="X must"):
        second_moment_accumulate_(torch.zeros(4, 4), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="mask"):
        second_moment_accumulate_(torch.zeros(4, 4), torch.zeros(2, 4), rows=torch.ones(3, dtype=torch.bool))


def test_mirror_upper():
    C = exact(7, 7, seed=8).triu()
    want = C + C.triu(1).T
    C += torch.zeros(7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).tril(-1), float("nan"))
    assert torch.equal(mirror_upper_(C), want)


# ---------------------------------------------------------------- low-rank update (interpreter)

def ulp(x, dtype):
    """Unit in the last place of |x| in ``dtype`` (float64 tensor)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.double().abs())
    return torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float64), e - 1).clamp_min(fi.smallest_normal * fi.eps)


def check_one_rounding(out, W0, A, B, alpha):
    """|out - exact| <= half an ulp of W's dtype (one rounding) + the fp32 accumulation bound."""
    exact64 = W0.double() + alpha * (A.double() @ B.double().T)
    r = A.shape[1]
    fp32_err = (r + 2) * 2.0**-24 * (W0.double().abs() + abs(alpha) * (A.double().abs() @ B.double().abs().T))
    bound = 0.5 * torch.maximum(ulp(exact64, out.dtype), ulp(out, out.dtype)) + fp32_err
    err = (out.double() - exact64).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 7, 64])
def test_lowrank_update_one_rounding(dtype, rank):
    W = randn(100, 60, dtype=dtype, seed=rank)
    A, B = randn(100, rank, seed=rank + 1), randn(60, rank, seed=rank + 2) / rank**0.5
    W0 = W.clone()
    assert lowrank_update_(W, A, B, 0.5, force_triton=True, block_m=32, block_k=32) is W
    check_one_rounding(W, W0, A, B, 0.5)
    if dtype != torch.float32:  # same rounding as the reference nearly everywhere (fp32: sums differ in order)
        assert (W != lowrank_update_reference_(W0.clone(), A, B, 0.5)).float().mean() < 0.01


def test_lowrank_update_large_odd_shape_shipped_blocks():
    W = randn(1000, 333, dtype=torch.bfloat16, seed=10)
    A, B = randn(1000, 20, seed=11), randn(333, 20, seed=12)
    W0 = W.clone()
    lowrank_update_(W, A, B, -1.0, force_triton=True)  # 64x128 tiles, rank chunks of 16
    check_one_rounding(W, W0, A, B, -1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_update_conv1d_orientation(dtype):
    """GPT-2 Conv1D stores W as [in, out]: pass W.T (a strided view) or swap the factors."""
    U, V = randn(40, 7, seed=13), randn(90, 7, seed=14)
    Wc = randn(90, 40, dtype=dtype, seed=15)  # [in, out]
    W0 = Wc.clone()
    lowrank_update_(Wc.T, U, V, 1.0, force_triton=True, block_m=32, block_k=32)
    check_one_rounding(Wc.T, W0.T, U, V, 1.0)
    Wc2 = W0.clone()
    lowrank_update_(Wc2, V, U, 1.0, force_triton=True, block_m=32, block_k=32)
    check_one_rounding(Wc2, W0, V, U, 1.0)  # both ways one rounding from the exact update
    if dtype != torch.float32:  # and the same bits nearly everywhere (fp32: the dot's summation
        assert (Wc != Wc2).float().mean() < 0.01  # order may follow the layout in the last bits)


def test_lowrank_update_factor_dtypes_and_strides():
    W = randn(50, 30, dtype=torch.float16, seed=16)
    A = randn(7, 50, dtype=torch.float64, seed=17).T  # fp64, transposed view
    B = randn(30, 14, dtype=torch.bfloat16, seed=18)[:, ::2]  # bf16, strided
    W0 = W.clone()
    lowrank_update_(W, A, B, 2.0, force_triton=True, block_m=32, block_k=32)
    check_one_rounding(W, W0, A.float(), B.float(), 2.0)


def test_lowrank_update_edges():
    W = randn(1, 1, seed=19)
    want = W + 6.0
    lowrank_update_(W, torch.full((1, 1), 3.0), torch.full((1, 1), 2.0), force_triton=True, block_m=16, block_k=16)
    assert torch.equal(W, want)
    lowrank_update_(W, torch.zeros(1, 0), torch.zeros(1, 0), force_triton=True)  # rank 0: no-op
    assert torch.equal(W, want)
    with pytest.raises(ValueError, match="shapes"):
        lowrank_update_(W, torch.zeros(2, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="W must"):
        lowrank_update_(W.double(), torch.zeros(1, 1), torch.zeros(1, 1))


def test_lowrank_update_cpu_dispatch():
    W = randn(20, 10, dtype=torch.bfloat16, seed=20)
    A, B = randn(20, 3, seed=21), randn(10, 3, seed=22)
    want = W.float().add_(A @ B.T, alpha=0.25).to(torch.bfloat16)
    assert torch.equal(lowrank_update_(W, A, B, 0.25), want)


# ---------------------------------------------------------------- GPU (real sizes, bf16/tf32)

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("d", [6400, 11008, 16384])
def test_gpu_second_moment_large_exact(d):
    """Exact-valued bf16 X: products and sums are exact, so C must equal the fp32 matmul bit for bit."""
    X = exact(3000, d, dtype=torch.bfloat16, seed=d).cuda()
    C = torch.zeros(d, d, device="cuda")
    second_moment_accumulate_(C, X)  # CUDA dispatches to Triton
    x = X.float()
    ref = x.T @ x
    assert torch.equal(C.triu(), ref.triu())
    del ref
    mirror_upper_(C)
    assert torch.equal(C, C.T)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision,rtol", [("tf32x3", 1e-5), ("ieee", 1e-5), ("tf32", 5e-3)])
def test_gpu_second_moment_fp32_precision(precision, rtol):
    X = randn(2048, 6400, seed=1).cuda()
    mask = torch.rand(2048, device="cuda") > 0.1
    C = torch.zeros(6400, 6400, device="cuda")
    second_moment_accumulate_(C, X, rows=mask, input_precision=precision)
    x = X[mask].double()
    ref = x.T @ x
    scale = (x.abs().T @ x.abs())
    err = ((C.double() - ref).abs() / scale).triu()
    assert err.max().item() < rtol


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_second_moment_16bit_randn(dtype):
    X = randn(4096, 11008, dtype=dtype, seed=2).cuda()
    C = torch.zeros(11008, 11008, device="cuda")
    second_moment_accumulate_(C, X)
    x = X.double()
    ref = x.T @ x
    err = (C.double() - ref).abs().triu().max().item() / (x.abs().T @ x.abs()).max().item()
    assert err < 1e-5


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [1, 64, 1024])
def test_gpu_lowrank_update(dtype, rank):
    W = randn(4096, 11008, dtype=dtype, seed=rank).cuda()
    A, B = randn(4096, rank, seed=1).cuda(), (randn(11008, rank, seed=2) / rank**0.5).cuda()
    W0 = W.clone()
    lowrank_update_(W, A, B, 0.5)
    check_one_rounding(W, W0, A, B, 0.5)
    Wt = W0.T.contiguous().T  # Conv1D-style storage ([in, out] seen through .T), same values
    lowrank_update_(Wt, A, B, 0.5)
    check_one_rounding(Wt, W0, A, B, 0.5)


@pytest.mark.gpu
@cuda
def test_gpu_lowrank_update_tf32x3_option():
    W = randn(4096, 4096, dtype=torch.bfloat16, seed=3).cuda()
    A, B = randn(4096, 1024, seed=4).cuda(), (randn(4096, 1024, seed=5) / 32).cuda()
    W0 = W.clone()
    lowrank_update_(W, A, B, 1.0, input_precision="tf32x3")
    check_one_rounding(W, W0, A, B, 1.0)


# ---------------------------------------------------------------- AOT compile for Hopper (no GPU)
#
# Compiled in one child process without TRITON_INTERPRET (``python tests/test_kernels.py --aot``,
# see helpers.kernels), which reports as JSON.

SM_CASES = [(dt, rows) for dt in ("bf16", "fp16", "fp32") for rows in (True, False)]
LU_CASES = [(dt, conv1d, prec) for dt in ("bf16", "fp32") for conv1d in (False, True) for prec in ("ieee", "tf32x3")]


def _aot_report():
    if why := aot_unavailable():
        return {"skip": why}
    out = {}
    for dt, rows in SM_CASES:
        args = dict(X=f"*{dt}:16", ROWS="*i32:16", C="*fp32:16", TILE_I="*i32:16", TILE_J="*i32:16",
                    n_rows="i32", d="i32:16", stride_xn="i32:16", stride_c="i32:16")
        precision = sm.FP32_INPUT_PRECISION if dt == "fp32" else None
        config = sm.GPU_CONFIG[{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]]
        out[f"sm-{dt}-{rows}"] = aot_facts(aot_compile(sm._second_moment_kernel, args, config, dict(
            stride_xd=1, HAS_ROWS=rows, INTERPRETER=False, INPUT_PRECISION=precision)))
    for dt, conv1d, prec in LU_CASES:
        args = dict(W=f"*{dt}:16", A="*fp32:16", B="*fp32:16", M="i32:16", K="i32:16", R="i32", alpha="fp32",
                    stride_wm="i32:16", stride_wk="i32:16", stride_am="i32:16", stride_bk="i32:16")
        unit = dict(stride_wm=1) if conv1d else dict(stride_wk=1)  # W.T view: rows are contiguous
        out[f"lu-{dt}-{conv1d}-{prec}"] = aot_facts(aot_compile(lu._lowrank_update_kernel, args, lu.GPU_CONFIG, dict(
            unit, stride_ar=1, stride_br=1, INTERPRETER=False, INPUT_PRECISION=prec)))
    return out


@pytest.fixture(scope="module")
def aot():
    return aot_child_report(__file__)


@pytest.mark.parametrize("dtype,has_rows", SM_CASES)
def test_aot_second_moment_hopper(aot, dtype, has_rows):
    facts = aot[f"sm-{dtype}-{has_rows}"]
    assert facts["wgmma"]  # 16-bit and tf32x3 dots both run on Hopper's tensor cores
    assert facts["shared"] <= 232448  # fits sm_90's 227 KiB of shared memory per block
    assert_no_spills(facts)


@pytest.mark.parametrize("dtype,conv1d,precision", LU_CASES)
def test_aot_lowrank_update_hopper(aot, dtype, conv1d, precision):
    facts = aot[f"lu-{dtype}-{conv1d}-{precision}"]
    # ieee fp32 has no tensor-core instruction (FMA dot; the shipped default); tf32x3 uses wgmma.
    assert facts["wgmma"] == (precision == "tf32x3")
    assert_no_spills(facts)


if __name__ == "__main__" and sys.argv[1:] == ["--aot"]:
    print(json.dumps(_aot_report()))
