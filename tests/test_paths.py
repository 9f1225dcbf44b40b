"""Fast paths against the reference paths they replace (same results, by test)."""

import pytest
import torch

from editfast.data.corpus import corpus_texts
from editfast.data.requests import load_dataset
from editfast.methods.locate_then_edit.locate import LayerwiseReader, word_activations
from editfast.methods.locate_then_edit.solve import Moment, residual, solve_reference
from editfast.methods.locate_then_edit.stats import (
    accumulate_second_moments,
    token_batches,
)
from editfast.methods.locate_then_edit.targets import (
    KV_TOKEN_SHARE,
    _Batch,
    optimize_targets,
    plan_chunks,
)
from editfast.methods.locate_then_edit.templates import context_templates
from editfast.methods.registry import METHODS, resolve_hparams
from editfast.models.load import load_model


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-neox"])
def tiny64(request):
    """Tiny models in float64: the batched and per-request paths must then agree to ~1e-10
    (in fp32 the tiny random models' optimisation amplifies rounding noise, see golden README)."""
    lm = load_model(f"random:{request.param}")
    lm.model.double()
    return lm


@pytest.mark.parametrize("method", ["memit", "rome"])
def test_batched_targets_equal_per_request(tiny64, method):
    lm = tiny64
    hp = resolve_hparams(method, lm.spec, lm.model.config, {"v_num_grad_steps": 8})
    m = METHODS[method]
    flat = [t for g in m.templates(lm, hp, mode="fixed") for t in g]
    reqs = load_dataset("counterfact", 5)
    site, layer = m.z_site(lm, hp)
    ll = hp.loss_layer(lm.adapter.num_layers(lm.model))
    ref = optimize_targets(lm, reqs, hp, flat, site, layer, ll, backend="reference")
    fast = optimize_targets(lm, reqs, hp, flat, site, layer, ll, backend="fast")
    lean = optimize_targets(lm, reqs, hp, flat, site, layer, ll, backend="reference-lean")
    for a, b, c in zip(fast, ref, lean):
        assert len(a.losses) == len(b.losses) == len(c.losses)
        assert torch.allclose(a.target_init, b.target_init, rtol=1e-10, atol=1e-12)
        assert ((a.target - b.target).norm() / b.target.norm()).item() < 1e-8
        assert ((c.target - b.target).norm() / b.target.norm()).item() < 1e-8
    # memory-aware chunking gives the same z as one batch
    chunked = optimize_targets(lm, reqs, hp, flat, site, layer, ll, backend="fast", max_tokens=60)
    for a, b in zip(chunked, fast):
        assert ((a.target - b.target).norm() / b.target.norm()).item() < 1e-8


def test_early_stop_per_request(monkeypatch):
    """A request whose loss falls under the threshold stops alone; the others go on (both paths
    agree). Tiny random models never reach the original 0.05, so the threshold is set between
    the requests' losses of a first run."""
    import editfast.methods.locate_then_edit.targets as targets

    lm = load_model("random:tiny-llama")
    lm.model.double()
    hp = resolve_hparams("memit", lm.spec, lm.model.config, {"v_num_grad_steps": 12, "v_weight_decay": 0.0,
                                                            "kl_factor": 0.0, "clamp_norm_factor": 1e6, "v_lr": 2.0})
    flat = [t for g in context_templates(lm, "groups", hp, mode="fixed") for t in g]
    reqs = load_dataset("counterfact", 4)
    site = lm.adapter.layer_tmp.format(2)
    first = optimize_targets(lm, reqs, hp, flat, site, 2, 3, backend="reference")
    at_step = sorted(r.losses[5]["loss"] for r in first)
    monkeypatch.setattr(targets, "EARLY_STOP_LOSS", (at_step[1] + at_step[2]) / 2)
    ref = optimize_targets(lm, reqs, hp, flat, site, 2, 3, backend="reference")
    fast = optimize_targets(lm, reqs, hp, flat, site, 2, 3, backend="fast")
    assert [len(a.losses) for a in fast] == [len(b.losses) for b in ref]
    assert len({len(a.losses) for a in fast}) > 1, "the test needs requests that stop at different steps"
    for a, b in zip(fast, ref):
        assert ((a.target - b.target).norm() / b.target.norm()).item() < 1e-8


def test_plan_chunks_respects_budget():
    lm = load_model("random:tiny-llama")
    bs = [_Batch(lm, r, ["{}", "A. {}"]) for r in load_dataset("counterfact", 7)]
    chunks = plan_chunks(bs, 40)
    assert sorted(i for c in chunks for i in c) == list(range(7)) and len(chunks) > 1
    for c in chunks:
        if len(c) > 1:
            rows, width = sum(bs[i].ids.shape[0] for i in c), max(bs[i].prefix_width for i in c)
            assert sum(bs[i].suffix_tokens for i in c) + rows * width / KV_TOKEN_SHARE <= 40
    for b in bs:  # suffixes: from the subject's last token to the end; the KL row is one token
        lens, look = b.mask.sum(1).tolist(), b.lookup.tolist()
        assert b.suffix_tokens == sum(n - k for n, k in zip(lens, look)) - (lens[-1] - look[-1]) + 1


def test_layerwise_reader_equals_fresh_forwards(tiny64):
    """MEMIT's fast key reads (each pass starts at the layer edited last, texts cut after the
    subject) equal full forwards on the model as edited so far."""
    lm, ad = tiny64, tiny64.adapter
    reqs = load_dataset("counterfact", 3)
    templates = [t.replace("{}", r.prompt, 1) for r in reqs for t in ("{}", "Some context. {}", "{} Really.")]
    subjects = [r.subject for r in reqs for _ in range(3)]
    keys, outs = LayerwiseReader(lm, templates, subjects, batch_size=4), LayerwiseReader(lm, templates, subjects)
    top = ad.layer_tmp.format(ad.num_layers(lm.model) - 1)
    saved = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    try:
        for layer in (0, 1, 2):
            rewrite = ad.rewrite_tmp.format(layer)
            got_k = keys.read(layer, inputs=[rewrite])[("in", rewrite)]
            got_o = outs.read(layer, outputs=[top])[("out", top)]
            ref = word_activations(lm, templates, subjects, inputs=[rewrite], outputs=[top])
            assert torch.allclose(got_k, ref[("in", rewrite)], rtol=1e-10, atol=1e-12)
            assert torch.allclose(got_o, ref[("out", top)], rtol=1e-10, atol=1e-12)
            W = lm.model.get_submodule(ad.rewrite_tmp.format(layer)).weight  # edit this layer
            W.data += 0.1 * torch.randn(W.shape, generator=g, dtype=W.dtype)
        with pytest.raises(ValueError, match="layers must go up"):
            keys.read(1, inputs=[ad.rewrite_tmp.format(1)])
    finally:
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                p.copy_(saved[n])


def spd(d, n, cond=1e3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    C = (Q * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)) @ Q.T
    return C.float(), torch.randn(d, n, generator=g) * 0.3


@pytest.mark.parametrize("d,n,lam", [(100, 1, 20000.0), (256, 7, 1000.0), (333, 40, 5.0)])
def test_fast_solve_equals_float64(d, n, lam):
    C, K = spd(d, n)
    m = Moment(C)
    fast = m.adj_keys(K, lam, "fast")
    ref = solve_reference(C, K, lam)
    assert fast.dtype == torch.float32 and m.reports[-1]["solve"] == "cholesky-woodbury fp32"
    assert ((fast.double() - ref).norm() / ref.norm()).item() < 1e-4
    # the factorisation of λC is reused by later batches
    m.adj_keys(K[:, :1], lam, "fast")
    assert len(m._cache) == 1


def test_ill_conditioned_falls_back_and_reports():
    C, K = spd(64, 3, cond=1e12)
    C[0, 0] = -1.0  # not positive definite: fp32 Cholesky fails
    m = Moment(C)
    with pytest.warns(RuntimeWarning, match="float64"):
        adj = m.adj_keys(K, 1.0, "fast")
    assert adj.dtype == torch.float64 and m.reports[-1]["solve"] == "float64 fallback"
    assert residual(C, K, 1.0, adj) < 1e-8


def test_one_pass_statistics_equal_per_layer_reference():
    lm = load_model("random:tiny-gpt2")
    texts = corpus_texts("wikitext", 40)
    batches = list(token_batches(lm.tokenizer, texts, 48, batch_tokens=512))
    fast = accumulate_second_moments(lm, [0, 2, 3], batches)
    ref = accumulate_second_moments(lm, [0, 2, 3], batches, backend="reference")
    for l in (0, 2, 3):
        assert fast[l].count == ref[l].count == sum(int(m.sum()) for _, m in batches)
        err = ((fast[l].moment() - ref[l].moment()).norm() / ref[l].moment().norm()).item()
        assert err <= 1e-5
    lm.model.double()  # and a float64 recomputation from scratch
    try:
        dbl = accumulate_second_moments(lm, [3], batches, dtype=torch.float64)
    finally:
        lm.model.float()
    assert ((fast[3].moment().double() - dbl[3].moment()).norm() / dbl[3].moment().norm()).item() < 1e-5


def test_statistics_cache_and_resume(tmp_path, monkeypatch):
    """An interrupted statistics run resumes from its checkpoint and gives the same C."""
    import editfast.methods.locate_then_edit.stats as stats

    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path))
    lm = load_model("random:tiny-llama")
    hp = resolve_hparams("memit", lm.spec, lm.model.config, {"mom2_n_samples": 400, "mom2_max_tokens": 32})
    full = stats.second_moments(lm, [1, 2], hp, progress=False, use_cache=False)

    calls = {"n": 0}
    real = stats._one_pass

    def interrupted(*a, **kw):
        ck = kw["checkpoint"]

        def ck_then_stop(state):
            ck(state)
            calls["n"] += 1
            raise KeyboardInterrupt

        return real(*a, **{**kw, "checkpoint": ck_then_stop})

    monkeypatch.setattr(stats, "_one_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stats.second_moments(lm, [1, 2], hp, progress=False, checkpoint_every=2)
    partials = list(tmp_path.rglob("partial-*"))
    assert calls["n"] == 1 and len(partials) == 1
    assert not list(tmp_path.rglob("layer*.safetensors"))  # nothing final written
    monkeypatch.setattr(stats, "_one_pass", real)
    resumed = stats.second_moments(lm, [1, 2], hp, progress=False, checkpoint_every=2)
    assert not list(tmp_path.rglob("partial-*"))
    for l in (1, 2):
        assert torch.allclose(resumed[l], full[l], rtol=1e-6, atol=1e-9)
    cached = stats.second_moments(lm, [1, 2], hp, progress=False)  # from the cache
    assert all(torch.equal(cached[l], resumed[l]) for l in (1, 2))


def test_plan_groups():
    from editfast.methods.locate_then_edit.targets import plan_groups

    lengths = [1, 1, 1, 6, 6, 6, 6, 3, 3]
    # free calls: one group per length; expensive calls: one padded group
    assert sorted(map(sorted, plan_groups(lengths, 0))) == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    assert plan_groups(lengths, 10_000) == [list(range(9))]
    groups = plan_groups(lengths, 5)
    assert sorted(i for g in groups for i in g) == list(range(9))
