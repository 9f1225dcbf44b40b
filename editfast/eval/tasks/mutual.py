"""MuTual (dialogue): multi-turn dialogue reasoning, dev split (886); pick the right next turn of 4.

standard: LogLik of each option " {option}" after "{article}\\n" (speaker tags "m :"/"f :" kept in
  the article and the options), normalised by the option's token count; the options are ranked
  by that score: recall@1, recall@2 and MRR (ties count against the gold option).
paper: Generate 3 tokens after
  "{article}\\nWhich choice is correct?\\nA. {o1}\\nB. {o2}\\nC. {o3}\\nD. {o4}\\nAmong A through D, the answer is";
  R@1 = the output's first letter (an optional "(" allowed) is the gold letter. The study's code
  (Model-Editing-Hurt `test-dialogue.py`) used "Q: {article} Which choice is correct? Answer
  Chioces: (A){o1}(B)...(D){o4} A: Among A through D, the answer is", 1 token, and a substring test.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from editfast.core.errors import DataError
from editfast.engine.requests import Generate, LogLik, Output, Request
from editfast.eval.metrics import ranks
from editfast.eval.tasks._common import BaseTask, read_jsonl

LETTERS = "ABCD"


class MuTual(BaseTask):
    name, category, data_file = "mutual", "dialogue", "mutual/dev.jsonl"
    primary = {"standard": "r@1", "paper": "r@1"}

    def load(self) -> list[dict[str, Any]]:
        out = []
        for row in read_jsonl(self.data_file, ("article", "options", "answers")):
            if len(row["options"]) != 4 or row["answers"] not in LETTERS:
                raise DataError(f"{self.data_file}: {row.get('id')}: need 4 options and an answer in A-D")
            out.append({"id": row.get("id"), "article": row["article"], "options": list(row["options"]),
                        "label": LETTERS.index(row["answers"])})
        return out

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        self.check(protocol)
        if protocol == "standard":
            return [LogLik(example["article"] + "\n", " " + o) for o in example["options"]]
        opts = "".join(f"{L}. {o}\n" for L, o in zip(LETTERS, example["options"]))
        return [Generate(f"{example['article']}\nWhich choice is correct?\n{opts}Among A through D, the answer is", 3)]

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        self.check(protocol)
        if protocol == "standard":
            r1, r2, rr = ranks([o.logprob / max(o.n_tokens, 1) for o in outputs], example["label"])
            return {"r@1": r1, "r@2": r2, "mrr": rr}
        m = re.match(r"\s*\(?([A-D])\b", outputs[0])
        return {"r@1": float(m is not None and m.group(1) == LETTERS[example["label"]])}
