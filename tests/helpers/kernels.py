"""The kernel tests' shared pieces: exact and random inputs, and the ahead-of-time (AOT) compile
for Hopper (sm_90) that needs no GPU.

Triton's code generator does not work in a process that imported triton with TRITON_INTERPRET=1
(its standard library is then interpreted), so a test module compiles its kernels in one child
process without it (``python tests/test_kernels.py --aot``, see `aot_child_report`), which
reports as JSON.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def exact(*shape, dtype=torch.float32, seed=0):
    """Multiples of 1/4 in [-2, 2]: exact in every dtype (tf32 too), products and sums exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=g) / 4).to(dtype)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def aot_compile(kernel, args, config, constexprs):
    """Compile ``kernel`` for sm_90 as a real launch specialises it.

    ``args``: name → type ("*bf16", "i32", ...; a trailing ":16" marks a pointer or int the JIT
    would see as divisible by 16). Unit strides go in ``constexprs`` (the JIT specialises ints
    equal to 1). ``config``: the shipped GPU_CONFIG (upper case: block sizes, else options).
    """
    fn = kernel
    constexprs = {**constexprs, **{k: v for k, v in config.items() if k.isupper()}}
    signature, attrs = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty, _, div = args[name].partition(":")
        signature[name] = ty
        if div:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = triton.backends.compiler.GPUTarget("cuda", 90, 32)
    return triton.compile(src, target=target, options={k: v for k, v in config.items() if not k.isupper()})


def aot_facts(compiled):
    """What the tests assert on: tensor-core instructions, shared memory, local memory use."""
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([TOOLS / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True, text=True)
        sass = subprocess.run([TOOLS / "nvdisasm", cubin], capture_output=True, text=True)
    return dict(wgmma="wgmma" in ptx, ptx_local="ld.local" in ptx or "st.local" in ptx, shared=compiled.metadata.shared,
                usage=usage.stdout.strip().splitlines()[-1] if usage.returncode == 0 else "error: " + usage.stderr,
                sass_local=bool(re.search(r"\b(LDL|STL)\b", sass.stdout)) if sass.returncode == 0 else None)


def aot_unavailable():
    """Why kernels cannot be compiled for sm_90 here (None: they can)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        return f"triton has no NVIDIA backend: {e}"
    if not (TOOLS / "ptxas").exists():
        return f"ptxas is not shipped at {TOOLS}"
    return None


def aot_child_report(script):
    """Run ``python script --aot`` without TRITON_INTERPRET; its last stdout line is a JSON report
    (``{"skip": reason}`` skips the calling test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--aot"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    return report


def assert_no_spills(facts):
    assert not facts["ptx_local"], "PTX uses local memory"
    assert "LOCAL:0" in facts["usage"] and "STACK:0" in facts["usage"], facts["usage"]
    assert facts["sass_local"] is False, "register spills (LDL/STL) in SASS"
