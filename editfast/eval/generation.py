"""CounterFact's generation metric: fluency, as ROME/MEMIT's evaluation computes it
(``experiments/py/eval_utils_counterfact.py``: ``test_generation``, ``n_gram_entropy``).

For each generation prompt the model writes one text by top-k sampling (k = 5) until prompt and
text together are 100 tokens long (ROME's ``generate_fast(..., max_out_len=100)`` counts the
prompt's tokens); the text is the prompt followed by the sample, Unicode-NFKD-normalised, with
"\\n\\n" turned into a space. A text's n-gram entropy is the mean of its bigram entropy weighted
2/3 and its trigram entropy weighted 4/3 (entropies in bits over the words' n-gram frequencies,
words as ``nltk.word_tokenize`` splits them: ``editfast.eval.words``); a fact's fluency is the
mean over its texts.

Differences from the original: the samples are drawn by the batched engine (``Sample``), each
from its own seed (derived from the run's seed, the fact's case_id and the prompt's position), so
a run is reproducible and a text does not depend on its batch; the original's
``torch.multinomial`` on a shared generator gives other (equally distributed) samples.

Consistency (TF-IDF similarity of the texts to Wikipedia snippets about the new object) is not
computed: ROME's ``attribute_snippets.json`` (926 MB) and its IDF table are not available in
this environment (see ``docs/evaluation.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from editfast.core.errors import RequestError
from editfast.core.paths import cache_dir, write_cache
from editfast.data.requests import Request, load_dataset
from editfast.engine.engine import Engine
from editfast.engine.requests import Sample
from editfast.eval.words import word_tokenize

TOP_K = 5  # ROME's generate_fast
MAX_OUT_LEN = 100  # tokens of prompt and sample together (ROME's test_generation)
NGRAM_WEIGHTS = ((2, 2 / 3), (3, 4 / 3))  # ROME's compute_n_gram_entropy
PROBE_DATASET = "counterfact"  # the checkpoints' probe set: its first PROBE_RECORDS records
PROBE_RECORDS = 10
GENERATION_SEED = 42  # the facade's (EasyEdit seeds 42): with the prompt it seeds each test_generation sample


def ngram_entropy(text: str) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n = 2, 3 of weight_n × H_n, H_n the entropy in
    bits of the text's word n-gram frequencies (0 for a text with fewer than n words)."""
    words = word_tokenize(text)
    terms = []
    for n, weight in NGRAM_WEIGHTS:
        counts = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        terms.append(weight * -sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(terms) / len(terms)


def fluency(texts: Sequence[str]) -> float:
    """ROME's ``n_gram_entropy`` (arithmetic): the mean n-gram entropy of ``texts``."""
    if not texts:
        raise ValueError("fluency of no texts")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def clean(text: str) -> str:
    """ROME's post-processing of a generated text: NFKD, "\\n\\n" to a space."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def sample_seed(seed: int, case_id, position: int) -> int:
    """The seed of one text: the run's seed, the fact's case_id and the prompt's position (CounterFact
    repeats a prompt to get several samples of it)."""
    digest = hashlib.sha256(f"{seed}\0{case_id}\0{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def samples(tokenizer, prompts: Sequence[str], seeds: Sequence[int]) -> list[Sample]:
    """ROME's sampling requests for ``prompts``: top-k 5, up to 100 tokens with the prompt's."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    return [Sample(p, max(1, MAX_OUT_LEN - n), TOP_K, seed) for p, n, seed in zip(prompts, lengths, seeds)]


def texts(engine: Engine, requests: Sequence[Sample]) -> list[str]:
    """The texts ROME scores: each prompt followed by its sample, cleaned; one batch on ``engine``."""
    return [clean(r.prompt + t) for r, t in zip(requests, engine.generate(requests))]


@dataclass
class Texts:
    """Which request wrote which texts: ``owner[i]`` is the index (in the probe's requests) of the
    request whose generation prompt ``texts[i]`` continues."""

    texts: list[str]
    owner: list[int]


class GenerationProbe:
    """The generation prompts of some requests as sampling requests, built once (prompts, seeds and
    their token lengths cannot change with edits) and run on an engine as one batch."""

    def __init__(self, tokenizer, requests: Sequence[Request], seed: int, name: str = ""):
        self.name, self.requests = name, list(requests)
        prompts = [(i, j, p) for i, r in enumerate(self.requests) for j, p in enumerate(r.generation_prompts)]
        self.samples = samples(tokenizer, [p for *_, p in prompts],
                               [sample_seed(seed, self.requests[i].case_id, j) for i, j, _ in prompts])
        self.owner = [i for i, _, _ in prompts]

    def generate(self, engine: Engine) -> Texts:
        return Texts(texts(engine, self.samples), self.owner)

    def measure(self, engine: Engine, cache: Path | None = None) -> dict:
        """A checkpoint's ``generation`` entry: mean fluency over the texts, its standard error,
        the number of texts, which prompts, seconds. ``cache``: read from (and written to) this file
        (``cache_file``: the unedited model's, the same for every session of a study)."""
        if cache is not None and cache.is_file():
            try:
                return {**json.loads(cache.read_text()), "cached": True}
            except (OSError, ValueError):
                pass  # measured again, and the file rewritten
        t = time.perf_counter()
        scores = [ngram_entropy(x) for x in self.generate(engine).texts]
        se = statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else 0.0
        doc = {"fluency": sum(scores) / len(scores), "fluency_stderr": se, "n": len(scores),
               "prompts": self.name, "seconds": time.perf_counter() - t}
        if cache is not None:
            write_cache(cache, json.dumps(doc, indent=1) + "\n")
        return doc

    def cache_file(self, lm) -> Path:
        """Where the measurement of ``lm``'s unedited weights is kept: keyed by the weights'
        fingerprint, dtype, device, the probe's name and everything that decides the texts (prompts,
        seeds, lengths)."""
        key = json.dumps([lm.fingerprint, str(lm.dtype), lm.device.type, self.name,
                          [(s.prompt, s.seed, s.max_new_tokens, s.top_k) for s in self.samples]])
        return cache_dir() / "eval" / f"fluency-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def probe(tokenizer, seed: int, records: int = PROBE_RECORDS) -> GenerationProbe:
    """The fixed probe set a checkpoint measures fluency on: the generation prompts (10 each) of the
    first ``records`` records of the full-schema CounterFact file, the same at every checkpoint."""
    reqs = load_dataset(PROBE_DATASET, records)
    which = "record 1 (case_id" if records == 1 else f"records 1-{records} (case_ids"
    name = f"{PROBE_DATASET} {which} {', '.join(str(r.case_id) for r in reqs)}): " \
           f"{sum(len(r.generation_prompts) for r in reqs)} generation prompts"
    return GenerationProbe(tokenizer, reqs, seed, name)


def fluency_per_request(engine: Engine, requests: Sequence[Request], seed: int) -> list[float | None]:
    """Each request's fluency (mean n-gram entropy of its generation prompts' texts), None for a
    request without generation prompts; all requests' texts are sampled as one batch."""
    got = GenerationProbe(engine.tok, requests, seed).generate(engine)
    by: dict[int, list[float]] = {}
    for i, text in zip(got.owner, got.texts):
        by.setdefault(i, []).append(ngram_entropy(text))
    return [sum(by[i]) / len(by[i]) if i in by else None for i in range(len(requests))]


CONSISTENCY_MISSING = (
    "consistency (TF-IDF similarity of generated text to Wikipedia snippets about the new object) needs ROME's "
    "attribute_snippets.json and its IDF table (idf.npy, tfidf_vocab.json), which editfast does not have (they "
    "could not be obtained; docs/evaluation.md); fluency is measured with --fluency")


def check_generation_prompts(requests: Sequence[Request], dataset: str | None) -> None:
    """Refuse fluency for requests none of which has generation prompts, unless the dataset is
    CounterFact in EasyEdit's schema (its checkpoints measure the probe set)."""
    if dataset != "counterfact-full" and not any(r.generation_prompts for r in requests):
        which = f"dataset {dataset!r}" if dataset else "the requests given"
        raise RequestError(
            f"fluency needs generation prompts, and no request of {which} has them: only "
            "CounterFact's full-schema records have them (--dataset counterfact, its 500 records; a file in "
            "ROME's schema with 'generation_prompts')")
