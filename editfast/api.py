"""The edit job: statistics, sequential batches of edits, edit metrics before and after.

    lm = editfast.load_model("smollm2-135m")
    reqs = editfast.load_dataset("counterfact", n=10)
    result = editfast.edit(lm, reqs, method="memit", seed=0)
    print(result.summary["post"]["efficacy_success"])
    result.save("runs/memit-10")

A thin wrapper over ``EditSession`` (``session.py``). The model is edited in place. If anything
fails, every edited weight is restored bit for bit to the last good batch. Undo exactly by replay
from the base weights (``apply_update(lm, u, alpha=-1)`` rounds a second time, so it is not exact):

    s = editfast.EditSession(lm, "memit", reqs)
    s.run()
    s.undo(0)        # bit for bit the model before; s.undo(k) keeps the first k edits
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from editfast.data.requests import Request
from editfast.methods.hparams import HParams
from editfast.models.update import Update
from editfast.session.journal import load_run
from editfast.session.session import EditResult, EditSession


def edit(lm, requests: Sequence[Request], method: str = "memit", *, hparams: HParams | None = None,
         hparams_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
         batch_size: int | None = None, seed: int = 0, templates: str | list[list[str]] = "generated",
         evaluate: bool = True, eval_batch_size: int = 32, progress: bool = True,
         backend: str = "fast", **session_kw) -> EditResult:
    """Apply ``requests`` to ``lm`` (in place) with ``method`` and measure the edit metrics.

    ``backend="fast"`` (default) optimises all targets of a batch together and solves with the
    factorise-once fp32 path; ``"reference"`` runs the original algorithm step by step (one
    target at a time, float64 solve). Both give the same updates within float tolerance.
    Further keywords (``eval_tasks``, ``eval_at``, ``out`` ...) go to ``EditSession``.
    """
    return EditSession(lm, method, requests, hparams=hparams, hparams_file=hparams_file, overrides=overrides,
                       batch_size=batch_size, seed=seed, templates=templates, backend=backend, evaluate=evaluate,
                       eval_batch_size=eval_batch_size, progress=progress, **session_kw).run()


def load_journal(run_dir: str | Path, lm=None) -> tuple[dict[str, Any], list[list[Update]]]:
    """The config and updates (one list per batch) of an ``editfast edit`` run directory.

    The run is validated whole before it is returned (``journal.load_run``): its config document,
    every journal entry, and with ``lm`` the model fingerprint and each update's weight, shape,
    dtype and finiteness, so a bad run is refused (EditfastError, one line) before any work."""
    config, entries = load_run(run_dir, lm)
    return config, [e.updates for e in entries]
