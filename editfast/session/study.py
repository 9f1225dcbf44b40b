"""The study: a grid of sequential editing sessions on one model and one edit dataset.

A study file (YAML) names the model, the dataset, the evaluation and the runs; each run is one
method in one setting:

    sequential   one fact (or ``batch_size`` facts) after another, checkpoints at ``eval_at``
    batch        one batch of B facts from the unedited model, for each B in ``sizes``
    batches      ``batch_size`` facts per batch, ``batches`` batches in sequence (a checkpoint each)

All sessions share the model (restored to its base weights between sessions), the statistics and
the context templates (cached on disk), and the unedited evaluation (cached by model fingerprint,
task, protocol, limit, seed and dtype). Each session lives in ``OUT/runs/<name>/`` with its
journal, so an interrupted study resumes (``--resume``) where it stopped. Outputs:
``study.json`` (every run's curve), ``report.md`` and ``plots/<task>.png`` (ability against the
number of edits, one line per run, error bars from the standard errors).

A profile (``--profile quick``) overrides top-level keys and per-run keys, for CPUs.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from editfast.core.errors import EditfastError
from editfast.core.paths import write_json, write_text
from editfast.data.requests import dataset_names, load_dataset
from editfast.eval.edit_metrics import headline_edit_metric
from editfast.eval.evaluator import Evaluator
from editfast.eval.generation import CONSISTENCY_MISSING, check_generation_prompts
from editfast.eval.tasks import resolve_tasks
from editfast.methods.registry import METHODS
from editfast.models.load import load_model
from editfast.models.update import restore
from editfast.session.curves import plot_study
from editfast.session.session import EditSession

TOP_KEYS = {"name", "model", "dataset", "offset", "seed", "templates", "dtype", "device", "eval", "runs", "profiles",
            "description"}
EVAL_KEYS = {"tasks", "protocols", "limit", "limits", "thresholds", "edit_metrics", "fluency", "consistency"}
RUN_KEYS = {"name", "method", "setting", "n", "batch_size", "eval_at", "sizes", "batches", "hparams", "label"}
SETTINGS = ("sequential", "batch", "batches")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _unknown(where: str, got: dict, allowed: set[str]) -> None:
    bad = sorted(set(got) - allowed)
    if bad:
        raise EditfastError(f"study {where}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")


def load_study(path: str | Path, profile: str | None = None) -> dict[str, Any]:
    """Read and check a study file; apply ``profile``. Every error names the key."""

    p = Path(path)
    if not p.is_file():
        raise EditfastError(f"study file not found: {p}")
    try:
        doc = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EditfastError(f"study file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise EditfastError(f"study file {p} must hold a mapping")
    _unknown("file", doc, TOP_KEYS)
    profiles = doc.pop("profiles", None) or {}
    if profile is not None:
        if profile not in profiles:
            raise EditfastError(f"study has no profile {profile!r}; profiles: {', '.join(profiles) or 'none'}")
        prof = dict(profiles[profile])
        run_over = prof.pop("runs", {}) or {}
        only = prof.pop("only", None)
        _unknown(f"profile {profile}", prof, TOP_KEYS - {"runs", "profiles"})
        doc = _merge(doc, prof)
        names = [r.get("name") for r in doc.get("runs", [])]
        for name in run_over:
            if name not in names:
                raise EditfastError(f"study profile {profile}: no run named {name!r} (runs: {', '.join(map(str, names))})")
        doc["runs"] = [_merge(r, run_over.get(r.get("name"), {})) for r in doc.get("runs", [])
                       if only is None or r.get("name") in only]
    doc["profile"] = profile
    ev = doc.setdefault("eval", {}) or {}
    _unknown("eval", ev, EVAL_KEYS)
    if ev.get("tasks"):
        resolve_tasks(ev["tasks"])
    if ev.get("consistency"):
        raise EditfastError(f"study eval: {CONSISTENCY_MISSING}")
    runs = doc.get("runs")
    if not runs:
        raise EditfastError("study: 'runs' must list at least one run")
    seen = set()
    for r in runs:
        _unknown(f"run {r.get('name')!r}", r, RUN_KEYS)
        if not r.get("name") or r["name"] in seen:
            raise EditfastError(f"study: every run needs a unique name (got {r.get('name')!r})")
        seen.add(r["name"])
        if str(r.get("method", "")).lower() not in METHODS:
            raise EditfastError(f"study run {r['name']!r}: unknown method {r.get('method')!r}; choose from "
                                f"{', '.join(METHODS)}")
        if r.get("setting") not in SETTINGS:
            raise EditfastError(f"study run {r['name']!r}: setting must be one of {', '.join(SETTINGS)}, "
                                f"got {r.get('setting')!r}")
        need = {"sequential": ("n",), "batch": ("sizes",), "batches": ("batch_size", "batches")}[r["setting"]]
        for k in need:
            if r.get(k) is None:
                raise EditfastError(f"study run {r['name']!r}: setting {r['setting']} needs {k!r}")
    ds = doc.get("dataset", "zsre-alt")
    if ds not in dataset_names() and not Path(ds).is_file():
        raise EditfastError(f"study: unknown dataset {ds!r}")
    return doc


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


def default_label(run: dict) -> str:
    s = run["setting"]
    what = {"sequential": "one at a time" if int(run.get("batch_size") or 1) == 1 else f"{run.get('batch_size')} per batch",
            "batch": "one batch of B", "batches": f"{run.get('batch_size')} per batch"}[s]
    return f"{run['method']} · {what}"


def run_study(study: dict, out: str | Path, progress: bool = True, resume: bool = False) -> dict[str, Any]:

    out = Path(out)
    if ((out / "study.json").is_file() or (out / "runs").is_dir()) and not resume:
        raise EditfastError(f"{out} already holds a study; continue it with --resume or choose another --out")
    t0 = time.perf_counter()
    ev = study.get("eval") or {}
    seed = int(study.get("seed", 0))
    plan = [(r, s) for r in study["runs"] for s in sessions_of(r)]
    n_max = max(s["n"] for _, s in plan)
    requests = load_dataset(study.get("dataset", "zsre-alt"), n_max, offset=int(study.get("offset", 0)))
    if ev.get("fluency"):
        check_generation_prompts(requests, str(study.get("dataset", "zsre-alt")))  # before the model loads
    lm = load_model(study.get("model", "smollm2-135m"), dtype=study.get("dtype", "float32"),
                    device=study.get("device", "cpu"))
    protocols = ev.get("protocols") or ["standard"]
    templates: dict[str, list] = {}  # per method: generated once, shared by its sessions
    evaluator = None
    if ev.get("tasks"):  # task requests built once for the whole study, one engine

        evaluator = Evaluator(lm, ev["tasks"], protocols if len(protocols) > 1 else protocols[0], ev.get("limit"),
                              seed, progress, ev.get("limits"))
    runs_out = []
    for run, sess in plan:
        d = out / "runs" / sess["dir"]
        label = run.get("label") or default_label(run)
        if (d / "results.json").is_file() and (d / "curve.json").is_file():  # finished in an earlier call
            curve = json.loads((d / "curve.json").read_text())
            templates.setdefault(run["method"], json.loads((d / "session.json").read_text())["templates"])
        else:
            s = EditSession(lm, run["method"], requests[: sess["n"]], overrides=run.get("hparams"),
                            batch_size=sess["batch_size"], seed=seed, evaluate=ev.get("edit_metrics", True),
                            templates=templates.get(run["method"], study.get("templates", "generated")),
                            eval_tasks=ev.get("tasks"), eval_limit=ev.get("limit"), eval_limits=ev.get("limits"),
                            protocol=protocols if len(protocols) > 1 else protocols[0], eval_at=sess["eval_at"],
                            out=d, progress=progress, label=label, evaluator=evaluator,
                            thresholds=ev.get("thresholds") or (0.077, 0.171), fluency=bool(ev.get("fluency")),
                            dataset={"name": str(study.get("dataset", "zsre-alt"))})
            try:
                res = s.run(resume=resume and (d / "session.json").is_file())
                templates.setdefault(run["method"], res.templates)
                curve = res.curve
            finally:
                restore(lm, s.base)
        runs_out.append({"run": run["name"], "session": sess["dir"], "label": label, "method": run["method"],
                         "setting": run["setting"], "batch_size": sess["batch_size"], "curve": curve})
    lines = merge_lines(runs_out)
    plots = plot_study(lines, out / "plots")
    doc = {"study": {k: v for k, v in study.items()}, "model": lm.spec, "model_fingerprint": lm.fingerprint,
           "seconds": time.perf_counter() - t0, "lines": lines, "sessions": runs_out,
           "plots": [str(p.relative_to(out)) for p in plots]}
    report = report_md(doc)
    doc["report_md"] = report
    write_json(out / "study.json", doc)
    write_text(out / "report.md", report)
    return doc


def merge_lines(sessions: list[dict]) -> list[dict]:
    """One curve per run: a 'batch' run's sessions (one per size) become points of one line,
    each taken after its own batch from the unedited model."""
    lines: dict[str, dict] = {}
    for s in sessions:
        line = lines.setdefault(s["run"], {"label": s["label"], "model": s["curve"]["model"], "method": s["method"],
                                           "setting": s["setting"], "points": []})
        have = {p["edits"] for p in line["points"]}
        line["points"] += [p for p in s["curve"]["points"] if p["edits"] not in have]
    for line in lines.values():
        line["points"].sort(key=lambda p: p["edits"])
    return list(lines.values())


def _headline(r: dict | None) -> float | None:
    """A task result's headline metric (None where the task did not run)."""
    return None if r is None else r["metrics"][r["primary"]]


def _drift(p: dict) -> float | None:
    """‖W − W₀‖₁ over the edited matrices at a checkpoint."""
    return p.get("weights", {}).get("total", {}).get("l1")


def _fluency(p: dict) -> float | None:
    """CounterFact's fluency at a checkpoint (``editfast.eval.generation``), where it was measured."""
    return (p.get("generation") or {}).get("fluency")


def _probe(lines: list[dict]) -> str | None:
    """Which prompts the study's fluency was measured on (None: not measured)."""
    return next((p["generation"]["prompts"] for l in lines for p in l["points"] if p.get("generation")), None)


def _fmt(r: dict | None) -> str:
    if r is None:
        return "-"
    v, se = _headline(r), (r.get("stderr") or {}).get(r["primary"])
    return f"{v:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def report_md(doc: dict) -> str:
    """Per task: rows = runs, columns = number of edits; then edit metrics and weight drift."""
    lines = doc["lines"]
    st = doc["study"]
    out = [f"# Study {st.get('name', '')} · {doc['model']} · dataset {st.get('dataset', 'zsre-alt')}"
           f"{' · profile ' + st['profile'] if st.get('profile') else ''}", "",
           f"Measured in {doc['seconds'] / 60:.1f} min. Values: headline metric ± standard error at each number of "
           "edits (columns).", ""]
    tasks = list(dict.fromkeys(t for l in lines for p in l["points"] for t in p.get("tasks", {})))
    out += comparison_md(lines, tasks)
    for t in tasks:
        edits = sorted({p["edits"] for l in lines for p in l["points"] if t in p.get("tasks", {})})
        first = next(p["tasks"][t] for l in lines for p in l["points"] if t in p.get("tasks", {}))
        out += [f"## {t} ({first['primary']}{'' if first['higher_is_better'] else ', lower is better'})", "",
                "| run | " + " | ".join(map(str, edits)) + " |", "|---|" + "---|" * len(edits)]
        for l in lines:
            by = {p["edits"]: p.get("tasks", {}).get(t) for p in l["points"]}
            out.append(f"| {l['label']} | " + " | ".join(_fmt(by.get(e)) for e in edits) + " |")
        out.append("")
    edits = sorted({p["edits"] for l in lines for p in l["points"]})
    probe = _probe(lines)
    fluency = f"Fluency (n-gram entropy of top-k samples of the probe set's generation prompts; {probe})"
    for title, get in (("Edit success (first edit metric: efficacy or rewrite accuracy, of the facts edited so far)",
                        lambda p: (headline_edit_metric(p.get("edit_metrics")) or (None, None))[1]),
                       *([(fluency, _fluency)] if probe else []),
                       ("Weight drift ‖W − W₀‖₁ over the edited matrices", _drift)):
        out += [f"## {title}", "", "| run | " + " | ".join(map(str, edits)) + " |", "|---|" + "---|" * len(edits)]
        for l in lines:
            by = {p["edits"]: get(p) for p in l["points"]}
            out.append(f"| {l['label']} | " + " | ".join("-" if by.get(e) is None else f"{by[e]:.3g}" for e in edits)
                       + " |")
        out.append("")
    return "\n".join(out)


def comparison_md(lines: list[dict], tasks: list[str]) -> list[str]:
    """One row per run: unedited -> its last checkpoint, for the edit success rates, each task's
    headline metric and the weights' drift, with the seconds per edit (editing only)."""
    rates: list[str] = []
    for l in lines:
        for k in (l["points"][-1].get("edit_metrics") or {}):
            if k.endswith(("_success", "_acc")) and k not in rates:
                rates.append(k)
    flu = _probe(lines) is not None
    cols = [k.removesuffix("_success").removesuffix("_acc") for k in rates] + (["fluency"] if flu else []) + tasks
    out = ["## Comparison: unedited → last checkpoint", "",
           "| run | edits | s / edit | " + " | ".join(cols) + " | ‖W − W₀‖₁ |", "|---|" + "---|" * (len(cols) + 3)]
    pair = lambda a, b, f: "-" if a is None or b is None else f"{a:{f}} → {b:{f}}"
    for l in lines:
        first, last = l["points"][0], l["points"][-1]
        em0, em1 = first.get("edit_metrics") or {}, last.get("edit_metrics") or {}
        task = lambda p, t: _headline(p.get("tasks", {}).get(t))
        drift = _drift(last)
        per_edit = last["seconds"] / last["edits"] if last["edits"] and last.get("seconds") is not None else None
        out.append(f"| {l['label']} | {last['edits']} | {'-' if per_edit is None else f'{per_edit:.2f}'} | "
                   + " | ".join([pair(em0.get(k), em1.get(k), ".2f") for k in rates]
                                + ([pair(_fluency(first), _fluency(last), ".3f")] if flu else [])
                                + [pair(task(first, t), task(last, t), ".3f") for t in tasks])
                   + f" | {'-' if drift is None else f'{drift:.3g}'} |")
    return out + [""]
