"""SAMSum (summarization): messenger-like dialogues with human summaries, test split (819).

standard: "Summarize the dialogue.\\n\\n{dialogue}\\n\\nSummary:"; Generate 96 tokens, stop at "\\n\\n";
  ROUGE-1/2/L F-measure (rouge-score, Porter stemmer), mean over examples.
paper: "{dialogue}\\nTL;DR:"; Generate 64 tokens, stop at "\\n\\n"; the same three ROUGE F-measures,
  plus `rouge` = their mean, the single number the study reported. The study's code
  (Model-Editing-Hurt `test-summarization.py`) generated 25 tokens, scored with the `rouge`
  package (no stemming) and scored 818 of the 819 dialogues.
"""

from __future__ import annotations

from typing import Any, Sequence

from editfast.engine.requests import Generate, Output, Request
from editfast.eval.metrics import rouge
from editfast.eval.tasks._common import BaseTask, read_jsonl


class SAMSum(BaseTask):
    name, category, data_file = "samsum", "summarization", "samsum/test.jsonl"
    primary = {"standard": "rougeL", "paper": "rougeL"}
    target_key = "summary"

    def load(self) -> list[dict[str, Any]]:
        rows = read_jsonl(self.data_file, ("id", "dialogue", "summary"))
        return [{"id": r["id"], "dialogue": r["dialogue"], "summary": r["summary"]} for r in rows]

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        self.check(protocol)
        d = example["dialogue"]
        if protocol == "standard":
            return [Generate(f"Summarize the dialogue.\n\n{d}\n\nSummary:", 96, ("\n\n",))]
        return [Generate(f"{d}\nTL;DR:", 64, ("\n\n",))]

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        self.check(protocol)
        r = rouge([outputs[0].strip()], [example["summary"]])
        if protocol == "paper":
            r["rouge"] = (r["rouge1"] + r["rouge2"] + r["rougeL"]) / 3
        return r
