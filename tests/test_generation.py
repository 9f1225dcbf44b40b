"""CounterFact's fluency: ROME's n-gram entropy on nltk's words, top-k sampling through the engine,
per fact and at every checkpoint."""

import json
import math

import nltk
import numpy as np
import pytest
from helpers import assert_refused
from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktSentenceTokenizer

from editfast.data.requests import load_dataset
from editfast.engine.engine import Engine
from editfast.engine.requests import Generate, Sample
from editfast.eval.generation import fluency, fluency_per_request, ngram_entropy
from editfast.eval.words import sentences, treebank_words, word_tokenize
from editfast.session.session import EditSession

TEXTS = [  # CounterFact generation prompts with continuations of the kind a small model writes
    ("People around Angola speak the language of Portuguese. The country's capital, Luanda, is \"big\" (really) "
     "-- and it's 3,000 km away! Isn't it? I can't say; they're gonna find out..."),
    ("Danielle Darrieux's mother tongue is French. Where Danielle Darrieux is from, people speak the language of "
     "French.\n\nShe was born in Bordeaux; her films: 'Mayerling', \"Madame de...\" and more [sic] {x} <y> * #1 "
     "@home & 50% of 'em."),
    ("The law in Ikaalinen declares the language Finnish. The law in Ikaalinen declares the language Finnish. "
     "The law in Ikaalinen declares the language Finnish."),
    "Toko Yasuda, the guitar guitar guitar guitar guitar guitar",
]


def nltk_words(text):
    """nltk.word_tokenize without its downloaded Punkt model: Punkt's untrained splitter (equal to the
    English model on texts without abbreviations), then nltk's Treebank word tokenizer."""
    return [w for s in PunktSentenceTokenizer().tokenize(text) for w in NLTKWordTokenizer().tokenize(s)]


def rome_entropy(text):
    """ROME's compute_n_gram_entropy, written out in float64 with nltk's n-grams and FreqDist."""
    words = nltk_words(text)
    terms = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        freqs = np.array(list(nltk.FreqDist(nltk.ngrams(words, n)).values()), dtype=np.float64)
        freqs = freqs / freqs.sum()
        terms.append(weight * np.sum(-freqs * np.log(freqs) / np.log(2)))
    return float(np.mean(terms))


def test_words_equal_nltk():
    """Treebank words equal nltk's on every sentence; the sentence split equals Punkt's on these texts,
    and keeps abbreviations and initials inside a sentence (as Punkt's English model does)."""
    for text in TEXTS:
        assert sentences(text) == PunktSentenceTokenizer().tokenize(text), text
        assert word_tokenize(text) == nltk_words(text)
        for s in sentences(text):
            assert treebank_words(s) == NLTKWordTokenizer().tokenize(s)
    assert sentences("Mr. Brown met J. Smith in the U.S. on Monday. Then he left.") == \
        ["Mr. Brown met J. Smith in the U.S. on Monday.", "Then he left."]


def test_ngram_entropy_equals_rome_formula():
    for text in TEXTS:
        assert ngram_entropy(text) == pytest.approx(rome_entropy(text), rel=1e-12, abs=1e-12)
    assert fluency(TEXTS) == pytest.approx(np.mean([rome_entropy(t) for t in TEXTS]), rel=1e-12)
    # by hand: bigrams ab, ba, ab -> H2 = h(1/3); trigrams aba, bab -> H3 = 1 bit
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h + 4 / 3 * 1) / 2, rel=1e-15)
    assert ngram_entropy("one") == 0.0  # no n-grams: no entropy (ROME's sum over an empty array)


def test_sampling_is_seeded_and_batch_independent(tiny):
    eng = Engine(tiny, progress=False)
    reqs = [Sample("People around Angola speak the language of", 24, 5, 1), Sample("The", 30, 5, 2),
            Sample("One can get to Angola by navigating", 12, 5, 3), Sample("The", 30, 5, 4), Sample("The", 30, 5, 2)]
    together = eng.generate(reqs)
    assert together == [eng.generate([r])[0] for r in reqs]  # alone: the same texts
    assert together == eng.generate(reqs[::-1])[::-1]  # in another order
    assert together[1] == together[4] and together[1] != together[3]  # the seed decides, not the slot
    assert len(tiny.tokenizer(together[1], add_special_tokens=False)["input_ids"]) >= 20
    greedy = eng.generate([Generate("The", 30)])[0]
    assert eng.generate([Sample("The", 30, 1, 9)])[0] == greedy  # top-1 sampling is greedy


def test_session_measures_fluency_per_fact_and_at_checkpoints(pristine_tiny, tmp_path):
    reqs = load_dataset("counterfact", 2)
    want = fluency_per_request(Engine(pristine_tiny, progress=False), reqs, 0)  # the unedited model's
    s = EditSession(pristine_tiny, "memit", reqs, batch_size=1, templates="fixed", progress=False, fluency=True,
                    fluency_probe=1, eval_at=[0, 2], out=tmp_path / "run", dataset={"name": "counterfact"})
    res = s.run()
    pts = json.loads((tmp_path / "run" / "curve.json").read_text())["points"]
    assert [p["edits"] for p in pts] == [0, 2]
    for p in pts:
        g = p["generation"]
        assert set(g) - {"cached"} == {"fluency", "fluency_stderr", "n", "prompts", "seconds"} and g["n"] == 10
        assert g["prompts"] == pts[0]["generation"]["prompts"] and "record 1 (case_id 20952)" in g["prompts"]
        assert set(p["eval_s_by"]) == {"edit_metrics", "generation"}
    # the probe's one record is the first request, sampled with the same seeds: the same texts at 0 edits
    assert pts[0]["generation"]["fluency"] == pytest.approx(want[0], rel=1e-12)
    # the unedited model's measurement is kept, keyed by its weights' fingerprint, for the next session
    kept = json.loads(s._probe.cache_file(pristine_tiny).read_text())
    assert kept["fluency"] == pts[0]["generation"]["fluency"] and "cached" not in pts[1]["generation"]
    assert [r["pre"]["fluency"] for r in res.per_request] == pytest.approx(want, rel=1e-12)
    assert all(isinstance(r["post"]["fluency"], float) for r in res.per_request)
    assert res.summary["post"]["fluency"] == pytest.approx(np.mean([r["post"]["fluency"] for r in res.per_request]))


def test_fluency_refused_without_generation_prompts_and_consistency_refused(tmp_path, capsys):
    out = tmp_path / "o"
    tiny = ["--out", str(out), "--model", "random:tiny-llama", "--quiet"]
    assert_refused(["edit", "--method", "memit", "--n", "2", "--dataset", "zsre", "--fluency", *tiny], capsys, "zsre",
                   "generation prompts", "--dataset counterfact", absent=[out])
    assert_refused(["edit", "--method", "memit", "--n", "2", "--consistency", *tiny], capsys, "attribute_snippets.json",
                   "idf", absent=[out])
    study = tmp_path / "s.yaml"
    study.write_text("dataset: counterfact\neval: {consistency: true}\nruns: [{name: r, method: rome, setting: "
                     "sequential, n: 1}]\n")
    assert_refused(["study", str(study), *tiny[:2], "--quiet"], capsys, "consistency", absent=[out])


def test_fluency_in_the_tables():
    """The edit table's fluency row, the curve table's and the study report's fluency columns."""
    from types import SimpleNamespace

    from editfast.cli.edit import curve_table, summary_table
    from editfast.session.study import report_md

    gen = lambda f: {"fluency": f, "fluency_stderr": 0.1, "n": 100, "prompts": "probe P", "seconds": 1.0}
    pts = [{"edits": e, "seconds": 2.0 * e, "edit_metrics": {"efficacy_success": s, "paraphrase_success": s},
            "generation": gen(f), "weights": {"total": {"l1": float(e)}}}
           for e, s, f in ((0, 0.2, 5.61), (4, 0.9, 4.25))]
    summary = {"metric_kind": "counterfact", "n": 4, "pre": {"efficacy_success": 0.2, "fluency": 5.61},
               "post": {"efficacy_success": 0.9, "fluency": 4.25}}
    timings = {"edit_s": 1.0, "edits_per_s": 4.0, "targets_s": 0.5, "statistics_s": 0.1, "total_s": 2.0}
    table = summary_table(SimpleNamespace(summary=summary, timings=timings, config={"batch_size": 4}))
    assert any(line.split() == ["fluency", "5.610", "4.250"] for line in table.splitlines())
    assert "| efficacy_success | fluency |" in curve_table({"points": pts}) and "| 4 | 0.900 | 4.250 |" in \
        curve_table({"points": pts})
    doc = {"study": {"name": "s", "dataset": "counterfact"}, "model": "m", "seconds": 60.0,
           "lines": [{"label": "memit", "points": pts}]}
    report = report_md(doc)
    assert "| efficacy | paraphrase | fluency |" in report and "5.610 → 4.250" in report
    assert "## Fluency" in report and "probe P" in report and "| memit | 5.610 ± 0.100 | 4.250 ± 0.100 |" in report
    assert "## fluency" not in report  # one fluency table, titled with its probe set
