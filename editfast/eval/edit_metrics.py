"""Edit metrics (CounterFact, zsRE) built on one batched primitive, `score_continuations`.

Definitions follow ROME/MEMIT (`compute_rewrite_quality_counterfact` / `_zsre`): CounterFact
compares P(target) = exp(-mean token NLL) of the new and the true target after each prompt;
zsRE counts teacher-forced argmax hits on the target's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from editfast.core.errors import RequestError
from editfast.data.requests import Request
from editfast.engine.engine import Engine

HEADLINE_EDIT_METRICS = ("efficacy_success", "rewrite_acc")  # the first present is a checkpoint's headline


@dataclass
class ContinuationScore:
    """How a model scores `continuation` after `context` (teacher-forced)."""

    logprob_sum: float  # sum of log p of the continuation's tokens
    n_tokens: int
    mean_nll: float  # -logprob_sum / n_tokens
    n_argmax: int  # continuation tokens that were the model's argmax at their position

    @property
    def prob(self) -> float:
        """ROME's P(continuation): exp(-mean NLL)."""
        return math.exp(-self.mean_nll)


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
    progress: bool = False, desc: str = "edit metrics"
) -> list[ContinuationScore]:
    """Score each (context, continuation) pair; the continuation carries its own leading space.

    Context and continuation are tokenised separately without special tokens and concatenated,
    as ROME/MEMIT's evaluation does. Identical pairs are scored once. The scoring itself is the
    evaluation engine's (``Engine.score_ids``): contexts run once and are KV-cached, and the
    fused log-prob kernel never materialises [B, T, V] logits. ``batch_size`` sets the engine's
    token budget (64 tokens a row). ``progress``: a bar named ``desc`` over the pairs.
    """

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    contexts = _tokenize(tokenizer, [c for c, _ in unique])
    conts = _tokenize(tokenizer, [t for _, t in unique])
    seqs = [(contexts[c], conts[t]) for c, t in unique]
    for (c, t), (c_ids, t_ids) in zip(unique, seqs):
        if not c_ids or not t_ids:
            raise RequestError(f"cannot score {t!r} after {c!r}: context and continuation must be non-empty")
    lm = SimpleNamespace(model=model, tokenizer=tokenizer, spec=type(model).__name__)
    results = Engine(lm, batch_tokens=64 * batch_size, progress=progress).score_ids(seqs, desc=desc)
    scores = {p: ContinuationScore(r.logprob, r.n_tokens, -r.logprob / r.n_tokens, r.n_greedy)
              for p, r in zip(unique, results)}
    return [scores[p] for p in pairs]


def counterfact_metrics(
    model: torch.nn.Module, tokenizer: Any, requests: Sequence[Request], batch_size: int = 32, **progress
) -> list[dict[str, Any]]:
    """Per request: `p_new`, `p_true` on the rewrite prompt; `efficacy_success` (P(new) > P(true))
    and `efficacy_magnitude` (P(new) - P(true)); `paraphrase_success` / `_magnitude` (means over
    paraphrase prompts); `neighborhood_success` (mean of [P(true) > P(new)], the specificity) and
    `neighborhood_magnitude` (mean of P(true) - P(new)). On neighbourhood prompts "true" is the
    request's neighborhood_target (CounterFact: target_true). Fields without prompts are None."""
    pairs: list[tuple[str, str]] = []
    for r in requests:
        if r.target_true is None:
            raise RequestError(f"request {r.case_id}: CounterFact metrics need target_true")
        new, true, nb_true = " " + r.target_new, " " + r.target_true, " " + (r.neighborhood_target or r.target_true)
        for p in (r.filled(), *r.paraphrase_prompts):
            pairs += [(p, new), (p, true)]
        for p in r.neighborhood_prompts:
            pairs += [(p, new), (p, nb_true)]
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size, **progress))

    def take(n: int) -> list[tuple[ContinuationScore, ContinuationScore]]:
        return [(next(scores), next(scores)) for _ in range(n)]

    out = []
    for r in requests:
        ((new, true),) = take(1)
        para, nb = take(len(r.paraphrase_prompts)), take(len(r.neighborhood_prompts))
        out.append(
            {
                "case_id": r.case_id,
                "p_new": new.prob,
                "p_true": true.prob,
                "efficacy_success": new.mean_nll < true.mean_nll,
                "efficacy_magnitude": new.prob - true.prob,
                "paraphrase_success": _mean([n.mean_nll < t.mean_nll for n, t in para]),
                "paraphrase_magnitude": _mean([n.prob - t.prob for n, t in para]),
                "neighborhood_success": _mean([t.mean_nll < n.mean_nll for n, t in nb]),
                "neighborhood_magnitude": _mean([t.prob - n.prob for n, t in nb]),
            }
        )
    return out


def zsre_metrics(
    model: torch.nn.Module, tokenizer: Any, requests: Sequence[Request], batch_size: int = 32, **progress
) -> list[dict[str, Any]]:
    """Per request, MEMIT's token accuracies (teacher-forced argmax hits, pooled over the
    prompts of a kind): `rewrite_acc` and `paraphrase_acc` of " " + target_new,
    `neighborhood_acc` of " " + neighborhood_target. Fields without prompts are None."""
    pairs: list[tuple[str, str]] = []
    for r in requests:
        if r.neighborhood_prompts and r.neighborhood_target is None:
            raise RequestError(f"request {r.case_id}: neighborhood prompts without a neighborhood_target")
        new = " " + r.target_new
        pairs += [(p, new) for p in (r.filled(), *r.paraphrase_prompts)]
        pairs += [(p, " " + str(r.neighborhood_target)) for p in r.neighborhood_prompts]
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size, **progress))

    def acc(n: int) -> float | None:
        """Token accuracy pooled over the ``n`` next prompts' target tokens."""
        got = [next(scores) for _ in range(n)]
        return sum(s.n_argmax for s in got) / sum(s.n_tokens for s in got) if got else None

    return [
        {
            "case_id": r.case_id,
            "rewrite_acc": acc(1),
            "paraphrase_acc": acc(len(r.paraphrase_prompts)),
            "neighborhood_acc": acc(len(r.neighborhood_prompts)),
        }
        for r in requests
    ]


def summarize(per_request: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric or bool field over the requests that have it (None is skipped;
    a field that is None everywhere stays None), plus "n". `case_id` is not averaged."""
    out: dict[str, Any] = {"n": len(per_request)}
    keys = dict.fromkeys(k for d in per_request for k in d if k != "case_id")
    for k in keys:
        values = [d.get(k) for d in per_request]
        if all(v is None or isinstance(v, (bool, int, float)) for v in values):
            out[k] = _mean([float(v) for v in values if v is not None])
    return out


def _tokenize(tokenizer: Any, texts: list[str]) -> dict[str, list[int]]:
    texts = list(dict.fromkeys(texts))
    return dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))


def _mean(xs: Sequence[float | bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def metric_kind(requests: Sequence[Request]) -> str:
    """CounterFact-style metrics need target_true on every request; otherwise zsRE-style accuracy."""
    return "counterfact" if all(r.target_true for r in requests) else "zsre"


def edit_metrics(lm, requests: Sequence[Request], kind: str, batch_size: int = 32, progress: bool = False,
                 desc: str = "edit metrics") -> list[dict]:
    """Per request, ``kind``'s metrics (``counterfact_metrics`` or ``zsre_metrics``); ``progress``: a bar named
    ``desc`` over the scored pairs."""
    fn = {"counterfact": counterfact_metrics, "zsre": zsre_metrics}[kind]
    return fn(lm.model, lm.tokenizer, list(requests), batch_size=batch_size, progress=progress, desc=desc)


def headline_edit_metric(metrics: dict | None) -> tuple[str, float] | None:
    """Efficacy (CounterFact) or rewrite accuracy (zsRE): the edit metric a curve shows first."""
    if not metrics:
        return None
    key = next((k for k in HEADLINE_EDIT_METRICS if k in metrics), next(iter(metrics)))
    return key, metrics[key]
