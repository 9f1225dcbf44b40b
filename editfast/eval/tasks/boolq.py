"""BoolQ (closed-domain QA): SuperGLUE BoolQ validation (3,270); yes/no questions on a passage.

standard: LogLik of " yes" / " no" after "{passage}\\nQuestion: {question}?\\nAnswer:"; accuracy of
  the argmax. Labels may be the strings "true"/"false" (this copy) or JSON booleans.
paper: Generate 3 tokens after "{passage}\\nQuestion: {question}? Answer yes or no.\\nAnswer:";
  correct if the first word is exactly "yes"/"no" as gold. The study's code (Model-Editing-Hurt
  `test-ClosedDomainQA.py`) used "Please answer the given question based on the passage. The
  answer should be exact 'yes' or 'no'. passage: {passage} question: {question}. answer:",
  1 token, and left unparseable answers out of the accuracy; we count every example.
"""

from __future__ import annotations

from typing import Any

from editfast.core.errors import DataError
from editfast.eval.tasks._common import ChoiceTask, read_jsonl

LABELS = {True: 0, "true": 0, "True": 0, False: 1, "false": 1, "False": 1}


class BoolQ(ChoiceTask):
    name, category, data_file = "boolq", "closed-domain QA", "boolq/val.jsonl.gz"
    choices = ("yes", "no")

    def load(self) -> list[dict[str, Any]]:
        out = []
        for row in read_jsonl(self.data_file, ("passage", "question", "label")):
            label = row["label"]
            if not isinstance(label, (bool, str)) or label not in LABELS:
                raise DataError(f"{self.data_file}: label {label!r} is not true/false")
            out.append({"passage": row["passage"], "question": row["question"], "label": LABELS[label]})
        return out

    def prompt(self, example: dict[str, Any], protocol: str) -> str:
        p, q = example["passage"], example["question"]
        if protocol == "standard":
            return f"{p}\nQuestion: {q}?\nAnswer:"
        return f"{p}\nQuestion: {q}? Answer yes or no.\nAnswer:"
