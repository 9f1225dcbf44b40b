"""WISE: its equations in float64 (activation score, margin and target losses, TIES merge, routing
rule), one training step against a plain autograd computation, sharding and merging on a tiny
model, batched routing against rows alone, and bad hyper-parameters."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import KNOWN, assert_refused, run_cli

from editfast.data.requests import Request, load_dataset
from editfast.easyedit import BaseEditor, WISEHyperParams
from editfast.eval.edit_metrics import edit_metrics
from editfast.methods.base import State
from editfast.methods.registry import METHODS, make_hparams, resolve_hparams
from editfast.methods.wise import (
    WEIGHT_DECAY,
    draw_mask,
    encode_edit,
    margin_loss,
    merge,
    target_loss,
    train_side,
    weight_name,
)
from editfast.models import routing
from editfast.models.load import load_model
from editfast.models.routing import choose, row_score, token_distance
from editfast.session.journal import load_run
from editfast.session.session import EditSession, apply_entries

WISE = METHODS["wise"]
D = torch.float64
F64 = torch.nn.functional


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_activation_score_float64():
    """Δ = mean over a row's real tokens of ‖silu(y) − silu(y0)‖₂; at inference a row over 100 tokens
    takes its largest token distance."""
    y0, y = randn(3, 120, 4, seed=1), randn(3, 120, 4, seed=2)
    mask = torch.zeros(3, 120, dtype=torch.long)
    mask[0, :5], mask[1, :120], mask[2, :101] = 1, 1, 1
    d = token_distance(y0, y, F64.silu)
    for b in range(3):
        n = int(mask[b].sum())
        per = [((F64.silu(y[b, t]) - F64.silu(y0[b, t])) ** 2).sum().sqrt() for t in range(n)]
        assert torch.allclose(d[b, :n], torch.stack(per), rtol=1e-12, atol=0)
        mean = sum(per) / n
        assert torch.allclose(row_score(d, mask)[b], mean, rtol=1e-12, atol=0)
        assert torch.allclose(row_score(d, mask, infer=True)[b], max(per) if n > 100 else mean, rtol=1e-12, atol=0)


def mean_pos(x):
    x = x.flatten()
    pos = [v for v in x.tolist() if v > 0]
    return sum(pos) / len(pos) if pos else 0.0


@pytest.mark.parametrize("d_out", [0.5, 30.0])
def test_margin_loss_float64(d_out):
    """L_a = mean₊(Δ_out − Δ_in + γ) + mean₊(Δ_out − α) + mean₊(β − Δ_in): the mean of the positive
    entries of each hinge (the original's reduction), 0 where none is positive."""
    d_in = torch.tensor([1.0, 25.0, 18.0, 40.0], dtype=D)
    out = torch.tensor([d_out], dtype=D)
    alpha, beta, gamma = 5.0, 20.0, 10.0
    want = (mean_pos(out.view(-1, 1) - d_in + gamma) + mean_pos(out - alpha) + mean_pos(beta - d_in))
    assert margin_loss(d_in, out, alpha, beta, gamma).item() == pytest.approx(want, rel=1e-14)
    assert margin_loss(torch.tensor([50.0], dtype=D), torch.tensor([0.0], dtype=D), 5, 20, 10).item() == 0.0


def test_target_loss_float64():
    """Per row Σ CE over its target tokens / (target tokens + 1), the mean over rows."""
    logits = randn(5, 11, seed=3)
    labels = torch.tensor([1, 2, 3, 4, 5])
    row = torch.tensor([0, 0, 1, 1, 1])
    n = torch.tensor([2, 3])
    ce = [-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(5)]
    want = ((ce[0] + ce[1]) / 3 + (ce[2] + ce[3] + ce[4]) / 4) / 2
    assert torch.allclose(target_loss(logits, labels, row, n), want, rtol=1e-14, atol=0)


def ties_by_hand(weights, base, tensors, density):
    """TIES as the original's GTA('magnitude', 'sum', normalize=True), element by element."""
    deltas = []
    for t in tensors:
        d = (t - base).flatten()
        k = int(density * d.numel())
        keep = set(d.abs().argsort(descending=True)[:k].tolist())
        deltas.append([d[j].item() if j in keep else 0.0 for j in range(d.numel())])
    out = []
    for j in range(base.numel()):
        wd = [w * d[j] for w, d in zip(weights, deltas)]
        major = 1.0 if sum(wd) >= 0 else -1.0
        agree = [i for i, v in enumerate(wd) if v != 0 and (1.0 if v > 0 else -1.0) == major]
        div = sum(weights[i] for i in agree) or 1.0
        out.append(base.flatten()[j].item() + sum(wd[i] for i in agree) / div)
    return torch.tensor(out, dtype=D).view_as(base)


def test_ties_merge_float64():
    base = randn(4, 5, seed=4)
    tensors = [base + randn(4, 5, seed=s) for s in (5, 6, 7)]
    weights = [1.0 / 3] * 3
    got = merge("ties", weights, base, tensors, 0.53)
    assert torch.allclose(got, ties_by_hand(weights, base, tensors, 0.53), rtol=1e-13, atol=1e-15)
    # one memory, density 1: the merge is that memory; "linear" reads the first weight and tensor only
    assert torch.allclose(merge("ties", [1.0], base, tensors[:1], 1.0), tensors[0], rtol=1e-14, atol=1e-15)
    assert torch.allclose(merge("linear", [0.25, 0.75], base, tensors[:2], 1.0), 0.25 * tensors[0] + 0.75 * base)


def test_routing_rule():
    """WISE-Retrieve: W' if its Δ reaches its threshold, else W; a memory wins over the best so far
    when its Δ exceeds it and its own threshold. WISE-Merge: W if both are below the threshold, else
    the larger Δ (the merged weight on a tie is not taken)."""
    d_side = torch.tensor([1.0, 5.0, 5.0, 1.0, 1.0])
    d_mem = [torch.tensor([0.5, 6.0, 4.0, 3.0, 9.0]), torch.tensor([0.0, 7.0, 0.0, 2.5, 8.0])]
    assert choose(d_side, 2.0, d_mem, [2.0, 6.5]).tolist() == [0, 3, 1, 2, 2]
    d_merged = torch.tensor([1.0, 6.0, 4.0, 1.0, 3.0])
    assert choose(d_side, 2.0, [], [], d_merged=d_merged).tolist() == [0, -1, 1, 0, -1]


def test_masks_are_seeded_per_shard():
    a, b = draw_mask((30, 40), 0.2, 0, 0), draw_mask((30, 40), 0.2, 0, 1)
    assert torch.equal(a, draw_mask((30, 40), 0.2, 0, 0)) and not torch.equal(a, b)
    assert abs(a.double().mean().item() - 0.2) < 0.05


@pytest.fixture(scope="module")
def tiny64():
    lm = load_model("random:tiny-llama")
    lm.model.double()
    return lm


def full_loss(lm, hp, rows, w):
    """The loss of one iteration by plain autograd: the whole model, W' put in place of W."""
    name = weight_name(lm.adapter, hp)
    mod = lm.model.get_submodule(name.rsplit(".", 1)[0])
    got = {}

    def hook(m, args, out):
        got["y0"], got["y"] = out.detach(), F64.linear(args[0], w)
        return got["y"]

    h = mod.register_forward_hook(hook)
    try:
        b = rows.batch
        logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    finally:
        h.remove()
    n = rows.n_edit
    lab = b.labels[:n]
    loss_rows = []
    for i in range(n):
        pos = (lab[i] != -100).nonzero()[:, 0]
        ce = F64.cross_entropy(logits[i, pos], lab[i, pos], reduction="sum")
        loss_rows.append(ce / (len(pos) + 1))
    d = ((F64.silu(got["y"]) - F64.silu(got["y0"])) ** 2).sum(-1).sqrt()
    m = b.attention_mask.to(D)
    delta = (d * m).sum(1) / m.sum(1)
    a, be, g = hp.act_margin
    return torch.stack(loss_rows).mean() + margin_loss(delta[:n], delta[n:], a, be, g), delta.detach()


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_one_training_step_float64(tiny64, backend):
    """W'₁ = clamp(W'₀ − lr·(∇L ⊙ mask + 1e-5·W'₀), W ± c), ∇L by autograd through the whole model
    (the fast backend runs only the layers above the edited one, from recorded hidden states); the
    recorded activation is the template rows' mean Δ at W'₀ (read before the last step)."""
    lm = tiny64
    hp = make_hparams("wise", {**WISE.presets["tiny"], "n_iter": 1, "edit_lr": 0.5, "norm_constraint": 0.01})
    W = lm.model.get_parameter(weight_name(lm.adapter, hp)).detach().clone()
    side0 = W + 0.004 * randn(*W.shape, seed=8)
    mask = draw_mask(W.shape, hp.mask_ratio, 0, 0)
    r = Request(prompt="{} lives in", subject="Alice", target_new="Paris")
    rows = encode_edit(lm.tokenizer, r, ["{}", "Yes. {}"], "The weather is mild", hp.loc_tokens, "cpu")
    w = side0.clone().requires_grad_(True)
    loss, delta = full_loss(lm, hp, rows, w)
    (g,) = torch.autograd.grad(loss, w)
    want = torch.clamp(side0 - hp.edit_lr * (g * mask + WEIGHT_DECAY * side0), W - 0.01, W + 0.01)
    got, recorded, steps = train_side(lm, hp, rows, W, side0, mask, backend)
    assert steps == 1
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    assert recorded == pytest.approx(delta[: rows.n_edit].mean().item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------- sessions

REQS = [Request(prompt="{} lives in", subject=s, target_new=t, case_id=i)
        for i, (s, t) in enumerate([("Alice", "Paris"), ("Bob", "Rome"), ("Carol", "Oslo"), ("Dan", "Lima"),
                                    ("Eve", "Kyiv")])]
PROBE = ["Alice lives in Paris", "Eve lives in Kyiv", "The weather today is mild and", "Bob"]


@pytest.fixture
def routed_tiny(pristine_tiny):
    yield pristine_tiny
    routing.uninstall(pristine_tiny.model)


def probe_logits(lm):
    """Logits of a padded batch through the engine's routing (real tokens marked)."""
    enc = lm.tokenizer(PROBE, return_tensors="pt", padding=True)
    with torch.no_grad(), routing.tokens(lm.model, enc["attention_mask"]):
        return lm.model(**enc).logits


def used_state(s):
    """The state tensors in use (a merge leaves a stale memory.{i} behind, which counts for nothing)."""
    t = s.state.tensors
    n = int(t["memories"]) if "memories" in t else 0
    keys = ["side", "side_min", "count", "mask", "memories", *(f"memory.{i}{x}" for i in range(n) for x in ("", ".min"))]
    return {k: t[k].clone() for k in keys if k in t}


def assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_resume_and_undo_bit_identical(routed_tiny, tmp_path, monkeypatch):
    """Five edits on tiny-llama (shards of 2, a merge at 4): the routed model after undo(3) is that of
    a 3-edit run, undo(0) the base, and a run cut in its fourth edit and resumed that of the full
    run, bit for bit (state and logits); no weight changes."""
    lm = routed_tiny
    kw = dict(evaluate=False, progress=False, templates="fixed")
    base_w = {k: v.clone() for k, v in lm.model.state_dict().items()}
    base_logits = probe_logits(lm)
    three = EditSession(lm, "wise", REQS[:3], **kw)
    three.run()
    st3, lg3 = used_state(three), probe_logits(lm)
    routing.uninstall(lm.model)  # the base again: a run folder starts only on the model as loaded
    assert not lm.edited
    full = EditSession(lm, "wise", REQS, out=tmp_path / "run", **kw)
    full.run()
    st5, lg5 = used_state(full), probe_logits(lm)
    assert int(st5["memories"]) == 1 and int(st3["memories"]) == 1  # 3: one shard saved; 5: two merged into one
    assert not torch.equal(lg5, base_logits)  # some probe row is routed to a memory
    assert all(torch.equal(v, base_w[k]) for k, v in lm.model.state_dict().items())
    full.undo(3)
    assert_same(used_state(full), st3)
    assert torch.equal(probe_logits(lm), lg3)
    full.undo(0)
    assert torch.equal(probe_logits(lm), base_logits)

    calls, edit = [], WISE.edit

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("interrupted (simulated)")
        return edit(*a, **k)

    monkeypatch.setattr(WISE, "edit", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        EditSession(lm, "wise", REQS, out=tmp_path / "cut", **kw).run()
    monkeypatch.undo()
    routing.uninstall(lm.model)
    r = EditSession(lm, "wise", REQS, out=tmp_path / "cut", **kw)
    r.run(resume=True)
    assert_same(used_state(r), st5)
    assert torch.equal(probe_logits(lm), lg5)


def test_cli_saved_model_export_and_bad_hparams(tmp_path, capsys):
    """`editfast edit --method wise --save-model` on tiny-llama: the saved model, loaded by editfast,
    routes as the run's journal replayed onto the base (same logits, bit for bit); plain weights are
    the base's. `editfast export --lora` of the run and bad hyper-parameters: one line, exit 2,
    nothing written."""
    out = tmp_path / "run"
    code, _, err = run_cli(["edit", "--method", "wise", "--model", "random:tiny-llama", "--n", "3", "--templates",
                            "fixed", "--no-eval", "--quiet", "--save-model", "--out", str(out)], capsys)
    assert code == 0, err
    saved = load_model(out / "model")
    assert [type(m).__name__ for m in routing.routes(saved.model).values()] == ["SideMemory"]
    replayed = load_model("random:tiny-llama")
    config, entries = load_run(out, replayed)
    apply_entries(replayed, config, entries)
    probe = [f"{r.filled()} {r.target_new}" for r in load_dataset("counterfact", 3)] + ["The weather today is"]
    lg = {}
    for key, lm in (("saved", saved), ("replayed", replayed)):
        enc = lm.tokenizer(probe, return_tensors="pt", padding=True)
        with torch.no_grad(), routing.tokens(lm.model, enc["attention_mask"]):
            lg[key] = lm.model(**enc).logits
        with torch.no_grad(), routing.bypassed(lm.model):
            lg[key + "-base"] = lm.model(**enc).logits
    assert torch.equal(lg["saved"], lg["replayed"]) and torch.equal(lg["saved-base"], lg["replayed-base"])
    assert not torch.equal(lg["saved"], lg["saved-base"])  # the edited facts are routed to the memory
    assert_refused(["export", str(out), "--lora", str(tmp_path / "lora")], capsys, "wise", "lora",
                   absent=[tmp_path / "lora"])
    for setting, word in (("merge_freq=3", "multiple of save_freq"), ("replay=true", "replay"),
                          ("merge_alg=slerp", "merge_alg"), ("act_margin=[1,2]", "act_margin"),
                          ("mask_ratio=0", "mask_ratio"), ("layers=[1,2]", "one layer"), ("bogus=1", "bogus"),
                          ("loc_corpus=nowhere.txt", "loc_corpus"), ("module=mlp.nope", "mlp.nope")):
        bad = tmp_path / "bad"
        assert_refused(["edit", "--method", "wise", "--model", "random:tiny-llama", "--n", "2", "--templates",
                        "fixed", "--no-eval", "--quiet", "--set", setting, "--out", str(bad)], capsys, word,
                       absent=[bad])


EASYEDIT = sorted((Path(__file__).parent / "data" / "easyedit_wise").glob("*.yaml"))


@pytest.mark.filterwarnings("ignore:.*differs from the model edited")
@pytest.mark.parametrize("path", EASYEDIT, ids=[p.name for p in EASYEDIT])
def test_easyedit_files_load(path):
    """EasyEdit's hparams/WISE files (tests/data/easyedit_wise) load through the facade and for
    `editfast edit --hparams`: inner_params names the layer and module, every other key its field."""
    raw = yaml.safe_load(path.read_text())
    hp = WISEHyperParams.from_hparams(path).editfast_hparams()
    via_cli = resolve_hparams("wise", "smollm2-135m", None, None, path, options={})
    layer, module = re.fullmatch(r".+\[(\d+)\]\.(.+)\.weight", raw["inner_params"][0]).groups()
    for h in (hp, via_cli):
        assert h.layers == [int(layer)] and h.module == module
        for key in ("edit_lr", "n_iter", "mask_ratio", "act_margin", "act_ratio", "norm_constraint", "save_freq",
                    "merge_freq", "merge_alg", "densities", "weights", "retrieve", "replay", "objective_optimization"):
            assert getattr(h, key) == raw[key], key


def test_efficacy_on_smollm2(pristine):
    """One known CounterFact fact on SmolLM2 (the preset, 10 steps, the bare prompt as the only
    template): the edited prompt is routed to the side memory and says the new target; an unrelated
    text is routed to the base (same logits); no weight changes."""
    lm = pristine
    r = load_dataset("counterfact")[KNOWN[0]]
    hp = resolve_hparams("wise", "smollm2-135m", lm.model.config, {"n_iter": 10})
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    enc = lm.tokenizer(["The history of the Roman Empire spans many centuries"], return_tensors="pt")
    with torch.no_grad():
        unrelated = lm.model(**enc).logits
    pre = edit_metrics(lm, [r], "counterfact")[0]
    state = WISE.prepare(lm, hp)
    try:
        list(WISE.edit(lm, [r], hp, state, [["{}"]]))
        WISE.install(lm, hp, state)
        post = edit_metrics(lm, [r], "counterfact")[0]
        with torch.no_grad(), routing.tokens(lm.model, enc["attention_mask"]):
            assert torch.equal(lm.model(**enc).logits, unrelated)
    finally:
        routing.uninstall(lm.model)
    print("pre", pre, "\npost", post)
    assert not pre["efficacy_success"] and post["efficacy_success"]
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("retrieve", [True, False])
def test_shards_and_merges_float64(retrieve):
    """After every save_freq edits W' joins the memories (WISE-Retrieve: with its smallest activation,
    then none for the new shard); after every merge_freq the shards merge by TIES: Retrieve, the last
    merge_freq/save_freq memories into one whose min is theirs; Merge, all memories into the merged
    weight, weights/n each the first time, then 0.4/n each and 0.6 for the merged weight so far."""
    hp = make_hparams("wise", {**WISE.presets["tiny"], "retrieve": retrieve, "densities": 0.5})  # shards 2, merge 4
    base = randn(6, 5, seed=10)
    sides = [base + randn(6, 5, seed=20 + i) for i in range(4)]
    state = State()
    for i, (w, a) in enumerate(zip(sides, [3.0, 2.0, 5.0, 4.0])):  # what edit() does after training
        state.set("side", w)
        prev = float(state.tensors.get("side_min", torch.tensor(1e9)))
        state.set("side_min", torch.tensor(min(prev, a), dtype=D))
        if (i + 1) % hp.save_freq == 0:
            WISE._save_shard(state, hp, base)
        if (i + 1) % hp.merge_freq == 0:
            WISE._merge(state, hp, base, 1)
    t = state.tensors
    first = merge("ties", [0.5, 0.5], base, sides[1::2], 0.5)
    assert torch.equal(t["side"], base)
    if retrieve:
        assert int(t["memories"]) == 1 and float(t["memory.0.min"]) == 2.0 and float(t["side_min"]) == 1e9
        assert torch.allclose(t["memory.0"], first, rtol=1e-14, atol=0)
        return
    assert int(t["memories"]) == 0 and float(t["side_min"]) == 2.0  # WISE-Merge: the smallest of all edits
    assert torch.allclose(t["merged"], first, rtol=1e-14, atol=0)
    for w in sides[:2]:
        state.set("side", w)
        WISE._save_shard(state, hp, base)
    WISE._merge(state, hp, base, 2)
    want = merge("ties", [0.2, 0.2, 0.6], base, [sides[0], sides[1], first], 0.5)
    assert torch.allclose(t["merged"], want, rtol=1e-14, atol=0)


def test_easyedit_facade_runs_wise():
    """EasyEdit's BaseEditor with WISEHyperParams: sequential edits leave the memory routed on the
    model; an edit with sequential_edit=False is measured routed and then taken back (state and
    route as before it)."""
    hp = WISEHyperParams(alg_name="WISE", model_name="random:tiny-llama", n_iter=2, act_margin=[0.5, 2.0, 1.0],
                         inner_params=["model.layers[2].mlp.down_proj.weight"], retrieve=True, replay=False)
    ed = BaseEditor.from_hparams(hp)
    _, model, _ = ed.edit(prompts=["Alice lives in", "Bob works for"], target_new=["Paris", "Google"],
                          subject=["Alice", "Bob"], sequential_edit=True, verbose=False)
    memory = routing.routes(model)["model.layers.2.mlp.down_proj"]
    kept = {k: v.clone() for k, v in memory.tensors().items()}
    assert int(ed._state.tensors["count"]) == 2
    ed.edit(prompts=["Carol lives in"], target_new=["Oslo"], subject=["Carol"], sequential_edit=False, verbose=False)
    assert int(ed._state.tensors["count"]) == 2
    again = routing.routes(model)["model.layers.2.mlp.down_proj"].tensors()
    assert kept.keys() == again.keys() and all(torch.equal(kept[k], again[k]) for k in kept)
    routing.uninstall(model)
