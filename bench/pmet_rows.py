"""PMET: the benchmark rows, batched targets and the edit end to end against the original's path.

    python bench/pmet_rows.py [--n 10] [--model smollm2-135m] [--json FILE]

Rows, each measured in the same process on the same requests and hyper-parameters (the model's
PMET preset; statistics computed once beforehand and shared, not timed):
- targets: PMET's joint attention + MLP optimisation for all ``--n`` facts in one batch
  (``backend="fast"``) against the original's loop, one request at a time with the LM head on
  every position (``"reference"``), and against the same loop with the lean head
  (``"reference-lean"``: what batching alone gains); ``extra``: the largest relative difference of
  the FFN targets z and the steps run;
- PMET end to end (targets, keys, solves, applying): fast against reference (per-request targets,
  float64 solve), from the same weights.
``ratio = reference_s / fast_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.kernel_rows import device_name, row  # noqa: E402
from editfast.data.requests import load_dataset  # noqa: E402
from editfast.methods.locate_then_edit.base import LocateState  # noqa: E402
from editfast.methods.locate_then_edit.solve import Moment  # noqa: E402
from editfast.methods.locate_then_edit.stats import second_moments  # noqa: E402
from editfast.methods.registry import (
    METHODS,
    resolve_hparams,  # noqa: E402
)
from editfast.models.load import load_model  # noqa: E402
from editfast.models.update import restore, snapshot  # noqa: E402
from editfast.session.session import edit_batch


def pmet_rows(model: str, n: int, device: str = "cpu", dtype: str = "float32") -> list[dict]:
    lm = load_model(model, device=device, dtype=dtype)
    dev = device_name(torch.device(device))
    pmet = METHODS["pmet"]
    hp = resolve_hparams("pmet", lm.spec, lm.model.config)
    reqs = load_dataset("counterfact", n)
    groups = pmet.templates(lm, hp, mode="fixed")
    pmet.optimize(lm, reqs[:2], hp, groups)  # warm up (threads, tokenizer caches)
    rows, runs = [], {}
    for backend in ("reference", "reference-lean", "fast"):
        trace: dict = {}
        t = time.perf_counter()
        z = pmet.optimize(lm, reqs, hp, groups, trace=trace, backend=backend)
        runs[backend] = (time.perf_counter() - t, z, sum(len(l) for l in trace["losses"]))
    fast_s, z_fast, _ = runs["fast"]
    for backend, label in (("reference", "per-request (original)"), ("reference-lean", "per-request, lean head")):
        ref_s, z_ref, steps = runs[backend]
        err = ((z_fast - z_ref).norm(dim=0) / z_ref.norm(dim=0)).max().item()
        rows.append(row(f"PMET targets: batched vs {label}", dev, f"{model}, n={n}, {steps} steps in all", dtype,
                        ref_s, fast_s, f"max rel z difference {err:.1e}"))

    moments = second_moments(lm, hp.layers, hp, progress=False)
    base = snapshot(lm, pmet.sites(lm, hp))
    times = {}
    for backend in ("reference", "fast"):
        state = LocateState(moments={l: Moment(c) for l, c in moments.items()})
        t = time.perf_counter()
        edit_batch(lm, pmet, reqs, hp, state, groups, backend=backend)
        times[backend] = time.perf_counter() - t
        restore(lm, base)
    rows.append(row("PMET end to end (excl. statistics)", dev, f"{model}, n={n}, layers {hp.layers}", dtype,
                    times["reference"], times["fast"],
                    f"{n / times['fast']:.2f} edits/s vs {n / times['reference']:.2f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = pmet_rows(args.model, args.n, args.device, args.dtype)
    print("| row | device | sizes | dtype | reference s | editfast s | ratio | extra |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['device']} | {r['sizes']} | {r['dtype']} | {r['baseline_s']:.2f} | "
              f"{r['editfast_s']:.2f} | {r['ratio']:.2f}x | {r['extra']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
