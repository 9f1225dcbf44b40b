"""Edit requests and the datasets that supply them (CounterFact, zsRE, user files).

A `Request` asks to rewrite one fact: in `prompt` ("{} is located in") the subject ("Angola")
should now be followed by `target_new` ("Antarctica") instead of `target_true` ("Africa").
Datasets ship inside the package (`_data/datasets/`, provenance in its SOURCES.md), so
`load_dataset("counterfact")` works offline.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from editfast.core.errors import DataError, RequestError
from editfast.core.paths import PACKAGE_DATA

DATA_DIR = PACKAGE_DATA / "datasets"
_CF_FULL_FILES = tuple(
    f"counterfact/easyedit_format/counterfact-{split}.json.gz" for split in ("train", "val", "edit")
)
_DATASETS: dict[str, tuple[str, ...]] = {
    "counterfact": ("counterfact/counterfact_500.json",),
    "counterfact-full": _CF_FULL_FILES,
    "counterfact-train": (_CF_FULL_FILES[0],),  # for training MEND: disjoint from "counterfact"
    "zsre": ("zsre/zsre_mend_train-1k.json",),
    "zsre-alt": ("zsre/zsre_mend_train-1k.json",),
}
SCHEMAS = {  # what each request of a shipped dataset carries
    "counterfact": "ROME's full CounterFact schema: 2 paraphrases, 10 neighbourhood prompts, generation prompts",
    "counterfact-full": "CounterFact in EasyEdit's schema: 1 paraphrase, 1 neighbourhood prompt",
    "counterfact-train": "CounterFact in EasyEdit's schema: 1 paraphrase, 1 neighbourhood prompt",
    "zsre": "zsRE (MEND's records): question, paraphrase, locality question; toward answers[0]",
    "zsre-alt": "zsRE (MEND's records): question, paraphrase, locality question; toward the record's alt",
}
COUNTERFACT_FULL_SCHEMA_RECORDS = 500  # records of "counterfact"; beyond them only "counterfact-full" serves


def dataset_schema(name: str | os.PathLike[str]) -> str:
    """One line on what the requests of ``name`` carry (a file: detected per record)."""
    return SCHEMAS.get(str(name), "a file of requests: the schema detected per record")


def default_dataset(n: int, offset: int = 0) -> str:
    """The dataset a run without --dataset edits: the 500 full-schema CounterFact records while they
    suffice, else all of CounterFact in EasyEdit's schema (said to the user and recorded)."""
    return "counterfact" if offset + n <= COUNTERFACT_FULL_SCHEMA_RECORDS else "counterfact-full"


@dataclass(frozen=True)
class Request:
    """One fact to rewrite. `target_*` are stored without a leading space."""

    prompt: str  # exactly one "{}" marking the subject
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()  # full sentences, subject already inside
    neighborhood_prompts: tuple[str, ...] = ()  # other subjects, same relation
    neighborhood_target: str | None = None  # expected answer on the neighbourhood prompts
    case_id: int | str | None = None
    generation_prompts: tuple[str, ...] = ()  # CounterFact's full schema: prompts for fluency

    def __post_init__(self) -> None:  # accept lists for the prompt tuples
        object.__setattr__(self, "paraphrase_prompts", tuple(self.paraphrase_prompts))
        object.__setattr__(self, "neighborhood_prompts", tuple(self.neighborhood_prompts))
        object.__setattr__(self, "generation_prompts", tuple(self.generation_prompts))

    def filled(self) -> str:
        """The prompt with the subject in place of its single "{}"."""
        if self.prompt.count("{}") != 1:
            raise RequestError(f"{_name(self)}: prompt {self.prompt!r} must contain exactly one '{{}}'")
        return self.prompt.replace("{}", self.subject)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Request:
        """Build from a ROME CounterFact record, an EasyEdit/MEND zsRE record (toward its "alt", as
        EasyEdit edits; answers[0] where "alt" is missing or empty), an EasyEdit
        CounterFact record, or the flat form written by `to_dict`. A filled prompt (no "{}")
        that contains the subject is turned into a template at the subject's first occurrence."""
        if not isinstance(d, Mapping):
            raise RequestError(f"a request must be a JSON object, not {type(d).__name__}")
        case_id = _case_id(d.get("case_id"), "request")
        where = f"request {case_id}" if case_id is not None else "request"

        def need(m: Mapping[str, Any], key: str, prefix: str = "") -> Any:
            if m.get(key) is None:
                raise RequestError(f"{where}: missing field '{prefix}{key}'")
            return m[key]

        if "requested_rewrite" in d:  # ROME CounterFact schema
            rw = d["requested_rewrite"]
            if not isinstance(rw, Mapping):
                raise RequestError(
                    f"{where}: 'requested_rewrite' must be one object "
                    "(multi-edit records such as MQuAKE's are not supported)"
                )
            true = _text(rw.get("target_true"), where, "requested_rewrite.target_true")
            return cls(
                prompt=_str(need(rw, "prompt", "requested_rewrite."), where, "prompt"),
                subject=_str(need(rw, "subject", "requested_rewrite."), where, "subject"),
                target_new=_text(need(rw, "target_new", "requested_rewrite."), where, "target_new"),
                target_true=true,
                paraphrase_prompts=_strs(d.get("paraphrase_prompts"), where, "paraphrase_prompts"),
                neighborhood_prompts=_strs(d.get("neighborhood_prompts"), where, "neighborhood_prompts"),
                neighborhood_target=true,
                case_id=case_id,
                generation_prompts=_strs(d.get("generation_prompts"), where, "generation_prompts"),
            )

        subject = _str(need(d, "subject"), where, "subject")
        if "src" in d and "answers" in d:  # MEND zsRE schema (MEMIT's, EasyEdit's)
            answers = d["answers"]
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not answers:
                raise RequestError(f"{where}: field 'answers' must be a non-empty list")
            loc = d.get("loc")
            # EasyEdit edits toward the counterfactual "alt"; MEMIT toward answers[0] (load_dataset("zsre"))
            new = ("alt", d["alt"]) if d.get("alt") else ("answers[0]", answers[0])
            return cls(
                prompt=_template(_str(need(d, "src"), where, "src"), subject, where),
                subject=subject,
                target_new=_str(new[1], where, new[0]),
                paraphrase_prompts=_strs(d.get("rephrase"), where, "rephrase"),
                neighborhood_prompts=(_str(loc, where, "loc") + "?",) if loc else (),
                neighborhood_target=_text(d.get("loc_ans"), where, "loc_ans"),
                case_id=case_id,
            )

        # flat form, or EasyEdit CounterFact (filled prompt, ground_truth, rephrase/locality)
        prompt = _str(need(d, "prompt"), where, "prompt")
        if "{}" not in prompt and subject and subject in prompt:
            prompt = _template(prompt, subject, where)

        def either(key: str, easyedit_key: str) -> Any:
            return d[key] if key in d else d.get(easyedit_key)

        true = _text(either("target_true", "ground_truth"), where, "target_true")
        neighborhood = _strs(either("neighborhood_prompts", "locality_prompt"), where, "neighborhood_prompts")
        if "neighborhood_target" in d or "locality_ground_truth" in d:
            nb_target = _text(either("neighborhood_target", "locality_ground_truth"), where, "neighborhood_target")
        else:  # CounterFact convention: neighbours keep the true answer
            nb_target = true if neighborhood else None
        return cls(
            prompt=prompt,
            subject=subject,
            target_new=_text(need(d, "target_new"), where, "target_new"),
            target_true=true,
            paraphrase_prompts=_strs(either("paraphrase_prompts", "rephrase_prompt"), where, "paraphrase_prompts"),
            neighborhood_prompts=neighborhood,
            neighborhood_target=nb_target,
            case_id=case_id,
            generation_prompts=_strs(d.get("generation_prompts"), where, "generation_prompts"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able form; `Request.from_dict(r.to_dict()) == r` (generation prompts only where
        the request has them)."""
        gen = {"generation_prompts": list(self.generation_prompts)} if self.generation_prompts else {}
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "neighborhood_target": self.neighborhood_target,
            **gen,
        }


def validate_requests(requests: Iterable[Request]) -> None:
    """Raise RequestError, naming the case, at the first request that cannot be edited:
    prompt without exactly one "{}", empty subject or target, target_new == target_true,
    duplicate case_id, or two requests for the same (subject, prompt) with different targets
    (MEMIT cannot edit both in one batch)."""
    seen_ids: dict[int | str, int] = {}
    seen_facts: dict[tuple[str, str], Request] = {}
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise RequestError(f"request #{i}: expected a Request (see Request.from_dict), not {type(r).__name__}")
        _case_id(r.case_id, f"request #{i}")
        name = _name(r, i)
        for field in ("prompt", "subject", "target_new"):
            if not isinstance(getattr(r, field), str):
                raise RequestError(f"{name}: {field} must be a string, not {type(getattr(r, field)).__name__}")
        n_slots = r.prompt.count("{}")
        if n_slots == 0:
            raise RequestError(f"{name}: subject absent from the prompt: {r.prompt!r} has no '{{}}' marking it")
        if n_slots > 1:
            raise RequestError(f"{name}: prompt {r.prompt!r} has {n_slots} '{{}}'; exactly one must mark the subject")
        if not r.subject.strip():
            raise RequestError(f"{name}: empty subject")
        if not r.target_new.strip():
            raise RequestError(f"{name}: empty target_new")
        if r.target_true is not None and r.target_new.strip() == r.target_true.strip():
            raise RequestError(f"{name}: target_new equals target_true ({r.target_new!r}); nothing to edit")
        if r.case_id is not None:
            if r.case_id in seen_ids:
                raise RequestError(f"{name}: duplicate case_id {r.case_id!r} (also request #{seen_ids[r.case_id]})")
            seen_ids[r.case_id] = i
        other = seen_facts.setdefault((r.subject, r.prompt), r)
        if other.target_new != r.target_new:
            raise RequestError(
                f"{name}: conflicts with {_name(other)}: both rewrite {r.filled()!r} but to different "
                f"targets ({other.target_new!r} vs {r.target_new!r}); they cannot be edited in one batch"
            )


def dataset_names() -> list[str]:
    """Names accepted by `load_dataset` besides file paths."""
    return list(_DATASETS)


def load_dataset(name_or_path: str | os.PathLike[str], n: int | None = None, *, offset: int = 0) -> list[Request]:
    """Load requests `offset .. offset+n` (all if n is None) of a shipped dataset or a file.

    Shipped: "counterfact" (500 full ROME records, file order), "counterfact-full" (CounterFact
    in EasyEdit format sorted by case_id: 21,605 requests — of the 21,919 cases, 314 that rewrite
    the same subject and prompt as a lower case_id to a different target are skipped, see
    _data/datasets/SOURCES.md), "zsre" (1,000 MEND records, case_id = index, toward answers[0], as
    MEMIT's zsRE loader), "zsre-alt" (the same records toward their counterfactual "alt", as the 2024
    study and EasyEdit edit),
    "counterfact-train" (EasyEdit's train split in file order, for training editor networks such as
    MEND's: the records whose case_id or subject is among the 500 of "counterfact" are removed, so
    it is disjoint from the evaluation records, then conflicts as for counterfact-full: 9,669).
    Files: .json (a list of records), .jsonl, optionally .gz; the schema is detected per record
    (see `Request.from_dict`; zsRE records in a file edit toward their "alt", EasyEdit's convention,
    or answers[0] where "alt" is empty); records without case_id get their index in the file.
    The selected requests are checked with `validate_requests`.
    """
    if n is not None and n <= 0:
        raise DataError(f"n must be a positive number of requests, got {n}")
    if offset < 0:
        raise DataError(f"offset must be >= 0, got {offset}")
    name = str(name_or_path)
    if name in _DATASETS:
        records = [rec for f in _DATASETS[name] for rec in _read_records(DATA_DIR / f)]
        if name == "counterfact-full":
            records.sort(key=lambda rec: rec["case_id"])
        requests = _parse(records, DATA_DIR / _DATASETS[name][0])
        if name == "zsre":  # MEMIT's zsRE convention: toward answers[0] (a file's records go toward "alt")
            requests = [replace(r, target_new=rec["answers"][0]) for r, rec in zip(requests, records)]
        if name == "counterfact-full":
            requests = _drop_conflicts(requests)
        if name == "counterfact-train":
            requests = _drop_conflicts(_disjoint_from_eval(requests))
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            if path.suffix or os.sep in name or path.exists():
                raise DataError(f"dataset file not found: {path}")
            raise DataError(
                f"unknown dataset {name!r}: not a file and not one of {', '.join(dataset_names())}"
            )
        requests = _parse(_read_records(path), path)

    end = len(requests) if n is None else offset + n
    if end > len(requests) or offset >= len(requests):
        want = "any" if n is None else n
        hint = " (counterfact-full has all 21,605)" if name == "counterfact" else ""
        raise DataError(f"dataset {name!r} has {len(requests)} requests{hint}; cannot take {want} from offset {offset}")
    selected = requests[offset:end]
    validate_requests(selected)
    return selected


# --------------------------------------------------------------------------- helpers


def _name(r: Request, index: int | None = None) -> str:
    if r.case_id is not None:
        return f"request {r.case_id}"
    return f"request #{index}" if index is not None else "request"


def _case_id(x: Any, where: str) -> int | str | None:
    """A case_id is an integer (not a boolean), a string, or absent (None)."""
    if x is None or isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool)):
        return x
    shown = repr(x) if len(repr(x)) <= 40 else repr(x)[:37] + "..."
    raise RequestError(f"{where}: field 'case_id' must be an integer or a string, not {type(x).__name__} ({shown})")


def _str(x: Any, where: str, field: str) -> str:
    if not isinstance(x, str):
        raise RequestError(f"{where}: field '{field}' must be a string, not {type(x).__name__}")
    return x


def _text(x: Any, where: str, field: str) -> str | None:
    """A target given as "Paris" or as {"str": "Paris", "id": ...}; None stays None."""
    if x is None:
        return None
    if isinstance(x, Mapping):
        if "str" not in x:
            raise RequestError(f"{where}: field '{field}' is an object without 'str'")
        x = x["str"]
    return _str(x, where, field)


def _strs(x: Any, where: str, field: str) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    if not isinstance(x, list):
        raise RequestError(f"{where}: field '{field}' must be a list of strings")
    return tuple(_str(s, where, field) for s in x)


def _template(filled: str, subject: str, where: str) -> str:
    """"Angola is in" + "Angola" -> "{} is in" (first occurrence of the subject)."""
    i = filled.find(subject) if subject else -1
    if i < 0:
        raise RequestError(f"{where}: subject {subject!r} does not occur in the prompt {filled!r}")
    return filled[:i] + "{}" + filled[i + len(subject) :]


def _read_records(path: Path) -> list[Any]:
    """JSON list (or one object) or JSONL records from a plain or gzipped file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    jsonl = path.name.removesuffix(".gz").endswith(".jsonl")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if not jsonl:
                data = json.load(f)
                return data if isinstance(data, list) else [data]
            records = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: invalid JSON on line {lineno}: {e}") from e
            return records
    except FileNotFoundError as e:
        raise DataError(f"dataset file not found: {path}") from e
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip file: {' '.join(str(e).split()) or type(e).__name__}") from e
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as e:
        raise DataError(f"{path}: not a valid JSON{'L' if jsonl else ''} file: {' '.join(str(e).split())}") from e


def _parse(records: list[Any], path: Path) -> list[Request]:
    requests = []
    for i, rec in enumerate(records):
        try:
            r = Request.from_dict(rec)
        except RequestError as e:
            raise DataError(f"{path}: record {i}: {e}") from e
        if r.case_id is None:
            r = replace(r, case_id=i)
        requests.append(r)
    return requests


def _disjoint_from_eval(requests: list[Request]) -> list[Request]:
    """Drop the requests that share a case_id or a subject with the 500 "counterfact" records."""
    evals = _parse(_read_records(DATA_DIR / _DATASETS["counterfact"][0]), DATA_DIR / _DATASETS["counterfact"][0])
    ids, subjects = {r.case_id for r in evals}, {r.subject for r in evals}
    return [r for r in requests if r.case_id not in ids and r.subject not in subjects]


def _drop_conflicts(requests: list[Request]) -> list[Request]:
    """Keep the first request of each (subject, prompt) and later ones only if same target."""
    first: dict[tuple[str, str], str] = {}
    return [r for r in requests if first.setdefault((r.subject, r.prompt), r.target_new) == r.target_new]
