"""Shared test settings.

- TRITON_INTERPRET=1 when no CUDA device exists, set before any kernel module is imported, so
  the Triton kernels run (slowly, exactly) on the CPU.
- One torch thread: the CI machine has 2 cores and the tests are small; two threads fighting
  another process made small matmuls up to 100x slower.
- GOLDEN: the reference vectors of the original ROME/MEMIT code ($EDITFAST_GOLDEN_DIR).
"""

import os
from pathlib import Path

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(int(os.environ.get("EDITFAST_TEST_THREADS", "1")))
except ImportError:  # pragma: no cover
    pass

GOLDEN = Path(os.environ.get("EDITFAST_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def run_cli(argv, capsys):
    """Run the CLI's entry point in-process: (exit code, stdout, stderr)."""
    import pytest
    from editfast.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def assert_refused(argv, capsys, *words, absent=(), code=2):
    """Run the CLI in-process and assert a clean refusal: exit ``code`` (2 for bad input), exactly one
    line on stderr starting "editfast: error:" with no traceback, each of ``words`` in that line
    (case-insensitive), and none of the ``absent`` paths left on disk. Returns the line."""
    got, _, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert got == code, f"exit {got}, stderr: {err}"
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("editfast: error:"), err
    for w in words:
        assert str(w).lower() in lines[0].lower(), (w, lines[0])
    for p in absent:
        assert not Path(p).exists(), f"{p} was left behind"
    return lines[0]
