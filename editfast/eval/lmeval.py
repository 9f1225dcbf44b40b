"""editfast's task results in lm-evaluation-harness's layouts: results JSON, standard errors, samples.

    results_doc(result)                   # {"results", "n-samples", "configs", "versions", "n-shot", ...}
    mean_stderr(xs); bootstrap_stderr(f, xs, iters)
    sample_record(...)                    # one line of samples_<task>_<date>.jsonl

The results layout is lm-eval's ``simple_evaluate`` output: ``results`` {task: {"alias",
"acc,none", "acc_stderr,none", ...}}, ``n-samples`` {task: {"original", "effective"}},
``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``group_subtasks``, ``config``, so
``lm_eval.utils.make_table(doc)`` prints it and tools that read lm-eval's files read it. Metric
names follow lm-eval where it has the same metric (``accuracy`` is ``acc``; GSM8K's is
``exact_match``); editfast's own names stay in ``tasks/<task>.json`` and under ``editfast``.
The filter is always ``none`` (a task's answer extraction is part of its metric).

Standard errors are lm-eval's formulas: the sample standard deviation over sqrt(n) for a mean of
per-example values (``mean_stderr``), otherwise the sample standard deviation of the aggregate
over bootstrap resamples drawn as lm-eval draws them (chunks of at most 1,000 resamples, chunk
i from ``random.Random(i)``), so the same per-example values give lm-eval's numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from editfast.core.compat import versions
from editfast.core.paths import write_text
from editfast.engine.requests import (
    Generate,
    LogLik,
    LogLikResult,
    Rolling,
    RollingResult,
)
from editfast.eval.base import Task
from editfast.eval.tasks import TASKS

BOOTSTRAP_ITERS = 1000  # lm-eval's default is 100,000; 1,000 resamples give the stderr to a few percent
FILTER = "none"
OUTPUT_TYPES = {LogLik: "multiple_choice", Generate: "generate_until", Rolling: "loglikelihood_rolling"}


# ---- standard errors ------------------------------------------------------------------------------

def sample_stddev(xs: Sequence[float]) -> float:
    """Unbiased sample standard deviation (nan for fewer than two values)."""
    if len(xs) < 2:
        return math.nan
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def mean_stderr(xs: Sequence[float]) -> float:
    """Standard error of a mean: sample std / sqrt(n) (lm-eval's ``mean_stderr``)."""
    return sample_stddev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def resamples(xs: Sequence, iters: int = BOOTSTRAP_ITERS):
    """lm-eval's bootstrap draws: ``iters // min(1000, iters)`` chunks, chunk i drawn from Random(i)."""
    chunk = min(1000, iters)
    for i in range(iters // chunk if xs else 0):
        rnd = random.Random(i)
        for _ in range(chunk):
            yield rnd.choices(xs, k=len(xs))


def bootstrap_stderr(f: Callable[[Sequence], float], xs: Sequence, iters: int = BOOTSTRAP_ITERS) -> float:
    """Bootstrap standard error of ``f(xs)``, equal to lm-eval's ``bootstrap_stderr(f, xs, iters)``."""
    return sample_stddev([f(s) for s in resamples(xs, iters)])


# ---- names -----------------------------------------------------------------------------------------

def lm_eval_name(task, metric: str) -> str:
    """The lm-eval name of one of ``task``'s metrics (``task.lm_eval_names``, default unchanged)."""
    return getattr(task, "lm_eval_names", {}).get(metric, metric)


def _task(name: str):

    return TASKS.get(name)


# ---- results document ------------------------------------------------------------------------------

def task_config(task, r) -> dict[str, Any]:
    """lm-eval's ``configs[task]`` for one of editfast's tasks (what it evaluated, and how)."""
    mean = task is None or type(task).aggregate is Task.aggregate
    metric_list = [{"metric": lm_eval_name(task, k), "aggregation": "mean" if mean else f"editfast:{r.task}",
                    "higher_is_better": r.higher_is_better} for k in r.metrics]
    return {"task": r.task, "tag": [r.category], "dataset_path": getattr(task, "data_file", ""),
            "test_split": "test", "output_type": r.output_type or None, "num_fewshot": n_shot(task, r.protocol),
            "metric_list": metric_list, "repeats": 1, "should_decontaminate": False,
            "metadata": {"version": version(task), "protocol": r.protocol, "category": r.category,
                         "primary": lm_eval_name(task, r.primary), "editfast_metrics": list(r.metrics)}}


def n_shot(task, protocol: str) -> int:
    return int(getattr(task, "num_fewshot", {}).get(protocol, 0))


def version(task) -> float:
    return float(getattr(task, "version", 1.0))


def results_doc(result, device=None, model_args: str = "") -> dict[str, Any]:
    """An ``EvalResult`` as lm-eval's results document, with editfast's own record under ``editfast``."""

    res, cfgs, vers, shots, hib, counts = {}, {}, {}, {}, {}, {}
    for r in result.tasks:
        task = _task(r.task)
        row: dict[str, Any] = {"alias": r.task}
        for k, v in r.metrics.items():
            name = lm_eval_name(task, k)
            se = r.stderr.get(k)
            row[f"{name},{FILTER}"] = v
            row[f"{name}_stderr,{FILTER}"] = se if se is not None and math.isfinite(se) else "N/A"
        res[r.task] = row
        cfgs[r.task] = task_config(task, r)
        vers[r.task] = version(task)
        shots[r.task] = n_shot(task, r.protocol)
        hib[r.task] = {lm_eval_name(task, k): r.higher_is_better for k in r.metrics}
        counts[r.task] = {"original": r.total if r.total is not None else r.n, "effective": r.n}
    env = versions(device)
    return {"results": res, "group_subtasks": {t: [] for t in res}, "configs": cfgs, "versions": vers,
            "n-shot": shots, "higher_is_better": hib, "n-samples": counts,
            "config": {"model": "editfast", "model_args": model_args or f"model={result.model}",
                       "model_spec": result.model, "batch_size": "auto", "device": env.get("device"),
                       "limit": result.limit, "bootstrap_iters": BOOTSTRAP_ITERS, "random_seed": result.seed,
                       "protocol": result.protocol},
            "date": datetime.now().timestamp(), "transformers_version": env.get("transformers"),
            "environment": env, "editfast": result.to_json()}


def change_doc(before, after) -> dict[str, dict[str, float]]:
    """{task: {"<lm-eval metric>,none": after - before}}."""
    out = {}
    after_by = {t.task: t for t in after.tasks}
    for t in before.tasks:
        task = _task(t.task)
        out[t.task] = {f"{lm_eval_name(task, k)},{FILTER}": after_by[t.task].metrics[k] - v
                       for k, v in t.metrics.items() if k in after_by[t.task].metrics}
    return out


# ---- samples ---------------------------------------------------------------------------------------

def _sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _arguments(req) -> tuple:
    if isinstance(req, LogLik):
        return (req.context, req.continuation)
    if isinstance(req, Generate):
        return (req.prompt, {"until": list(req.stop), "max_gen_toks": req.max_new_tokens, "do_sample": False})
    return (req.text,)


def _response(out) -> Any:
    if isinstance(out, LogLikResult):
        return (out.logprob, out.is_greedy)
    if isinstance(out, RollingResult):
        return out.logprob
    return out


def _sanitize(x):
    """lm-eval's ``sanitize_list``: every leaf of (nested) lists and tuples as a string."""
    if isinstance(x, list):
        return [_sanitize(v) for v in x]
    if isinstance(x, tuple):
        return [_sanitize(v) for v in x]
    return str(x)


def sample_record(task, doc_id: int, example: dict, requests: Sequence, outputs: Sequence,
                  metrics: dict[str, float]) -> dict[str, Any]:
    """One logged sample as lm-eval writes it to ``samples_<task>_<date>.jsonl`` (its field names; the
    arguments as ``gen_args_i.arg_j``, responses as strings), metric values under lm-eval's names."""
    target = example.get(getattr(task, "target_key", "label"))
    args = [_arguments(r) for r in requests]
    resps = [_response(o) for o in outputs]
    named = {lm_eval_name(task, k): v for k, v in metrics.items()}
    doc_json = json.dumps(example, indent=2, default=str, ensure_ascii=False)
    rec = {"doc_id": doc_id, "doc": json.loads(json.dumps(example, default=str)), "target": str(target),
           "arguments": {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(arg)} for i, arg in enumerate(args)},
           "resps": _sanitize([[r] for r in resps]), "filtered_resps": _sanitize(resps), "filter": FILTER,
           "metrics": list(named), "doc_hash": _sha(doc_json), "prompt_hash": _sha(args[0][0] if args else ""),
           "target_hash": _sha(str(target))}
    rec.update(named)
    return rec


def date_id() -> str:
    """lm-eval's file-name timestamp (``samples_<task>_<date_id>.jsonl``)."""
    return datetime.now().isoformat().replace(":", "-")


def write_samples(out_dir, samples: dict[str, list[dict]], stamp: str | None = None) -> list:
    """``samples_<task>_<date_id>.jsonl`` per task in ``out_dir``, each written atomically."""


    stamp = stamp or date_id()
    paths = []
    for task, recs in samples.items():
        p = Path(out_dir) / f"samples_{task}_{stamp}.jsonl"
        write_text(p, "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in recs))
        paths.append(p)
    return paths
