"""The general-ability metrics on hand-computed cases (no model)."""

import math

import pytest

from editfast.eval.metrics import (
    canonical_number,
    entity_prf,
    exact_match,
    extract_number,
    first_word,
    iob2_entities,
    normalize_answer,
    numbers,
    ranks,
    rouge,
    token_f1,
)


def test_normalize_answer():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_match():
    assert exact_match("The Beatles.", ["beatles", "Paul"]) == 1.0
    assert exact_match("Beatles band", ["beatles"]) == 0.0
    assert exact_match("x", "x") == 1.0  # one gold as a string
    assert exact_match("x", []) == 0.0


def test_token_f1_by_hand():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; overlap 2
    # P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert token_f1("the cat sat", ["dog", "a cat sat down", "cat sat"]) == pytest.approx(1.0)  # max over golds
    assert token_f1("dog", ["cat"]) == 0.0
    # repeated tokens count once per occurrence: [cat, cat] vs [cat] -> P 1/2, R 1, F1 2/3
    assert token_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)
    assert token_f1("the", ["a"]) == 1.0  # both normalise to nothing (SQuAD)
    assert token_f1("the", ["cat"]) == 0.0
    assert token_f1("cat", []) == 0.0


def test_extract_number():
    assert extract_number("$1,234.50") == "1234.5"
    assert extract_number("The answer is 18.") == "18"
    assert extract_number("9 eggs, 2 dollars: 9 * 2 = 18. The answer is $18.\n") == "18"
    assert extract_number("She has 3 then 5 then 7") == "7"  # no marker: last number
    assert extract_number("the answer is 12 and then 40") == "12"  # first number after the marker
    assert extract_number("The answer is 5. Next one: The answer is -3.") == "-3"  # last marker
    assert extract_number("The answer is unknown, maybe 4") == "4"
    assert extract_number("no digits") is None
    assert extract_number("18.00") == "18"
    assert numbers("from 5-3 to 1,000,000 and -2") == ["5", "3", "1000000", "-2"]
    assert canonical_number("2,125") == "2125" and canonical_number("x") is None


def test_first_word():
    assert first_word(" True.\nmore") == "true"
    assert first_word('"No", said') == "no"
    assert first_word("") == ""


def test_rouge_by_hand():
    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    r = rouge([pred], [ref])
    # unigrams: the x2, cat, on, mat shared = 5 of 6 each side -> F = 5/6
    assert r["rouge1"] == pytest.approx(5 / 6)
    # bigrams: the-cat, on-the, the-mat shared = 3 of 5 each side -> F = 3/5
    assert r["rouge2"] == pytest.approx(3 / 5)
    # LCS: the cat on the mat = 5 of 6 -> F = 5/6
    assert r["rougeL"] == pytest.approx(5 / 6)
    # mean over pairs; an identical pair scores 1, an empty prediction 0
    r = rouge([pred, "", ref], [ref, ref, ref])
    assert r["rouge1"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert rouge(["Running dogs"], ["dogs run"])["rouge1"] == pytest.approx(1.0)  # stemmer on
    with pytest.raises(ValueError):
        rouge(["a"], [])


def test_iob2_entities():
    toks = "Nadim Ladki of AL-AIN , United Arab Emirates met John".split()
    tags = ["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC", "I-LOC", "I-LOC", "O", "B-PER"]
    assert iob2_entities(toks, tags) == [("PER", "Nadim Ladki"), ("ORG", "AL-AIN"),
                                         ("LOC", "United Arab Emirates"), ("PER", "John")]
    # I- without B- starts an entity; I- of another type starts a new one; B- after B- splits
    assert iob2_entities(list("abcdef"), ["I-LOC", "I-LOC", "I-PER", "B-PER", "B-PER", "I-PER"]) == [
        ("LOC", "a b"), ("PER", "c"), ("PER", "d"), ("PER", "e f")]
    assert iob2_entities(["x"], ["O"]) == []
    with pytest.raises(ValueError):
        iob2_entities(["x"], ["X-PER"])
    with pytest.raises(ValueError):
        iob2_entities(["x", "y"], ["O"])


def test_entity_prf():
    p, r, f = entity_prf(3, 1, 2)  # P 3/4, R 3/5, F1 2PR/(P+R) = 2/3
    assert (p, r, f) == (pytest.approx(0.75), pytest.approx(0.6), pytest.approx(2 / 3))
    assert entity_prf(0, 0, 0) == (0.0, 0.0, 0.0)
    assert entity_prf(0, 0, 5) == (0.0, 0.0, 0.0)  # nothing predicted
    assert entity_prf(0, 4, 0) == (0.0, 0.0, 0.0)  # nothing to find
    assert entity_prf(2, 0, 0) == (1.0, 1.0, 1.0)


def test_ranks_with_ties():
    assert ranks([0.1, 0.9, 0.3, 0.2], 1) == (1.0, 1.0, 1.0)
    assert ranks([0.1, 0.9, 0.3, 0.2], 2) == (0.0, 1.0, 0.5)
    assert ranks([0.1, 0.9, 0.3, 0.2], 0) == (0.0, 0.0, 0.25)
    # ties count against the gold: tied with one other -> rank 2; all equal -> rank n
    assert ranks([0.5, 0.5, 0.1, 0.0], 0) == (0.0, 1.0, 0.5)
    assert ranks([-1.0] * 4, 3) == (0.0, 0.0, 0.25)
    assert ranks([math.nan, 0.0, 1.0, 2.0], 0)[2] == 0.25  # NaN ranks last
