"""Word tokenisation for CounterFact's fluency: the tokens ``nltk.word_tokenize`` gives ROME's
n-gram entropy, without nltk or its downloaded Punkt model.

``nltk.word_tokenize`` is a sentence split (Punkt's English model) followed by nltk's improved
Treebank word tokenizer on each sentence. The Punkt model is data that cannot be had offline, so
sentences end here at ".", "?" or "!" (with any closing quotes or brackets) before white space,
except after an ellipsis, a one-letter initial or a common abbreviation ("Mr.", "U.S.", ...); the
sentence split matters only to where a period stays attached ("Paris." inside a sentence, "Paris"
"." at its end). The word rules are the Treebank tokenizer's as nltk applies them (quotes become
`` and '', punctuation and clitics split off, periods kept inside a sentence); tests check them
against nltk's ``NLTKWordTokenizer`` on fixed texts.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "corp", "no", "vol", "fig",
    "al", "e.g", "i.e", "u.s", "u.k", "a.m", "p.m", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "mt", "ft", "gen", "col", "lt", "sgt", "rev", "hon", "dept", "univ", "est", "approx"))
_SENTENCE_END = re.compile(r"""(?<=[.?!])["'\)\]}»”’]*(?=\s+)""")
_CLOSERS = "\"'»”’)]}"

# (pattern, replacement) in the order nltk applies them; every token ends up between spaces
_OPENING = [
    (re.compile("([«“‘„]|`+)"), r" \1 "),
    (re.compile(r'^"'), "``"),
    (re.compile("(``)"), r" \1 "),
    (re.compile(r"""([ (\[{<])("|'')"""), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_PUNCTUATION = [
    (re.compile(r"""([^.])(\.)([\])}>"'»”’ ]*)\s*$"""), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile("[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r"""([^.])(\.)([\])}>"']*)\s*$"""), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"\*"), r" \g<0> "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
]
_CLOSING = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile("''"), " '' "),
    (re.compile('"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sSmMdD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
    r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
    r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b")]


def sentences(text: str) -> list[str]:
    """Split ``text`` after sentence-ending punctuation that is not an abbreviation's or an initial's."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        word = text[start:end].rstrip(_CLOSERS).split()[-1] if text[start:end].split() else ""
        stem = word.rstrip(".?!").lstrip("\"'(«“‘[{").lower()
        if word.endswith(".") and (word.endswith("..") or len(stem) == 1 and stem.isalpha() or stem in _ABBREVIATIONS):
            continue
        out.append(text[start:end].strip())
        start = end
    rest = text[start:].strip()
    return [s for s in out + [rest] if s]


def treebank_words(sentence: str) -> list[str]:
    """nltk's improved Treebank tokenisation of one sentence."""
    s = sentence
    for pattern, repl in _OPENING + _PUNCTUATION:
        s = pattern.sub(repl, s)
    s = " " + s + " "
    for pattern, repl in _CLOSING:
        s = pattern.sub(repl, s)
    for pattern in _CONTRACTIONS:
        s = pattern.sub(r" \1 \2 ", s)
    return s.split()


def word_tokenize(text: str) -> list[str]:
    """The words of ``text`` as ``nltk.word_tokenize`` splits English: sentences, then Treebank words."""
    return [w for s in sentences(text) for w in treebank_words(s)]
