"""What the engine answers: log-likelihood of a continuation (``LogLik``), greedy generation
(``Generate``), top-k sampling (``Sample``), rolling log-likelihood of a whole text (``Rolling``),
and their results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class LogLik:
    """Score log p(continuation | context). The continuation carries its own leading space."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Generate:
    """Greedy continuation of ``prompt``: at most ``max_new_tokens``, cut at the first stop string."""

    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sample:
    """Top-k sampled continuation of ``prompt``: exactly ``max_new_tokens`` tokens, an end-of-text
    token included (it is dropped from the text and does not end the sample), as ROME's
    ``generate_fast``. ``seed`` alone fixes the sample: the same request gives the same text in
    any batch (up to the float rounding of its logits)."""

    prompt: str
    max_new_tokens: int
    top_k: int = 5
    seed: int = 0
    stop: tuple[str, ...] = ()  # none: a sample runs to its length


@dataclass(frozen=True)
class Rolling:
    """Log-likelihood of a whole text (perplexity): the engine windows it over the model's context."""

    text: str


Request = Union[LogLik, Generate, Sample, Rolling]


@dataclass(frozen=True)
class LogLikResult:
    logprob: float  # sum of log p over the continuation's tokens
    n_tokens: int
    is_greedy: bool  # every continuation token is the argmax
    n_greedy: int = 0  # how many continuation tokens are the argmax


@dataclass(frozen=True)
class RollingResult:
    logprob: float  # sum over all predicted tokens
    n_tokens: int  # tokens predicted
    n_words: int = 0
    n_bytes: int = 0


Output = Union[LogLikResult, str, RollingResult]  # str for Generate and Sample
