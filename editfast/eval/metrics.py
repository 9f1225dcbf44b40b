"""Metrics of the general-ability tasks: pure functions on strings and numbers, no model.

- ``normalize_answer`` / ``exact_match`` / ``token_f1``: SQuAD's answer normalisation and scores.
- ``extract_number`` / ``numbers``: numbers in a generation, in a canonical form ("1,234.50" -> "1234.5").
- ``first_word``: the first word of a generation, lowercased, punctuation stripped.
- ``rouge``: ROUGE-1/2/L F-measure from the ``rouge-score`` package (Porter stemmer on).
- ``iob2_entities`` / ``entity_prf``: entity spans from IOB tags; precision, recall and F1.
- ``ranks``: recall@1, recall@2 and reciprocal rank of the gold option among scored options.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Sequence

from editfast.core.errors import EditfastError

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer (0.0 for no golds)."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def _f1(pred_toks: list[str], gold_toks: list[str]) -> float:
    if not pred_toks or not gold_toks:  # SQuAD: both empty -> 1, one empty -> 0
        return float(pred_toks == gold_toks)
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_toks), same / len(gold_toks)
    return 2 * p * r / (p + r)


def token_f1(pred: str, golds: str | Sequence[str]) -> float:
    """SQuAD token F1 of the normalised answers, the max over gold answers (0.0 for no golds)."""
    toks = normalize_answer(pred).split()
    return max((_f1(toks, normalize_answer(g).split()) for g in _golds(golds)), default=0.0)


_NUMBER = re.compile(r"(?<!\d)-?\d[\d,]*(?:\.\d+)?")


def canonical_number(s: str) -> str | None:
    """"1,234.50" -> "1234.5", "18.00" -> "18", "$-3" -> "-3"; None if ``s`` is not a number."""
    try:
        d = Decimal(s.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def numbers(text: str) -> list[str]:
    """Every number in ``text``, in order, canonical (commas and $ dropped, "-" kept unless after a digit)."""
    out = (canonical_number(m) for m in _NUMBER.findall(text.replace("$", "")))
    return [n for n in out if n is not None]


def extract_number(text: str) -> str | None:
    """The answer number of a chain of thought: the first number after the last "The answer is"
    (case-insensitive), else the last number of the text; None if there is none."""
    i = text.lower().rfind("the answer is")
    if i >= 0:
        after = numbers(text[i:])
        if after:
            return after[0]
    found = numbers(text)
    return found[-1] if found else None


def first_word(text: str) -> str:
    """The first whitespace-separated word, lowercased, punctuation stripped from both ends."""
    words = text.split()
    return words[0].strip(string.punctuation).lower() if words else ""


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer  # pulls nltk (~0.5 s): only SAMSum needs it
    except ImportError:  # pragma: no cover - dependency of the package
        raise EditfastError("ROUGE needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over (prediction, reference) pairs (rouge-score, stemmer on)."""
    if len(preds) != len(refs):
        raise ValueError(f"rouge: {len(preds)} predictions but {len(refs)} references")
    out = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs):
        s = _rouge_scorer().score(r, p)  # score(target, prediction)
        for k in out:
            out[k] += s[k].fmeasure
    return {k: v / len(preds) for k, v in out.items()} if preds else out


def iob2_entities(tokens: Sequence[str], tags: Sequence[str]) -> list[tuple[str, str]]:
    """(type, text) of the entities of an IOB2-tagged sentence, in order; text = tokens joined by spaces.
    An I-X that does not continue an X entity (after O, at the start, or after another type) starts
    a new one, as in conlleval."""
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    ents: list[tuple[str, list[str]]] = []
    cur: str | None = None
    for tok, tag in zip(tokens, tags):
        if tag == "O":
            cur = None
            continue
        prefix, _, typ = tag.partition("-")
        if prefix not in ("B", "I") or not typ:
            raise ValueError(f"bad IOB tag {tag!r}")
        if prefix == "B" or cur != typ:
            ents.append((typ, []))
            cur = typ
        ents[-1][1].append(tok)
    return [(t, " ".join(w)) for t, w in ents]


def entity_prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts; a zero denominator gives 0.0 (as seqeval does)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def ranks(scores: Sequence[float], gold: int) -> tuple[float, float, float]:
    """(recall@1, recall@2, reciprocal rank) of option ``gold``. Ties count against the gold:
    its rank is 1 + the number of other options scoring >= it, so all-equal scores give rank n.
    NaN scores rank last."""
    s = [(-math.inf if math.isnan(x) else x) for x in scores]
    rank = 1 + sum(1 for i, x in enumerate(s) if i != gold and x >= s[gold])
    return float(rank <= 1), float(rank <= 2), 1.0 / rank
