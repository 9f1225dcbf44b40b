"""The corpora that ``mom2_dataset`` names, for the second-moment statistics.

    wikitext         the bundled head of WikiText-103's training split (4,736 paragraphs; headings
                     skipped, WikiText's ``@-@`` tokenisation undone)
    wikipedia        Wikipedia through ``datasets``, read only from the local Hugging Face datasets
                     cache (offline): EasyEdit's ``wikimedia/wikipedia`` ``20231101.en``, else the
                     original ROME/MEMIT's ``wikipedia`` ``20200501.en``; the ``text`` field
    FILE.jsonl       one JSON object per line with a ``text`` string (``.jsonl.gz`` too)
    FILE (any other) a text file, one document per non-empty line (``.gz`` too); a ``*.tokens``
                     file is read like the bundled WikiText

Texts are taken in file order. ``Corpus.key`` identifies the content for the statistics cache: the
bundled corpus and ``wikipedia`` by name, a local file by its sha256 (an edited file is recomputed).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from editfast.core.errors import DataError, HParamsError
from editfast.core.paths import PACKAGE_DATA, hf_cache
from editfast.models.load import file_sha256

BUNDLED = {"wikitext": PACKAGE_DATA / "corpus" / "wiki.train.tokens.head2.75MiB.gz"}
HUB = {"wikipedia": (("wikimedia/wikipedia", "20231101.en"), ("wikipedia", "20200501.en"))}  # EasyEdit's, original's


def detokenize_wikitext(line: str) -> str:
    line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    return re.sub(r" ([.,;:!?')])", r"\1", line).replace("( ", "(").strip()


def hf_datasets_cache() -> Path:
    """Where ``datasets`` keeps its cache: $HF_DATASETS_CACHE, else $HF_HOME/datasets, else
    $XDG_CACHE_HOME/huggingface/datasets, else ~/.cache/huggingface/datasets."""
    return hf_cache("datasets", "HF_DATASETS_CACHE")


def _hub_files(name: str) -> tuple[list[Path], str] | None:
    """The cached training split's arrow files of the first of ``HUB[name]`` that is cached, and its id."""
    root = hf_datasets_cache()
    for repo, config in HUB[name]:
        base = root / repo.replace("/", "___") / config
        by_dir: dict[Path, list[Path]] = {}
        for f in base.glob("**/*-train*.arrow") if base.is_dir() else ():
            by_dir.setdefault(f.parent, []).append(f)
        if by_dir:
            newest = max(by_dir, key=lambda d: d.stat().st_mtime)
            return sorted(by_dir[newest]), f"{repo}/{config}"
    return None


@dataclass
class Corpus:
    name: str  # as mom2_dataset gives it
    kind: str  # bundled | hub | jsonl | text
    key: str  # identifies the content in the statistics cache
    files: list[Path]

    def _lines(self):
        for path in self.files:
            opener = gzip.open if str(path).endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    yield from enumerate(f, 1)
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read corpus {path}: {e}") from None

    def _iter(self):
        if self.kind == "hub":
            from datasets import Dataset  # optional: only a local Hub dataset corpus needs it

            if not self.files:  # not in the local datasets cache: the one-line error
                open_corpus(self.name)
            for path in self.files:
                ds = Dataset.from_file(str(path))
                for i in range(0, len(ds), 1000):
                    yield from (t for t in ds[i: i + 1000]["text"] if t and t.strip())
            return
        wikitext = self.kind == "bundled" or str(self.files[0]).removesuffix(".gz").endswith(".tokens")
        for n, line in self._lines():
            s = line.strip()
            if not s:
                continue
            if self.kind == "jsonl":
                try:
                    text = json.loads(s)["text"]
                    assert isinstance(text, str)
                except (ValueError, KeyError, TypeError, AssertionError):
                    raise DataError(f"corpus {self.files[0]} line {n}: not a JSON object with a 'text' "
                                    "string") from None
                if text.strip():
                    yield text
            elif wikitext:
                if not (s.startswith("=") and s.endswith("=")):
                    yield detokenize_wikitext(s)
            else:
                yield s

    def texts(self, n: int) -> list[str]:
        """The first ``n`` texts (fewer if the corpus has fewer)."""
        out = []
        for t in self._iter():
            out.append(t)
            if len(out) >= n:
                break
        if not out:
            raise DataError(f"corpus {self.name!r} holds no text")
        return out

    def size(self, limit: int | None = None) -> int:
        """How many texts the corpus has, counted up to ``limit`` (hub: rows of the cached split)."""
        if self.kind == "hub":
            from datasets import Dataset  # optional: only a local Hub dataset corpus needs it

            return sum(len(Dataset.from_file(str(p))) for p in self.files)
        n = 0
        for _ in self._iter():
            n += 1
            if limit is not None and n >= limit:
                break
        return n


def open_corpus(name: str) -> Corpus:
    """The corpus ``mom2_dataset`` names; HParamsError (one line, before any work) if it cannot be read."""
    if name in BUNDLED:
        return Corpus(name, "bundled", name, [BUNDLED[name]])
    if name in HUB:
        found = _hub_files(name)
        if found is None:
            wanted = " or ".join(f"{r} {c}" for r, c in HUB[name])
            raise HParamsError(
                f"mom2_dataset {name!r}: {wanted} is not in the local Hugging Face datasets cache "
                f"({hf_datasets_cache()}; editfast reads it offline): download it once with datasets.load_dataset, "
                f"import the statistics with 'editfast stats import', or use mom2_dataset=wikitext (bundled) or a "
                f"local .txt/.jsonl file")
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise HParamsError(f"mom2_dataset {name!r} is read with the 'datasets' package, which is not "
                               "installed") from None
        return Corpus(name, "hub", name, found[0])
    path = Path(name).expanduser()
    if not path.is_file():
        raise HParamsError(f"mom2_dataset {name!r} is neither a known corpus ({', '.join([*BUNDLED, *HUB])}) nor a "
                           "file")

    kind = "jsonl" if str(path).removesuffix(".gz").endswith(".jsonl") else "text"
    return Corpus(name, kind, f"{kind}:{file_sha256(path)}", [path])


def corpus_texts(name: str, n_samples: int) -> list[str]:
    """The first ``n_samples`` texts of a corpus (``corpus.open_corpus``; fewer if it has fewer)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise HParamsError(f"mom2_n_samples must be a positive number of paragraphs, got {n_samples!r}")
    return open_corpus(name).texts(n_samples)
