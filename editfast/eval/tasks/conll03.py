"""CoNLL-2003 (NER): English test set (eng.testb), 3,453 sentences; PER, ORG, LOC, MISC entities.

Sentences: blank-line separated, -DOCSTART- lines skipped, tokens joined with single spaces;
gold entities = (type, text) from the IOB2 tags (an I- without a B- starts an entity).
standard: "Extract the named entities (person, organization, location, miscellaneous) from the
  text. Write one per line as \\"type: entity\\".\\n\\nText: {sentence}\\nEntities:\\n"; Generate 64
  tokens, stop at "\\n\\n" / "Text:". Lines "type: entity" are parsed (type words person/
  organization/location/miscellaneous or PER/ORG/LOC/MISC, any case; a leading "-", "*" or "•" is
  dropped; other lines ignored). Entity-level precision/recall/F1 with exact (type, text) match,
  counted as multisets within each sentence and summed over the corpus: `f1` (micro),
  `precision`, `recall`, `f1_PER`, `f1_ORG`, `f1_LOC`, `f1_MISC`.
paper: one Generate per type, "Please identify {Person|Organization|Location|Miscellaneous} Entity
  from the given text. Text: {sentence} Entity:", 32 tokens, stop at "\\n"; a gold entity is found
  if its text occurs in that type's output; `score` = mean over the types with gold entities of
  found/gold (corpus level), plus `rate_PER` ... The study's code (Model-Editing-Hurt `test-NER.py`)
  generated 10 tokens, glued "," and "." to the previous word, read an entity as running from
  its B- tag to the next O (merging adjacent entities), and counted a sentence without gold
  entities and an empty output as one found entity.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from editfast.core.errors import DataError
from editfast.engine.requests import Generate, Output, Request
from editfast.eval.metrics import entity_prf, iob2_entities
from editfast.eval.tasks._common import BaseTask, read_lines

TYPES = ("PER", "ORG", "LOC", "MISC")
NAMES = {"PER": "Person", "ORG": "Organization", "LOC": "Location", "MISC": "Miscellaneous"}
ALIASES = {**{n.lower(): t for t, n in NAMES.items()}, **{t.lower(): t for t in TYPES}, "organisation": "ORG"}


def parse_entities(text: str) -> list[tuple[str, str]]:
    """(type, text) pairs from lines "type: entity"; lines of another shape are ignored."""
    out = []
    for line in text.splitlines():
        typ, sep, ent = line.strip().lstrip("-*• ").partition(":")
        typ, ent = ALIASES.get(typ.strip().lower()), ent.strip()
        if sep and typ and ent:
            out.append((typ, ent))
    return out


class CoNLL03(BaseTask):
    name, category, data_file = "conll03", "NER", "conll2003/test.txt"
    primary = {"standard": "f1", "paper": "score"}
    target_key = "entities"

    def load(self) -> list[dict[str, Any]]:
        out, toks, tags = [], [], []
        for i, line in enumerate([*read_lines(self.data_file), ""], 1):
            cols = line.split()
            if cols and cols[0] != "-DOCSTART-":
                if len(cols) != 4:
                    raise DataError(f"{self.data_file}:{i}: expected 'TOKEN POS CHUNK NER'")
                toks.append(cols[0])
                tags.append(cols[3])
            elif toks:  # a blank or -DOCSTART- line ends the sentence
                try:
                    ents = iob2_entities(toks, tags)
                except ValueError as e:
                    raise DataError(f"{self.data_file}:{i}: {e}") from None
                out.append({"text": " ".join(toks), "entities": ents})
                toks, tags = [], []
        if not out:
            raise DataError(f"{self.data_file}: no sentences")
        return out

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        self.check(protocol)
        s = example["text"]
        if protocol == "standard":
            prompt = ("Extract the named entities (person, organization, location, miscellaneous) from the text. "
                      f"Write one per line as \"type: entity\".\n\nText: {s}\nEntities:\n")
            return [Generate(prompt, 64, ("\n\n", "Text:"))]
        return [Generate(f"Please identify {NAMES[t]} Entity from the given text. Text: {s} Entity:", 32, ("\n",))
                for t in TYPES]

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        self.check(protocol)
        gold = Counter(tuple(e) for e in example["entities"])
        out: dict[str, float] = {}
        if protocol == "standard":
            pred = Counter(parse_entities(outputs[0]))
            hit = gold & pred
            for t in TYPES:
                tp = sum(n for (typ, _), n in hit.items() if typ == t)
                out[f"tp_{t}"] = float(tp)
                out[f"fp_{t}"] = float(sum(n for (typ, _), n in pred.items() if typ == t) - tp)
                out[f"fn_{t}"] = float(sum(n for (typ, _), n in gold.items() if typ == t) - tp)
            return out
        for t, gen in zip(TYPES, outputs):
            ents = [text for (typ, text), n in gold.items() if typ == t for _ in range(n)]
            out[f"found_{t}"] = float(sum(e in gen for e in ents))
            out[f"gold_{t}"] = float(len(ents))
        return out

    def aggregate(self, per_example: list[dict[str, float]], protocol: str) -> dict[str, float]:
        self.check(protocol)
        tot = Counter()
        for e in per_example:
            tot.update(e)
        if protocol == "standard":
            p, r, f = entity_prf(*(sum(tot[f"{k}_{t}"] for t in TYPES) for k in ("tp", "fp", "fn")))
            res = {"f1": f, "precision": p, "recall": r}
            for t in TYPES:
                res[f"f1_{t}"] = entity_prf(tot[f"tp_{t}"], tot[f"fp_{t}"], tot[f"fn_{t}"])[2]
            return res
        rates = {t: tot[f"found_{t}"] / tot[f"gold_{t}"] for t in TYPES if tot[f"gold_{t}"]}
        return {"score": sum(rates.values()) / len(rates) if rates else 0.0, **{f"rate_{t}": v for t, v in rates.items()}}
