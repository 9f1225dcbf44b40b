"""RTE (NLI): SuperGLUE/GLUE RTE validation (277 pairs); does the premise entail the hypothesis?

standard: LogLik of " True" (entailment) / " False" (not_entailment) after
  "{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:"; accuracy of the argmax.
paper: Generate 3 tokens after "{premise} entails the {hypothesis}. True or False?\\nanswer:";
  correct if the first word is "true" for entailment, "false" otherwise. The study's code
  (Model-Editing-Hurt `test-NLI.py`) wrote "... True or False? answer:" on one line, generated
  1 token, tested for the substrings "true"/"false", and reported accuracy over the answers that
  contained one of them; we count every example (an unparseable answer is wrong).
"""

from __future__ import annotations

from typing import Any

from editfast.core.errors import DataError
from editfast.eval.tasks._common import ChoiceTask, read_jsonl

LABELS = {"entailment": 0, "not_entailment": 1}


class RTE(ChoiceTask):
    name, category, data_file = "rte", "nli", "rte/val.jsonl"
    choices = ("True", "False")

    def load(self) -> list[dict[str, Any]]:
        out = []
        for row in read_jsonl(self.data_file, ("premise", "hypothesis", "label")):
            if row["label"] not in LABELS:
                raise DataError(f"{self.data_file}: label {row['label']!r} is not one of {', '.join(LABELS)}")
            out.append({"premise": row["premise"], "hypothesis": row["hypothesis"], "label": LABELS[row["label"]]})
        return out

    def prompt(self, example: dict[str, Any], protocol: str) -> str:
        p, h = example["premise"], example["hypothesis"]
        if protocol == "standard":
            return f"{p}\nQuestion: {h} True or False?\nAnswer:"
        return f"{p} entails the {h}. True or False?\nanswer:"
