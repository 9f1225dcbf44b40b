import gzip
import json

import pytest

from editfast.core.errors import DataError, RequestError
from editfast.data.requests import (
    Request,
    dataset_names,
    load_dataset,
    validate_requests,
)


def test_shipped_datasets_load_with_expected_counts():
    assert dataset_names() == ["counterfact", "counterfact-full", "counterfact-train", "zsre", "zsre-alt"]
    assert len(load_dataset("counterfact")) == 500
    full = load_dataset("counterfact-full")
    assert len(full) == 21_605  # 21,919 cases minus 314 conflicting ones (see SOURCES.md)
    assert [r.case_id for r in full] == sorted(r.case_id for r in full)
    assert full[0].case_id == 0 and full[-1].case_id == 21_918
    assert len(load_dataset("zsre")) == 1000
    zsre, alt = load_dataset("zsre", 3), load_dataset("zsre-alt", 3)
    assert [r.target_new for r in alt] == ["unmanned aircraft", "Virgo", "1997"]  # each record's "alt"
    assert all(a.prompt == z.prompt and a.target_true is None for a, z in zip(alt, zsre))


def test_first_counterfact_record():
    r = load_dataset("counterfact", 1)[0]
    assert (r.case_id, r.prompt, r.subject) == (20952, "{} is located in", "Angola")
    assert (r.target_new, r.target_true, r.neighborhood_target) == ("Antarctica", "Africa", "Africa")
    assert r.filled() == "Angola is located in"
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10
    assert all("Angola" in p for p in r.paraphrase_prompts)


def test_counterfact_full_agrees_with_full_schema_records():
    full = {r.case_id: r for r in load_dataset("counterfact-full")}
    shared = [r for r in load_dataset("counterfact") if r.case_id in full]
    assert len(shared) > 490  # a few of the 500 are among the skipped conflicting cases
    for r in shared:
        f = full[r.case_id]
        assert (f.prompt, f.subject, f.target_new, f.target_true) == (r.prompt, r.subject, r.target_new, r.target_true)
        assert f.neighborhood_prompts[0] in r.neighborhood_prompts
        assert f.neighborhood_target == r.target_true


def test_zsre_built_like_memit():
    r = load_dataset("zsre", 1)[0]
    assert r.case_id == 0
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "What is the product made by {}?", "UniFirst", "uniform", None)
    assert r.paraphrase_prompts == ("What will be the product of UniFirst?",)
    assert r.neighborhood_prompts == ("nq question: john goodman's character in the big lebowski?",)
    assert r.neighborhood_target == "Walter Sobchak"


def test_n_and_offset():
    rs = load_dataset("counterfact", 3, offset=2)
    assert [r.case_id for r in rs] == [r.case_id for r in load_dataset("counterfact")[2:5]]
    with pytest.raises(DataError, match="has 500 requests"):
        load_dataset("counterfact", 501)
    with pytest.raises(DataError, match="has 500 requests"):
        load_dataset("counterfact", 10, offset=495)
    with pytest.raises(DataError, match="positive"):
        load_dataset("counterfact", 0)


def test_round_trip():
    for r in load_dataset("counterfact", 3) + load_dataset("zsre", 3):
        assert Request.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_from_dict_schemas():
    flat = Request.from_dict({"prompt": "{} plays", "subject": "Messi", "target_new": {"str": "tennis"},
                              "target_true": "football", "neighborhood_prompts": ["Pele plays"]})
    assert flat == Request("{} plays", "Messi", "tennis", "football", (), ("Pele plays",), "football")
    easyedit = Request.from_dict({"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is",
                                  "target_new": "English", "subject": "Danielle Darrieux", "ground_truth": "French",
                                  "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "French"})
    assert easyedit.prompt == "The mother tongue of {} is"
    assert (easyedit.paraphrase_prompts, easyedit.neighborhood_prompts) == (("r",), ("l",))
    with pytest.raises(RequestError, match="target_new"):
        Request.from_dict({"prompt": "{} plays", "subject": "Messi"})
    with pytest.raises(RequestError, match="requested_rewrite.subject"):
        Request.from_dict({"case_id": 3, "requested_rewrite": {"prompt": "{} is", "target_new": {"str": "x"}}})


def req(prompt="{} is located in", subject="Angola", new="Antarctica", true="Africa", case_id=1):
    return Request(prompt, subject, new, true, case_id=case_id)


@pytest.mark.parametrize(
    "requests, message",
    [
        ([req(prompt="Angola is located in")], "request 1: subject absent from the prompt"),
        ([req(prompt="{} and {} are in")], "request 1: .* 2 '{}'"),
        ([req(new="  ")], "request 1: empty target_new"),
        ([req(subject="")], "request 1: empty subject"),
        ([req(new="Africa")], "request 1: target_new equals target_true"),
        ([req(case_id=7), req(subject="Chad", case_id=7)], "duplicate case_id 7"),
        ([req(case_id=1), req(new="Europe", case_id=2)],
         "request 2: conflicts with request 1.*'Antarctica' vs 'Europe'"),
    ],
)
def test_validation_errors(requests, message):
    with pytest.raises(RequestError, match=message):
        validate_requests(requests)


def test_validation_accepts_good_batch():
    validate_requests([req(case_id=1), req(subject="Chad", case_id=2), req(case_id=3, true=None)])
    validate_requests([Request("{} {{x}}", "a", "b")])  # braces elsewhere are fine
    assert Request("{} {{x}}", "a", "b").filled() == "a {{x}}"


def test_custom_jsonl_and_gz(tmp_path):
    records = [{"prompt": "{} plays", "subject": "Messi", "target_new": "tennis", "target_true": "football"},
               {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"}]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    rs = load_dataset(path)
    assert [r.case_id for r in rs] == [0, 1]
    assert rs[1].prompt == "The capital of {} is" and rs[1].target_true is None
    gz = tmp_path / "mine.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(records).encode()))
    assert load_dataset(str(gz)) == rs


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="missing.json"):
        load_dataset(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": ')
    with pytest.raises(DataError, match="bad.json"):
        load_dataset(bad)
    badl = tmp_path / "bad.jsonl"
    badl.write_text('{"prompt": "{} x", "subject": "a", "target_new": "b"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        load_dataset(badl)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text('[{"prompt": "{} x", "subject": "a"}]')
    with pytest.raises(DataError, match="incomplete.json: record 0: .*target_new"):
        load_dataset(incomplete)
    with pytest.raises(DataError, match="unknown dataset 'nope'.*counterfact-full"):
        load_dataset("nope")
