"""A study's plan before it runs: its sessions, edits, checkpoints and tasks, and the time each
session should take on this machine, from a short calibration.

    plan = plan_study(study, lm, requests, evaluators(lm, study))   # calibrates (cached)
    print(plan_md(plan))

The calibration edits ``CALIBRATION_FACTS`` facts of the study's stream with each distinct run
(method and hyper-parameters), restoring the weights after each (cached by the model's
fingerprint, dtype, device, thread count and what it measured, so a repeated plan costs nothing),
and times a tenth of one checkpoint's evaluation (``CALIBRATION_SHARE`` of each task's examples, at
least one, at most ``CALIBRATION_EXAMPLES``) on the unedited model, cached by the evaluator, so a
repeated plan reads it back. The estimate scales linearly: seconds per fact × facts, seconds per
example × examples per checkpoint, edit metrics per fact × the facts each checkpoint scores. Target optimisation of a batch runs its facts
together, so a batch of 100 costs less per fact than a batch of 2: the estimate errs high there.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from editfast.core.paths import cache_dir, write_cache
from editfast.eval.evaluator import Evaluator
from editfast.session.session import EditSession

CALIBRATION_FACTS = 2
CALIBRATION_SHARE = 0.1  # of a checkpoint's examples per task (at least 1: WikiText's are whole articles) ...
CALIBRATION_EXAMPLES = 20  # ... and at most this many
CALIBRATION_VERSION = 1


def sessions_of(run: dict) -> list[dict]:
    """The sessions of one run: name, n, batch size, checkpoints."""
    s = run["setting"]
    if s == "sequential":
        n = int(run["n"])
        bs = int(run.get("batch_size") or 1)
        return [{"dir": run["name"], "n": n, "batch_size": bs, "eval_at": run.get("eval_at") or [0, n]}]
    if s == "batch":
        return [{"dir": f"{run['name']}-{b}", "n": int(b), "batch_size": int(b), "eval_at": [0, int(b)]}
                for b in run["sizes"]]
    b, k = int(run["batch_size"]), int(run["batches"])
    return [{"dir": run["name"], "n": b * k, "batch_size": b, "eval_at": [i * b for i in range(k + 1)]}]


def run_protocols(study: dict, run: dict) -> list[str]:
    """The protocols a run is evaluated under: its own, else the study's, else standard."""
    return run.get("protocols") or (study.get("eval") or {}).get("protocols") or ["standard"]


def evaluators(lm, study: dict, progress: bool = False) -> dict[tuple, Evaluator]:
    """One evaluator per set of protocols the runs use: each task's requests built once."""
    ev = study.get("eval") or {}
    out: dict[tuple, Evaluator] = {}
    for r in study["runs"] if ev.get("tasks") else ():
        p = tuple(run_protocols(study, r))
        if p not in out:
            out[p] = Evaluator(lm, ev["tasks"], list(p) if len(p) > 1 else p[0], ev.get("limit"),
                               int(study.get("seed", 0)), progress, ev.get("limits"))
    return out


def run_key(run: dict) -> str:
    """What a run's edit cost depends on: its method and hyper-parameters (and one fact per batch or more)."""
    one = run["setting"] == "sequential" and int(run.get("batch_size") or 1) == 1
    return json.dumps([run["method"], run.get("hparams") or {}, one], sort_keys=True)


def _examples(e: Evaluator) -> dict[str, int]:
    """Examples per task key ("task" or "task:protocol") that one checkpoint evaluates."""
    return {e.key(t.name, p): len(examples) for p, _, plan in e.plans for t, examples, _ in plan.entries}


def calibrate(lm, study: dict, requests: list, evals: dict[tuple, Evaluator], progress: bool = False) -> dict:
    """Seconds per fact (editing, edit metrics) and per checkpoint (weight analysis) for each run key,
    from ``CALIBRATION_FACTS`` facts (cached: read back when this machine measured the same before),
    and seconds per example of each task from one checkpoint's evaluation: the unedited model's,
    which the evaluator caches, so the study's first checkpoint reads it back."""
    ev = study.get("eval") or {}
    ident = [CALIBRATION_VERSION, lm.fingerprint, str(lm.dtype), lm.device.type, torch.get_num_threads(),
             study.get("templates", "generated"), ev.get("edit_metrics", True), ev.get("thresholds"),
             [r.case_id for r in requests[:CALIBRATION_FACTS]]]
    runs: dict[str, dict] = {}
    cached = []
    for r in study["runs"]:  # each run key cached on its own: an interrupted calibration keeps what it measured
        k = run_key(r)
        if k in runs:
            continue
        f = cache_dir() / "study-plan" / f"{hashlib.sha256(json.dumps([*ident, k]).encode()).hexdigest()[:24]}.json"
        if f.is_file():
            try:
                runs[k] = json.loads(f.read_text())
                cached.append(str(f))
                continue
            except (OSError, ValueError) as e:
                warnings.warn(f"ignoring the corrupt calibration {f} ({e}); calibrating again", RuntimeWarning,
                              stacklevel=2)
        runs[k] = _calibrate_edit(lm, study, r, requests[:CALIBRATION_FACTS])
        write_cache(f, json.dumps(runs[k], indent=2) + "\n")
    doc = {"facts": CALIBRATION_FACTS, "threads": torch.get_num_threads(), "runs": runs,
           "cached": str(Path(cached[0]).parent) if len(cached) == len(runs) else None}
    t0 = time.perf_counter()
    tasks: dict[str, float] = {}
    for protocols, e in evals.items():
        names = {t.name: len(ex) for _, _, plan in e.plans for t, ex, _ in plan.entries}
        few = {t: max(1, min(CALIBRATION_EXAMPLES, math.ceil(n * CALIBRATION_SHARE))) for t, n in names.items()}
        small = Evaluator(lm, ev["tasks"], list(protocols) if len(protocols) > 1 else protocols[0], None,
                          int(study.get("seed", 0)), progress, few)
        tasks.update({k: r["seconds"] / max(r["n"], 1) for k, r in small.run(base=True).items()})
    return {**doc, "task_s_per_example": tasks, "checkpoint_s": time.perf_counter() - t0}


def _calibrate_edit(lm, study: dict, r: dict, facts: list) -> dict:
    """One run's seconds per fact (editing, edit metrics) and per weight analysis, on ``facts``."""
    ev = study.get("eval") or {}
    t0 = time.perf_counter()
    s = EditSession(lm, r["method"], facts, overrides=r.get("hparams"),
                    batch_size=1 if json.loads(run_key(r))[2] else len(facts), seed=int(study.get("seed", 0)),
                    evaluate=ev.get("edit_metrics", True), templates=study.get("templates", "generated"),
                    progress=False, thresholds=ev.get("thresholds") or (0.077, 0.171))
    try:
        tm = s.run().timings
        t = time.perf_counter()
        s.weight_changes()
        weights_s = time.perf_counter() - t
    finally:
        s.release()
    return {"method": r["method"], "edit_s_per_fact": tm["edit_s"] / len(facts),
            "edit_metrics_s_per_fact": (tm.get("eval_pre_s", 0.0) + tm.get("eval_post_s", 0.0)) / (2 * len(facts)),
            "weights_s": weights_s, "seconds": time.perf_counter() - t0}


def plan_study(study: dict, lm, requests: list, evals: dict[tuple, Evaluator], progress: bool = False) -> dict[str, Any]:
    """Every session with its edits, checkpoints, examples per task and estimated seconds (editing,
    checkpoints, total); the unedited evaluation counted once (none where it is cached already)."""
    cal = calibrate(lm, study, requests, evals, progress)
    ev = study.get("eval") or {}
    em_on = ev.get("edit_metrics", True)
    base_done = {p: all(e.cache_file(t.name, pr, lim).is_file() for pr, lim, plan in e.plans for t, _, _ in plan.entries)
                 for p, e in evals.items()}  # the unedited evaluation, cached by an earlier study: read back
    sessions = []
    for r in study["runs"]:
        c = cal["runs"][run_key(r)]
        p = tuple(run_protocols(study, r))
        e = evals.get(p)
        examples = _examples(e) if e else {}
        per_ck = sum(cal["task_s_per_example"].get(k, 0.0) * n for k, n in examples.items())
        for s in sessions_of(r):
            n, em = s["n"], c["edit_metrics_s_per_fact"] if em_on else 0.0
            ck = em * n * (1 if n in s["eval_at"] else 2)  # before the edits; after them where no checkpoint scored all
            for k in s["eval_at"]:
                ck += em * (k or n) + c["weights_s"]
                if e is not None and not (k == 0 and base_done.get(p)):
                    ck += per_ck
                if k == 0:
                    base_done[p] = True
            edits = c["edit_s_per_fact"] * n
            sessions.append({"run": r["name"], "session": s["dir"], "method": r["method"], "n": n,
                             "batch_size": s["batch_size"], "eval_at": s["eval_at"], "protocols": list(p),
                             "examples": examples, "edits_s": edits, "checkpoints_s": ck, "total_s": edits + ck})
    return {"study": study.get("name"), "model": lm.spec, "model_fingerprint": lm.fingerprint,
            "calibration": cal, "sessions": sessions, "total_s": sum(s["total_s"] for s in sessions)}


def duration(s: float | None) -> str:
    """Seconds as a reader reads them: 45 s, 12 min, 3.4 h."""
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 90 * 60 else f"{s / 3600:.1f} h"


def plan_md(plan: dict) -> str:
    """The plan as text: what runs, on what, and how long each session should take here."""
    st, cal = plan, plan["calibration"]
    tasks = dict.fromkeys(k for s in st["sessions"] for k in s["examples"])
    n_ex = {k: next(s["examples"][k] for s in st["sessions"] if k in s["examples"]) for k in tasks}
    head = (f"Plan of study {st['study']} on {st['model']}: {len(st['sessions'])} sessions, "
            f"{sum(s['n'] for s in st['sessions']):,} edits, {sum(len(s['eval_at']) for s in st['sessions'])} checkpoints")
    out = [head,
           "tasks (examples per checkpoint): " + (", ".join(f"{k} {n}" for k, n in n_ex.items()) or "none"),
           f"calibration on {cal['threads']} thread(s): {cal['facts']} facts edited per method ("
           + (f"read from {cal['cached']}" if cal.get("cached") else
              f"{duration(sum(r['seconds'] for r in cal['runs'].values()))}") + "), a tenth of a checkpoint's "
           f"evaluation of the unedited model ({duration(cal['checkpoint_s'])}; 0 s when cached)",
           "", "| session | method | edits | per batch | checkpoints | editing | checkpoints | estimate |",
           "|---|---|---|---|---|---|---|---|"]
    for s in st["sessions"]:
        out.append(f"| {s['session']} | {s['method']} | {s['n']:,} | {s['batch_size']} | "
                   f"{', '.join(f'{k:,}' for k in s['eval_at'])} | {duration(s['edits_s'])} | "
                   f"{duration(s['checkpoints_s'])} | {duration(s['total_s'])} |")
    out += ["", f"Estimated total: {duration(st['total_s'])} ({st['total_s']:.0f} s), one session after another."]
    return "\n".join(out)
