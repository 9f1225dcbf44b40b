"""The 10-edit MEMIT job quiet and beside a competing CPU load, fast path and reference path.

    python bench/load_rows.py [--model smollm2-135m] [--n 10] [--busy 2] [--json FILE]
    python bench/load_rows.py --one fast          # one timing in this process (used by the driver)

Each timing runs in a fresh process (its threads and OpenMP settings as a user's would be: the
process's own defaults), with the statistics cached beforehand and fixed context templates, and
times ``memit.edit`` on the same n CounterFact requests. The load is ``--busy`` processes that
spin a core each (pure Python loops: another job on a user's laptop), started before the timed
process and stopped after it. Goal (issue 12): the fast path slows by no more than the
reference path does, and stays >= 3x faster than it under load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(model: str, n: int, backend: str) -> dict:
    """Time one MEMIT batch of n edits in this process (OpenMP's wait policy chosen as the CLI does)."""
    from editfast.core.threads import choose_wait_policy

    choose_wait_policy()
    import torch

    from editfast.data.requests import load_dataset
    from editfast.methods.registry import METHODS, resolve_hparams
    from editfast.models.load import load_model
    from editfast.session.session import edit_batch

    lm = load_model(model)
    memit = METHODS["memit"]
    hp = resolve_hparams("memit", lm.spec, lm.model.config)
    state = memit.prepare(lm, hp, progress=False)  # cached statistics
    groups = memit.templates(lm, hp, mode="fixed")
    reqs = load_dataset("counterfact", n)
    t = time.perf_counter()
    edit_batch(lm, memit, reqs, hp, state, groups, backend=backend)
    return {"backend": backend, "seconds": time.perf_counter() - t, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def spin() -> None:  # pragma: no cover - a load generator
    while True:
        pass


@contextmanager
def busy_processes(n: int):
    """``n`` processes spinning a core each while the block runs."""
    procs = [mp.Process(target=spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.join()


def timed_child(model: str, n: int, backend: str, busy: int, env: dict | None = None) -> dict:
    with busy_processes(busy):
        out = subprocess.run([sys.executable, __file__, "--one", backend, "--model", model, "--n", str(n)],
                             capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def job(model: str, n: int, busy: int, env: dict | None = None) -> float:
    """Seconds of the whole ``editfast edit --n N`` job (load, templates, statistics cached, metrics)."""
    import tempfile

    with busy_processes(busy), tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "editfast.cli", "edit", "--model", model, "--n", str(n), "--quiet",
                        "--out", f"{d}/run"], env={**os.environ, **(env or {})}, check=True, capture_output=True)
        return time.perf_counter() - t


def load_rows(model: str, n: int, busy: int) -> list[dict]:
    times, policy = {}, {}
    for backend in ("fast", "reference"):
        for load in (0, busy):
            r = timed_child(model, n, backend, load)
            times[backend, load], policy[backend, load] = r["seconds"], r["omp_wait_policy"]
    rows = []
    for load in (0, busy):
        ref, fast = times["reference", load], times["fast", load]
        rows.append({"name": f"MEMIT {n} edits, {'quiet' if not load else f'{load} busy processes'}",
                     "model": model, "reference_s": ref, "editfast_s": fast, "ratio": ref / fast,
                     "omp_wait_policy": policy["fast", load]})
    rows.append({"name": "slowdown under load (loaded / quiet)", "model": model,
                 "reference_x": times["reference", busy] / times["reference", 0],
                 "editfast_x": times["fast", busy] / times["fast", 0]})
    jobs = {(load, pol): job(model, n, load, {"OMP_WAIT_POLICY": pol} if pol else None)
            for load, pol in ((0, None), (busy, "ACTIVE"), (busy, None))}
    rows.append({"name": f"whole 'editfast edit --n {n}' job (fast path)", "model": model,
                 "quiet_s": jobs[0, None], "loaded_spinning_s": jobs[busy, "ACTIVE"], "loaded_s": jobs[busy, None],
                 "slowdown_x": jobs[busy, None] / jobs[0, None]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--one", choices=("fast", "reference"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.n, args.one)))
        return
    rows = load_rows(args.model, args.n, args.busy)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
