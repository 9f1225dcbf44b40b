"""Benchmark rows of sequential sessions: what checkpoints and resume cost against the edits.

- checkpoint overhead: a MEMIT session with 5 checkpoints (edit metrics of the facts edited so
  far, two tasks, weight analysis) against the same session's edits alone; and the checkpoints'
  evaluation against calling ``evaluate()`` at each one (requests rebuilt, a new engine), which is
  what a script around ``editfast eval`` would do;
- resume: continuing a finished run from its journal (read, check, replay every batch) against
  running it.
"""

from __future__ import annotations

import tempfile
import time

import torch

from bench.kernel_rows import device_name, row
from editfast.data.requests import load_dataset
from editfast.eval.runner import evaluate
from editfast.models.load import load_model
from editfast.models.update import restore
from editfast.session.session import EditSession


def session_rows(model: str, quick: bool, device: str, dtype: str) -> list[dict]:
    lm = load_model(model, device=device, dtype=dtype)
    dev = device_name(torch.device(device))
    n, bs = (10, 2) if quick else (50, 10)
    tasks, limit = "sst2,rte", 20 if quick else 100
    reqs = load_dataset("counterfact", n)
    at = [0] + [round(n * i / 4 / bs) * bs for i in range(1, 5)]
    kw = dict(batch_size=bs, templates="fixed", progress=False, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        EditSession(lm, "memit", reqs[:bs], evaluate=False, **kw).run()  # warm: statistics cached, threads up
        s = EditSession(lm, "memit", reqs, evaluate=False, out=f"{tmp}/plain", **kw)
        restore_all = s.base
        t = time.perf_counter()
        plain = s.run()
        plain_s = time.perf_counter() - t
        restore(lm, restore_all)
        s = EditSession(lm, "memit", reqs, eval_tasks=tasks, eval_limit=limit, eval_at=at, out=f"{tmp}/curve", **kw)
        t = time.perf_counter()
        res = s.run()
        curve_s = time.perf_counter() - t
        ck = [p["eval_s"] for p in res.curve["points"]]
        rows.append(row("session: 5 checkpoints vs edits alone", dev,
                        f"{model}, MEMIT n={n} in batches of {bs}, {tasks} x {limit} + edit metrics", dtype,
                        plain_s, curve_s, f"checkpoints {sum(ck):.1f}s ({sum(ck) / plain_s:.0%} of the edits), "
                                          f"{sum(ck) / len(ck):.1f}s each; ratio < 1 is the overhead"))
        # the same checkpoint evaluations the naive way: evaluate() (requests rebuilt, new engine) at each
        t = time.perf_counter()
        for _ in at:
            evaluate(lm, tasks, "standard", limit, 0, progress=False)
        naive_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in at:
            s.evaluator.run()
        once_s = time.perf_counter() - t
        rows.append(row("checkpoint tasks: plan built once vs evaluate() each time", dev,
                        f"{model}, {len(at)} checkpoints, {tasks} x {limit}", dtype, naive_s, once_s, ""))
        # resume a finished run: read the journal, check, replay every batch
        restore(lm, restore_all)
        t = time.perf_counter()
        EditSession(lm, "memit", reqs, evaluate=False, out=f"{tmp}/plain", **kw).run(resume=True)
        resume_s = time.perf_counter() - t
        restore(lm, restore_all)
        rows.append(row("resume (journal replay) vs the run", dev, f"{model}, MEMIT n={n}, {n // bs} batches", dtype,
                        plain.timings["edit_s"], resume_s, "resume includes statistics from cache and templates"))
    return rows


if __name__ == "__main__":
    from bench.run import print_table

    print_table(session_rows("random:tiny-llama", True, "cpu", "float32"))
