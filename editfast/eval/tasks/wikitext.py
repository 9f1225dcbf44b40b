"""WikiText-103 test perplexity (not one of the eight categories; same under both protocols).

Examples are the articles of wiki.test.tokens, split at the top-level headings " = Title = ".
An article's text is its paragraphs, detokenised as the bundled statistics corpus is
(`editfast.data.corpus.detokenize_wikitext`: " @-@ " -> "-", no space before punctuation, ...) and
joined by "\\n"; headings (lines starting and ending with "=") and blank lines are dropped, as
that corpus drops them. One Rolling
request per article. Corpus-level metrics from the summed log-likelihood LL:
`perplexity` = exp(-LL / tokens), `word_perplexity` = exp(-LL / words) (words = whitespace-
separated words of the detokenised text), `bits_per_byte` = -LL / (UTF-8 bytes * ln 2).
Lower is better. Numbers are not comparable with ones computed on the raw tokenised text.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from editfast.core.errors import DataError
from editfast.data.corpus import detokenize_wikitext
from editfast.engine.requests import Output, Request, Rolling
from editfast.eval.tasks._common import BaseTask, read_lines

TITLE = re.compile(r"^ = ([^=].*) = $")


class WikiText(BaseTask):
    name, category, data_file = "wikitext", "perplexity", "wikitext103/wiki.test.tokens.gz"
    primary = {"standard": "perplexity", "paper": "perplexity"}
    higher_is_better = False
    protocol_free = True
    target_key = "text"
    lm_eval_names = {"perplexity": "token_perplexity"}  # lm-eval's "perplexity" is exp(-mean per-document LL)

    def load(self) -> list[dict[str, Any]]:
        articles: list[tuple[str, list[str]]] = []
        for line in read_lines(self.data_file):
            m = TITLE.match(line)
            if m:
                articles.append((m.group(1).strip(), []))
            elif line.strip() and not (line.strip().startswith("=") and line.strip().endswith("=")):
                if not articles:
                    raise DataError(f"{self.data_file}: text before the first ' = Title = ' heading")
                articles[-1][1].append(detokenize_wikitext(line))
        out = [{"title": t, "text": "\n".join(p)} for t, p in articles if p]
        if not out:
            raise DataError(f"{self.data_file}: no articles")
        return out

    def requests(self, example: dict[str, Any], protocol: str) -> list[Request]:
        self.check(protocol)
        return [Rolling(example["text"])]

    def score(self, example: dict[str, Any], outputs: Sequence[Output], protocol: str) -> dict[str, float]:
        self.check(protocol)
        r, text = outputs[0], example["text"]
        return {"logprob": r.logprob, "n_tokens": float(r.n_tokens),
                "n_words": float(len(text.split())), "n_bytes": float(len(text.encode("utf-8")))}

    def aggregate(self, per_example: list[dict[str, float]], protocol: str) -> dict[str, float]:
        self.check(protocol)
        ll, tok, words, nbytes = (sum(e[k] for e in per_example) for k in ("logprob", "n_tokens", "n_words", "n_bytes"))
        if not tok or not words or not nbytes:
            return {"perplexity": math.nan, "word_perplexity": math.nan, "bits_per_byte": math.nan}
        return {"perplexity": math.exp(-ll / tok), "word_perplexity": math.exp(-ll / words),
                "bits_per_byte": -ll / nbytes / math.log(2)}
