"""GSM8K (reasoning): grade-school maths word problems, test split (1,319; 1,311 scored).

standard: 8-shot chain of thought. The exemplars are the first 8 test problems, never scored:
  "Question: {q}\\nAnswer: {gold solution without <<...>> annotations}\\nThe answer is {N}.\\n\\n" x 8,
  then "Question: {q}\\nAnswer:"; Generate 256 tokens, stop at "\\n\\nQuestion:" / "Question:".
  Prediction = the first number after the last "The answer is", else the last number
  (commas and $ dropped); accuracy = numeric equality with the gold number after "####".
paper: zero-shot "Q: {q}\\nA: Let's think step by step."; Generate 256 tokens, stop at "\\nQ:";
  correct if the gold number occurs as a number anywhere in the output. Differences from the
  study's code (Gu et al. 2024, Model-Editing-Hurt `test-reasoning.py`): it put the *gold
  rationale* into the prompt ("Q: {q} A:Let's think step by step. {rationale} Therefore, the
  answer (arabic numerals) is:") and generated 5 tokens, a leak we do not reproduce; zero-shot-CoT's
  second "Therefore, the answer (arabic numerals) is:" pass would need a prompt that depends on
  the first output, which one batched pass cannot give, so we match numbers in the single output.
  Both protocols score the same 1,311 problems (the study scored all 1,319).
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Sequence

from editfast.core.errors import DataError
from editfast.engine.requests import Generate, Output, Request
from editfast.eval.metrics import canonical_number, extract_number, numbers
from editfast.eval.tasks._common import BaseTask, read_jsonl

N_SHOT = 8


class GSM8K(BaseTask):
    name, category, data_file = "gsm8k", "reasoning", "gsm8k/test.jsonl"
    primary = {"standard": "accuracy", "paper": "accuracy"}
    lm_eval_names, num_fewshot, target_key = {"accuracy": "exact_match"}, {"standard": N_SHOT}, "target"

    def load(self) -> list[dict[str, Any]]:
        out = []
        for i, row in enumerate(read_jsonl(self.data_file, ("question", "answer")), 1):
            rationale, sep, gold = row["answer"].rpartition("####")
            target = canonical_number(gold) if sep else None
            if target is None:
                raise DataError(f"{self.data_file}:{i}: no '#### <number>' final answer")
            rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()
            out.append({"question": row["question"], "rationale": rationale, "target": target})
        return out

    def scored(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return examples[N_SHOT:]

    @cached_property
    def fewshot(self) -> str:
        return "".join(
            f"Question: {e['question']}\nAnswer: {e['rationale']}\nThe answer is {e['target']}.\n\n"
            for e in self.load()[:N_SHOT]
        )

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        self.check(protocol)
        if protocol == "standard":
            prompt = f"{self.fewshot}Question: {example['question']}\nAnswer:"
            return [Generate(prompt, 256, ("\n\nQuestion:", "Question:"))]
        return [Generate(f"Q: {example['question']}\nA: Let's think step by step.", 256, ("\nQ:",))]

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        self.check(protocol)
        if protocol == "standard":
            return {"accuracy": float(extract_number(outputs[0]) == example["target"])}
        return {"accuracy": float(example["target"] in numbers(outputs[0]))}
