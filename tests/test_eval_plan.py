"""EvalPlan (requests built once, run on any model), standard errors, and the JSON round trip."""

import json
import math
import random

import pytest

from editfast.core.errors import EditfastError
from editfast.eval.base import Task
from editfast.eval.runner import (
    EvalPlan,
    EvalResult,
    TaskResult,
    evaluate,
    markdown_table,
    stderrs,
)
from editfast.eval.tasks import TASKS


@pytest.fixture(scope="module")
def plan():
    return EvalPlan.build("rte,nq,conll03", "standard", limit=3, seed=0)  # conll03: bootstrap stderr


@pytest.fixture(scope="module")
def result(tiny, plan):
    return plan.run(tiny, progress=False)


def test_plan_is_reusable_and_equals_evaluate(tiny, plan, result):
    assert [t.name for t, _, _ in plan.entries] == ["rte", "nq", "conll03"]
    assert len(plan.pool) == 3 * (2 + 1 + 1)
    a, b = result, plan.run(tiny, progress=False)
    c = evaluate(tiny, "rte,nq,conll03", "standard", limit=3, seed=0, progress=False)
    for x in (b, c):
        assert [(t.task, t.n, t.requests, t.metrics, t.stderr) for t in x.tasks] == \
               [(t.task, t.n, t.requests, t.metrics, t.stderr) for t in a.tasks]
    for t in a.tasks:
        assert set(t.stderr) == set(t.metrics) and all(math.isfinite(v) and v >= 0 for v in t.stderr.values())
    assert "±" in markdown_table(a)


def test_json_round_trip(result):
    res = result
    doc = res.to_json()
    assert all("stderr" in t and "requests_per_s" in t for t in doc["tasks"].values())
    back = EvalResult.from_json(json.loads(json.dumps(doc)))
    assert back == res and back.to_json() == doc
    one = doc["tasks"]["rte"]
    assert TaskResult.from_json(one).to_json(doc["model"], doc["seed"]) == one


def test_plan_errors():
    for kw, word in [({"protocol": "zero"}, "zero"), ({"limit": 0}, "--limit"), ({"tasks": "nosuch"}, "nosuch")]:
        with pytest.raises(EditfastError, match=word):
            EvalPlan.build(**{"tasks": "rte", **kw})


class Mean(Task):
    name = "mean"


class BootMean(Mean):
    name = "bootmean"

    def aggregate(self, per_example, protocol):
        return super().aggregate(per_example, protocol)


def test_stderr_analytic_and_bootstrap():
    rng = random.Random(0)
    per = [{"acc": float(rng.random() < 0.3), "x": rng.gauss(0, 2)} for _ in range(400)]
    p = sum(e["acc"] for e in per) / len(per)
    se = stderrs(Mean(), per, "standard")
    assert se["acc"] == pytest.approx(math.sqrt(p * (1 - p) / (len(per) - 1)), rel=1e-12)  # binomial, unbiased
    boot = stderrs(BootMean(), per, "standard")  # not the default aggregate: bootstrap (lm-eval's fixed seeds)
    assert boot == stderrs(BootMean(), per, "standard") != stderrs(BootMean(), per, "standard", iters=500)
    for k in ("acc", "x"):
        assert boot[k] == pytest.approx(se[k], rel=0.2)
    assert math.isnan(stderrs(Mean(), per[:1], "standard")["acc"])
    wiki = [{"logprob": -rng.uniform(200, 400), "n_tokens": 100.0, "n_words": 80.0, "n_bytes": 400.0} for _ in range(50)]
    ws = stderrs(TASKS["wikitext"], wiki, "standard")
    assert set(ws) == {"perplexity", "word_perplexity", "bits_per_byte"} and 0 < ws["bits_per_byte"] < 0.1
