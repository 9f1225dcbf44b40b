"""Evaluate a model on the general-ability tasks, before and after editing.

    result = evaluate(lm, "all", protocol="standard", limit=100, seed=0)
    markdown_table(result)

    plan = EvalPlan.build("all", "standard", limit=100, seed=0)  # examples and requests, built once
    before, after = plan.run(lm), plan.run(edited_lm)

All selected tasks' requests are pooled into one engine call (sorted by length across tasks).
Subsampling (``limit``) is deterministic: the same seed picks the same examples. Every metric
has a standard error (``stderr``) by lm-eval's formulas (``lmeval.py``): sample std / sqrt(n) for
means of per-example values, bootstrap otherwise. ``write_report`` writes eval.json in
lm-evaluation-harness's results layout and, with ``log_samples``, its per-sample files.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editfast.core import distributed as dist
from editfast.core.errors import EditfastError
from editfast.core.paths import atomic_path, write_json, write_text
from editfast.engine.engine import Engine
from editfast.engine.requests import Generate, LogLik
from editfast.eval.base import PROTOCOLS, Task
from editfast.eval.lmeval import (
    BOOTSTRAP_ITERS,
    OUTPUT_TYPES,
    change_doc,
    date_id,
    mean_stderr,
    resamples,
    results_doc,
    sample_record,
    sample_stddev,
    write_samples,
)
from editfast.eval.tasks import resolve_tasks


def _cost(req) -> int:
    """Rough token cost of a request (characters / 4), to apportion pooled engine time to tasks."""
    if isinstance(req, LogLik):
        return (len(req.context) + len(req.continuation)) // 4 + 1
    if isinstance(req, Generate):
        return len(req.prompt) // 4 + 8 * req.max_new_tokens
    return len(req.text) // 4 + 1


@dataclass
class TaskResult:
    task: str
    category: str
    protocol: str
    metrics: dict[str, float]
    primary: str
    higher_is_better: bool
    n: int
    seconds: float
    requests: int
    stderr: dict[str, float] = field(default_factory=dict)  # metric -> standard error
    total: int | None = None  # examples the task has (n of them were scored)
    output_type: str = ""  # lm-eval's request kind: multiple_choice, generate_until, loglikelihood_rolling

    def to_json(self, model: str, seed: int) -> dict[str, Any]:
        return {"task": self.task, "category": self.category, "protocol": self.protocol, "model": model,
                "seed": seed, "n": self.n, "metrics": self.metrics, "primary": self.primary,
                "higher_is_better": self.higher_is_better, "seconds": self.seconds, "requests": self.requests,
                "requests_per_s": self.requests / self.seconds if self.seconds else None, "stderr": self.stderr,
                "n_total": self.total, "output_type": self.output_type}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "TaskResult":
        """Inverse of ``to_json`` (model and seed belong to the EvalResult; requests_per_s is derived)."""
        return cls(doc["task"], doc["category"], doc["protocol"], dict(doc["metrics"]), doc["primary"],
                   doc["higher_is_better"], doc["n"], doc["seconds"], doc["requests"], dict(doc.get("stderr", {})),
                   doc.get("n_total"), doc.get("output_type", ""))


@dataclass
class EvalResult:
    model: str
    protocol: str
    seed: int
    limit: int | None
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0
    engine: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[dict]] | None = field(default=None, compare=False, repr=False)  # run(log_samples=True)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "protocol": self.protocol, "seed": self.seed, "limit": self.limit,
                "seconds": self.seconds, "engine": self.engine,
                "tasks": {t.task: t.to_json(self.model, self.seed) for t in self.tasks}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "EvalResult":
        """Inverse of ``to_json``, e.g. to read back a cached eval.json (or its "before"/"after")."""
        return cls(doc["model"], doc["protocol"], doc["seed"], doc["limit"],
                   [TaskResult.from_json(t) for t in doc["tasks"].values()], doc["seconds"], dict(doc["engine"]))


def select_ids(task: Task, limit: int | None, seed: int) -> tuple[list[dict], list[int], int]:
    """(selected examples, their indices among the scored examples, how many are scored in all)."""
    examples = task.scored(task.load())
    ids = list(range(len(examples)))
    if limit is not None and limit < len(examples):
        rng = random.Random(f"{seed}:{task.name}")
        ids = sorted(rng.sample(ids, limit))
    return [examples[i] for i in ids], ids, len(examples)


def select(task: Task, limit: int | None, seed: int) -> list[dict]:
    return select_ids(task, limit, seed)[0]


def stderrs(task: Task, per_example: list[dict[str, float]], protocol: str,
            iters: int = BOOTSTRAP_ITERS) -> dict[str, float]:
    """Standard error of each of ``task.aggregate``'s metrics, by lm-eval's formulas.

    A task with the default aggregate (mean of per-example values): sample std / sqrt(n)
    (lm-eval's ``mean_stderr``). Any other aggregate (corpus F1, perplexity from summed counts):
    the sample std of the aggregate over lm-eval's ``iters`` bootstrap resamples (``lmeval.resamples``;
    all metrics from the same resamples, as lm-eval's per-metric runs draw them).
    """
    metrics = task.aggregate(per_example, protocol)
    if type(task).aggregate is Task.aggregate:
        return {k: mean_stderr([e[k] for e in per_example]) for k in metrics}
    boot: dict[str, list[float]] = {k: [] for k in metrics}
    for sample in resamples(per_example, iters):
        for k, v in task.aggregate(sample, protocol).items():
            if k in boot and math.isfinite(v):
                boot[k].append(v)
    return {k: sample_stddev(v) for k, v in boot.items()}


@dataclass
class EvalPlan:
    """The selected examples of each task and their engine requests, built once and run on any model.

    ``entries`` holds (task, examples, per-example (start, end) slices into ``pool``).
    """

    protocol: str
    limit: int | None
    seed: int
    entries: list[tuple[Task, list[dict], list[tuple[int, int]]]]
    pool: list[Any]
    doc_ids: dict[str, list[int]] = field(default_factory=dict)  # task -> the examples' indices among its scored
    totals: dict[str, int] = field(default_factory=dict)  # task -> how many examples it scores in all

    @classmethod
    def build(cls, tasks: str | list[str] = "all", protocol: str = "standard", limit: int | None = None,
              seed: int = 0) -> "EvalPlan":
        if protocol not in PROTOCOLS:
            raise EditfastError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if limit is not None and limit <= 0:
            raise EditfastError(f"--limit must be a positive number of examples, got {limit}")
        entries, pool, doc_ids, totals = [], [], {}, {}
        for task in resolve_tasks(tasks if isinstance(tasks, str) else ",".join(tasks)):
            examples, doc_ids[task.name], totals[task.name] = select_ids(task, limit, seed)
            slices = []
            for ex in examples:
                reqs = task.requests(ex, protocol)
                slices.append((len(pool), len(pool) + len(reqs)))
                pool.extend(reqs)
            entries.append((task, examples, slices))
        return cls(protocol, limit, seed, entries, pool, doc_ids, totals)

    def run(self, lm, engine: Engine | None = None, batch_tokens: int | str = "auto",
            progress: bool = True, log_samples: bool = False) -> EvalResult:
        """Run every request through one engine call, then score each task (metrics and stderr);
        ``log_samples``: keep every example's record in lm-eval's sample format (``result.samples``)."""

        t0 = time.perf_counter()
        engine = engine or Engine(lm, batch_tokens=batch_tokens, progress=progress)
        examples = [range(a, b) for _, _, slices in self.entries for a, b in slices]  # kept on one rank
        outputs = dist.sharded_map(engine.run, self.pool, examples, _cost)  # torchrun: a shard per rank
        total = time.perf_counter() - t0
        cost_all = sum(_cost(r) for r in self.pool) or 1
        p = self.protocol
        result = EvalResult(lm.spec, p, self.seed, self.limit, seconds=total, engine=dict(engine.stats))
        for task, examples, slices in self.entries:
            per_ex = [task.score(ex, outputs[a:b], p) for ex, (a, b) in zip(examples, slices)]
            share = sum(_cost(self.pool[i]) for a, b in slices for i in range(a, b)) / cost_all
            kind = OUTPUT_TYPES.get(type(self.pool[slices[0][0]]), "") if slices and slices[0][1] > slices[0][0] else ""
            result.tasks.append(TaskResult(task.name, task.category, p, task.aggregate(per_ex, p), task.primary[p],
                                           task.higher_is_better, len(examples), total * share,
                                           sum(b - a for a, b in slices), stderrs(task, per_ex, p),
                                           self.totals.get(task.name), kind))
            if log_samples:
                ids = self.doc_ids.get(task.name) or list(range(len(examples)))
                result.samples = result.samples or {}
                result.samples[task.name] = [sample_record(task, i, ex, self.pool[a:b], outputs[a:b], m)
                                             for i, ex, (a, b), m in zip(ids, examples, slices, per_ex)]
        return result


def evaluate(lm, tasks: str | list[str] = "all", protocol: str = "standard", limit: int | None = None,
             seed: int = 0, batch_tokens: int | str = "auto", progress: bool = True,
             engine: Engine | None = None, log_samples: bool = False) -> EvalResult:
    """``EvalPlan.build(tasks, protocol, limit, seed).run(lm, ...)``."""
    return EvalPlan.build(tasks, protocol, limit, seed).run(lm, engine, batch_tokens, progress, log_samples)


def markdown_table(before: EvalResult, after: EvalResult | None = None) -> str:
    """One row per task: the headline metric (and all metrics), before/after and the change."""
    rows = []
    if after is None:
        rows.append("| task | category | metric | value | n | seconds | requests/s |")
        rows.append("|---|---|---|---|---|---|---|")
        for t in before.tasks:
            rps = t.requests / t.seconds if t.seconds else 0
            se = t.stderr.get(t.primary)
            pm = f" ± {se:.4f}" if se is not None and math.isfinite(se) else ""
            rows.append(f"| {t.task} | {t.category} | {t.primary} | {t.metrics[t.primary]:.4f}{pm} | {t.n} | "
                        f"{t.seconds:.1f} | {rps:.1f} |")
        return "\n".join(rows)
    rows.append("| task | category | metric | before | after | change |")
    rows.append("|---|---|---|---|---|---|")
    after_by = {t.task: t for t in after.tasks}
    for t in before.tasks:
        a = after_by[t.task]
        b, v = t.metrics[t.primary], a.metrics[t.primary]
        arrow = "" if t.higher_is_better else " (lower is better)"
        rows.append(f"| {t.task} | {t.category} | {t.primary}{arrow} | {b:.4f} | {v:.4f} | {v - b:+.4f} |")
    return "\n".join(rows)


def change_plot(before: EvalResult, after: EvalResult, path) -> None:
    """PNG bar chart of each task's relative change of its headline metric (damage is negative), with
    ± one standard error of the change: sqrt(se_before² + se_after²) / |before| (the two evaluations
    treated as independent, which overstates the error of a paired change)."""
    import matplotlib  # ~0.5 s: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (idem)

    names, changes, errs = [], [], []
    after_by = {t.task: t for t in after.tasks}
    for t in before.tasks:
        b, a = t.metrics[t.primary], after_by[t.task].metrics[t.primary]
        rel = (a - b) / abs(b) * 100 if b else 0.0
        changes.append(rel if t.higher_is_better else -rel)
        ses = [x.stderr.get(t.primary, math.nan) for x in (t, after_by[t.task])]
        err = math.sqrt(sum(se * se for se in ses)) / abs(b) * 100 if b else math.nan
        errs.append(err if math.isfinite(err) else 0.0)
        names.append(f"{t.task}\n{t.primary}")
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    bars = ax.bar(names, changes, yerr=errs, capsize=4, ecolor="#333",
                  color=["#2a7" if c >= 0 else "#c33" for c in changes])
    ax.bar_label(bars, labels=[f"{c:+.1f}%" for c in changes], padding=2, fontsize=8)
    lo = min([c - e for c, e in zip(changes, errs)] + [0.0])
    hi = max([c + e for c, e in zip(changes, errs)] + [0.0])
    pad = 0.15 * ((hi - lo) or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("change after editing (%, higher = better; ± stderr)")
    ax.set_title(f"{before.model} · {before.protocol} protocol · n ≤ {before.limit or 'all'} per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(out, before: EvalResult, after: EvalResult | None = None, device=None) -> None:
    """eval.json, tasks/<task>.json, report.md, with ``after`` change.png, and where the results hold
    samples (``log_samples``) samples_<task>_<date>.jsonl (with ``after``: in before/ and after/).

    eval.json is lm-evaluation-harness's results layout (``lmeval.results_doc``) of the evaluated
    model: with ``after`` that is the edited model, and ``before`` holds the unedited model's
    document in the same layout, ``change`` the difference of every metric."""


    out = Path(out)
    doc = results_doc(after if after is not None else before, device)
    if after is not None:
        doc["before"] = results_doc(before, device)
        doc["change"] = change_doc(before, after)
    stamp = date_id()
    for sub, res in (("before", before), ("after", after)) if after is not None else (("", before),):
        if res.samples:
            write_samples(out / sub, res.samples, stamp)
    for t in before.tasks:
        one = {"before": t.to_json(before.model, before.seed)} if after else t.to_json(before.model, before.seed)
        if after is not None:
            one["after"] = next(a for a in after.tasks if a.task == t.task).to_json(after.model, after.seed)
        write_json(out / "tasks" / f"{t.task}.json", one)
    write_json(out / "eval.json", doc)
    title = f"# {before.model} · {before.protocol} protocol · seed {before.seed} · limit {before.limit}\n\n"
    write_text(out / "report.md", title + markdown_table(before, after) + "\n")
    if after is not None:
        with atomic_path(out / "change.png") as tmp:
            change_plot(before, after, tmp)
