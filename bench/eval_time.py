"""Time the general-ability evaluation task by task (each task's result is written as it ends).

    python bench/eval_time.py --model smollm2-135m --protocol standard [--limit N] --out DIR

Writes DIR/<task>.json (the runner's per-task JSON plus wall seconds) and prints one line per
task, so a long full run leaves a record of every task it finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from editfast.core.paths import write_json
from editfast.eval.runner import evaluate
from editfast.eval.tasks import resolve_tasks
from editfast.models.load import load_model

CHEAP_FIRST = ["rte", "sst2", "mutual", "wikitext", "boolq", "samsum", "nq", "conll03", "gsm8k"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--protocol", default="standard")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tasks", default=",".join(CHEAP_FIRST))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lm = load_model(args.model)
    for task in resolve_tasks(args.tasks):
        t = time.perf_counter()
        res = evaluate(lm, task.name, args.protocol, args.limit, progress=False)
        wall = time.perf_counter() - t
        tr = res.tasks[0]
        doc = tr.to_json(lm.spec, 0) | {"wall_s": wall, "engine": res.engine}
        write_json(Path(args.out) / f"{task.name}.json", doc)
        print(json.dumps({"task": task.name, "n": tr.n, "requests": tr.requests, "wall_s": round(wall, 1),
                          "req_per_s": round(tr.requests / wall, 2), tr.primary: tr.metrics[tr.primary]}), flush=True)


if __name__ == "__main__":
    main()
