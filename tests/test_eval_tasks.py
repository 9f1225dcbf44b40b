"""The general-ability tasks: shipped data, requests under both protocols, scoring of synthetic outputs."""

import gzip
import hashlib
import math
import re

import pytest

from editfast.core.errors import DataError, EditfastError
from editfast.core.paths import PACKAGE_DATA
from editfast.engine.requests import (
    Generate,
    LogLik,
    LogLikResult,
    Rolling,
    RollingResult,
)
from editfast.eval.tasks import ALL, TASKS, _common, get_task, resolve_tasks
from editfast.eval.tasks.conll03 import NAMES, TYPES, parse_entities

COUNTS = {  # loaded, scored
    "gsm8k": (1319, 1311), "rte": (277, 277), "nq": (3610, 3610), "boolq": (3270, 3270),
    "mutual": (886, 886), "samsum": (819, 819), "conll03": (3453, 3453), "sst2": (872, 872),
    "wikitext": (62, 62),
}
SHAPES = {  # task -> protocol -> (request type, requests per example)
    "gsm8k": {"standard": (Generate, 1), "paper": (Generate, 1)},
    "rte": {"standard": (LogLik, 2), "paper": (Generate, 1)},
    "nq": {"standard": (Generate, 1), "paper": (Generate, 1)},
    "boolq": {"standard": (LogLik, 2), "paper": (Generate, 1)},
    "mutual": {"standard": (LogLik, 4), "paper": (Generate, 1)},
    "samsum": {"standard": (Generate, 1), "paper": (Generate, 1)},
    "conll03": {"standard": (Generate, 1), "paper": (Generate, 4)},
    "sst2": {"standard": (LogLik, 2), "paper": (Generate, 1)},
    "wikitext": {"standard": (Rolling, 1), "paper": (Rolling, 1)},
}
CHOICE = ["rte", "boolq", "sst2"]


@pytest.fixture(scope="module")
def data():
    return {name: task.scored(task.load()) for name, task in TASKS.items()}


def run(task, examples, protocol, answer):
    """Score ``examples`` with outputs made by ``answer(example, requests)``; return the aggregate."""
    per = []
    for ex in examples:
        reqs = task.requests(ex, protocol)
        per.append(task.score(ex, answer(ex, reqs), protocol))
    return task.aggregate(per, protocol)


def test_registry():
    assert list(TASKS) == ["gsm8k", "rte", "nq", "boolq", "mutual", "samsum", "conll03", "sst2", "wikitext"]
    assert ALL == list(TASKS)[:8]
    assert [t.name for t in resolve_tasks("all")] == list(TASKS)
    assert [t.name for t in resolve_tasks("sst2, rte,sst2")] == ["sst2", "rte"]
    assert resolve_tasks(["nq"]) == [TASKS["nq"]] and get_task("nq") is TASKS["nq"]
    assert len({t.category for t in TASKS.values()}) == 9
    for name in ("bogus", "gsm8k,bogus", "", " , "):
        with pytest.raises(EditfastError, match="gsm8k"):
            resolve_tasks(name)
    with pytest.raises(EditfastError, match="conll03"):
        get_task("ner")
    for t in TASKS.values():
        assert set(t.primary) == {"standard", "paper"} and t.higher_is_better == (t.name != "wikitext")


@pytest.mark.parametrize("name", list(TASKS))
def test_counts_and_requests(name, data):
    task = TASKS[name]
    loaded, scored = COUNTS[name]
    assert len(task.load()) == loaded and len(data[name]) == scored
    for protocol, (kind, n) in SHAPES[name].items():
        for ex in data[name]:
            reqs = task.requests(ex, protocol)
            assert len(reqs) == n and all(type(r) is kind for r in reqs)
            if kind is Generate:
                assert all(r.max_new_tokens > 0 and r.prompt for r in reqs)
    with pytest.raises(EditfastError, match="protocol"):
        task.requests(data[name][0], "bogus")


def test_label_words_are_single_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(PACKAGE_DATA / "tokenizer" / "tokenizer.json"))
    for name in CHOICE:
        for c in TASKS[name].choices:
            assert len(tok.encode(" " + c, add_special_tokens=False).ids) == 1, (name, c)


def test_prompts(data):
    rte = data["rte"][0]
    r = TASKS["rte"].requests(rte, "standard")
    assert r[0] == LogLik(f"{rte['premise']}\nQuestion: {rte['hypothesis']} True or False?\nAnswer:", " True")
    assert r[1].continuation == " False"
    assert TASKS["rte"].requests(rte, "paper")[0] == Generate(
        f"{rte['premise']} entails the {rte['hypothesis']}. True or False?\nanswer:", 3)
    sst = data["sst2"][0]
    assert sst == {"sentence": "it 's a charming and often affecting journey .", "label": 0}
    assert [r.continuation for r in TASKS["sst2"].requests(sst, "standard")] == [" positive", " negative"]
    assert TASKS["boolq"].requests(data["boolq"][0], "standard")[0].context.endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    nq = TASKS["nq"].requests(data["nq"][0], "standard")[0]
    assert nq.prompt == "Answer these questions:\nQ: when was the last time anyone was on the moon?\nA:"
    assert nq.stop == ("\n", "Q:") and nq.max_new_tokens == 32
    mu = data["mutual"][0]
    r = TASKS["mutual"].requests(mu, "standard")
    assert r[0].context == mu["article"] + "\n" and r[0].continuation.startswith(" m : so you come")
    p = TASKS["mutual"].requests(mu, "paper")[0].prompt
    assert "\nWhich choice is correct?\nA. m : so you come" in p and p.endswith("\nAmong A through D, the answer is")
    conll = data["conll03"][0]
    assert conll == {"text": "SOCCER - JAPAN GET LUCKY WIN , CHINA IN SURPRISE DEFEAT .",
                     "entities": [("LOC", "JAPAN"), ("PER", "CHINA")]}
    paper = TASKS["conll03"].requests(conll, "paper")
    assert paper[0].prompt == f"Please identify Person Entity from the given text. Text: {conll['text']} Entity:"
    samsum = TASKS["samsum"].requests(data["samsum"][0], "paper")[0]
    assert samsum.prompt.endswith("\nTL;DR:") and samsum.stop == ("\n\n",)
    wiki = data["wikitext"][0]
    assert wiki["title"] == "Robert Boulter" and wiki["text"].startswith("Robert Boulter is an English film, television")
    assert "@" not in wiki["text"] and " = " not in wiki["text"]


def test_gsm8k(data):
    task, examples = TASKS["gsm8k"], data["gsm8k"]
    shots = task.fewshot
    assert shots.count("Question: ") == 8 and shots.count("The answer is ") == 8 and "<<" not in shots
    assert shots.startswith("Question: Janet\u2019s ducks lay 16 eggs") and "\nThe answer is 18.\n\n" in shots
    assert all(e["question"] not in shots for e in examples)  # exemplars are never scored
    req = task.requests(examples[0], "standard")[0]
    assert req.prompt == shots + f"Question: {examples[0]['question']}\nAnswer:"
    assert (req.max_new_tokens, req.stop) == (256, ("\n\nQuestion:", "Question:"))
    assert task.requests(examples[0], "paper")[0] == Generate(
        f"Q: {examples[0]['question']}\nA: Let's think step by step.", 256, ("\nQ:",))
    assert {e["target"] for e in task.load()} >= {"18", "2125"}  # commas dropped
    gold = lambda ex, reqs: [f"She works it out: 3 + 4 = 7 so {ex['target']} in all.\nThe answer is {ex['target']}."]
    assert run(task, examples, "standard", gold) == {"accuracy": 1.0}
    off = lambda ex, reqs: [f"The answer is {int(ex['target']) + 1}."]
    assert run(task, examples, "standard", off) == {"accuracy": 0.0}
    ex = {"target": "18"}
    assert task.score(ex, ["He earns $18 a day, so 20 in all"], "standard")["accuracy"] == 0.0  # last number
    assert task.score(ex, ["He earns $18 a day, so 20 in all"], "paper")["accuracy"] == 1.0  # any number
    assert task.score(ex, ["He earns 180 a day"], "paper")["accuracy"] == 0.0
    assert task.score({"target": "2125"}, ["so $2,125.00"], "paper")["accuracy"] == 1.0


@pytest.mark.parametrize("name", CHOICE)
def test_choice_tasks(name, data):
    task, examples = TASKS[name], data[name]
    def loglik(good):
        return lambda ex, reqs: [LogLikResult(-1.0 if (i == ex["label"]) == good else -2.0, 1, True)
                                 for i in range(len(reqs))]
    assert run(task, examples, "standard", loglik(True)) == {"accuracy": 1.0}
    assert run(task, examples, "standard", loglik(False)) == {"accuracy": 0.0}
    say = lambda pick: (lambda ex, reqs: [f" {task.choices[pick(ex['label'])].upper()}.\nmore text"])
    assert run(task, examples, "paper", say(lambda y: y)) == {"accuracy": 1.0}
    assert run(task, examples, "paper", say(lambda y: 1 - y)) == {"accuracy": 0.0}
    assert run(task, examples, "paper", lambda ex, reqs: [" maybe"]) == {"accuracy": 0.0}
    # half right -> 0.5 exactly on a balanced pair
    pair = [{**examples[0], "label": 0}, {**examples[0], "label": 1}]
    assert run(task, pair, "paper", lambda ex, reqs: [task.choices[0]]) == {"accuracy": 0.5}


def test_boolq_accepts_json_booleans(tmp_path, monkeypatch):
    (tmp_path / "boolq").mkdir()
    with gzip.open(tmp_path / "boolq" / "val.jsonl.gz", "wt") as f:
        f.write('{"passage": "p", "question": "q", "label": true}\n{"passage": "p", "question": "q", "label": "false"}\n')
    monkeypatch.setattr(_common, "DATA_DIR", tmp_path)
    assert [e["label"] for e in TASKS["boolq"].load()] == [0, 1]
    with gzip.open(tmp_path / "boolq" / "val.jsonl.gz", "wt") as f:
        f.write('{"passage": "p", "question": "q", "label": 1}\n')
    with pytest.raises(DataError, match="label"):
        TASKS["boolq"].load()


def test_mutual(data):
    task, examples = TASKS["mutual"], data["mutual"]
    def loglik(ex, reqs):  # gold: lower summed log-prob (-6 vs -4) but better per token (-1 vs -2)
        return [LogLikResult(-6.0 if i == ex["label"] else -4.0, 6 if i == ex["label"] else 2, False)
                for i in range(4)]
    assert run(task, examples, "standard", loglik) == {"r@1": 1.0, "r@2": 1.0, "mrr": 1.0}
    def second(ex, reqs):  # gold ranked second
        return [LogLikResult({ex["label"]: -2.0, (ex["label"] + 1) % 4: -1.0}.get(i, -3.0), 1, False) for i in range(4)]
    assert run(task, examples, "standard", second) == {"r@1": 0.0, "r@2": 1.0, "mrr": 0.5}
    letter = lambda ex, reqs: [f" ({'ABCD'[ex['label']]})"]
    assert run(task, examples, "paper", letter) == {"r@1": 1.0}
    wrong = lambda ex, reqs: [f" {'ABCD'[(ex['label'] + 1) % 4]}. {'ABCD'[ex['label']]}"]
    assert run(task, examples, "paper", wrong) == {"r@1": 0.0}


def test_nq(data):
    task, examples = TASKS["nq"], data["nq"]
    gold = lambda ex, reqs: [" " + ex["answers"][-1] + "."]
    assert run(task, examples, "standard", gold) == {"exact_match": 1.0, "f1": 1.0}
    assert run(task, examples, "paper", gold) == {"exact_match": 1.0}
    ex = {"answers": ["14 December 1972 UTC", "December 1972"]}
    assert task.score(ex, [" in December 1972"], "standard") == {"exact_match": 0.0, "f1": pytest.approx(0.8)}


def test_samsum(data):
    task, examples = TASKS["samsum"], data["samsum"][:50]
    gold = lambda ex, reqs: [" " + ex["summary"] + "\n"]
    for protocol in ("standard", "paper"):
        res = run(task, examples, protocol, gold)
        assert all(v == pytest.approx(1.0) for v in res.values())
    assert set(run(task, examples, "paper", gold)) == {"rouge1", "rouge2", "rougeL", "rouge"}
    res = run(task, examples, "standard", lambda ex, reqs: [""])
    assert res == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_conll03(data):
    task, examples = TASKS["conll03"], data["conll03"]
    listing = lambda ex, reqs: ["\n".join(f"{NAMES[t].lower()}: {text}" for t, text in ex["entities"])]
    res = run(task, examples, "standard", listing)
    assert res == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "f1_PER": 1.0, "f1_ORG": 1.0, "f1_LOC": 1.0, "f1_MISC": 1.0}
    res = run(task, examples, "standard", lambda ex, reqs: [""])
    assert res["f1"] == 0.0 and res["precision"] == 0.0 and res["recall"] == 0.0
    # hand count: gold LOC JAPAN, PER CHINA; predicted LOC JAPAN (tp), LOC CHINA (fp LOC, fn PER)
    ex = examples[0]
    s = task.score(ex, ["location: JAPAN\n- LOC: CHINA\nnot an entity line"], "standard")
    assert (s["tp_LOC"], s["fp_LOC"], s["fn_LOC"], s["tp_PER"], s["fn_PER"]) == (1, 1, 0, 0, 1)
    agg = task.aggregate([s], "standard")
    assert agg["precision"] == 0.5 and agg["recall"] == 0.5 and agg["f1_LOC"] == pytest.approx(2 / 3)
    assert agg["f1_PER"] == 0.0 and agg["f1_ORG"] == 0.0
    assert parse_entities("Person: John Smith\n* organisation : UN\nmisc:\nfoo: bar") == [("PER", "John Smith"), ("ORG", "UN")]
    # paper: one output per type; found if the entity's text occurs in it
    every = lambda ex, reqs: [" ; ".join(text for t, text in ex["entities"] if t == typ) for typ in TYPES]
    res = run(task, examples, "paper", every)
    assert res == {"score": 1.0, "rate_PER": 1.0, "rate_ORG": 1.0, "rate_LOC": 1.0, "rate_MISC": 1.0}
    s = task.score(ex, [" JAPAN", "", " JAPAN and CHINA", ""], "paper")
    assert task.aggregate([s], "paper") == {"score": 0.5, "rate_PER": 0.0, "rate_LOC": 1.0}  # types without gold skipped


def test_wikitext(data):
    task, examples = TASKS["wikitext"], data["wikitext"]
    for protocol in ("standard", "paper"):
        assert task.requests(examples[0], protocol) == [Rolling(examples[0]["text"])]
    # log p = -ln 2 per token -> perplexity 2; bits/byte = tokens/bytes
    out = lambda ex, reqs: [RollingResult(-len(ex["text"].split()) * 2 * math.log(2), 2 * len(ex["text"].split()))]
    res = run(task, examples, "standard", out)
    words = sum(len(e["text"].split()) for e in examples)
    nbytes = sum(len(e["text"].encode()) for e in examples)
    assert res["perplexity"] == pytest.approx(2.0)
    assert res["word_perplexity"] == pytest.approx(4.0)  # 2 tokens per word
    assert res["bits_per_byte"] == pytest.approx(2 * words / nbytes)
    assert 150_000 < words < 250_000


@pytest.mark.parametrize("name", list(TASKS))
def test_missing_data_file(name, tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "DATA_DIR", tmp_path)
    with pytest.raises(DataError, match="missing"):
        TASKS[name].load()


@pytest.mark.parametrize("name", ["rte", "nq", "mutual", "samsum", "gsm8k"])
def test_malformed_jsonl(name, tmp_path, monkeypatch):
    path = tmp_path / TASKS[name].data_file
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(_common, "DATA_DIR", tmp_path)
    path.write_text('{"question": "q"\n')
    with pytest.raises(DataError, match="bad JSON"):
        TASKS[name].load()
    path.write_text('{"unrelated": 1}\n')
    with pytest.raises(DataError, match="missing field"):
        TASKS[name].load()


def test_malformed_text_files(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "DATA_DIR", tmp_path)
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood .\tpositive\n")
    with pytest.raises(DataError, match="sst2/dev.tsv:2"):
        TASKS["sst2"].load()
    (tmp_path / "conll2003").mkdir()
    (tmp_path / "conll2003" / "test.txt").write_text("EU NNP B-NP B-ORG\nrejects VBZ\n")
    with pytest.raises(DataError, match="test.txt:2"):
        TASKS["conll03"].load()
    (tmp_path / "conll2003" / "test.txt").write_text("EU NNP B-NP X-ORG\n")
    with pytest.raises(DataError, match="bad IOB tag"):
        TASKS["conll03"].load()


def test_shipped_files_match_sources():
    root = PACKAGE_DATA / "tasks"
    table = re.findall(r"^([0-9a-f]{64})  (\S+)$", (root / "SOURCES.md").read_text(), re.M)
    assert len(table) == 9
    for digest, rel in table:
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel
    assert {rel for _, rel in table} == {t.data_file for t in TASKS.values()}
