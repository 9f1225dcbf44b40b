"""KN (knowledge neurons): the attribution and the edit written out in float64, the batched
integration against a step-by-step Riemann sum, the session's journal, bad input, and what KN
really does to SmolLM2's ten known facts."""

import pytest
import torch
from helpers import KNOWN, assert_refused, run_cli

import editfast
from editfast.core.errors import HParamsError, RequestError
from editfast.data.requests import Request, load_dataset
from editfast.methods import kn
from editfast.methods.registry import METHODS, make_hparams, resolve_hparams
from editfast.models.load import load_model
from editfast.models.update import Sparse, apply_update, restore, weight_param
from editfast.session.journal import Journal
from editfast.session.session import EditSession, edit_batch

KN = METHODS["kn"]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def tiny64(request):
    """GPT-2 (Conv1D, LayerNorm in the model's dtype) and Llama (gated MLP; its RMSNorm computes in
    float32 even in a float64 model, so its sums agree to ~1e-7 relative, not 1e-12)."""
    lm = load_model(f"random:{request.param}")
    lm.model.double()
    return lm


def tol(lm):
    return 1e-10 if lm.adapter.family == "gpt2" else 2e-6


def close(a, b, lm):
    return ((a - b).abs().max() / b.abs().max()).item() < tol(lm)


def riemann_by_hand(lm, prompt_ids, layer, token, steps, site="mlp_in"):
    """The integral written out, one forward and one gradient per step: the site's activation a at
    the prompt's last position replaced by α_k·a (α_k = k / (steps − 1), the original's
    linspace(0, 1, steps)), g_k = ∂ softmax(logits_last)[token] / ∂(α_k·a), score = a · Σ_k g_k / steps."""
    model = lm.model
    name = (lm.adapter.mlp_in_tmp if site == "mlp_in" else lm.adapter.rewrite_tmp).format(layer)
    mod = model.get_submodule(name)
    ids = torch.tensor([prompt_ids])
    seen = {}
    if site == "mlp_in":
        h = mod.register_forward_hook(lambda m, a, out: seen.setdefault("a", out[0, -1].detach().clone()))
    else:
        h = mod.register_forward_pre_hook(lambda m, a: seen.setdefault("a", a[0][0, -1].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    a = seen["a"]
    total = torch.zeros_like(a)
    for k in range(steps):
        alpha = k / (steps - 1) if steps > 1 else 0.0
        x = (alpha * a).clone().requires_grad_(True)

        def put(t):
            t = t.clone()
            t[0, -1] = x
            return t

        if site == "mlp_in":
            h = mod.register_forward_hook(lambda m, args, out: put(out))
        else:
            h = mod.register_forward_pre_hook(lambda m, args: (put(args[0]),))
        with torch.enable_grad():
            p = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[token]
            (g,) = torch.autograd.grad(p, x)
        h.remove()
        total += g
    return a * total / steps


def test_alpha_grid_is_the_originals_linspace():
    assert kn.alphas(1).tolist() == [0.0]  # llama-2-7b's preset (steps=1): the gradient at the baseline only
    assert kn.alphas(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("site", ["mlp_in", "down_in"])
def test_batched_integral_equals_the_stepwise_riemann_sum(tiny64, site):
    lm = tiny64
    hp = resolve_hparams("kn", lm.spec, lm.model.config, {"steps": 6, "batch_size": 3, "activation": site,
                                                          "retokenize": False})
    prompt, answer = "The capital of Norway is", "Rome"  # one answer token
    ids = kn.encode_prompt(lm.tokenizer, prompt)
    (token,) = lm.tokenizer.encode(answer)
    by_hand = torch.stack([riemann_by_hand(lm, ids, l, token, hp.steps, site) for l in hp.layers])
    fast = kn.attribution_scores(lm, prompt, answer, hp, "fast")
    ref = kn.attribution_scores(lm, prompt, answer, hp, "reference")
    assert fast.dtype == torch.float64 and fast.shape == (4, 256)
    assert close(fast, by_hand, lm) and close(ref, by_hand, lm)
    # all layers in one pass, one layer a pass, and passes that skip the layers below them agree
    for per in (4, 1, 3):
        hp.layers_per_pass = per
        assert close(kn.attribution_scores(lm, prompt, answer, hp, "fast"), by_hand, lm)
    assert kn.coarse_neurons(fast, 0.2) == kn.coarse_neurons(by_hand, 0.2)


def test_multi_token_answers_as_the_original(tiny64):
    """retokenize=False (GPT-2/GPT-J branch): every answer token scored at the prompt's last
    position, the integrals averaged. retokenize=True (Llama branch): token i scored after the
    prompt with the clean model's greedy tokens 0..i-1 appended as text and re-tokenised."""
    lm = tiny64
    tok = lm.tokenizer
    prompt, answer = "The capital of Norway is", "Oslo"
    t = tok.encode(answer)
    assert len(t) == 2
    hp = resolve_hparams("kn", lm.spec, lm.model.config, {"steps": 4, "batch_size": 2, "retokenize": False})
    ids = kn.encode_prompt(tok, prompt)
    same_pos = torch.stack([(riemann_by_hand(lm, ids, l, t[0], 4) + riemann_by_hand(lm, ids, l, t[1], 4)) / 2
                            for l in hp.layers])
    assert close(kn.attribution_scores(lm, prompt, answer, hp, "fast"), same_pos, lm)
    assert close(kn.attribution_scores(lm, prompt, answer, hp, "reference"), same_pos, lm)
    hp.retokenize = True
    with torch.no_grad():
        g = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    ids1 = kn.encode_prompt(tok, prompt + tok.decode([g]))
    moved = torch.stack([(riemann_by_hand(lm, ids, l, t[0], 4) + riemann_by_hand(lm, ids1, l, t[1], 4)) / 2
                         for l in hp.layers])
    assert close(kn.attribution_scores(lm, prompt, answer, hp, "fast"), moved, lm)
    assert close(kn.attribution_scores(lm, prompt, answer, hp, "reference"), moved, lm)


def test_selection_and_refine():
    s = torch.tensor([[0.1, 0.5, -1.0], [1.0, 0.2, 0.21]])
    assert kn.coarse_neurons(s, 0.2) == [(0, 1), (1, 0), (1, 2)]  # strictly above 0.2 · max
    assert kn.coarse_neurons(s, 1.0) == []
    per = [[(0, 1), (1, 0)], [(1, 0)], [(1, 0), (2, 2)]]
    assert kn.refined_neurons(per, 0.4, refine=False) == [(0, 1), (1, 0), (2, 2)]
    assert kn.refined_neurons(per, 0.4, refine=True) == [(1, 0)]  # count > 3 · 0.4
    assert kn.refined_neurons(per, 0.0, refine=True) == [(0, 1), (1, 0), (2, 2)]


@pytest.mark.parametrize("target", ["Rome", "Oslo"])
def test_edit_formula_written_out(tiny64, target):
    """Each selected neuron's column of the down projection (GPT-2: the Conv1D's row) gains
    Σ_j E[t_j] − Σ_i E[g_i] (one-token target: − 2·E[g_0]); nothing else changes."""
    lm = tiny64
    tok = lm.tokenizer
    r = Request(prompt="The capital of {} is", subject="Norway", target_new=target, target_true="Paris", case_id=0)
    hp = resolve_hparams("kn", lm.spec, lm.model.config)
    names = [f"{lm.adapter.rewrite_tmp.format(l)}.weight" for l in hp.layers]
    before = {n: weight_param(lm.model, n)[0].detach().clone() for n in names}
    scores = kn.attribution_scores(lm, r.filled(), r.target_true, hp)
    neurons = kn.coarse_neurons(scores, hp.adaptive_threshold)
    t = tok.encode(target)
    greedy, text = [], r.filled()
    with torch.no_grad():
        for _ in t:
            g = int(lm.model(input_ids=torch.tensor([kn.encode_prompt(tok, text)])).logits[0, -1].argmax())
            greedy.append(g)
            text += tok.decode([g])
    E = lm.model.get_submodule(lm.adapter.embed).weight.detach()
    delta = E[t].sum(0) - (2 * E[greedy[0]] if len(t) == 1 else E[greedy].sum(0))
    trace = {}
    try:
        ups = edit_batch(lm, KN, [r], hp, KN.prepare(lm, hp), KN.templates(lm, hp), trace=trace)
        assert trace["neurons"] == [[(hp.layers[row], i) for row, i in neurons]] and neurons
        assert all(isinstance(u, Sparse) for u in ups)
        assert {u.weight for u in ups} == {names[row] for row, _ in neurons}
        for row, n in enumerate(names):
            W0, W1 = before[n], weight_param(lm.model, n)[0].detach()
            if lm.adapter.weight_in_out:  # Conv1D [in, out]: the neuron's output weights are a row
                W0, W1 = W0.T, W1.T
            cols = [i for rr, i in neurons if rr == row]
            expect = W0.clone()
            expect[:, cols] += delta.float().double()[:, None]  # the update's values are fp32
            assert torch.allclose(W1, expect, rtol=0, atol=1e-6), n  # apply_update adds in fp32
    finally:
        with torch.no_grad():
            for n, w in before.items():
                weight_param(lm.model, n)[0].copy_(w)


def test_session_journals_and_undoes_kn():
    lm = load_model("random:tiny-gpt2")
    reqs = load_dataset("counterfact", 3)
    s = EditSession(lm, "kn", reqs, evaluate=False, progress=False)
    base = {k: v.clone() for k, v in s.base.items()}
    assert list(s.base) == [f"transformer.h.{l}.mlp.c_proj.weight" for l in range(4)]  # sites(): every layer
    res = s.run()
    assert len(res.journal) == 3 and all(isinstance(u, Sparse) for ups in res.journal for u in ups)
    after = {n: weight_param(lm.model, n)[0].detach().clone() for n in base}
    assert any(not torch.equal(after[n], base[n]) for n in base)
    s.undo(2)  # base, then the journal's first two batches
    two = {n: weight_param(lm.model, n)[0].detach().clone() for n in base}
    restore(lm, base)
    for ups in res.journal[:2]:
        for u in ups:
            apply_update(lm, u)
    assert all(torch.equal(weight_param(lm.model, n)[0], two[n]) for n in base)
    s.undo(0)
    assert all(torch.equal(weight_param(lm.model, n)[0], base[n]) for n in base)


def test_presets_are_easyedits():
    p = KN.presets
    assert p["gpt2-xl"]["layers"] == list(range(48)) and p["gpt-j-6b"]["layers"] == list(range(28))
    assert (p["gpt2-xl"]["steps"], p["gpt2-xl"]["batch_size"], p["gpt2-xl"]["adaptive_threshold"]) == (20, 20, 0.2)
    assert (p["gpt-j-6b"]["steps"], p["gpt-j-6b"]["adaptive_threshold"]) == (20, 0.1)
    assert (p["llama-2-7b"]["steps"], p["llama-2-7b"]["batch_size"], p["llama-2-7b"]["retokenize"]) == (1, 1, True)
    for values in p.values():
        hp = make_hparams("kn", values)
        assert hp.lr_scale == 1.0 and hp.p == 0.4 and not hp.refine and hp.target_prefix == ""


@pytest.mark.parametrize("values,word", [
    ({"adaptive_threshold": 0}, "adaptive_threshold"), ({"adaptive_threshold": 1.5}, "adaptive_threshold"),
    ({"adaptive_threshold": -0.2}, "adaptive_threshold"), ({"p": 1.0}, "p="), ({"p": -0.1}, "p="),
    ({"steps": 20, "batch_size": 3}, "divide"), ({"steps": 0}, "steps"), ({"lr_scale": 0}, "lr_scale"),
    ({"target_prefix": "x"}, "target_prefix"), ({"activation": "gate"}, "activation"),
    ({"layers_per_pass": -1}, "layers_per_pass"), ({"refine": "yes"}, "refine"),
])
def test_bad_hparams(values, word):
    with pytest.raises(HParamsError, match=word):
        make_hparams("kn", {"layers": [0, 1], **values})


def test_cli_refuses_bad_threshold_and_requests(tmp_path, capsys):
    tiny = ["--model", "random:tiny-llama", "--quiet", "--method", "kn"]
    assert_refused(["edit", *tiny, "--set", "adaptive_threshold=2", "--out", str(tmp_path / "a")], capsys,
                   "adaptive_threshold", absent=[tmp_path / "a"])
    assert_refused(["edit", *tiny, "--set", "steps=20", "--set", "batch_size=3", "--out", str(tmp_path / "b")],
                   capsys, "batch_size", absent=[tmp_path / "b"])
    # zsRE requests have no current answer to attribute: refused at the first edit, nothing left behind
    assert_refused(["edit", *tiny, "--dataset", "zsre", "--n", "1", "--out", str(tmp_path / "c")], capsys,
                   "target_true", absent=[tmp_path / "c"])


def test_request_without_true_answer_refused_weights_untouched():
    lm = load_model("random:tiny-llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(RequestError, match="target_true"):
        editfast.edit(lm, load_dataset("zsre", 1), "kn", evaluate=False, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_cli_edit_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["edit", "--method", "kn", "--n", "2", "--model", "random:tiny-gpt2", "--quiet",
                                 "--out", str(out)], capsys)
    assert code == 0, err
    assert "efficacy" in stdout
    entries = Journal(out).read()
    assert [(e.start, e.end) for e in entries] == [(0, 1), (1, 2)]
    assert all(isinstance(u, Sparse) for e in entries for u in e.updates)


# --------------------------------------------------------------------------- SmolLM2, real facts

@pytest.mark.slow
def test_kn_on_ten_known_facts(smol):
    """What KN (the SmolLM2 preset, EasyEdit's numerics) really does to facts the model knows,
    edited one after another: it finds neurons of the true answer and suppresses it (p_true falls
    ~180x), but it does not write the new one (p_new falls too); efficacy rises from 0 to 0.1
    only. Measured (2-core CPU): efficacy 0.0 -> 0.1, paraphrase 0.0 -> 0.15, neighbourhood
    0.80 -> 0.76, p_true 0.216 -> 0.0012, p_new 0.0081 -> 0.00012."""
    lm = smol
    saved = {k: v.clone() for k, v in lm.model.state_dict().items()}
    data = load_dataset("counterfact")
    reqs = [data[i] for i in KNOWN]
    try:
        res = editfast.edit(lm, reqs, method="kn", seed=0, progress=False)
    finally:
        after = {k: v.clone() for k, v in lm.model.state_dict().items()}
        lm.model.load_state_dict(saved)
    pre, post = res.summary["pre"], res.summary["post"]
    print("pre", pre, "\npost", post, "\ntimings", res.timings["edit_s"])
    for row in res.per_request:
        print(row["case_id"], row["target_true"], "->", row["target_new"], row["post"])
    assert pre["efficacy_success"] == 0.0
    assert post["p_true"] < 0.1 * pre["p_true"]  # the true answer's neurons found and suppressed
    assert post["efficacy_magnitude"] > pre["efficacy_magnitude"]
    assert post["efficacy_success"] >= 0.1 and post["paraphrase_success"] >= 0.1
    assert abs(post["neighborhood_success"] - pre["neighborhood_success"]) <= 0.1 + 1e-9
    assert len(res.journal) == 10 and all(ups and all(isinstance(u, Sparse) for u in ups) for ups in res.journal)
    changed = [k for k in saved if not torch.equal(saved[k], after[k])]
    assert changed and all(k.endswith("mlp.down_proj.weight") for k in changed)
