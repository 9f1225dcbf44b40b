"""UltraEdit: the benchmark row (fast path vs the original algorithm step by step) and the tuning
of its SmolLM2 preset.

    python bench/ultraedit_rows.py [--n 1000] [--model smollm2-135m]     # the row
    python bench/ultraedit_rows.py --tune [--facts 100]                  # the preset's grid
    python bench/ultraedit_rows.py --eval-run RUN --sample 1000          # edit metrics of a run, sampled

The row: a lifelong UltraEdit session of ``--n`` CounterFact-full requests in turns of 100, run
twice in the same process from the same base weights: ``backend="fast"`` (every sub-batch of a turn
in few forward/backward passes, LM head at the answer positions only, the ridge solved in its
dual N × N form as low-rank factors) against ``backend="reference"`` (the original's
``cache`` + ``predict_param_shifts``: one forward/backward per sub-batch of 10 with full logits,
the edited weights requiring gradients and module hooks, normalisation in padded blocks of 128,
the float32 d_in × d_in primal solve per module, dense ΔW). Edit time only (no metrics); the
original also writes and re-reads every turn's keys on disk, which the reference leaves out.
``ratio = reference_s / fast_s``; ``extra`` gives edits/s and the largest relative difference of
the two paths' final weights' changes.

The tuning (``--tune``): held-out CounterFact facts the tests and the scale run never see (the
requests of counterfact-full after its first 20,000, minus the 500 bundled records), ``--facts``
of them edited from the unedited model in turns of 100, every grid point in turn; edit metrics of
all of them after the last turn; the point with the best mean of efficacy, paraphrase and
neighbourhood success wins.
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
from editfast.eval.edit_metrics import (
    edit_metrics,  # noqa: E402
    summarize,  # noqa: E402
)
from editfast.models.load import load_model  # noqa: E402
from editfast.models.update import restore  # noqa: E402
from editfast.session.session import EditSession


def ultraedit_rows(model: str, quick: bool, device: str, dtype: str, n: int | None = None) -> list[dict]:
    lm = load_model(model, device=device, dtype=dtype)
    dev = device_name(torch.device(device))
    n = n or (200 if quick else 1000)
    reqs = load_dataset("counterfact-full", n)
    kw = dict(batch_size=100, evaluate=False, progress=False, seed=0)
    EditSession(lm, "ultraedit", reqs[:10], **kw).run()  # warm up (threads, tokenizer caches)
    times, deltas = {}, {}
    for backend in ("reference", "fast"):
        s = EditSession(lm, "ultraedit", reqs, backend=backend, **kw)
        base = s.base
        restore(lm, base)
        t = time.perf_counter()
        s.run()
        times[backend] = time.perf_counter() - t
        deltas[backend] = {w: (s.lm.model.get_parameter(w).detach() - w0).double() for w, w0 in base.items()}
        restore(lm, base)
    err = max(((deltas["fast"][w] - deltas["reference"][w]).norm() / deltas["reference"][w].norm()).item()
              for w in deltas["fast"])
    ref_s, fast_s = times["reference"], times["fast"]
    return [row("UltraEdit lifelong session: fast vs original", dev,
                f"{model}, n={n} in turns of 100 (counterfact-full)", dtype, ref_s, fast_s,
                f"{n / fast_s:.1f} edits/s vs {n / ref_s:.1f}; max rel ΔW difference {err:.1e}")]


def held_out(limit: int) -> list:
    """counterfact-full after its first 20,000 requests, minus the 500 bundled records."""
    bundled = {r.case_id for r in load_dataset("counterfact")}
    return [r for r in load_dataset("counterfact-full")[20000:] if r.case_id not in bundled][:limit]


GRID_MODULES = {  # name -> (layers, modules)
    "down 19-27 (GPT-J-like)": (list(range(19, 28)), ["rewrite"]),
    "gate 10-14 + up 17-23 (Llama-3-like)": (list(range(10, 15)) + list(range(17, 24)),
                                             ["mlp.gate_proj"] * 5 + ["mlp.up_proj"] * 7),
}


def tune(model: str, facts: int, lrs: list[float], only: str | None, out: str | None, pre: bool = True) -> None:
    torch.manual_seed(0)
    lm = load_model(model)
    reqs = held_out(facts)
    print(f"{len(reqs)} held-out requests, case ids {reqs[0].case_id}..{reqs[-1].case_id}", flush=True)
    pre = summarize(edit_metrics(lm, reqs, "counterfact")) if pre else {}
    print("unedited", json.dumps({k: round(v, 4) for k, v in pre.items() if isinstance(v, float)}), flush=True)
    results = []
    for name, (layers, modules) in GRID_MODULES.items():
        if only and only not in name:
            continue
        for lr in lrs:
            s = EditSession(lm, "ultraedit", reqs, overrides={"layers": layers, "modules": modules, "lr": lr},
                            batch_size=100, evaluate=False, progress=False)
            t = time.perf_counter()
            s.run()
            edit_s = time.perf_counter() - t
            post = summarize(edit_metrics(lm, reqs, "counterfact"))
            restore(lm, s.base)
            score = (post["efficacy_success"] + post["paraphrase_success"] + post["neighborhood_success"]) / 3
            r = {"modules": name, "lr": lr, "score": score, "edit_s": edit_s,
                 **{k: v for k, v in post.items() if isinstance(v, float)}}
            results.append(r)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    best = max(results, key=lambda r: r["score"])
    print("best", json.dumps(best), flush=True)
    if out:
        Path(out).write_text(json.dumps({"pre": pre, "grid": results, "best": best}, indent=1) + "\n")


def eval_run(run: str, sample: int, seed: int, out: str | None, pre_file: str | None = None,
             pre_only: bool = False) -> dict:
    """Edit metrics of an ``editfast edit --no-eval`` run (finished, or stopped: then of the requests
    its journal holds) on a sample: ``sample`` requests drawn with ``random.Random(seed)`` from those
    edited, scored on the unedited model and again after the journal is replayed onto it (the run's
    weights after its last journaled batch).

    ``pre_only``: score the unedited model only, on a sample of all the run's requests (while it
    runs), into ``pre_file``; a later call with ``pre_file`` reuses it if its sample is the same."""
    import random

    from editfast.models.update import apply_update
    from editfast.session.journal import load_run

    doc = json.loads((Path(run) / "session.json").read_text())["config"]
    ds = doc["dataset"]
    lm = load_model(doc["model"], dtype=doc["dtype"].replace("torch.", ""))
    entries = [] if pre_only else load_run(run, lm)[1]
    done = doc["n"] if pre_only else (entries[-1].end if entries else 0)
    reqs = load_dataset(ds["name"], done, offset=ds.get("offset", 0))
    idx = sorted(random.Random(seed).sample(range(done), min(sample, done)))
    chosen = [reqs[i] for i in idx]
    saved = json.loads(Path(pre_file).read_text()) if pre_file and Path(pre_file).is_file() else None
    t = time.perf_counter()
    if saved is not None and saved["indices"] == idx:
        pre = saved["pre"]
    else:
        pre = summarize(edit_metrics(lm, chosen, "counterfact"))
    pre_s = time.perf_counter() - t
    if pre_only:
        res = {"run": run, "indices": idx, "pre": pre, "pre_eval_s": pre_s}
        Path(pre_file or "pre.json").write_text(json.dumps(res) + "\n")
        print(json.dumps(res["pre"], indent=1), flush=True)
        return res
    t = time.perf_counter()
    for e in entries:
        for u in e.updates:
            apply_update(lm, u)
    replay_s = time.perf_counter() - t
    t = time.perf_counter()
    post = summarize(edit_metrics(lm, chosen, "counterfact"))
    edit_s = sum(e.info.get("seconds") or 0.0 for e in entries)
    res = {"run": run, "edits_done": done, "batches": len(entries), "edit_s": edit_s,
           "edits_per_s": done / max(edit_s, 1e-9), "sample": len(chosen), "seed": seed, "first_indices": idx[:10],
           "pre": pre, "post": post, "pre_eval_s": pre_s, "replay_s": replay_s, "post_eval_s": time.perf_counter() - t}
    print(json.dumps(res, indent=1), flush=True)
    if out:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=None, help="edits of the row (default 1000; --quick 200)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--no-pre", action="store_true", help="skip the unedited model's metrics")
    ap.add_argument("--only", default=None, help="tune only the module sets whose name contains this")
    ap.add_argument("--eval-run", default=None, help="a finished edit run (--no-eval) to score on a sample")
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--pre-json", default=None, help="the unedited model's metrics of the sample (reused if there)")
    ap.add_argument("--pre-only", action="store_true", help="only score the unedited model (into --pre-json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.eval_run:
        eval_run(args.eval_run, args.sample, args.seed, args.json, args.pre_json, args.pre_only)
        return
    if args.tune:
        tune(args.model, args.facts, [float(x) for x in args.lrs.split(",")], args.only, args.json, not args.no_pre)
        return
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    from bench.run import print_table

    rows = ultraedit_rows(args.model, args.quick, device, dtype, args.n)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
