"""FT-L and FT-M: the L∞ projection and both objectives in float64 against the originals' formulas,
one step of the loop against Adam's first step written out, resume and undo bit for bit, EasyEdit's
FT files, efficacy on SmolLM2, and bad inputs."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import KNOWN, assert_refused, run_cli
from helpers.golden import logp_first_token

import editfast
from editfast.core.errors import EditfastError, HParamsError
from editfast.data.requests import load_dataset
from editfast.methods.base import State
from editfast.methods.ft import clamp_to_ball, encode, request_nll
from editfast.methods.registry import (
    METHODS,
    make_hparams,
    resolve_hparams,
    split_options,
)
from editfast.models.update import Dense, restore, snapshot
from editfast.session.session import EditSession, edit_batch

D = torch.float64
FT_FILES = sorted((Path(__file__).parent / "data" / "easyedit_hparams" / "FT").glob("*.yaml"))


def test_clamp_is_the_linf_projection_float64():
    """clamp(W, W₀ − ε, W₀ + ε) = W₀ + sign(W − W₀)·min(|W − W₀|, ε): the nearest point of the L∞ ball."""
    g = torch.Generator().manual_seed(0)
    W0, W = torch.randn(7, 5, generator=g, dtype=D), torch.randn(7, 5, generator=g, dtype=D) * 0.01
    W = W0 + W
    eps = 0.004
    got = clamp_to_ball(W, W0, eps)
    d = W - W0
    want = W0 + torch.sign(d) * torch.minimum(d.abs(), torch.full_like(d, eps))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert (got - W0).abs().max() <= eps + 1e-15 and ((W - W0).abs() > eps).any()  # some were cut
    inside = (W - W0).abs() <= eps
    assert torch.equal(got[inside], W[inside])  # what is inside stays
    assert torch.equal(clamp_to_ball(got, W0, eps), got)  # a projection


def test_prompt_last_loss_is_roms_float64():
    """FT-L: −(1/T_i) Σⱼ log softmax(z_i)[t_ij] at the prompt's last logits z_i, averaged over requests;
    written as ROME's code: gather from right-padded target ids, masked, summed, divided, mean."""
    g = torch.Generator().manual_seed(1)
    V, targets = 11, [[3, 7, 7], [5]]
    last = torch.randn(2, V, generator=g, dtype=D)
    ids = torch.tensor([[3, 7, 7], [5, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=D)
    want = (-(torch.gather(F.log_softmax(last, -1), 1, ids) * mask).sum(1) / mask.sum(1)).mean()
    owner = torch.tensor([0, 0, 0, 1])
    got = request_nll(last[owner], torch.tensor([t for ts in targets for t in ts]), owner, 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_target_new_loss_is_easyedits_float64():
    """FT-M: EasyEdit's masked loss, written as its code on a left-padded batch (shifted logits,
    label mask from the prompt's and the padding's lengths), equals the mean of each request's mean
    NLL over its target tokens read at the positions before them in a right-padded batch."""
    g = torch.Generator().manual_seed(2)
    V = 13
    prompts, targets = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    L = max(len(p) + len(t) for p, t in zip(prompts, targets))
    table = torch.randn(V, V, generator=g, dtype=D)  # logits depend on the token only: any padding gives the same
    # EasyEdit: left padding, label_mask True after num_pad + num_prompt tokens
    rows = [[0] * (L - len(p) - len(t)) + p + t for p, t in zip(prompts, targets)]
    ids = torch.tensor(rows)
    logits = table[ids]
    prompt_len = [L - len(p) - len(t) + len(p) for p, t in zip(prompts, targets)]
    label_mask = torch.tensor([[False] * n + [True] * (L - n) for n in prompt_len])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(2, -1)
    want = ((loss * label_mask[:, 1:]).sum(1) / label_mask[:, 1:].sum(1)).mean()
    # editfast: right padding, target token j of request i scored at position len(prompt_i) − 1 + j
    owner = torch.tensor([i for i, t in enumerate(targets) for _ in t])
    pos = [len(p) - 1 + j for p, t in zip(prompts, targets) for j in range(len(t))]
    right = [p + t[:-1] for p, t in zip(prompts, targets)]
    at = torch.tensor([right[i][q] for i, q in zip(owner.tolist(), pos)])
    got = request_nll(table[at], torch.tensor([x for t in targets for x in t]), owner, 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_encode_scores_the_target_where_each_objective_says(tiny):
    tok = tiny.tokenizer
    r = next(r for r in load_dataset("counterfact", 20)
             if len(tok(" " + r.target_new, add_special_tokens=False)["input_ids"]) > 1)
    prompt = tok(r.filled())["input_ids"]
    target = tok(" " + r.target_new, add_special_tokens=False)["input_ids"]
    last = encode(tok, [r], "prompt_last")
    assert last.ids == [prompt] and last.pos == [len(prompt) - 1] * len(target) and last.label == target
    new = encode(tok, [r], "target_new")
    assert new.ids == [prompt + target[:-1]] and new.label == target
    assert new.pos == list(range(len(prompt) - 1, len(prompt) - 1 + len(target)))


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
def test_one_step_is_adams_first_step_then_the_clamp(pristine_tiny, method):
    """One pass, one mini-batch: ΔW = clamp(−lr · g / (|g| + 1e-8), ±ε), g the gradient of the
    original's loss computed from the full logits of a plain forward (Adam's first step: m̂ = g, v̂ = g²)."""
    lm = pristine_tiny
    reqs = load_dataset("counterfact", 2)
    eps = 5e-3
    hp = make_hparams(method, {"layers": [1], "num_steps": 1, "lr": 1e-2, "norm_constraint": eps, "batch_size": 2})
    (up,) = edit_batch(lm, METHODS[method], reqs, hp, State(), [["{}"]])
    assert isinstance(up, Dense) and up.weight == "model.layers.1.mlp.down_proj.weight"
    W = lm.model.get_submodule("model.layers.1.mlp.down_proj").weight
    W.data.sub_(up.delta)  # back to (about) the base: the gradient there
    tok = lm.tokenizer
    W.requires_grad_(True)
    loss = 0
    for r in reqs:
        p = tok(r.filled())["input_ids"]
        t = tok(" " + r.target_new, add_special_tokens=False)["input_ids"]
        if method == "ft-l":
            logp = lm.model(input_ids=torch.tensor([p])).logits[0, -1].double().log_softmax(-1)
            loss = loss - logp[t].mean() / 2
        else:
            logp = lm.model(input_ids=torch.tensor([p + t])).logits[0].double().log_softmax(-1)
            loss = loss - logp[torch.arange(len(p) - 1, len(p) + len(t) - 1), t].mean() / 2
    (g,) = torch.autograd.grad(loss, W)
    W.requires_grad_(False)
    want = (-1e-2 * g.double() / (g.double().abs() + 1e-8)).clamp(-eps, eps)
    torch.testing.assert_close(up.delta.double(), want, rtol=0, atol=2e-6)
    assert (up.delta.abs() > 0.999 * eps).float().mean() > 0.5  # most entries hit the clamp (lr > ε)


def test_edit_leaves_weights_and_gradient_flags(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny.model.parameters()]
    hp = resolve_hparams("ft-m", tiny.spec, tiny.model.config)
    ups = next(METHODS["ft-m"].edit(tiny, load_dataset("counterfact", 2), hp, State(), [["{}"]]))
    assert [u.weight for u in ups] == METHODS["ft-m"].sites(tiny, hp)
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny.model.parameters()] == flags and all(
        p.grad is None for p in tiny.model.parameters())
    with pytest.raises(EditfastError):
        edit_batch(tiny, METHODS["ft-m"], load_dataset("counterfact", 1), hp, State(), [["{}"]],
                   targets=torch.zeros(64, 1))
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
def test_resume_and_undo_are_bit_identical(tiny, tmp_path, monkeypatch, method):
    reqs = load_dataset("counterfact", 6)
    kw = dict(batch_size=2, evaluate=False, progress=False, overrides={"num_steps": 2})
    full = EditSession(tiny, method, reqs, **kw)
    base = full.base
    full.run()
    w3 = snapshot(tiny, full.sites)
    restore(tiny, base)
    first = EditSession(tiny, method, reqs[:2], **kw)
    first.run()
    w1 = snapshot(tiny, first.sites)
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)

    restore(tiny, base)
    s = EditSession(tiny, method, reqs, out=tmp_path / "run", **kw)
    s.run()
    assert all(torch.equal(v, w3[k]) for k, v in snapshot(tiny, s.sites).items())
    s.undo(2)
    assert all(torch.equal(v, w1[k]) for k, v in snapshot(tiny, s.sites).items())
    s.undo(0)
    assert all(torch.equal(v, base[k]) for k, v in snapshot(tiny, s.sites).items())

    calls, edit = [], METHODS[method].edit

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted (simulated)")
        return edit(*a, **k)

    monkeypatch.setattr(METHODS[method], "edit", flaky)
    restore(tiny, base)
    with pytest.raises(RuntimeError, match="simulated"):
        EditSession(tiny, method, reqs, out=tmp_path / "cut", **kw).run()
    monkeypatch.undo()
    restore(tiny, base)
    r = EditSession(tiny, method, reqs, out=tmp_path / "cut", **kw)
    r.run(resume=True)
    assert all(torch.equal(v, w3[k]) for k, v in snapshot(tiny, r.sites).items())
    restore(tiny, base)


def test_easyedit_ft_files_resolve_to_ft_l_and_ft_m(tmp_path):
    """EasyEdit's hparams/FT files (verbatim): alg_name FT with prompt_last is ft-l, with target_new
    ft-m; every method key the hyper-parameter of the same name; through the facade's FTHyperParams."""
    import editfast.easyedit as ee

    assert [p.name for p in FT_FILES] == ["gpt-j-6B.yaml", "gpt2-xl.yaml", "llama-7b.yaml", "llama3-8b.yaml"]
    for path in FT_FILES:
        text = path.read_text()
        for objective, method in (("prompt_last", "ft-l"), ("target_new", "ft-m")):
            f = tmp_path / f"{method}-{path.name}"
            f.write_text(text.replace('"prompt_last"', f'"{objective}"'))
            raw = yaml.safe_load(f.read_text())
            _, options, ignored = split_options(raw)
            assert options["method"] == method and ignored == ["max_length"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # max_length without effect
                hp = resolve_hparams(method, raw["model_name"], None, None, f, options={})
                facade = ee.FTHyperParams.from_hparams(f)
            assert facade.method == method and facade.editfast_hparams() == hp
            for key in ("layers", "num_steps", "weight_decay", "kl_factor", "objective_optimization",
                        "rewrite_module_tmp"):
                assert getattr(hp, key) == raw[key], (path, key)
            assert hp.lr == float(raw["lr"]) and hp.batch_size == raw["batch_size"]
            assert hp.norm_constraint == (float(raw["norm_constraint"]) if raw["norm_constraint"] else None)
    facade.objective_optimization = "prompt_last"  # EasyEdit's switch between the two
    assert facade.method == "ft-l"
    with pytest.raises(HParamsError, match="ft-m"):  # an FT-M file edited with --method ft-l
        resolve_hparams("ft-l", "x", None, None, tmp_path / "ft-m-gpt2-xl.yaml", options={})


def test_facade_edits_tiny_with_an_ft_m_file(tiny, tmp_path):
    import editfast.easyedit as ee

    text = (Path(__file__).parent / "data" / "easyedit_hparams" / "FT" / "llama-7b.yaml").read_text()
    text = (text.replace("./hugging_cache/llama-2-7b", "random:tiny-llama").replace("layers: [21]", "layers: [1]")
            .replace('"prompt_last"', '"target_new"').replace("lr: 5e-4", "lr: 1e-2"))
    (tmp_path / "ftm.yaml").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # device 0 without CUDA, max_length
        editor = ee.BaseEditor.from_hparams(ee.FTHyperParams.from_hparams(tmp_path / "ftm"))
    metrics, _, _ = editor.edit(prompts=["Ray Charles, the"], target_new=["violin"], subject=["Ray Charles"],
                                    ground_truth=["piano"], sequential_edit=True, verbose=False)
    assert editor.method.name == "ft-m" and len(metrics) == 1
    assert metrics[0]["post"]["rewrite_acc"] >= metrics[0]["pre"]["rewrite_acc"]


@pytest.mark.parametrize("values,words", [
    ({"lr": -1e-3}, ["lr"]), ({"lr": 0.0}, ["lr"]), ({"num_steps": 0}, ["num_steps"]),
    ({"norm_constraint": -1e-3}, ["norm_constraint"]), ({"norm_constraint": 0.0}, ["norm_constraint"]),
    ({"norm_constraint": float("nan")}, ["norm_constraint"]), ({"weight_decay": -1.0}, ["weight_decay"]),
    ({"batch_size": 0}, ["batch_size"]), ({"kl_factor": 0.5}, ["kl_factor", "never uses"]),
    ({"objective_optimization": "target_new"}, ["ft-m"]), ({"objective_optimization": "x"}, ["prompt_last"]),
])
def test_bad_hparams_refused(values, words):
    with pytest.raises(HParamsError) as e:
        make_hparams("ft-l", {"layers": [1], **values})
    assert all(w in str(e.value) for w in words)


@pytest.mark.parametrize("method,setting,word", [
    ("ft-l", "norm_constraint=-1", "norm_constraint"), ("ft-m", "layers=[9]", "layers"),
    ("ft-m", "objective_optimization=prompt_last", "ft-l"),
])
def test_cli_bad_set_exits_2(method, setting, word, tmp_path, capsys):
    out = tmp_path / "run"
    assert_refused(["edit", "--method", method, "--model", "random:tiny-llama", "--n", "2", "--no-eval", "--quiet",
                    "--set", setting, "--out", str(out)], capsys, word, absent=[out])


def test_cli_edits_with_ft_m(tmp_path, capsys):
    code, _, err = run_cli(["edit", "--method", "ft-m", "--model", "random:tiny-llama", "--n", "2", "--no-eval",
                              "--quiet", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "run" / "journal").iterdir())) >= 2


def test_ft_on_smollm2_known_facts(pristine):
    """Two of the test's known facts (one-token targets) in one batch (one mini-batch: one Adam step
    per pass), each method with its SmolLM2 preset from the unedited model: the new object overtakes
    the true one (CounterFact's efficacy) for both, from behind for both."""
    lm = pristine
    data = load_dataset("counterfact")
    reqs = [data[i] for i in KNOWN[:2]]

    def margins():
        return [logp_first_token(lm, r.filled(), r.target_new) - logp_first_token(lm, r.filled(), r.target_true)
                for r in reqs]

    sites = [s for m in ("ft-l", "ft-m") for s in METHODS[m].sites(lm, resolve_hparams(m, lm.spec, lm.model.config))]
    base, before = snapshot(lm, sites), margins()
    assert all(m < -3 for m in before), before
    for method in ("ft-m", "ft-l"):
        res = editfast.edit(lm, reqs, method=method, batch_size=2, evaluate=False, progress=False)
        after = margins()
        print(method, "log p(new) - log p(true):", before, "->", after, res.timings["edit_s"])
        assert all(m > 0 for m in after), (method, after)
        restore(lm, base)
