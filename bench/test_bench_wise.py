"""pytest-benchmark rows of WISE: edits per second (fast path against the original's algorithm step
by step, the whole model and LM head every iteration) and the evaluation slowdown of a routed model
against the unedited one (the same engine, the same requests: CounterFact's edit metrics).

    python -m pytest bench/test_bench_wise.py --benchmark-group-by=group

Model: $EDITFAST_BENCH_MODEL (default random:tiny-llama; smollm2-135m for real numbers). The
group's ratio is the mean times' quotient (edits/s = 1 / the edit row's mean).
"""

import os

import pytest

from editfast.data.requests import load_dataset
from editfast.eval.edit_metrics import edit_metrics
from editfast.methods.registry import METHODS, resolve_hparams
from editfast.models import routing
from editfast.models.load import load_model

MODEL = os.environ.get("EDITFAST_BENCH_MODEL", "random:tiny-llama")
WISE = METHODS["wise"]


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def setup(lm):
    hp = resolve_hparams("wise", lm.spec, lm.model.config, {"n_iter": 10})
    return hp, WISE.templates(lm, hp), load_dataset("counterfact", 20)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_wise_edit(benchmark, lm, setup, backend):
    hp, templates, reqs = setup
    state = WISE.prepare(lm, hp, progress=False)  # once per session: the loc texts

    def one_edit():
        list(WISE.edit(lm, reqs[:1], hp, state, templates, backend=backend))

    benchmark.group = f"wise edit {MODEL} n_iter={hp.n_iter}"
    benchmark.pedantic(one_edit, rounds=2, warmup_rounds=0)


@pytest.mark.parametrize("model", ["unedited", "routed"])
def test_wise_eval_slowdown(benchmark, lm, setup, model):
    hp, templates, reqs = setup
    if model == "routed":
        state = WISE.prepare(lm, hp, progress=False)
        for r in reqs[:3]:
            list(WISE.edit(lm, [r], hp, state, templates))
        WISE.install(lm, hp, state)
    benchmark.group = f"wise evaluation {MODEL} edit metrics of 20 requests"
    try:
        benchmark.pedantic(edit_metrics, args=(lm, reqs, "counterfact"), rounds=3, warmup_rounds=1)
    finally:
        routing.uninstall(lm.model)
