"""EditSession: one object owns a sequential editing run.

    s = EditSession(lm, "memit", requests, batch_size=10, eval_tasks="sst2,rte", eval_at=[0, 50, 100],
                    out="runs/memit-seq")
    result = s.run()            # batches in order; checkpoints evaluated; journal appended per batch
    s.undo(50)                  # the weights the run had after 50 edits (replayed from the base)

The session keeps the method's state across batches, applies each batch's updates as the method
yields them (``edit_batch``: the one place a method's updates reach the weights) inside a weight
guard (a failed or non-finite batch leaves the weights as after the last good batch), appends each
batch to the journal atomically (``journal.py``), and evaluates at checkpoints: the edit metrics
of the requests edited so far, general-ability tasks (requests built once per session; the
unedited model's results cached on disk by model fingerprint, task, protocol, limit, seed and
dtype, so every run of a study shares them) and the weights' change against the base.
``resume=True`` replays the journal of ``out`` onto the base model after checking that the
model, method, hyper-parameters and data are the same, then continues.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from editfast.core.compat import versions
from editfast.core.errors import EditfastError, RequestError, raise_if_terminated
from editfast.core.paths import atomic_path, write_json
from editfast.data.requests import Request, validate_requests
from editfast.engine.engine import Engine
from editfast.eval.edit_metrics import edit_metrics, metric_kind, summarize
from editfast.eval.evaluator import Evaluator
from editfast.eval.generation import (
    PROBE_RECORDS,
    check_generation_prompts,
    fluency_per_request,
    probe,
)
from editfast.methods.base import Method, State
from editfast.methods.hparams import HParams, check_layers
from editfast.methods.registry import get_method, make_hparams, resolve_hparams
from editfast.models import routing
from editfast.models.load import max_positions
from editfast.models.update import (
    Update,
    apply_update,
    check_finite,
    guard,
    restore,
    snapshot,
    validate_updates,
    weight_param,
)
from editfast.session.curves import (
    plot_curve,
    sum_weight_changes,
    weight_change,
)
from editfast.session.journal import (
    RESULTS_FILE,
    SESSION_FILE,
    Entry,
    Journal,
    write_entries,
)

CURVE_FILE = "curve.json"
PLOT_EVERY_S = 60.0  # curve.png redrawn at a checkpoint at most this often; always at the end


def requests_digest(requests: Sequence[Request]) -> str:
    """What is edited: generation prompts (fluency's, not the edit's) are left out, so runs journaled
    before requests carried them still resume."""
    docs = [{k: v for k, v in r.to_dict().items() if k != "generation_prompts"} for r in requests]
    return hashlib.sha256(json.dumps(docs, sort_keys=True, default=str).encode()).hexdigest()


def apply_updates(lm, updates: Sequence[Update]) -> None:
    """Write ``updates`` into the weights of ``lm``; none of them if one holds NaN or Inf."""
    check_finite(updates)
    for u in updates:
        apply_update(lm, u)


def apply_entries(lm, config: dict[str, Any], entries: Sequence[Entry]) -> None:
    """A run's journaled batches (``journal.load_run``: its config and entries) onto ``lm``, its base
    model: every update into the weights and, for a routed method, its memory (the batches' state,
    restored in order) installed, so the model is the run's after those batches."""
    method = get_method(config["method"])
    for e in entries:
        apply_updates(lm, e.updates)
    if method.routes:
        hp = make_hparams(method.name, dict(config.get("_hparams") or {}))
        state = State()
        for e in entries:
            method.restore_state(state, {k: v.to(lm.device) for k, v in e.state.items()})
        method.install(lm, hp, state)


def edit_batch(lm, method: Method, requests: Sequence[Request], hp: HParams, state: State,
               templates: list[list[str]], **kw) -> list[Update]:
    """One batch of ``method`` on ``lm``: each group of updates it yields is applied before it goes on
    (its next step reads the model as edited so far); returns them all, in order. ``kw``: ``edit``'s
    (targets, trace, backend, progress). The caller guards the weights."""
    updates: list[Update] = []
    for group in method.edit(lm, requests, hp, state, templates, **kw):
        apply_updates(lm, group)
        updates += group
    return updates


TEMPLATE_ROOM = 16  # tokens a context template may put before a prompt (generated ones: 10 + a few)


def check_lengths(lm, requests: Sequence[Request]) -> None:
    """Refuse, before any work, a request whose prompts with their target would not fit the model's
    context (a generated context template included)."""

    limit = max_positions(lm.model.config)
    if limit is None:
        return
    texts, owners = [], []
    for r in requests:
        for kind, prompts, target in (("prompt", [r.filled()], r.target_new),
                                      ("paraphrase prompt", r.paraphrase_prompts, r.target_new),
                                      ("neighbourhood prompt", r.neighborhood_prompts,
                                       r.neighborhood_target or r.target_true or "")):
            for p in prompts:
                texts.append(f"{p} {target}")
                owners.append((r, kind))
    lengths = [len(ids) for ids in lm.tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
    for n_tok, (r, kind) in zip(lengths, owners):
        if n_tok + TEMPLATE_ROOM > limit:
            raise RequestError(f"request {r.case_id}: its {kind} with the target is {n_tok} tokens; with up to "
                               f"{TEMPLATE_ROOM} of context template that exceeds the model's context of {limit} "
                               "tokens")


def boundaries(n: int, batch_size: int) -> list[int]:
    """Edit counts after each batch."""
    return [min(e, n) for e in range(batch_size, n + batch_size, batch_size)]


def parse_checkpoints(eval_at: Sequence[int] | str | None, n: int, batch_size: int) -> list[int]:
    """Checkpoints in number of edits: sorted, unique, each 0 or a batch boundary, at most n."""
    if eval_at is None:
        return []
    if isinstance(eval_at, str):
        try:
            eval_at = [int(x) for x in eval_at.split(",") if x.strip()]
        except ValueError:
            raise EditfastError(f"--eval-at must be a comma list of edit counts, got {eval_at!r}") from None
    pts = list(eval_at)
    if pts != sorted(pts) or len(set(pts)) != len(pts):
        raise EditfastError(f"--eval-at must be increasing, got {','.join(map(str, pts))}")
    ok = {0, *boundaries(n, batch_size)}
    for p in pts:
        if p < 0 or p > n:
            raise EditfastError(f"--eval-at {p} is outside 0..{n} (the run has {n} edits)")
        if p not in ok:
            raise EditfastError(f"--eval-at {p} is not at a batch boundary (batches of {batch_size}: "
                                f"checkpoints can be 0, {batch_size}, {2 * batch_size}, ... or {n})")
    return pts


@dataclass
class EditResult:
    method: str
    config: dict[str, Any]
    hparams: dict[str, Any]
    templates: list[list[str]]
    per_request: list[dict[str, Any]]
    summary: dict[str, Any]
    timings: dict[str, Any]
    journal: list[list[Update]] = field(default_factory=list)  # one list of updates per batch
    curve: dict[str, Any] | None = None
    entries: list[Entry] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "hparams": self.hparams,
                "context_templates": self.templates, "summary": self.summary, "timings": self.timings,
                "per_request": self.per_request}

    def save(self, out_dir: str | Path) -> Path:
        """results.json, the journal (one file per batch) and, with checkpoints, curve.json/png."""
        if self.config.get("weights_fingerprint", self.config.get("model_fingerprint")) != \
                self.config.get("model_fingerprint"):
            raise EditfastError(f"this run started on {self.config.get('model')} edited since it was loaded (weights "
                                f"{self.config['weights_fingerprint'][:12]}); its journal cannot be replayed onto the "
                                "loaded weights, so it is not saved as a run folder")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.entries and not Journal(out).exists():
            write_entries(out, self.entries)
        if not (out / SESSION_FILE).is_file():
            write_json(out / SESSION_FILE, {"config": self.config, "hparams": self.hparams,
                                            "templates": self.templates})
        if self.curve is not None and self.curve["points"]:
            write_curve(out, self.curve)
        write_json(out / RESULTS_FILE, self.to_json())
        return out


def write_curve(out: Path, curve: dict, plot: bool = True) -> None:
    """curve.json, and (``plot``) its figure curve.png."""
    write_json(out / CURVE_FILE, curve)
    if plot:
        with atomic_path(out / "curve.png") as tmp:
            plot_curve(curve, tmp)


class EditSession:
    """A sequential editing run of ``requests`` with ``method`` on ``lm`` (edited in place)."""

    def __init__(self, lm, method: str, requests: Sequence[Request], *, hparams: HParams | None = None,
                 hparams_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 batch_size: int | None = None, seed: int = 0, templates: str | list[list[str]] = "generated",
                 backend: str = "fast", evaluate: bool = True, eval_tasks: str | None = None,
                 eval_limit: int | None = None, protocol: str | Sequence[str] = "standard",
                 eval_limits: dict[str, int | None] | None = None,
                 eval_at: Sequence[int] | str | None = None, out: str | Path | None = None,
                 dataset: dict[str, Any] | None = None, eval_batch_size: int = 32, progress: bool = True,
                 thresholds: Sequence[float] = (0.077, 0.171), label: str | None = None,
                 evaluator: Evaluator | None = None, fluency: bool = False, fluency_probe: int = PROBE_RECORDS):
        if backend not in ("fast", "reference"):
            raise EditfastError(f"backend must be 'fast' or 'reference', got {backend!r}")
        self.lm, self.method = lm, get_method(method)
        self.requests = list(requests)
        if not self.requests:
            raise EditfastError("no requests to apply")
        validate_requests(self.requests)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise EditfastError(f"seed must be an integer in 0..2**32-1, got {seed!r}")
        if hparams is not None:
            hparams.validate()  # a caller's object may have changed since it was made
        self.hp = hparams or resolve_hparams(self.method.name, lm.spec, lm.model.config, overrides, hparams_file)
        if not isinstance(self.hp, self.method.hparams_class):
            raise EditfastError(f"hparams of type {type(self.hp).__name__} do not fit method {self.method.name}")
        self.hp.check_modules(lm.adapter)
        check_layers(self.hp, lm.adapter.num_layers(lm.model))
        check_lengths(lm, self.requests)
        if batch_size is not None and batch_size < 1:
            raise EditfastError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = self.method.batch_size(batch_size, len(self.requests))
        self.checkpoints = parse_checkpoints(eval_at, len(self.requests), self.batch_size)
        self.seed, self.backend, self.evaluate, self.progress = seed, backend, evaluate, progress
        self.eval_batch_size, self.thresholds = eval_batch_size, tuple(thresholds)
        self.template_mode = templates if isinstance(templates, str) else "given"
        self.templates = templates if isinstance(templates, list) else None
        if self.template_mode not in ("generated", "fixed", "given"):
            raise EditfastError(f"context template mode must be 'generated' or 'fixed', got {templates!r}")
        if evaluator is None and eval_tasks:
            evaluator = Evaluator(lm, eval_tasks, protocol, eval_limit, seed, progress, eval_limits)
        self.evaluator = evaluator  # a study passes one, shared by its sessions
        if self.checkpoints and not (self.evaluator or evaluate or fluency):
            raise EditfastError("--eval-at needs something to evaluate (edit metrics, --eval tasks or --fluency)")
        if fluency:
            check_generation_prompts(self.requests, (dataset or {}).get("name"))
            if not 1 <= fluency_probe <= 500:
                raise EditfastError(f"the fluency probe set is 1..500 CounterFact records, got {fluency_probe}")
        self.fluency, self.fluency_probe = fluency, fluency_probe
        self._probe = self._engine = None  # built once per session, at the first checkpoint that needs them
        self.out = Path(out) if out is not None else None
        if lm.edited and self.out is not None:
            raise EditfastError(f"{lm.spec} was edited in this process since it was loaded; a run folder's journal "
                                "is replayed onto the loaded weights (undo, export, --resume), so it cannot start "
                                "here: load the model again for a run with out=, or run without out=")
        self.kind = metric_kind(self.requests)
        self.sites = self.method.sites(lm, self.hp)
        self.base = snapshot(lm, self.sites)  # W0 of every weight the method writes
        self.entries: list[Entry] = []
        self.state = None
        self.config = {
            "model": lm.spec, "model_fingerprint": lm.fingerprint, "weights_fingerprint": lm.weights_fingerprint,
            "dtype": str(lm.dtype), "device": str(lm.device),
            "method": self.method.name, "n": len(self.requests), "batch_size": self.batch_size, "seed": seed,
            "backend": backend, "templates": self.template_mode, "dataset": dataset or {},
            "requests_sha256": requests_digest(self.requests), "eval_tasks": eval_tasks, "eval_limit": eval_limit,
            "protocol": protocol if isinstance(protocol, str) else list(protocol),
            "eval_limits": eval_limits or {}, "eval_at": self.checkpoints, "edit_metrics": evaluate,
            "fluency": fluency, "versions": versions(lm.device),
        }
        self._plotted = time.monotonic()  # curve.png: last drawn (the start counts: a short run draws it once, at its end)
        self.curve = {"label": label or f"{self.method.name} · {self.batch_size} per batch", "model": lm.spec,
                      "method": self.method.name, "batch_size": self.batch_size, "points": []}
        self.timings: dict[str, Any] = {"batches": []}

    # ---------------------------------------------------------------- state of a run
    @property
    def edits_done(self) -> int:
        return self.entries[-1].end if self.entries else 0

    def _prepare(self) -> None:
        if self.state is not None:
            return
        t = time.perf_counter()
        if self.templates is None:
            self.templates = self.method.templates(self.lm, self.hp, self.seed, self.template_mode, self.progress)
        self.timings["templates_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.state = self.method.prepare(self.lm, self.hp, progress=self.progress)
        self.method.install(self.lm, self.hp, self.state)
        self.timings["statistics_s"] = time.perf_counter() - t
        if self.state.statistics:  # the corpus, texts and tokens each layer's statistics used
            self.timings["statistics"] = {str(l): v for l, v in self.state.statistics.items()}

    def session_doc(self) -> dict[str, Any]:
        return {"config": self.config, "hparams": self.hp.to_dict(), "templates": self.templates}

    # ---------------------------------------------------------------- resume
    def _resume(self) -> None:
        """Check ``out``'s session against this one, replay its journal, read its curve."""
        doc_file = self.out / SESSION_FILE
        if not doc_file.is_file():
            raise EditfastError(f"--resume: {self.out} holds no journal of an editfast run to continue")
        try:
            doc = json.loads(doc_file.read_text())
            old, old_hp = doc["config"], doc["hparams"]
        except (ValueError, KeyError, TypeError) as e:
            raise EditfastError(f"--resume: cannot read {doc_file}: {e}") from None
        for key in ("model_fingerprint", "model", "dtype", "method", "requests_sha256", "n", "batch_size", "seed",
                    "backend", "templates", "eval_tasks", "eval_limit", "eval_limits", "protocol", "eval_at",
                    "edit_metrics"):
            if old.get(key) != self.config.get(key):
                what = "dataset (the requests)" if key == "requests_sha256" else key
                raise EditfastError(f"--resume: the run in {self.out} has {what} {old.get(key)!r}, this command "
                                    f"{self.config.get(key)!r}")
        if old_hp != self.hp.to_dict():
            diff = sorted(k for k in set(old_hp) | set(self.hp.to_dict()) if old_hp.get(k) != self.hp.to_dict().get(k))
            raise EditfastError(f"--resume: the run in {self.out} has other hyper-parameters ({', '.join(diff)})")
        self.templates = doc.get("templates") or self.templates
        self._prepare()
        entries = Journal(self.out).read()
        for e in entries:  # the whole journal, before any of it is applied
            validate_updates(self.lm, e.updates)
        self.replay(entries)
        if (self.out / CURVE_FILE).is_file():
            try:
                pts = json.loads((self.out / CURVE_FILE).read_text())["points"]
            except (ValueError, KeyError, TypeError):
                pts = []
            self.curve["points"] = [p for p in pts if p["edits"] <= self.edits_done]
        pre = self.out / "journal" / "pre.json"
        if pre.is_file():
            self._pre = json.loads(pre.read_text())

    def replay(self, entries: Sequence[Entry]) -> None:
        """Apply journaled batches onto the current (base) weights and take their method state."""
        for e in entries:
            apply_updates(self.lm, e.updates)
            self.method.restore_state(self.state, {k: v.to(self.lm.device) for k, v in e.state.items()})
            self.entries.append(e)
            self.timings["batches"].append({"seconds": e.info.get("seconds"), "targets_s": e.info.get("targets_s"),
                                            "n": e.end - e.start, "replayed": True})
        self.method.install(self.lm, self.hp, self.state)  # a routed method's memory as replayed

    def release(self) -> None:
        """Give the model back as this session found it: the base weights, and a routed method's
        memory removed (a study's next session, a plan's next calibration, start from it)."""
        restore(self.lm, self.base)
        if self.method.routes:
            routing.uninstall(self.lm.model)

    def undo(self, k: int) -> None:
        """Set the weights (and method state) to the run's after ``k`` edits: base, then batches 1..k."""
        ends = [0] + [e.end for e in self.entries]
        if k not in ends:
            raise EditfastError(f"undo: {k} is not a batch boundary of this run (boundaries: "
                                f"{', '.join(map(str, ends))})")
        keep = self.entries[: ends.index(k)]
        restore(self.lm, self.base)
        self.entries = []
        if self.state is not None:
            self.state.tensors.clear()
        self.timings["batches"] = []
        self.replay(keep)

    # ---------------------------------------------------------------- checkpoints
    def weight_changes(self) -> dict[str, Any]:
        per = {}
        for name, w0 in self.base.items():
            per[name] = weight_change(w0, weight_param(self.lm.model, name)[0].detach(), self.thresholds)
        return {"total": sum_weight_changes(per), "per_matrix": per}

    @property
    def engine(self):
        """The engine generation runs on: the evaluator's where there is one (a study shares it)."""
        if self._engine is None:
            self._engine = self.evaluator.engine if self.evaluator is not None else \
                Engine(self.lm, progress=self.progress)
        return self._engine

    def fluency_of(self, requests: Sequence[Request]) -> list[float | None]:
        """Each request's fluency (None without generation prompts), sampled with the run's seed."""
        return fluency_per_request(self.engine, requests, self.seed)

    def checkpoint(self, edit_seconds: float) -> dict[str, Any]:
        k = self.edits_done
        t = time.perf_counter()
        point: dict[str, Any] = {"edits": k, "batches": len(self.entries), "seconds": edit_seconds}
        by: dict[str, Any] = {}
        if self.evaluate:
            reqs = self.requests[:k] if k else self.requests
            if k == 0 and self._pre is not None:  # the unedited model's scores, taken just before: not twice
                per = [{key: v for key, v in row.items() if key != "fluency"} for row in self._pre]
            else:
                per = edit_metrics(self.lm, reqs, self.kind, self.eval_batch_size, progress=self.progress,
                                   desc=f"edit metrics at {k} edits")
            point["edit_metrics"] = {key: v for key, v in summarize(per).items() if key != "n"}
            point["edit_metrics_of"] = "edited so far" if k else "all requests, unedited"
            if k == len(self.requests):
                self._post = per
            by["edit_metrics"] = time.perf_counter() - t
        if self.evaluator is not None:
            point["tasks"] = self.evaluator.run(base=k == 0)
            # a result read from the cache cost this checkpoint nothing (its "seconds" are its first measurement's)
            by["tasks"] = {name: 0.0 if doc.get("cached") else doc.get("seconds", 0.0)
                           for name, doc in point["tasks"].items()}
        if self.fluency:
            if self._probe is None:
                self._probe = probe(self.lm.tokenizer, self.seed, self.fluency_probe)
            # the unedited model's: measured once, for every session of a study
            point["generation"] = self._probe.measure(self.engine, self._probe.cache_file(self.lm) if k == 0 else None)
            by["generation"] = 0.0 if point["generation"].get("cached") else point["generation"]["seconds"]
        point["weights"] = self.weight_changes()
        memory = self.method.memory_size(self.state)
        if memory is not None:
            point["memory"] = memory
        point["eval_s"] = time.perf_counter() - t
        point["eval_s_by"] = by
        self.curve["points"].append(point)
        if self.out is not None:  # the figure at most once a minute while the run goes on (drawing it costs
            # more than a small run's checkpoint); the run's end draws it whatever the time
            plot = time.monotonic() - self._plotted >= PLOT_EVERY_S
            write_curve(self.out, self.curve, plot)
            if plot:
                self._plotted = time.monotonic()
        return point

    # ---------------------------------------------------------------- the run
    def run(self, resume: bool = False) -> EditResult:
        t_start = time.perf_counter()
        self._pre = self._post = None
        if resume:
            if self.out is None:
                raise EditfastError("resume needs the run's output directory")
            self._resume()
        else:
            if self.out is not None and (Journal(self.out).exists() or (self.out / SESSION_FILE).is_file()):
                raise EditfastError(f"{self.out} already holds an edit run; continue it with --resume, or choose "
                                    "another --out")
            self._prepare()
        if self.out is not None and not resume:
            write_json(self.out / SESSION_FILE, self.session_doc())
        n = len(self.requests)
        if self.evaluate and self._pre is None:
            t = time.perf_counter()
            self._pre = edit_metrics(self.lm, self.requests, self.kind, self.eval_batch_size,
                                     progress=self.progress, desc="scoring before the edits")
            if self.fluency:
                for row, f in zip(self._pre, self.fluency_of(self.requests)):
                    row["fluency"] = f
            self.timings["eval_pre_s"] = time.perf_counter() - t
            if self.out is not None:
                write_json(self.out / "journal" / "pre.json", self._pre)
        done_pts = {p["edits"] for p in self.curve["points"]}
        edit_s = sum(b["seconds"] or 0.0 for b in self.timings["batches"])
        if self.edits_done in self.checkpoints and self.edits_done not in done_pts:
            self.checkpoint(edit_s)
        bar = tqdm(total=n, initial=self.edits_done, unit="edit", desc=f"{self.method.name} edits",
                   disable=not self.progress)
        t_edit = time.perf_counter()
        while self.edits_done < n:
            raise_if_terminated()  # an interruption Python dropped (raised in a __del__) stops at a batch boundary
            entry = self._edit_batch()
            self.entries.append(entry)
            n_edits = entry.end - entry.start
            self.timings["batches"].append({"seconds": entry.info["seconds"], "targets_s": entry.info["targets_s"],
                                            "n": n_edits})
            edit_s += entry.info["seconds"]
            bar.update(n_edits)
            if self.edits_done in self.checkpoints:
                bar.clear()
                self.checkpoint(edit_s)
        bar.close()
        new_edit_s = time.perf_counter() - t_edit
        return self._result(edit_s, new_edit_s, time.perf_counter() - t_start)

    def _edit_batch(self) -> Entry:
        """The next batch: edited, applied (``edit_batch``) and journaled inside a weight guard, so a
        failure leaves the weights as after the last good batch."""
        start = self.edits_done
        chunk = self.requests[start: start + self.batch_size]
        t = time.perf_counter()
        trace: dict = {}
        with guard(self.lm, self.sites):
            ups = edit_batch(self.lm, self.method, chunk, self.hp, self.state, self.templates, trace=trace,
                             backend=self.backend, progress=self.progress)
            info = {"seconds": time.perf_counter() - t, "targets_s": trace.get("targets_s"),
                    "case_ids": [r.case_id for r in chunk]}
            entry = Entry(len(self.entries), start, start + len(chunk), ups, self.state.take_changed(), info)
            self.method.install(self.lm, self.hp, self.state)
            if self.out is not None:
                Journal(self.out).append(entry)
        return entry

    def _result(self, edit_s: float, wall_edit_s: float, total_s: float) -> EditResult:
        if self.evaluate and self._post is None:
            t = time.perf_counter()
            self._post = edit_metrics(self.lm, self.requests, self.kind, self.eval_batch_size,
                                      progress=self.progress, desc="scoring after the edits")
            self.timings["eval_post_s"] = time.perf_counter() - t
        if self.evaluate and self.fluency and "fluency" not in self._post[0]:
            t = time.perf_counter()
            for row, f in zip(self._post, self.fluency_of(self.requests)):
                row["fluency"] = f
            self.timings["fluency_post_s"] = time.perf_counter() - t
        n = len(self.requests)
        tm = self.timings
        tm["edit_s"] = edit_s
        tm["edits_per_s"] = n / max(edit_s, 1e-9)
        tm["targets_s"] = sum(b["targets_s"] or 0.0 for b in tm["batches"])
        tm["solves"] = self.state.solve_reports() if self.state is not None else []
        tm["checkpoints_s"] = sum(p.get("eval_s", 0.0) for p in self.curve["points"])
        tm["total_s"] = total_s
        per_request = []
        for i, r in enumerate(self.requests):
            row: dict[str, Any] = {"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject,
                                   "target_new": r.target_new, "target_true": r.target_true}
            if self.evaluate:
                row["pre"], row["post"] = self._pre[i], self._post[i]
            per_request.append(row)
        summary: dict[str, Any] = {"metric_kind": self.kind, "n": n}
        if self.evaluate:
            summary["pre"], summary["post"] = summarize(self._pre), summarize(self._post)
        if self.curve["points"]:
            last = self.curve["points"][-1].get("weights", {}).get("total")
            summary["weights"] = last
        res = EditResult(self.method.name, self.config, self.hp.to_dict(), [list(g) for g in self.templates],
                         per_request, summary, tm, [e.updates for e in self.entries],
                         self.curve if self.curve["points"] else None, list(self.entries))
        if self.out is not None:
            res.save(self.out)
        return res
