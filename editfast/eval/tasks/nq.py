"""Natural Questions open (open-domain QA): NQ-open dev (3,610), used as its test set; closed book.

standard: zero-shot "Answer these questions:\\nQ: {question}?\\nA:"; Generate 32 tokens, stop at
  "\\n" / "Q:"; exact match and token F1 against the gold answers (max over them), SQuAD
  normalisation (lowercase, no punctuation, no articles a/an/the, collapsed whitespace).
paper: "Q: {question}?\\nA:"; Generate 16 tokens, stop at "\\n"; exact match. The study gave the
  model a retrieved passage ("Refer to the passage below and answer the following question.
  Passage: {document} Question: {question}", Model-Editing-Hurt `test-OpenDomainQA.py`) and
  counted a hit if any span of the output matched; our data has no passages, so it is closed book
  and the whole answer must match.
"""

from __future__ import annotations

from typing import Any, Sequence

from editfast.core.errors import DataError
from editfast.engine.requests import Generate, Output, Request
from editfast.eval.metrics import exact_match, token_f1
from editfast.eval.tasks._common import BaseTask, read_jsonl


class NQ(BaseTask):
    name, category, data_file = "nq", "open-domain QA", "nq_open/NQ-open.dev.jsonl"
    primary = {"standard": "exact_match", "paper": "exact_match"}
    target_key = "answers"

    def load(self) -> list[dict[str, Any]]:
        out = []
        for row in read_jsonl(self.data_file, ("question", "answer")):
            if not isinstance(row["answer"], list) or not row["answer"]:
                raise DataError(f"{self.data_file}: answers of {row['question']!r} are not a non-empty list")
            out.append({"question": row["question"], "answers": row["answer"]})
        return out

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        self.check(protocol)
        q = example["question"]
        if protocol == "standard":
            return [Generate(f"Answer these questions:\nQ: {q}?\nA:", 32, ("\n", "Q:"))]
        return [Generate(f"Q: {q}?\nA:", 16, ("\n",))]

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        self.check(protocol)
        pred, golds = outputs[0], example["answers"]
        if protocol == "standard":
            return {"exact_match": exact_match(pred, golds), "f1": token_f1(pred, golds)}
        return {"exact_match": exact_match(pred, golds)}
