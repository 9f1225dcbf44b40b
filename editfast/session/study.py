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
``study-file.json`` (the study as checked, written first: ``--resume`` and ``--only`` continue
only the same study), ``study.json`` (every run's curve), ``report.md`` and ``plots/`` (ability
against the number of edits, one line per run, error bars from the standard errors).

A finished session's committed data is ``runs/<session>/{curve.json,results.json,session.json}``
(``OUT/.gitignore`` leaves out the journals); ``only=[NAME]`` runs one run and reads the others'
finished sessions back, so a long study is run, committed and continued one run at a time.

A profile (``--profile quick``) overrides top-level keys and per-run keys, for CPUs.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from editfast.core.errors import EditfastError
from editfast.core.paths import write_json, write_text
from editfast.data.requests import dataset_names, load_dataset
from editfast.eval.edit_metrics import headline_edit_metric
from editfast.eval.generation import CONSISTENCY_MISSING, check_generation_prompts
from editfast.eval.runner import PROTOCOLS
from editfast.eval.tasks import resolve_tasks
from editfast.methods.hparams import check_layers
from editfast.methods.registry import METHODS, get_method, resolve_hparams
from editfast.models.load import load_model
from editfast.session.curves import plot_study, study_tasks, task_result
from editfast.session.plan import evaluators, plan_study, run_protocols, sessions_of
from editfast.session.session import EditSession, parse_checkpoints

TOP_KEYS = {"name", "model", "dataset", "offset", "seed", "templates", "dtype", "device", "eval", "runs", "profiles",
            "description"}
EVAL_KEYS = {"tasks", "protocols", "limit", "limits", "thresholds", "edit_metrics", "fluency", "consistency"}
RUN_KEYS = {"name", "method", "setting", "n", "batch_size", "eval_at", "sizes", "batches", "hparams", "label",
            "protocols"}
SETTINGS = ("sequential", "batch", "batches")
SETTING_KEYS = {"sequential": {"n", "batch_size", "eval_at"}, "batch": {"sizes"}, "batches": {"batch_size", "batches"}}
DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a folder name under runs/
STUDY_FILE = "study-file.json"  # the study as checked, written before the first session
GITIGNORE = "runs/*/journal/\n*.tmp\n"  # a finished run is committed without its journal
SAME_STUDY_KEYS = ("name", "model", "dataset", "offset", "seed", "templates", "dtype", "eval")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _unknown(where: str, got: dict, allowed: set[str]) -> None:
    bad = sorted(set(got) - allowed)
    if bad:
        raise EditfastError(f"study {where}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(where: str, key: str, v: Any, lo: int = 1, none: bool = False) -> None:
    if v is None and none:
        return
    if not _is_int(v) or v < lo:
        raise EditfastError(f"study {where}: {key} must be an integer >= {lo}{' or null' if none else ''}, got {v!r}")


def _str(where: str, key: str, v: Any, choices: tuple | list | None = None) -> None:
    if not isinstance(v, str) or not v.strip():
        raise EditfastError(f"study {where}: {key} must be a non-empty string, got {v!r}")
    if choices is not None and v not in choices:
        raise EditfastError(f"study {where}: {key} must be one of {', '.join(choices)}, got {v!r}")


def _ints(where: str, key: str, v: Any, lo: int) -> None:
    if not isinstance(v, list) or not v or not all(_is_int(x) and x >= lo for x in v):
        raise EditfastError(f"study {where}: {key} must be a non-empty list of integers >= {lo}, got {v!r}")
    if v != sorted(set(v)):
        raise EditfastError(f"study {where}: {key} must be increasing, got {v!r}")


def _protocols(where: str, v: Any) -> None:
    if not isinstance(v, list) or not v or not all(p in PROTOCOLS for p in v) or len(set(v)) != len(v):
        raise EditfastError(f"study {where}: protocols must be a list of {', '.join(PROTOCOLS)} (each once), "
                            f"got {v!r}")


def check_eval(ev: Any) -> None:
    """The ``eval`` mapping: types, known tasks and protocols, limits of tasks the study runs."""
    if not isinstance(ev, dict):
        raise EditfastError(f"study eval: must be a mapping, got {ev!r}")
    _unknown("eval", ev, EVAL_KEYS)
    if ev.get("consistency"):
        raise EditfastError(f"study eval: {CONSISTENCY_MISSING}")
    if not isinstance(ev.get("fluency", False), bool):
        raise EditfastError(f"study eval: fluency must be true or false, got {ev['fluency']!r}")
    names: list[str] = []
    if ev.get("tasks") is not None:
        _str("eval", "tasks", ev["tasks"])
        names = [t.name for t in resolve_tasks(ev["tasks"])]
    if "protocols" in ev:
        _protocols("eval", ev["protocols"])
    _int("eval", "limit", ev.get("limit"), none=True)
    limits = ev.get("limits")
    if limits is not None:
        if not isinstance(limits, dict):
            raise EditfastError(f"study eval: limits must map a task to a number of examples, got {limits!r}")
        for t, v in limits.items():
            if t not in names:
                raise EditfastError(f"study eval: limits names {t!r}, not among the study's tasks "
                                    f"({', '.join(names) or 'none'})")
            _int("eval", f"limits.{t}", v, none=True)
    th = ev.get("thresholds")
    if th is not None and (not isinstance(th, list) or not th or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in th)):
        raise EditfastError(f"study eval: thresholds must be a non-empty list of positive numbers, got {th!r}")
    if "edit_metrics" in ev and not isinstance(ev["edit_metrics"], bool):
        raise EditfastError(f"study eval: edit_metrics must be true or false, got {ev['edit_metrics']!r}")


def check_run(r: Any, ev: dict) -> None:
    """One run: name (a folder), method, setting and only its keys, each value's type and range."""
    if not isinstance(r, dict):
        raise EditfastError(f"study runs: every run must be a mapping, got {r!r}")
    where = f"run {r.get('name')!r}"
    _unknown(where, r, RUN_KEYS)
    if not isinstance(r.get("name"), str) or not RUN_NAME.fullmatch(r["name"]):
        raise EditfastError(f"study {where}: name must be letters, digits, '.', '_' or '-' (it names a folder)")
    if str(r.get("method", "")).lower() not in METHODS:
        raise EditfastError(f"study {where}: unknown method {r.get('method')!r}; choose from {', '.join(METHODS)}")
    s = r.get("setting")
    if s not in SETTINGS:
        raise EditfastError(f"study {where}: setting must be one of {', '.join(SETTINGS)}, got {s!r}")
    other = sorted(k for k in set().union(*SETTING_KEYS.values()) - SETTING_KEYS[s] if k in r)
    if other:
        raise EditfastError(f"study {where}: {', '.join(other)} do(es) not apply to setting {s} "
                            f"(it takes {', '.join(sorted(SETTING_KEYS[s]))})")
    need = {"sequential": ("n",), "batch": ("sizes",), "batches": ("batch_size", "batches")}[s]
    for k in need:
        if r.get(k) is None:
            raise EditfastError(f"study {where}: setting {s} needs {k!r}")
    for k in ("n", "batch_size", "batches"):
        if k in r:
            _int(where, k, r[k], none=k == "batch_size" and s == "sequential")
    if "sizes" in r:
        _ints(where, "sizes", r["sizes"], 1)
    if r.get("hparams") is not None and not isinstance(r["hparams"], dict):
        raise EditfastError(f"study {where}: hparams must be a mapping of hyper-parameter to value, got {r['hparams']!r}")
    if "label" in r:
        _str(where, "label", r["label"])
    if "protocols" in r:
        _protocols(where, r["protocols"])
        if not ev.get("tasks"):
            raise EditfastError(f"study {where}: protocols given but the study evaluates no tasks")
    method = get_method(r["method"])
    asked = r.get("batch_size")
    if method.max_batch_size and asked and asked > method.max_batch_size:
        raise EditfastError(f"study {where}: {method.name} edits at most {method.max_batch_size} fact(s) per batch, "
                            f"got batch_size {asked}")
    if s == "sequential":
        if "eval_at" in r and not (isinstance(r["eval_at"], list) and all(_is_int(x) for x in r["eval_at"])):
            raise EditfastError(f"study {where}: eval_at must be a list of edit counts, got {r['eval_at']!r}")
        try:
            parse_checkpoints(r.get("eval_at") or [0, r["n"]], r["n"], method.batch_size(asked or 1, r["n"]))
        except EditfastError as e:
            raise EditfastError(f"study {where}: {str(e).replace('--eval-at', 'eval_at')}") from None


def load_study(path: str | Path, profile: str | None = None) -> dict[str, Any]:
    """Read and check a study file whole (every run, every value); apply ``profile``. Every error
    names the run and the key. The model's config and the dataset are checked by ``check_study``."""

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
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise EditfastError("study profiles: must map a profile's name to a mapping of keys")
    if not isinstance(doc.get("runs"), list) or not doc["runs"]:
        raise EditfastError("study: 'runs' must list at least one run")
    if profile is not None:
        if profile not in profiles:
            raise EditfastError(f"study has no profile {profile!r}; profiles: {', '.join(profiles) or 'none'}")
        prof = dict(profiles[profile])
        run_over = prof.pop("runs", {}) or {}
        only = prof.pop("only", None)
        _unknown(f"profile {profile}", prof, TOP_KEYS - {"runs", "profiles"})
        doc = _merge(doc, prof)
        names = [r.get("name") if isinstance(r, dict) else None for r in doc["runs"]]
        for name in [*run_over, *(only or [])]:
            if name not in names:
                raise EditfastError(f"study profile {profile}: no run named {name!r} (runs: {', '.join(map(str, names))})")
        doc["runs"] = [_merge(r, run_over.get(r.get("name"), {})) for r in doc["runs"]
                       if only is None or r.get("name") in only]
    doc["profile"] = profile
    for key in ("name", "model", "dataset", "device", "description"):
        if key in doc:
            _str("file", key, doc[key])
    _int("file", "offset", doc.get("offset", 0), lo=0)
    seed = doc.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise EditfastError(f"study file: seed must be an integer in 0..2**32-1, got {seed!r}")
    _str("file", "templates", doc.get("templates", "generated"), ("generated", "fixed"))
    _str("file", "dtype", doc.get("dtype", "float32"), DTYPES)
    ev = doc["eval"] = doc.get("eval") or {}
    check_eval(ev)
    seen = set()
    for r in doc["runs"]:
        check_run(r, ev)
        if r["name"] in seen:
            raise EditfastError(f"study: two runs are named {r['name']!r}; every run needs a unique name")
        seen.add(r["name"])
    ds = doc.get("dataset", "zsre-alt")
    if ds not in dataset_names() and not Path(ds).is_file():
        raise EditfastError(f"study: unknown dataset {ds!r}")
    return doc


def check_study(study: dict, preflight=None) -> list:
    """What ``load_study`` cannot see: the dataset holds every run's facts (returned, the most any
    session needs), and, with ``preflight(model, method, overrides, dtype)``, each run's
    hyper-parameters against the model's config (layers beyond the model, unknown keys). No
    weights load."""
    n_max = max(s["n"] for r in study["runs"] for s in sessions_of(r))
    requests = load_dataset(study.get("dataset", "zsre-alt"), n_max, offset=int(study.get("offset", 0)))
    if (study.get("eval") or {}).get("fluency"):
        check_generation_prompts(requests, str(study.get("dataset", "zsre-alt")))
    for r in study["runs"] if preflight is not None else ():
        try:
            preflight(study.get("model", "smollm2-135m"), r["method"], r.get("hparams") or {},
                      study.get("dtype", "float32"))
        except EditfastError as e:
            raise EditfastError(f"study run {r['name']!r}: {e}") from None
    return requests


def default_label(run: dict) -> str:
    s = run["setting"]
    what = {"sequential": "one at a time" if int(run.get("batch_size") or 1) == 1 else f"{run.get('batch_size')} per batch",
            "batch": "one batch of B", "batches": f"{run.get('batch_size')} per batch"}[s]
    return f"{run['method']} · {what}"


DEFAULTS = {"model": "smollm2-135m", "dataset": "zsre-alt", "offset": 0, "seed": 0, "templates": "generated",
            "dtype": "float32", "eval": {}}


def holds_study(out: Path) -> bool:
    """Whether ``out`` holds a study (its checked file, its report, or sessions under runs/)."""
    return (out / STUDY_FILE).is_file() or (out / "study.json").is_file() or any((out / "runs").glob("*/session.json"))


def _old_study(out: Path) -> dict | None:
    for name in (STUDY_FILE, "study.json"):
        if (out / name).is_file():
            try:
                return json.loads((out / name).read_text())["study"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise EditfastError(f"{out}: cannot read {name}: {e}") from None
    return None


def same_study(out: Path, study: dict) -> None:
    """Refuse ``out`` unless it holds this study: the same model, dataset, seed, templates, dtype and
    evaluation, and every run both name the same (a run the file adds is welcome). The first
    difference is named."""
    old = _old_study(out)
    if old is None:
        if holds_study(out):
            return  # sessions of a study written before studies recorded their file: each session checks itself
        raise EditfastError(f"{out} holds no study to continue (no {STUDY_FILE}); start it without --resume")
    ev_old, ev_new = old.get("eval") or {}, study.get("eval") or {}
    pairs = [(k, old.get(k, DEFAULTS.get(k)), study.get(k, DEFAULTS.get(k))) for k in SAME_STUDY_KEYS if k != "eval"]
    pairs += [(f"eval.{k}", ev_old.get(k), ev_new.get(k)) for k in sorted(set(ev_old) | set(ev_new))]
    for key, a, b in pairs:
        if a != b:
            raise EditfastError(f"{out} holds study {old.get('name')!r} with {key} {a!r}; this study file has {b!r}: "
                                "continue a study only with its own file, or choose another --out")
    mine = {r["name"]: r for r in study["runs"]}
    for r in old.get("runs", []):
        new = mine.get(r["name"])
        diff = sorted(k for k in set(r) | set(new or {}) if k != "label" and r.get(k) != (new or {}).get(k))
        if new is not None and diff:
            k = diff[0]
            raise EditfastError(f"{out}: its run {r['name']!r} has {k} {r.get(k)!r}; this study file has "
                                f"{new.get(k)!r}: continue a study only with its own file, or choose another --out")


def _record(out: Path, study: dict) -> None:
    """study-file.json (this study, with the runs of the folder's that this file left out) and the .gitignore."""
    old = _old_study(out) if (out / STUDY_FILE).is_file() else None
    names = {r["name"] for r in study["runs"]}
    kept = [r for r in (old or {}).get("runs", []) if r["name"] not in names]
    write_json(out / STUDY_FILE, {"study": {**study, "runs": study["runs"] + kept}})
    if not (out / ".gitignore").is_file():
        write_text(out / ".gitignore", GITIGNORE)


def run_study(study: dict, out: str | Path, progress: bool = True, resume: bool = False,
              only: list[str] | None = None, requests: list | None = None, estimate: bool = True) -> dict[str, Any]:
    """Run the study's sessions into ``out`` (``only``: these runs; the others' finished sessions are
    read back, the rest named missing), then study.json, report.md and plots/ from every finished
    session. ``estimate``: plan first (a calibration, cached), so the report sets the estimate beside
    the measured time."""
    out = Path(out)
    if holds_study(out):
        if not (resume or only):
            raise EditfastError(f"{out} already holds a study; continue it with --resume or choose another --out")
        same_study(out, study)
    elif resume:
        raise EditfastError(f"{out} holds no study to continue; start it without --resume")
    t0 = time.perf_counter()
    ev = study["eval"]
    seed = int(study.get("seed", 0))
    plan = [(r, s) for r in study["runs"] for s in sessions_of(r)]
    if requests is None:
        requests = check_study(study)
    lm = load_model(study.get("model", "smollm2-135m"), dtype=study.get("dtype", "float32"),
                    device=study.get("device", "cpu"))
    for r in study["runs"]:  # every run's hyper-parameters against the model, before any session writes
        try:
            hp = resolve_hparams(r["method"], lm.spec, lm.model.config, r.get("hparams"))
            hp.check_modules(lm.adapter)
            check_layers(hp, lm.adapter.num_layers(lm.model))
        except EditfastError as e:
            raise EditfastError(f"study run {r['name']!r}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    _record(out, study)
    evals = evaluators(lm, study, progress)
    estimates = plan_study(study, lm, requests, evals, progress) if estimate else None
    templates: dict[str, list] = {}  # per method: generated once, shared by its sessions
    runs_out, missing = [], []
    for run, sess in plan:
        d = out / "runs" / sess["dir"]
        label = run.get("label") or default_label(run)
        protocols = run_protocols(study, run)
        if (d / "results.json").is_file() and (d / "curve.json").is_file():  # finished in an earlier call
            curve = json.loads((d / "curve.json").read_text())
            timings = json.loads((d / "results.json").read_text()).get("timings") or {}
            templates.setdefault(run["method"], json.loads((d / "session.json").read_text())["templates"])
        elif only is not None and run["name"] not in only:
            missing.append(sess["dir"])
            continue
        else:
            s = EditSession(lm, run["method"], requests[: sess["n"]], overrides=run.get("hparams"),
                            batch_size=sess["batch_size"], seed=seed, evaluate=ev.get("edit_metrics", True),
                            templates=templates.get(run["method"], study.get("templates", "generated")),
                            eval_tasks=ev.get("tasks"), eval_limit=ev.get("limit"), eval_limits=ev.get("limits"),
                            protocol=protocols if len(protocols) > 1 else protocols[0], eval_at=sess["eval_at"],
                            out=d, progress=progress, label=label, evaluator=evals.get(tuple(protocols)),
                            thresholds=ev.get("thresholds") or (0.077, 0.171), fluency=bool(ev.get("fluency")),
                            dataset={"name": str(study.get("dataset", "zsre-alt"))})
            try:
                res = s.run(resume=(d / "session.json").is_file())
                templates.setdefault(run["method"], res.templates)
                curve, timings = res.curve, res.timings
            finally:
                s.release()
        est = next((e for e in (estimates or {}).get("sessions", []) if e["session"] == sess["dir"]), None)
        runs_out.append({"run": run["name"], "session": sess["dir"], "label": label, "method": run["method"],
                         "setting": run["setting"], "batch_size": sess["batch_size"], "curve": curve,
                         "timings": {k: v for k, v in timings.items() if k != "batches" and k != "solves"},
                         "estimate_s": est and est["total_s"]})
    lines = merge_lines(runs_out)
    plots = plot_study(lines, out / "plots") if lines else []
    doc = {"study": {k: v for k, v in study.items()}, "model": lm.spec, "model_fingerprint": lm.fingerprint,
           "seconds": time.perf_counter() - t0, "lines": lines, "sessions": runs_out, "missing": missing,
           "plan": estimates, "plots": [str(p.relative_to(out)) for p in plots]}
    report = report_md(doc)
    doc["report_md"] = report
    write_json(out / "study.json", doc)
    write_text(out / "report.md", report)
    return doc


def render_study(out: str | Path) -> dict[str, Any]:
    """Redraw plots/ and rewrite report.md of a study folder from its study.json (no run; the data
    file itself is left as it is)."""
    out = Path(out)
    try:
        doc = json.loads((out / "study.json").read_text())
    except (OSError, ValueError) as e:
        raise EditfastError(f"{out}: cannot read study.json: {e}") from None
    doc["plots"] = [str(p.relative_to(out)) for p in plot_study(doc["lines"], out / "plots")]
    doc["report_md"] = report_md(doc)
    write_text(out / "report.md", doc["report_md"])
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
           f"Measured in {doc['seconds'] / 60:.1f} min (this call). Values: headline metric ± standard error at each "
           "number of edits (columns).", ""]
    if doc.get("missing"):
        out += [f"Not in this report (not finished yet): {', '.join(doc['missing'])}.", ""]
    tasks = study_tasks(lines)
    if "plots/overview.png" in doc.get("plots", []):
        out += ["![ability against edits, a panel per task](plots/overview.png)", ""]
    out += comparison_md(lines, tasks)
    probe = _probe(lines)
    for t in tasks:
        edits = sorted({p["edits"] for l in lines for p in l["points"] if task_result(p, t)})
        first = next(task_result(p, t) for l in lines for p in l["points"] if task_result(p, t))
        title = (f"Fluency (n-gram entropy of top-k samples of the probe set's generation prompts; {probe})"
                 if t == "fluency" and probe else
                 f"{t} ({first['primary']}{'' if first['higher_is_better'] else ', lower is better'})")
        out += [f"## {title}", "",
                "| run | " + " | ".join(map(str, edits)) + " |", "|---|" + "---|" * len(edits)]
        for l in lines:
            by = {p["edits"]: task_result(p, t) for p in l["points"]}
            out.append(f"| {l['label']} | " + " | ".join(_fmt(by.get(e)) for e in edits) + " |")
        out.append("")
    edits = sorted({p["edits"] for l in lines for p in l["points"]})
    for title, get in (("Edit success (first edit metric: efficacy or rewrite accuracy, of the facts edited so far)",
                        lambda p: (headline_edit_metric(p.get("edit_metrics")) or (None, None))[1]),
                       ("Weight drift ‖W − W₀‖₁ over the edited matrices", _drift)):
        out += [f"## {title}", "", "| run | " + " | ".join(map(str, edits)) + " |", "|---|" + "---|" * len(edits)]
        for l in lines:
            by = {p["edits"]: get(p) for p in l["points"]}
            out.append(f"| {l['label']} | " + " | ".join("-" if by.get(e) is None else f"{by[e]:.3g}" for e in edits)
                       + " |")
        out.append("")
    return "\n".join(out + time_md(doc.get("sessions") or []))


def _eval_split(p: dict) -> dict[str, float]:
    """A checkpoint's evaluation seconds by part: the point's own ``eval_s_by`` where it has one,
    else each task's share of the engine call and the rest (edit metrics and weight analysis)."""
    by = p.get("eval_s_by")
    if by:
        parts = {"edit metrics": by.get("edit_metrics") or 0.0, **(by.get("tasks") or {}),
                 "generation": by.get("generation") or 0.0}
        return {**parts, "weights, other": max((p.get("eval_s") or 0.0) - sum(parts.values()), 0.0)}
    tasks = {t: r.get("seconds") or 0.0 for t, r in (p.get("tasks") or {}).items() if not r.get("cached")}
    return {**tasks, "edit metrics, weights": max((p.get("eval_s") or 0.0) - sum(tasks.values()), 0.0)}


def time_md(sessions: list[dict]) -> list[str]:
    """Where each session's time went (editing, of it target optimisation; each checkpoint part),
    with the plan's estimate beside the measured total."""
    if not sessions:
        return []
    parts = list(dict.fromkeys(k for s in sessions for p in s["curve"]["points"] for k in _eval_split(p)))
    out = ["## Where the time went (seconds; estimate from the plan's calibration)", "",
           "| session | estimate | measured | editing | of it targets | " + " | ".join(parts) + " |",
           "|---|" + "---|" * (len(parts) + 4)]
    tot: dict[str, float | None] = dict.fromkeys(["estimate", "measured", "editing", "targets", *parts])
    for s in sessions:
        tm = s.get("timings") or {}
        split = dict.fromkeys(parts, 0.0)
        for p in s["curve"]["points"]:
            for k, v in _eval_split(p).items():
                split[k] += v
        pts = s["curve"]["points"]
        row = {"estimate": s.get("estimate_s"), "measured": tm.get("total_s"),
               "editing": tm.get("edit_s", pts[-1].get("seconds") if pts else None), "targets": tm.get("targets_s"),
               **split}
        for k, v in row.items():
            tot[k] = tot[k] if v is None else (tot[k] or 0.0) + v
        out.append(f"| {s['session']} | " + " | ".join("-" if v is None else f"{v:.0f}" for v in row.values()) + " |")
    out.append("| **all** | " + " | ".join("-" if v is None else f"{v:.0f}" for v in tot.values()) + " |")
    return out + [""]


def comparison_md(lines: list[dict], tasks: list[str]) -> list[str]:
    """One row per run: unedited -> its last checkpoint, for the edit success rates, each task's
    headline metric and the weights' drift, with the seconds per edit (editing only)."""
    rates: list[str] = []
    for l in lines:
        for k in (l["points"][-1].get("edit_metrics") or {}):
            if k.endswith(("_success", "_acc")) and k not in rates:
                rates.append(k)
    flu = _probe(lines) is not None
    tasks = [t for t in tasks if not (flu and t == "fluency")]  # fluency's column comes once, beside the edit rates
    cols = [k.removesuffix("_success").removesuffix("_acc") for k in rates] + (["fluency"] if flu else []) + tasks
    out = ["## Comparison: unedited → last checkpoint", "",
           "| run | edits | s / edit | " + " | ".join(cols) + " | ‖W − W₀‖₁ |", "|---|" + "---|" * (len(cols) + 3)]
    pair = lambda a, b, f: "-" if a is None or b is None else f"{a:{f}} → {b:{f}}"
    for l in lines:
        first, last = l["points"][0], l["points"][-1]
        em0, em1 = first.get("edit_metrics") or {}, last.get("edit_metrics") or {}
        task = lambda p, t: _headline(task_result(p, t))
        drift = _drift(last)
        per_edit = last["seconds"] / last["edits"] if last["edits"] and last.get("seconds") is not None else None
        out.append(f"| {l['label']} | {last['edits']} | {'-' if per_edit is None else f'{per_edit:.2f}'} | "
                   + " | ".join([pair(em0.get(k), em1.get(k), ".2f") for k in rates]
                                + ([pair(_fluency(first), _fluency(last), ".3f")] if flu else [])
                                + [pair(task(first, t), task(last, t), ".3f") for t in tasks])
                   + f" | {'-' if drift is None else f'{drift:.3g}'} |")
    return out + [""]
