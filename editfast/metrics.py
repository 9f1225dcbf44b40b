"""Edit metrics (CounterFact, zsRE) built on one batched primitive, `score_continuations`.

Definitions follow ROME/MEMIT (`compute_rewrite_quality_counterfact` / `_zsre`): CounterFact
compares P(target) = exp(-mean token NLL) of the new and the true target after each prompt;
zsRE counts teacher-forced argmax hits on the target's tokens.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from editfast.data import Request
from editfast.errors import RequestError


@dataclass
class ContinuationScore:
    """How a model scores `continuation` after `context` (teacher-forced)."""

    logprob_sum: float  # sum of log p of the continuation's tokens
    n_tokens: int
    mean_nll: float  # -logprob_sum / n_tokens
    argmax_correct: list[bool]  # per token: was it the model's argmax at its position

    @property
    def prob(self) -> float:
        """ROME's P(continuation): exp(-mean NLL)."""
        return math.exp(-self.mean_nll)


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 32
) -> list[ContinuationScore]:
    """Score each (context, continuation) pair; the continuation carries its own leading space.

    Context and continuation are tokenised separately without special tokens and concatenated.
    Identical pairs are scored once; pairs are sorted by length into right-padded batches and
    results come back in input order. Only the hidden states that predict continuation tokens go
    through lm_head (or, for models without `get_output_embeddings`, only those rows of the
    logits are kept), and log-softmax runs on them in float32. The model is used in whatever
    mode it is in (call `model.eval()` first if it has dropout).
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

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    can_trim = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]) - len(seqs[i][1]))
    scores: dict[tuple[str, str], ContinuationScore] = {}

    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        for b, i in enumerate(batch):
            ctx, cont = seqs[i]
            ids[b, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
            mask[b, : len(ctx) + len(cont)] = 1
            rows += [b] * len(cont)
            cols += range(len(ctx) - 1, len(ctx) + len(cont) - 1)  # position predicting each token
            targets += cont

        rows_t = torch.tensor(rows, device=device)
        cols_t = torch.tensor(cols, device=device)
        with _head_only_at(model, rows_t, cols_t, ids.shape) as gathered:
            kwargs = {}
            if gathered is None and can_trim:  # logits are needed from the shortest context's end on
                kwargs["logits_to_keep"] = width - min(len(seqs[i][0]) for i in batch) + 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        if gathered:
            picked = logits[0]  # [n_targets, V]
        else:
            picked = logits[rows_t, cols_t - (width - logits.shape[1])]
        del logits
        tgt = torch.tensor(targets, device=device)
        token_lp = picked.float().log_softmax(-1).gather(1, tgt[:, None]).squeeze(1)
        hits = (picked.argmax(-1) == tgt).tolist()
        token_lp = token_lp.double().tolist()

        pos = 0
        for i in batch:
            k = len(seqs[i][1])
            lp = math.fsum(token_lp[pos : pos + k])
            scores[unique[i]] = ContinuationScore(lp, k, -lp / k, hits[pos : pos + k])
            pos += k

    return [replace(scores[p], argmax_correct=list(scores[p].argmax_correct)) for p in pairs]


def counterfact_metrics(
    model: torch.nn.Module, tokenizer: Any, requests: Sequence[Request], batch_size: int = 32
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
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size))

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
    model: torch.nn.Module, tokenizer: Any, requests: Sequence[Request], batch_size: int = 32
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
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size))

    def acc(n: int) -> float | None:
        return _mean([hit for _ in range(n) for hit in next(scores).argmax_correct])

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


@contextmanager
def _head_only_at(
    model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, shape: torch.Size
) -> Iterator[list[bool] | None]:
    """While active, the output embedding (lm_head) sees only the hidden states at (rows, cols)
    of its [B, T, H] input, so the model returns logits [1, n, V] for just those positions
    instead of [B, T, V]; whatever the model does after lm_head (soft-capping, scaling) still
    applies. Yields None when the model has no `get_output_embeddings`, else a list that is
    non-empty once the selection happened (it is skipped if lm_head's input is not [*shape, H])."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module):
        yield None
        return
    done: list[bool] = []

    def select(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        h = args[0] if args else None
        if done or not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[:2] != shape:
            return None
        done.append(True)
        return (h[rows.to(h.device), cols.to(h.device)][None], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield done
    finally:
        handle.remove()


def _tokenize(tokenizer: Any, texts: list[str]) -> dict[str, list[int]]:
    texts = list(dict.fromkeys(texts))
    return dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))


def _mean(xs: Sequence[float | bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None

