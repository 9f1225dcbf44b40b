"""What the task files share: the data folder, readers that raise DataError, the protocol check,
and the two-label classification task (RTE, BoolQ, SST-2)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from editfast.core.errors import DataError, EditfastError
from editfast.core.paths import PACKAGE_DATA
from editfast.engine.requests import Generate, LogLik, Output, Request
from editfast.eval.base import PROTOCOLS, Task
from editfast.eval.metrics import first_word

DATA_DIR = PACKAGE_DATA / "tasks"  # tests point this elsewhere


def data_path(rel: str) -> Path:
    path = Path(DATA_DIR) / rel
    if not path.is_file():
        raise DataError(f"task data file missing: {path}")
    return path


def read_lines(rel: str) -> Iterator[str]:
    """Lines of a shipped text file (gzip if it ends in .gz), newline stripped."""
    path = data_path(rel)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_jsonl(rel: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The records of a JSONL file; DataError if a line is not a JSON object holding ``keys``."""
    rows = []
    for i, line in enumerate(read_lines(rel), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{rel}:{i}: bad JSON: {e}") from None
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{rel}:{i}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{rel}: no records")
    return rows


class BaseTask(Task):
    """Task with the attributes the engine and the report read beyond ``base.Task``."""

    protocols: tuple[str, ...] = PROTOCOLS
    higher_is_better: bool = True  # False for perplexity

    def check(self, protocol: str) -> None:
        if protocol not in self.protocols:
            raise EditfastError(f"task {self.name} has no protocol {protocol!r} (choose from {', '.join(self.protocols)})")

    def __repr__(self) -> str:
        return f"<task {self.name} ({self.category})>"


class ChoiceTask(BaseTask):
    """A label from a fixed set; ``example["label"]`` indexes ``choices``.

    standard: one LogLik per choice, continuation " " + choice (a single token for common
    tokenizers); prediction = argmax of the log-probabilities (a tie goes to the earlier choice).
    paper: one greedy Generate of ``max_new_tokens``; correct if the first word of the output,
    lowercased and stripped of punctuation, is the gold choice lowercased.
    """

    choices: tuple[str, ...] = ()
    max_new_tokens = 3
    primary = {"standard": "accuracy", "paper": "accuracy"}

    def prompt(self, example: dict[str, Any], protocol: str) -> str:
        raise NotImplementedError

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        self.check(protocol)
        ctx = self.prompt(example, protocol)
        if protocol == "standard":
            return [LogLik(ctx, " " + c) for c in self.choices]
        return [Generate(ctx, self.max_new_tokens)]

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        self.check(protocol)
        if protocol == "standard":
            lp = [o.logprob for o in outputs]
            pred = lp.index(max(lp))
        else:
            word = first_word(outputs[0])
            pred = next((i for i, c in enumerate(self.choices) if c.lower() == word), -1)
        return {"accuracy": float(pred == example["label"])}
