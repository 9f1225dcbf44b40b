"""pytest-benchmark suites of the pipeline stages: fast path and reference path side by side.

    python -m pytest bench/test_bench_pipeline.py --benchmark-group-by=group

Each group holds the two backends of one stage on the same inputs; the ratio is their mean
times' quotient (``bench/run.py`` prints it as one table). Model: $EDITFAST_BENCH_MODEL
(default random:tiny-llama, so the suite runs anywhere in seconds; use smollm2-135m or a
random:<preset> for real numbers).
"""

import os

import pytest

from editfast.data.corpus import corpus_texts
from editfast.data.requests import load_dataset
from editfast.methods.locate_then_edit.stats import (
    accumulate_second_moments,
    token_batches,
)
from editfast.methods.locate_then_edit.targets import optimize_targets
from editfast.methods.locate_then_edit.templates import context_templates
from editfast.methods.registry import resolve_hparams
from editfast.models.load import load_model

MODEL = os.environ.get("EDITFAST_BENCH_MODEL", "random:tiny-llama")


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_statistics(benchmark, lm, backend):
    hp = resolve_hparams("memit", lm.spec, lm.model.config)
    batches = list(token_batches(lm.tokenizer, corpus_texts("wikitext", 64), 128))
    benchmark.group = f"statistics {MODEL} layers {hp.layers}"
    benchmark.pedantic(accumulate_second_moments, args=(lm, hp.layers, batches), kwargs={"backend": backend},
                       rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", ["fast", "reference", "reference-lean"])
def test_targets(benchmark, lm, backend):
    hp = resolve_hparams("memit", lm.spec, lm.model.config, {"v_num_grad_steps": 5})
    flat = [t for g in context_templates(lm, "groups", hp, mode="fixed") for t in g]
    reqs = load_dataset("counterfact", 8)
    layer = hp.layers[-1]
    benchmark.group = f"targets {MODEL} n=8"
    benchmark.pedantic(optimize_targets, args=(lm, reqs, hp, flat, lm.adapter.layer_tmp.format(layer), layer,
                                               hp.loss_layer(lm.adapter.num_layers(lm.model))),
                       kwargs={"backend": backend}, rounds=2, warmup_rounds=0)
