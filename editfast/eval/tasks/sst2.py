"""SST-2 (sentiment): GLUE SST-2 validation (872 sentences, tokenised and lowercased as in GLUE).

standard: LogLik of " positive" / " negative" after
  "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"; accuracy of the argmax.
paper: Generate 3 tokens after "{sentence}\\nIs the sentiment positive or negative?\\nAnswer:";
  correct if the first word is exactly the gold label. The study's code (Model-Editing-Hurt
  `test-SentimentAnalysis.py`) used "For each snippet of text,label the sentiment of the text as
  positive or negative.The answer should be exact 'positive' or 'negative'. text: {sentence}
  answer:", 1 token, substring match, and left unparseable answers out; we count every example.
"""

from __future__ import annotations

from typing import Any

from editfast.core.errors import DataError
from editfast.eval.tasks._common import ChoiceTask, read_lines


class SST2(ChoiceTask):
    name, category, data_file = "sst2", "sentiment", "sst2/dev.tsv"
    choices = ("positive", "negative")

    def load(self) -> list[dict[str, Any]]:
        lines = list(read_lines(self.data_file))
        if not lines or lines[0].split("\t") != ["sentence", "label"]:
            raise DataError(f"{self.data_file}: header is not 'sentence<TAB>label'")
        out = []
        for i, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            sentence, _, label = line.rstrip("\r").rpartition("\t")
            if label not in ("0", "1") or not sentence.strip():
                raise DataError(f"{self.data_file}:{i}: expected 'sentence<TAB>0|1'")
            out.append({"sentence": sentence.strip(), "label": 0 if label == "1" else 1})
        return out

    def prompt(self, example: dict[str, Any], protocol: str) -> str:
        s = example["sentence"]
        if protocol == "standard":
            return f"{s}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        return f"{s}\nIs the sentiment positive or negative?\nAnswer:"
