"""General-ability evaluation at a session's checkpoints: the tasks' requests built once, one
engine, the unedited model's results cached by the fingerprint of the weights they measured
(``LoadedModel.weights_fingerprint``: a model edited since it was loaded has its own). Each cache
file holds the key it was written under, and is read only under that key.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

from editfast.core.paths import cache_dir, write_cache
from editfast.engine.engine import Engine
from editfast.eval.runner import EvalPlan, TaskResult
from editfast.eval.tasks import resolve_tasks


class Evaluator:
    """General-ability evaluation at checkpoints: requests built once, one engine, cached base.

    ``protocols``: one or several; with several, a task's results are keyed "task:protocol".
    ``limits``: per-task example limits over ``limit`` (e.g. {"wikitext": 10}).
    """

    def __init__(self, lm, tasks: str, protocols: str | Sequence[str], limit: int | None, seed: int,
                 progress: bool = True, limits: dict[str, int | None] | None = None, batch_tokens: int | str = "auto"):

        self.lm, self.seed, self.progress, self.batch_tokens = lm, seed, progress, batch_tokens
        protocols = [protocols] if isinstance(protocols, str) else list(protocols)
        limits = limits or {}
        resolved = resolve_tasks(tasks)
        names = [t.name for t in resolved]
        free = {t.name for t in resolved if t.protocol_free}
        self.plans = []  # (protocol, limit, plan)
        for i, p in enumerate(protocols):
            for lim in dict.fromkeys(limits.get(t, limit) for t in names):
                group = [t for t in names if limits.get(t, limit) == lim and not (i and t in free)]
                if group:
                    self.plans.append((p, lim, EvalPlan.build(group, p, lim, seed)))
        # (task, protocol scored under, protocol reported under too): WikiText once, not once per protocol
        self.shared = [(t, protocols[0], p) for p in protocols[1:] for t in names if t in free]
        self.keyed = len(protocols) > 1
        self._engine = None

    @property
    def engine(self):

        if self._engine is None:
            self._engine = Engine(self.lm, batch_tokens=self.batch_tokens, progress=self.progress)
        return self._engine

    def key(self, task: str, protocol: str) -> str:
        return f"{task}:{protocol}" if self.keyed else task

    def cache_key(self, task: str, protocol: str, limit: int | None) -> list:
        """What a cached result is keyed by: the weights as they are now, the task and its settings."""
        return [self.lm.weights_fingerprint, task, protocol, limit, self.seed, str(self.lm.dtype),
                self.lm.device.type]

    def cache_file(self, task: str, protocol: str, limit: int | None) -> Path:
        key = json.dumps(self.cache_key(task, protocol, limit))
        return cache_dir() / "eval" / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def run(self, base: bool = False) -> dict[str, dict]:
        """{task: {"primary", "higher_is_better", "metrics", "stderr", "n", "seconds", ...}}; ``base``:
        the unedited model, read from (and written to) the cache."""

        out: dict[str, dict] = {}
        for p, lim, plan in self.plans:
            names = [t.name for t, _, _ in plan.entries]
            if base:
                for name in names:
                    f = self.cache_file(name, p, lim)
                    if not f.is_file():
                        continue
                    try:
                        saved = json.loads(f.read_text())
                        if saved.get("cache_key") != self.cache_key(name, p, lim):
                            continue  # written under another key (or before keys were kept): a miss, rewritten
                        doc = TaskResult.from_json(saved).to_json(self.lm.spec, self.seed)
                        out[self.key(name, p)] = {**doc, "cached": True}
                    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                        warnings.warn(f"ignoring the corrupt cache file {f} ({e}); evaluating again", RuntimeWarning,
                                      stacklevel=2)
                missing = [n for n in names if self.key(n, p) not in out]
                plan = EvalPlan.build(missing, p, lim, self.seed) if missing else None
            if plan is None:
                continue
            for t in plan.run(self.lm, engine=self.engine, progress=self.progress).tasks:
                doc = t.to_json(self.lm.spec, self.seed)
                if base:
                    key = self.cache_key(t.task, p, lim)
                    write_cache(self.cache_file(t.task, p, lim),
                                json.dumps({**doc, "cache_key": key}, indent=2, default=str) + "\n")
                out[self.key(t.task, p)] = doc
        for name, scored, p in self.shared:  # the same numbers; their seconds were spent once
            out[self.key(name, p)] = {**out[self.key(name, scored)], "protocol": p, "seconds": 0.0,
                                      "requests_per_s": None, "scored_under": scored}
        order = [self.key(t.name, p) for p, _, plan in self.plans for t, _, _ in plan.entries]
        return {k: out[k] for k in order + [self.key(name, p) for name, _, p in self.shared]}
