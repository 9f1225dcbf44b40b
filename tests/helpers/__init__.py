"""What several test modules share that is not a fixture (fixtures live in ``tests/conftest.py``).

A test module imports these (``from helpers import run_cli``), never another test module; the
kernels' harness is in ``helpers.kernels``, the golden-set harness in ``helpers.golden``, a GGUF
writer in ``helpers.gguf``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The reference vectors of the original ROME/MEMIT code ($EDITFAST_GOLDEN_DIR, else ../shared/golden
# beside the checkout).
GOLDEN = Path(os.environ.get("EDITFAST_GOLDEN_DIR", Path(__file__).resolve().parents[3] / "shared" / "golden"))

# Records of the bundled CounterFact (500 cases) whose true object SmolLM2-135M-Instruct already
# predicts greedily (first token). The SmolLM2 preset was tuned on other facts (bench/tune_preset.py).
KNOWN = [52, 72, 122, 154, 163, 204, 212, 233, 242, 312]

# A small study on tiny-llama: three runs, an evaluation, a quick profile.
STUDY = """
name: tiny
model: random:tiny-llama
dataset: zsre-alt
templates: fixed
eval: {tasks: "sst2,wikitext", limit: 4, limits: {wikitext: 1}}
runs:
  - {name: rome-seq, method: rome, setting: sequential, n: 2, eval_at: [0, 1, 2]}
  - {name: memit-batch, method: memit, setting: batch, sizes: [1, 2]}
  - {name: memit-seq, method: memit, setting: batches, batch_size: 1, batches: 2}
profiles:
  quick: {eval: {limit: 2}, only: [rome-seq], runs: {rome-seq: {n: 1, eval_at: [0, 1]}}}
"""


def run_cli(argv, capsys):
    """Run the CLI's entry point in-process: (exit code, stdout, stderr)."""
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


def weights(lm) -> dict:
    """A copy of every parameter and buffer of ``lm``'s model (``lm.model.load_state_dict`` restores it)."""
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def reset(lm, saved: dict) -> None:
    """``lm`` as loaded again after a test: the weights ``saved`` put back, every routed memory removed
    and its record of changes cleared (a shared fixture is never handed on edited)."""
    from editfast.models import routing

    lm.model.load_state_dict(saved)
    routing.uninstall(lm.model)
    lm.changes.clear()


_USER_CACHE = os.environ.get("EDITFAST_CACHE")  # as the run began, before any test's monkeypatch
_SMOLLM2: list = []


def smollm2():
    """SmolLM2-135M, loaded once per process (the ``smol`` fixture and the golden cases share it),
    converted into (or read from) the cache in effect when the test run began, whatever cache the
    calling test has set."""
    if not _SMOLLM2:
        from editfast.models.load import load_model

        with pytest.MonkeyPatch.context() as mp:
            if _USER_CACHE is None:
                mp.delenv("EDITFAST_CACHE", raising=False)
            else:
                mp.setenv("EDITFAST_CACHE", _USER_CACHE)
            _SMOLLM2.append(load_model("smollm2-135m"))
    return _SMOLLM2[0]
