"""Soak: a long sequential MEMIT run killed with -9 at random times and resumed each time ends with
the same weights, bit for bit, as the same run left alone.

    python bench/soak.py [--n 500] [--batch-size 10] [--every 100] [--kills 3] [--seed 0] --out DIR

Runs ``editfast edit`` twice at the same time (one thread each, so that the two share the
machine evenly): A uninterrupted, B killed with SIGKILL at ``--kills`` random times (uniform in
[20 s, 480 s] after each start by default, seeded) and restarted with ``--resume`` until it finishes. Then
compares the saved models tensor by tensor and the curves' edit metrics, and writes
``DIR/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def command(out: Path, n: int, batch: int, every: int, model: str, resume: bool = False) -> list[str]:
    at = ",".join(str(k) for k in range(0, n + 1, every))
    return [sys.executable, "-m", "editfast.cli", "edit", "--method", "memit", "--model", model, "--n", str(n),
            "--batch-size", str(batch), "--eval-at", at, "--save-model", "--quiet", "--out", str(out),
            *(["--resume"] if resume else [])]


def batches(out: Path) -> int:
    return len(list((out / "journal").glob("batch-*.safetensors")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--delay", type=float, nargs=2, default=(20.0, 480.0), metavar=("MIN", "MAX"),
                    help="seconds between a (re)start and the next kill, drawn uniformly")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a_dir, b_dir = args.out / "A", args.out / "B"
    rng = random.Random(args.seed)
    t0 = time.time()
    a = subprocess.Popen(command(a_dir, args.n, args.batch_size, args.every, args.model), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    a_done: dict = {}
    waiter = threading.Thread(target=lambda: a_done.update(err=a.communicate()[1], s=time.time() - t0))
    waiter.start()
    kills = []
    b = subprocess.Popen(command(b_dir, args.n, args.batch_size, args.every, args.model), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for i in range(args.kills):
        delay = rng.uniform(*args.delay)
        try:
            b.wait(timeout=delay)
            break  # finished before the kill
        except subprocess.TimeoutExpired:
            pass
        b.send_signal(signal.SIGKILL)
        b.wait()
        kills.append({"after_s": round(delay, 1), "at_s": round(time.time() - t0, 1),
                      "batches_journaled": batches(b_dir) if b_dir.exists() else 0})
        resume = b_dir.exists() and (b_dir / "session.json").is_file()
        b = subprocess.Popen(command(b_dir, args.n, args.batch_size, args.every, args.model, resume=resume), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    b_err = b.communicate()[1]
    b_s = time.time() - t0
    waiter.join()
    a_err, a_s = a_done["err"], a_done["s"]
    assert a.returncode == 0, a_err
    assert b.returncode == 0, b_err

    import torch
    from safetensors.torch import load_file

    wa = load_file(str(a_dir / "model" / "model.safetensors"))
    wb = load_file(str(b_dir / "model" / "model.safetensors"))
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    ca = json.loads((a_dir / "curve.json").read_text())["points"]
    cb = json.loads((b_dir / "curve.json").read_text())["points"]
    same_curve = [p["edit_metrics"] for p in ca] == [p["edit_metrics"] for p in cb]
    doc = {"n": args.n, "batch_size": args.batch_size, "checkpoints": [p["edits"] for p in ca], "kills": kills,
           "uninterrupted_s": round(a_s, 1), "killed_and_resumed_s": round(b_s, 1), "tensors": len(wa),
           "tensors_differing": differ, "bit_identical": not differ, "edit_metrics_identical": same_curve,
           "final_edit_metrics": ca[-1]["edit_metrics"],
           "versions": json.loads((a_dir / "results.json").read_text())["config"]["versions"]}
    (args.out / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    sys.exit(0 if doc["bit_identical"] and same_curve else 1)


if __name__ == "__main__":
    main()
