"""PMET: its update formula in float64, the two-site target optimisation (batched against the
original's per-request loop), its NLL/KL schedule, efficacy on SmolLM2, and bad inputs."""

import dataclasses
import json
import math

import pytest
import torch
from helpers import KNOWN, assert_refused

import editfast
from editfast.core.errors import HParamsError
from editfast.data.requests import load_dataset
from editfast.methods.locate_then_edit.base import LayerInputs, LocateState
from editfast.methods.locate_then_edit.locate import word_activations
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.locate_then_edit.targets import Objective, optimize_targets
from editfast.methods.registry import METHODS, make_hparams, resolve_hparams
from editfast.models.load import load_model
from editfast.session.session import edit_batch

PMET = METHODS["pmet"]
D = torch.float64


class FakeLM:
    class adapter:
        rewrite_tmp = "mlp.{}"


def layer_inputs(index, n=3, d_in=12, d_out=8, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, T, d_in, generator=g, dtype=D)
    A = torch.randn(d_in, d_in, generator=g, dtype=D)
    C = A @ A.T / d_in + torch.eye(d_in, dtype=D)
    K = raw.mean(1).T  # [d_in, n]
    cur, z = torch.randn(d_out, n, generator=g, dtype=D), torch.randn(d_out, n, generator=g, dtype=D)
    x = LayerInputs(layer=index, index=index, keys_per_template=raw, keys=K, outs_per_template=raw[..., :d_out],
                    k_bare=raw[:, 0].T, w_k_bare=cur, cur=cur, targets=z)
    return x, C


@pytest.mark.parametrize("index", [0, 1, 2])
def test_update_formula_float64(index):
    """ΔW_i = (z − m) / √(n − i) · Kᵀ (K Kᵀ + λC)⁻¹, written out as the original computes it."""
    layers, lam = [0, 1, 2], 7.5
    x, C = layer_inputs(index)
    hp = PMET.hparams_class(layers=layers, mom2_update_weight=lam)
    state = LocateState(moments={index: Moment(C)})
    up = PMET.solve(FakeLM, x, hp, state, "reference", {})
    K, R = x.keys, x.targets - x.cur
    want = (R / math.sqrt(len(layers) - index)) @ K.T @ torch.inverse(K @ K.T + lam * C)
    got = up.dense()
    assert got.dtype == D and up.rank == 3 and up.weight == f"mlp.{index}.weight"
    assert ((got - want).norm() / want.norm()).item() < 1e-10
    # MEMIT's update from the same inputs differs by the residual's share only: 1/(n−i) vs 1/√(n−i)
    memit = METHODS["memit"].solve(FakeLM, x, METHODS["memit"].hparams_class(layers=layers, mom2_update_weight=lam),
                                   state, "reference", {}).dense()
    assert torch.allclose(got, memit * math.sqrt(len(layers) - index), rtol=1e-10, atol=1e-12)
    # the fast backend (fp32 factorise-once Woodbury) gives the same update
    fast = PMET.solve(FakeLM, x, hp, LocateState(moments={index: Moment(C.float())}), "fast", {}).dense().double()
    assert ((fast - want).norm() / want.norm()).item() < 1e-4


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-neox"])
def tiny64(request):
    lm = load_model(f"random:{request.param}")
    lm.model.double()
    return lm


def two_sites(lm, layer):
    return [lm.adapter.attn_tmp.format(layer), lm.adapter.mlp_tmp.format(layer)]


def test_two_site_targets_batched_equal_per_request(tiny64):
    """Attention and MLP outputs optimised together: both deltas move, the batched path equals the
    original's one-request-at-a-time loop (float64), with and without memory chunks, at a middle
    layer and at layer 0 (where nothing below is cached)."""
    lm = tiny64
    hp = resolve_hparams("pmet", lm.spec, lm.model.config, {"v_num_grad_steps": 6})
    flat = [t for g in PMET.templates(lm, hp, mode="fixed") for t in g]
    reqs = load_dataset("counterfact", 4)
    obj = PMET.objective(hp)
    for layer in (2, 0):
        sites = two_sites(lm, layer)
        ref = optimize_targets(lm, reqs, hp, flat, sites, layer, 3, backend="reference", objective=obj)
        fast = optimize_targets(lm, reqs, hp, flat, sites, layer, 3, backend="fast", objective=obj)
        lean = optimize_targets(lm, reqs, hp, flat, sites, layer, 3, backend="reference-lean", objective=obj)
        chunked = optimize_targets(lm, reqs, hp, flat, sites, layer, 3, backend="fast", objective=obj, max_tokens=60)
        for a, b, c, e in zip(fast, ref, lean, chunked):
            assert a.target.shape == (2, lm.adapter.d_model(lm.model))
            assert (b.delta.norm(dim=1) > 0).all(), "both deltas move"
            assert len(a.losses) == len(b.losses) == len(c.losses) == len(e.losses)
            assert torch.allclose(a.target_init, b.target_init, rtol=1e-10, atol=1e-12)
            for other in (a, c, e):
                assert ((other.target - b.target).norm() / b.target.norm()).item() < 1e-8
    # the sites' initial values: the blocks' outputs at the subject's last token of the bare prompt
    r, sites = reqs[0], two_sites(lm, 0)
    acts = word_activations(lm, [r.prompt], [r.subject], outputs=sites)
    for j, s in enumerate(sites):
        assert torch.allclose(fast[0].target_init[j], acts[("out", s)][0], rtol=1e-10, atol=1e-12)


def test_two_site_loss_falls():
    """With the decay and the clamp out of the way (tiny random models barely respond otherwise),
    the joint optimisation lowers the loss of every request."""
    lm = load_model("random:tiny-llama")
    lm.model.double()
    hp = resolve_hparams("pmet", lm.spec, lm.model.config, {"v_num_grad_steps": 10, "v_weight_decay": 0.0,
                                                           "clamp_norm_factor": 1e3, "v_lr": 2.0})
    flat = [t for g in PMET.templates(lm, hp, mode="fixed") for t in g]
    res = optimize_targets(lm, load_dataset("counterfact", 3), hp, flat, two_sites(lm, 2), 2, 3,
                           objective=PMET.objective(hp))
    for r in res:
        assert r.losses[-1]["loss"] < r.losses[0]["loss"] - 1e-3
        assert (r.delta.norm(dim=1) > 1).all()


def test_top_schedule_both_paths():
    """PMET's schedule: a request whose target is already every prompt's top prediction stops at
    once (δ = 0, KL = 0); with the KL stop disabled, each step after an all-top step weighs the NLL
    by 0.1. The batched path follows the per-request path step for step."""
    lm = load_model("random:tiny-llama")
    lm.model.double()
    hp = resolve_hparams("pmet", lm.spec, lm.model.config, {"v_num_grad_steps": 6})
    flat = [t for g in PMET.templates(lm, hp, mode="fixed") for t in g]
    data = {r.case_id: r for r in load_dataset("counterfact", 5)}
    # the random tiny Llama predicts " in" after every template of case 9012 (checked below)
    reqs = [data[20952], dataclasses.replace(data[9012], target_new="in"), data[3648]]
    sites = two_sites(lm, 2)
    obj = PMET.objective(hp)
    runs = [optimize_targets(lm, reqs, hp, flat, sites, 2, 3, backend=b, objective=obj) for b in ("reference", "fast")]
    for ref, fast in zip(*runs):
        assert len(ref.losses) == len(fast.losses)
        assert ((fast.target - ref.target).norm() / ref.target.norm()).item() < 1e-8
    top = runs[0][1]
    assert top.losses[0]["top"] and len(top.losses) == 1 and torch.equal(top.delta, torch.zeros_like(top.delta))
    assert len(runs[0][0].losses) == 6 and not runs[0][0].losses[0]["top"]
    never = Objective(nll_factor=2.0, top_nll_factor=0.2, top_kl_stop=-1.0)
    runs = [optimize_targets(lm, reqs[1:2], hp, flat, sites, 2, 3, backend=b, objective=never)[0]
            for b in ("reference", "fast")]
    for r in runs:
        assert len(r.losses) == 6
        for prev, cur in zip(r.losses, r.losses[1:]):
            assert cur["nll_factor"] == pytest.approx(0.2 if prev["top"] else 2.0)
        for rec in r.losses:
            assert rec["loss"] == pytest.approx(rec["nll_factor"] * rec["nll"] + rec["kl"] + rec["wd"], rel=1e-12)
        assert [x["top"] for x in r.losses] == [x["top"] for x in runs[0].losses]
    assert runs[0].losses[0]["top"] and runs[0].losses[1]["nll_factor"] == pytest.approx(0.2)


def test_edit_writes_mlp_weights_from_the_ffn_target():
    """The pipeline on a tiny model: only the MLP output projections of the edited layers change,
    rank = facts; z is the MLP output plus its δ, and the last layer's residual is z − m_L."""
    lm = load_model("random:tiny-llama")
    saved = {k: v.clone() for k, v in lm.model.state_dict().items()}
    try:
        trace: dict = {}
        hp = resolve_hparams("pmet", lm.spec, lm.model.config)
        state = PMET.prepare(lm, hp, progress=False)
        groups = PMET.templates(lm, hp, mode="fixed")
        ups = edit_batch(lm, PMET, load_dataset("counterfact", 3), hp, state, groups, trace=trace)
        assert [u.weight for u in ups] == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
        assert all(u.rank == 3 for u in ups)
        changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, saved[k])}
        assert changed == {u.weight for u in ups}
        assert torch.allclose(trace["zs"], trace["target_init"] + trace["z_delta"])
        assert (trace["attn_delta"].norm(dim=0) > 0).all() and (trace["z_delta"].norm(dim=0) > 0).all()
        assert torch.allclose(trace["resid.layer2"], trace["zs"] - trace["cur_zs.layer2"])  # √1 at the last layer
        assert torch.allclose(trace["resid.layer1"], (trace["zs"] - trace["cur_zs.layer1"]) / math.sqrt(2))
        assert trace["targets_s"] > 0
    finally:
        lm.model.load_state_dict(saved)


@pytest.mark.slow
def test_pmet_ten_known_facts(pristine):
    lm = pristine
    data = load_dataset("counterfact")
    reqs = [data[i] for i in KNOWN]
    res = editfast.edit(lm, reqs, method="pmet", seed=0, progress=False)
    pre, post = res.summary["pre"], res.summary["post"]
    print("pre", pre, "\npost", post, "\ntimings", res.timings)
    # measured (CPU, seed 0, SmolLM2 preset): efficacy 0.0 -> 0.8, paraphrase 0.0 -> 0.8, neighbourhood
    # 0.80 -> 0.71 (MEMIT's test asks efficacy >= 0.9; PMET's SmolLM2 clamp is not tuned yet, see README)
    assert post["efficacy_success"] >= 0.8
    assert post["paraphrase_success"] >= 0.5
    assert abs(post["neighborhood_success"] - pre["neighborhood_success"]) <= 0.1 + 1e-9
    assert len(res.journal) == 1 and all(u.rank == 10 for u in res.journal[0])
    assert [u.weight for u in res.journal[0]] == [f"model.layers.{l}.mlp.down_proj.weight" for l in (4, 5, 6, 7, 8)]


# --- bad inputs ------------------------------------------------------------------------------

# The original repository's GPT-J file (hparams/PMET/EleutherAI_gpt-j-6B.json): its keys and values.
ORIGINAL_GPTJ = {
    "layers": [3, 4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
    "v_num_grad_steps": 30, "v_lr": 2e-1, "v_loss_layer": 27, "v_weight_decay": 0.5, "kl_factor": 1,
    "rewrite_module_tmp": "transformer.h.{}.attn.out_proj", "rewrite_module_tmps": ["transformer.h.{}.mlp.fc_out"],
    "layer_module_tmp": "transformer.h.{}", "mlp_module_tmp": "transformer.h.{}.mlp.fc_out",
    "attn_module_tmp": "transformer.h.{}.attn.out_proj", "ln_f_module": "transformer.ln_f", "lm_head_module": "lm_head",
    "mom2_adjustment": True, "mom2_update_weight": 6000, "mom2_dataset": "wikipedia", "mom2_n_samples": 100000,
    "mom2_dtype": "float32", "nll_loss_factor": 1,
}


def test_original_file_and_presets():
    hp = make_hparams("pmet", dict(ORIGINAL_GPTJ))  # the file loads unchanged
    hp.check_modules(load_model("random:tiny-gptj").adapter)  # the projections' names are accepted
    preset = resolve_hparams("pmet", "random:gpt-j-6b", None)
    for k in ("layers", "clamp_norm_factor", "v_num_grad_steps", "v_lr", "v_loss_layer", "kl_factor",
              "mom2_update_weight", "nll_loss_factor"):
        assert getattr(preset, k) == getattr(hp, k), k
    llama = resolve_hparams("pmet", "random:llama-2-7b", None)
    assert llama.layers == [4, 5, 6, 7, 8] and llama.mom2_update_weight == 15000 and llama.clamp_norm_factor == 1
    with pytest.raises(HParamsError, match="--hparams"):  # neither source publishes GPT-2 XL values
        resolve_hparams("pmet", "random:gpt2-xl", None)


@pytest.mark.parametrize("values,word", [
    ({"layers": [5, 4]}, "increasing"),
    ({"layers": [1], "nll_loss_factor": 0}, "nll_loss_factor"),
    ({"layers": [1], "mom2_update_weight": float("nan")}, "mom2_update_weight"),
    ({"layers": [1], "rewrite_module_tmps": ["a.{}", "b.{}"]}, "rewrite_module_tmps"),
    ({"layers": [1], "layer_selection": "random"}, "layer_selection"),
])
def test_bad_hparams(values, word):
    with pytest.raises(HParamsError, match=word):
        make_hparams("pmet", values)


@pytest.mark.parametrize("key,value", [
    ("rewrite_module_tmps", ["model.layers.{}.self_attn.o_proj"]),  # the attention is never written
    ("attn_module_tmp", "model.layers.{}.self_attn.q_proj"),
    ("mlp_module_tmp", "model.layers.{}.mlp.up_proj"),
])
def test_module_names_refused_before_any_change(key, value):
    lm = load_model("random:tiny-llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    hp = make_hparams("pmet", {**PMET.presets["tiny"], key: value})
    with pytest.raises(HParamsError, match=key):
        editfast.edit(lm, load_dataset("counterfact", 2), "pmet", hparams=hp, templates="fixed", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("sets,word", [
    (["nll_loss_factor=-1"], "nll_loss_factor"),
    (["layers=[2, 1]"], "increasing"),
    (["rewrite_module_tmps=['model.layers.{}.self_attn.o_proj']"], "rewrite_module_tmps"),
])
def test_cli_refuses_bad_hparams(tmp_path, capsys, sets, word):
    out = tmp_path / "run"
    argv = ["edit", "--method", "pmet", "--n", "2", "--no-eval", "--out", str(out), "--model", "random:tiny-llama",
            "--templates", "fixed", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert_refused(argv, capsys, word, absent=[out])


def test_cli_edit_tiny(tmp_path, capsys):
    from helpers import run_cli

    out = tmp_path / "run"
    code, stdout, err = run_cli(["edit", "--method", "pmet", "--n", "2", "--out", str(out), "--model",
                                 "random:tiny-llama", "--templates", "fixed", "--quiet"], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["hparams"]["nll_loss_factor"] == 1.0 and res["hparams"]["layers"] == [1, 2]
