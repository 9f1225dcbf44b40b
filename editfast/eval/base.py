"""What a task declares, and what the engine answers.

A task file only declares data, prompt and metric: it turns each example into engine requests
(log-likelihood of a continuation, greedy generation, or rolling log-likelihood of a text), and
scores the engine's outputs. The engine batches the requests of all selected tasks together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

PROTOCOLS = ("standard", "paper")


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
class Rolling:
    """Log-likelihood of a whole text (perplexity): the engine windows it over the model's context."""

    text: str


Request = Union[LogLik, Generate, Rolling]


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


Output = Union[LogLikResult, str, RollingResult]  # str for Generate


class Task:
    """Base class of the tasks. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # short id used on the command line, e.g. "gsm8k"
    category: str = ""  # "reasoning", "nli", "open-domain QA", ...
    data_file: str = ""  # path relative to editfast/_data/tasks/
    primary: dict[str, str] = {}  # protocol -> name of the headline metric
    higher_is_better: bool = True  # of the headline metric (False for perplexity)
    # how lm-evaluation-harness's files name things (eval.json, --log-samples; ``lmeval.py``)
    version: float = 1.0  # of the task's definition
    lm_eval_names: dict[str, str] = {"accuracy": "acc"}  # editfast metric -> lm-eval's name for it
    num_fewshot: dict[str, int] = {}  # protocol -> exemplars in the prompt (0 if absent)
    target_key: str = "label"  # the example's field holding its gold answer

    def load(self) -> list[dict[str, Any]]:
        """All examples of the shipped data file, in file order. Raise DataError if missing/malformed."""
        raise NotImplementedError

    def scored(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The examples that are scored (e.g. GSM8K's few-shot exemplars are not). Default: all."""
        return examples

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        """The engine requests for one example under ``protocol``."""
        raise NotImplementedError

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        """Per-example metric values from the engine outputs (aligned with ``requests``)."""
        raise NotImplementedError

    def aggregate(self, per_example: list[dict[str, float]], protocol: str) -> dict[str, float]:
        """Task-level metrics. Default: the mean of every per-example value."""
        keys = per_example[0].keys() if per_example else []
        return {k: sum(e[k] for e in per_example) / len(per_example) for k in keys}
