"""pytest-benchmark rows of GRACE: edits per second, and what routing costs evaluation.

    python -m pytest bench/test_bench_grace.py --benchmark-group-by=group

- "grace edits": N requests in one batch (the fast path: the codebook updated request by request,
  the values trained in one padded forward per step) against the reference path (the originals'
  loop, one request at a time); edits/s = N / mean time.
- "routed evaluation": the same tasks on the same engine, the unedited model against the model
  routing through a codebook of K keys at GRACE's layer (keys are the layer's inputs at corpus
  tokens, radius ε = 1, random values: every token is looked up; few hit); the ratio is the
  slowdown routing costs.

Model: $EDITFAST_BENCH_MODEL (default random:tiny-llama; smollm2-135m for real numbers).
"""

import os

import pytest
import torch

from editfast.data.corpus import corpus_texts
from editfast.data.requests import load_dataset
from editfast.eval.runner import evaluate
from editfast.methods.base import State
from editfast.methods.registry import get_method, resolve_hparams
from editfast.models import routing
from editfast.models.load import load_model

MODEL = os.environ.get("EDITFAST_BENCH_MODEL", "random:tiny-llama")
N_EDITS = int(os.environ.get("EDITFAST_BENCH_GRACE_N", "8"))
TASKS, LIMIT = "sst2,rte,nq", int(os.environ.get("EDITFAST_BENCH_EVAL_LIMIT", "24"))


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def _edit(lm, reqs, backend):
    m = get_method("grace")
    hp = resolve_hparams("grace", lm.spec, lm.model.config)
    state = State()
    for _ in m.edit(lm, reqs, hp, state, [["{}"]], backend=backend):
        pass
    return state


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_grace_edits(benchmark, lm, backend):
    reqs = load_dataset("counterfact", N_EDITS)
    benchmark.group = f"grace edits {MODEL} n={N_EDITS}"
    benchmark.pedantic(_edit, args=(lm, reqs, backend), rounds=2, warmup_rounds=0)
    benchmark.extra_info["edits_per_s"] = N_EDITS / benchmark.stats.stats.mean


def _corpus_keys(lm, name: str, k: int) -> torch.Tensor:
    """The module's inputs at the first ``k`` tokens of the statistics corpus."""
    seen = []
    h = lm.model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0][0].detach()))
    try:
        with torch.no_grad():
            for text in corpus_texts("wikitext", 64):
                ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
                lm.model(ids)
                if sum(len(s) for s in seen) >= k:
                    break
    finally:
        h.remove()
    return torch.cat(seen)[:k].float()


@pytest.mark.parametrize("keys", [0, 100, 1000])
def test_routed_evaluation(benchmark, lm, keys):
    m = get_method("grace")
    hp = resolve_hparams("grace", lm.spec, lm.model.config)
    name = m.module_name(lm, hp)
    if keys:
        K = _corpus_keys(lm, name, keys)
        d_out = lm.model.get_submodule(name).weight.shape[0]
        routing.install(lm.model, name, routing.Codebook(K, torch.rand(len(K), d_out), torch.ones(len(K))))
    benchmark.group = f"routed evaluation {MODEL} {TASKS} limit {LIMIT}"
    try:
        benchmark.pedantic(evaluate, args=(lm, TASKS, "standard", LIMIT), kwargs={"progress": False},
                           rounds=2, warmup_rounds=1)
    finally:
        routing.uninstall(lm.model)
