"""What a task declares, and what the engine answers.

A task file only declares data, prompt and metric: it turns each example into engine requests
(log-likelihood of a continuation, greedy generation, or rolling log-likelihood of a text), and
scores the engine's outputs. The engine batches the requests of all selected tasks together.
"""

from __future__ import annotations

from typing import Any, Sequence

from editfast.engine.requests import Output, Request

PROTOCOLS = ("standard", "paper")


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
    # the same requests and scores under every protocol: an evaluation under several scores it once
    protocol_free: bool = False

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
