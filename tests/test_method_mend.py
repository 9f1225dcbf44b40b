"""MEND: the gradient decomposition and the editor network in float64, train-mend's files, edits
through the session (journaled low-rank updates, undo), refusals, and efficacy on SmolLM2."""

import json
from pathlib import Path

import pytest
import torch
from helpers import KNOWN, assert_refused, run_cli

import editfast
from editfast.core.errors import EditfastError
from editfast.data.requests import Request, load_dataset
from editfast.methods.mend.net import (
    GradientTransform,
    MENDNet,
    capture,
    edit_pairs,
    encode,
    load_net,
    mlp_sites,
)
from editfast.methods.registry import make_hparams
from editfast.models.load import load_model
from editfast.models.update import LowRank, weight_param
from editfast.session.session import EditSession

REQS = [Request(prompt="{} is located in the continent of", subject="Angola", target_new="Antarctica",
                target_true="Africa", paraphrase_prompts=("Angola lies in",), neighborhood_prompts=("Kenya is in",),
                neighborhood_target="Africa", case_id="a"),
        Request(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                target_true="French", paraphrase_prompts=("Danielle Darrieux spoke",), case_id="b")]


# ------------------------------------------------------------------------------------- float64 equations


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_gradient_decomposition_is_autograds_weight_gradient(preset):
    """Σ_t δ_t u_tᵀ over every token of the batch equals ∂L/∂W for each edited weight (float64),
    in the logical [out, in] layout (GPT-2's Conv1D stores Wᵀ)."""
    lm = load_model(f"random:{preset}", seed=1)
    lm.model.double()
    sites = mlp_sites(lm, [1, 2, 3])
    assert len(sites) == (6 if preset == "tiny-gpt2" else 9)
    batch = encode(lm.tokenizer, edit_pairs(REQS), lm.device)
    grads, loss, _ = capture(lm, sites, batch)
    params = [weight_param(lm.model, s.weight) for s in sites]
    for p, _ in params:
        p.requires_grad_(True)
    try:
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.labels != -100
        logp = logits.log_softmax(-1).gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
        ref_loss = -(logp * mask).sum() / mask.sum()  # the mean NLL of the target tokens, written out
        ref = torch.autograd.grad(ref_loss, [p for p, _ in params])
    finally:
        for p, _ in params:
            p.requires_grad_(False)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for s, (p, transposed), g in zip(sites, params, ref):
        u, d = grads[s.weight]
        assert u.dtype == torch.float64 and u.shape[:2] == batch.input_ids.shape
        outer = torch.einsum("bto,bti->oi", d, u)  # Σ_t δ_t u_tᵀ
        want = g.T if transposed else g
        assert torch.allclose(outer, want, rtol=1e-9, atol=1e-13), s.weight
    # the last layer sees only the positions that predict target tokens
    u3, d3 = grads[sites[-1].weight]
    assert int(((d3 != 0).any(-1)).sum()) == int((batch.labels != -100).sum())


def update_counter(x, m, s, k):  # the original's Welford step (algs/mend.py)
    new_m = m + (x - m) / k
    return new_m, s + (x - m) * (x - new_m)


def test_running_normalisation_is_the_originals_token_loop():
    cfg = dict(n_hidden=1, rank=4, init="id", norm=True, combine=True, x_only=False, delta_only=False,
               one_sided=False, shared=True, mlp_class="IDMLP", act="relu")
    torch.manual_seed(0)
    gt = GradientTransform(5, 3, cfg, n_modes=2).double().train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 1,
                torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.01) for n in (4, 1, 7)]
    # a token with u = 0 and one with δ = 0 are skipped (padding, positions after the target)
    u0, d0 = batches[2]
    u0[2] = 0
    d0[5] = 0
    mean_u = mean_d = s_u = s_d = None
    k = 0
    for u, d in batches:
        gt(u, d, 0)
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        for uu, dd in zip(u[keep], d[keep]):  # the original: one token at a time
            k += 1
            if k == 1:
                mean_u, mean_d, s_u, s_d = uu.clone(), dd.clone(), torch.zeros(5, dtype=torch.float64), \
                    torch.zeros(3, dtype=torch.float64)
            else:
                mean_u, s_u = update_counter(uu, mean_u, s_u, k)
                mean_d, s_d = update_counter(dd, mean_d, s_d, k)
    assert k == 10 and gt.k.item() == 10
    for got, want in ((gt.u_mean, mean_u), (gt.v_mean, mean_d), (gt.u_s, s_u), (gt.v_s, s_d),
                      (gt.u_std, (s_u / (k - 1)) ** 0.5), (gt.v_std, (s_d / (k - 1)) ** 0.5)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    kept = torch.cat([torch.cat([u, d], 1)[(u != 0).any(-1) & (d != 0).any(-1)] for u, d in batches])
    assert torch.allclose(gt.u_std, kept[:, :5].std(0), rtol=1e-12)  # the sample standard deviation
    # eval mode leaves the statistics alone
    before = gt.u_mean.clone()
    gt.eval()
    gt(*batches[0], 1)
    assert torch.equal(gt.u_mean, before)


def test_network_update_formula_written_out():
    """ΔW = edit_lr · Σ_t δ̃_t ũ_tᵀ with [ũ, δ̃] = IDMLP([(u-μu)/(σu+1e-7), (δ-μδ)/(σδ+1e-7)]) and
    each IDMLP layer x + relu(scale_m ⊙ (x vᵀ uᵀ + b) + shift_m); one network per weight shape, the mode
    the weight's index among those of its shape."""
    lm = load_model("random:tiny-llama")
    sites = mlp_sites(lm, [2, 3])
    hp = make_hparams("mend", dict(layers=[2, 3], rank=6, n_hidden=1))
    torch.manual_seed(0)
    net = MENDNet(sites, hp.to_dict(), hp.edit_lr).double()
    assert sorted(net.transforms) == ["256x64", "64x256"]  # gate & up (in 64, out 256) share one network
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, t in net.named_parameters():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * (0.3 if name.endswith(".u") else 1))
        for gt in net.transforms.values():
            for b in ("u_mean", "v_mean"):
                getattr(gt, b).copy_(torch.randn(getattr(gt, b).shape, generator=g, dtype=torch.float64))
            for b in ("u_std", "v_std"):
                getattr(gt, b).copy_(torch.rand(getattr(gt, b).shape, generator=g, dtype=torch.float64) + 0.5)
            gt.k.fill_(100)
    net.eval()
    grads = {s.weight: (torch.randn(2, 7, s.x_dim, generator=g, dtype=torch.float64),
                        torch.randn(2, 7, s.delta_dim, generator=g, dtype=torch.float64)) for s in sites}
    grads[sites[0].weight][1][1, 3:] = 0  # tokens with δ = 0 are dropped
    fac = net.factors(grads)
    modes = {}
    for i, s in enumerate(sites):
        key = f"{s.x_dim}x{s.delta_dim}"
        mode = modes.setdefault(key, []).__len__()
        modes[key].append(s.weight)
        gt = net.transforms[key]
        u, d = (x.reshape(-1, x.shape[-1]) for x in grads[s.weight])
        keep = (u != 0).any(-1) & (d != 0).any(-1)
        u, d = u[keep], d[keep]
        x = torch.cat([(u - gt.u_mean) / (gt.u_std + 1e-7), (d - gt.v_mean) / (gt.v_std + 1e-7)], 1)
        for layer in gt.mlp.layers:
            pre = x @ layer.v.T @ layer.u.T + layer.bias
            x = x + torch.clamp(pre * layer.mode_scale[mode] + layer.mode_shift[mode], min=0)
        ut, dt = x[:, : s.x_dim], x[:, s.x_dim:]
        want = net.edit_lrs[i] * torch.einsum("to,ti->oi", dt, ut)
        U, V = fac[s.weight]
        assert U.shape == (s.delta_dim, int(keep.sum())) and V.shape == (s.x_dim, int(keep.sum()))
        assert torch.allclose(U @ V.T, want, rtol=1e-10, atol=1e-12), s.weight
    assert modes == {"64x256": [sites[0].weight, sites[1].weight, sites[3].weight, sites[4].weight],
                     "256x64": [sites[2].weight, sites[5].weight]}


def test_identity_init_gives_the_normalised_gradient():
    """An untrained network is the identity on the normalised factors (the original's quirk: the
    edit is Σ norm(δ) norm(u)ᵀ, added with the positive initial edit_lr)."""
    lm = load_model("random:tiny-llama")
    sites = mlp_sites(lm, [3])
    hp = make_hparams("mend", dict(layers=[3], rank=5))
    net = MENDNet(sites, hp.to_dict(), hp.edit_lr).double().train()
    u = torch.randn(6, 64, dtype=torch.float64)
    d = torch.randn(6, 256, dtype=torch.float64)
    ut, dt = net.transform(sites[0], u, d)  # training mode: the statistics are these 6 tokens'
    assert torch.allclose(ut, (u - u.mean(0)) / (u.std(0) + 1e-7))
    assert torch.allclose(dt, (d - d.mean(0)) / (d.std(0) + 1e-7))
    assert torch.allclose(net.edit_lrs, torch.full((3,), 1e-4, dtype=torch.float64))


# ------------------------------------------------------------------------------------- train-mend, edits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A network trained by the CLI on random:tiny-llama (a few steps: the mechanics)."""
    out = tmp_path_factory.mktemp("mend") / "net"
    from editfast.cli import main

    main(["train-mend", "--model", "random:tiny-llama", "--steps", "6", "--heldout", "3", "--out", str(out), "--quiet"])
    return out


def test_train_mend_writes_the_network_and_its_description(trained):
    from safetensors import safe_open

    assert sorted(p.name for p in trained.iterdir()) == ["mend.json", "mend.safetensors"]
    doc = json.loads((trained / "mend.json").read_text())
    lm = load_model("random:tiny-llama")
    assert doc["model_fingerprint"] == lm.fingerprint and doc["layers"] == [1, 2, 3] and doc["steps"] == 6
    assert doc["data"]["name"] == "counterfact-train" and doc["data"]["heldout"] == 3
    assert doc["heldout"]["n"] == 3 and 0 <= doc["heldout"]["post"]["efficacy_success"] <= 1
    assert doc["training"]["optimizer_steps"] == 2  # accumulate_bs 2 (tiny): steps at iterations 2 and 4
    with safe_open(str(trained / "mend.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "editfast-mend-1"
    assert "edit_lrs" in keys and "transforms.256x64.u_mean" in keys
    net, _ = load_net(lm, trained)
    assert net.ready() and not net.training


def test_train_mend_same_seed_same_network():
    lm = load_model("random:tiny-llama")
    hp = make_hparams("mend", editfast.methods.registry.get_method("mend").presets["tiny"])
    reqs = load_dataset("counterfact-train", 20)
    from editfast.methods.mend.train import train_mend

    nets = [train_mend(lm, reqs, hp, 5, seed=3, progress=False)[0].state_dict() for _ in range(2)]
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


@pytest.mark.parametrize("preset,loc", [("tiny-gpt2", "answer"), ("tiny-llama", "all")])
def test_training_from_the_first_edited_layer_equals_full_forwards(preset, loc, monkeypatch):
    """Training runs the layers below the first edited one once per step (they do not change):
    the same network, bit for bit, as full forward passes."""
    import editfast.methods.mend.net as mn
    from editfast.methods.mend.train import train_mend

    lm = load_model(f"random:{preset}")
    hp = make_hparams("mend", {**editfast.methods.registry.get_method("mend").presets["tiny"], "loc_kl_positions": loc})
    reqs = load_dataset("counterfact-train", 20)
    fast = train_mend(lm, reqs, hp, 3, seed=0, progress=False)[0].state_dict()
    full_init = mn.Above.__init__
    monkeypatch.setattr(mn.Above, "__init__", lambda self, lm, first: full_init(self, lm, 0))
    full = train_mend(lm, reqs, hp, 3, seed=0, progress=False)[0].state_dict()
    assert all(torch.equal(fast[k], full[k]) for k in fast)


def test_edit_through_the_session_journals_lowrank_updates_and_undoes(trained, tmp_path):
    lm = load_model("random:tiny-llama")
    names = [s.weight for s in mlp_sites(lm, [1, 2, 3])]
    base = {n: weight_param(lm.model, n)[0].detach().clone() for n in names}
    s = EditSession(lm, "mend", REQS, overrides={"mend_dir": str(trained)}, evaluate=False, progress=False,
                    out=tmp_path / "run")
    assert sorted(s.sites) == sorted(names)
    res = s.run()
    assert len(res.journal) == 2 and all(isinstance(u, LowRank) for ups in res.journal for u in ups)
    n_tok = [len(lm.tokenizer(r.filled(), add_special_tokens=False)["input_ids"])
             + len(lm.tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in REQS]
    assert all(u.rank <= n_tok[0] for u in res.journal[0])  # rank ≤ tokens
    assert not all(torch.equal(base[n], weight_param(lm.model, n)[0]) for n in names)
    after = {n: weight_param(lm.model, n)[0].detach().clone() for n in names}
    s.undo(1)  # the base with batch 1 replayed
    assert not all(torch.equal(after[n], weight_param(lm.model, n)[0]) for n in names)
    s.undo(0)
    assert all(torch.equal(base[n], weight_param(lm.model, n)[0]) for n in names)
    lm2 = load_model("random:tiny-llama")  # the same edits again: the same weights
    EditSession(lm2, "mend", REQS, overrides={"mend_dir": str(trained)}, evaluate=False, progress=False).run()
    assert all(torch.equal(after[n], weight_param(lm2.model, n)[0]) for n in names)


def test_edit_cli_with_mend_dir(trained, tmp_path, capsys):
    code, out, err = run_cli(["edit", "--method", "mend", "--mend", str(trained), "--model", "random:tiny-llama",
                              "--n", "2", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    assert "efficacy" in out and (tmp_path / "r" / "results.json").is_file()
    doc = json.loads((tmp_path / "r" / "session.json").read_text())
    assert doc["hparams"]["mend_dir"] == str(trained)


# ------------------------------------------------------------------------------------- refusals


def edit_argv(tmp_path, *extra, model="random:tiny-llama"):
    return ["edit", "--method", "mend", "--model", model, "--n", "1", "--no-eval", "--out", str(tmp_path / "r"),
            "--quiet", *extra]


def test_missing_or_empty_network_dir_is_refused(tmp_path, capsys):
    assert_refused(edit_argv(tmp_path, "--mend", str(tmp_path / "nope")), capsys, "not found", "train-mend",
                   absent=[tmp_path / "r"])
    (tmp_path / "empty").mkdir()
    assert_refused(edit_argv(tmp_path, "--set", f"mend_dir={tmp_path / 'empty'}"), capsys, "no trained MEND network",
                   absent=[tmp_path / "r"])
    assert_refused(edit_argv(tmp_path), capsys, "train-mend", "--mend", absent=[tmp_path / "r"])  # none shipped


def test_network_of_another_model_or_corrupt_is_refused_weights_untouched(trained, tmp_path, capsys):
    assert_refused(edit_argv(tmp_path, "--mend", str(trained), model="random:tiny-gpt2"), capsys,
                   "trained for another model", absent=[tmp_path / "r"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mend.json").write_text((trained / "mend.json").read_text())
    (bad / "mend.safetensors").write_bytes(b"\x00garbage" * 10)
    lm = load_model("random:tiny-llama")
    names = [s.weight for s in mlp_sites(lm, [1, 2, 3])]
    before = {n: weight_param(lm.model, n)[0].detach().clone() for n in names}
    with pytest.raises(EditfastError, match="corrupt MEND network file"):
        editfast.edit(lm, REQS, "mend", overrides={"mend_dir": str(bad)}, evaluate=False, progress=False)
    (bad / "mend.json").write_text("{not json")
    with pytest.raises(EditfastError, match="unreadable"):
        editfast.edit(lm, REQS, "mend", overrides={"mend_dir": str(bad)}, evaluate=False, progress=False)
    doc = json.loads((trained / "mend.json").read_text())
    doc["model_fingerprint"] = "0" * 64
    (bad / "mend.json").write_text(json.dumps(doc))
    with pytest.raises(EditfastError, match="trained for another model"):
        editfast.edit(lm, REQS, "mend", overrides={"mend_dir": str(bad)}, evaluate=False, progress=False)
    (bad / "mend.safetensors").write_bytes((trained / "mend.safetensors").read_bytes())
    doc = json.loads((trained / "mend.json").read_text())
    doc["sites"][0]["out"] += 1  # the same model's name, another shape
    (bad / "mend.json").write_text(json.dumps(doc))
    with pytest.raises(EditfastError, match="other weights or shapes"):
        editfast.edit(lm, REQS, "mend", overrides={"mend_dir": str(bad)}, evaluate=False, progress=False)
    doc = json.loads((trained / "mend.json").read_text())
    doc["arch"]["rank"] = 3  # the description does not fit the tensors
    (bad / "mend.json").write_text(json.dumps(doc))
    with pytest.raises(EditfastError, match="does not match its description"):
        editfast.edit(lm, REQS, "mend", overrides={"mend_dir": str(bad)}, evaluate=False, progress=False)
    doc["arch"]["rank"] = 8
    doc["model_fingerprint"] = "0" * 64
    (bad / "mend.json").write_text(json.dumps(doc))
    assert all(torch.equal(before[n], weight_param(lm.model, n)[0]) for n in names)
    assert_refused(edit_argv(tmp_path, "--mend", str(bad)), capsys, "trained for another model",
                   absent=[tmp_path / "r"])


def test_option_misuse_is_refused(trained, tmp_path, capsys):
    assert_refused(["edit", "--method", "memit", "--mend", str(trained), "--model", "random:tiny-llama",
                    "--out", str(tmp_path / "r")], capsys, "--mend", absent=[tmp_path / "r"])
    assert_refused(["train-mend", "--model", "random:tiny-llama", "--set", "mend_dir=x", "--out",
                    str(tmp_path / "t")], capsys, "mend_dir", absent=[tmp_path / "t"])
    assert_refused(["train-mend", "--model", "random:tiny-llama", "--steps", "0", "--out", str(tmp_path / "t")],
                   capsys, "--steps", absent=[tmp_path / "t"])
    assert_refused(["train-mend", "--model", "random:tiny-llama", "--data", "counterfact", "--heldout", "500",
                    "--out", str(tmp_path / "t")], capsys, "--heldout", absent=[tmp_path / "t"])
    assert_refused(["train-mend", "--model", "random:tiny-llama", "--set", "combine=true", "--set", "x_only=true",
                    "--out", str(tmp_path / "t")], capsys, "combine", absent=[tmp_path / "t"])


# ------------------------------------------------------------------------------------- SmolLM2


SHIPPED = Path(editfast.__file__).parent / "_data" / "mend" / "smollm2-135m"


def test_shipped_network_records_how_to_reproduce_it():
    doc = json.loads((SHIPPED / "mend.json").read_text())
    preset = editfast.methods.registry.get_method("mend").presets["smollm2-135m"]
    assert doc["model"] == "smollm2-135m" and doc["data"]["name"] == "counterfact-train" and doc["seed"] == 0
    assert {k: doc["hparams"][k] for k in preset} == preset  # train-mend --steps N --seed 0 with the preset
    assert (SHIPPED / "mend.safetensors").stat().st_size < 4e6
    held = set(doc["data"]["heldout_case_ids"])
    evals = {r.case_id for r in load_dataset("counterfact")}
    assert not held & evals
    assert len(load_dataset("counterfact-train")) - doc["data"]["heldout"] == doc["data"]["n_train"]


# Measured with the shipped network (README "MEND"). Each known fact alone: efficacy 6/10, P(new) 0.008 ->
# 0.46 on average (magnitude -0.21 -> +0.38), paraphrase magnitude -0.15 -> +0.16, neighbourhood 0.80 ->
# 0.55. The ten one after another, measured after the last: efficacy 4/10, P(new) 0.23, P(true) 0.22 ->
# 0.11, neighbourhood 0.80 -> 0.66.
@pytest.mark.slow
def test_mend_known_facts_with_the_shipped_network(pristine):
    """`editfast edit --method mend` on SmolLM2 takes the shipped network. The original's protocol,
    each fact edited alone from the unedited model and measured right after; then the session's,
    the ten one after another (batches of 1)."""
    lm = pristine
    data = load_dataset("counterfact")
    reqs = [data[i] for i in KNOWN]
    names = [s.weight for s in mlp_sites(lm, [27, 28, 29])]
    base = {n: weight_param(lm.model, n)[0].detach().clone() for n in names}
    pre, post = [], []
    for r in reqs:
        res = editfast.edit(lm, [r], method="mend", seed=0, progress=False)
        assert sorted(u.weight for u in res.journal[0]) == sorted(names)
        assert all(isinstance(u, LowRank) and u.rank <= 20 for u in res.journal[0])
        pre.append(res.per_request[0]["pre"])
        post.append(res.per_request[0]["post"])
        with torch.no_grad():
            for n in names:
                weight_param(lm.model, n)[0].copy_(base[n])
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    print({k: (mean(pre, k), mean(post, k)) for k in pre[0] if k != "case_id"})
    assert mean(post, "p_new") >= 10 * mean(pre, "p_new")
    assert mean(post, "efficacy_success") >= 0.4 and mean(post, "efficacy_magnitude") >= 0.2
    assert mean(post, "paraphrase_magnitude") >= mean(pre, "paraphrase_magnitude") + 0.2
    assert mean(post, "neighborhood_success") >= mean(pre, "neighborhood_success") - 0.35
    res = editfast.edit(lm, reqs, method="mend", seed=0, progress=False)
    s_pre, s_post = res.summary["pre"], res.summary["post"]
    print("sequential", s_pre, s_post)
    assert len(res.journal) == 10
    assert s_post["efficacy_success"] >= 0.3 and s_post["p_new"] >= 10 * s_pre["p_new"]
    assert s_post["p_true"] >= 0.1 * s_pre["p_true"]  # the model still works after ten edits
    assert s_post["neighborhood_success"] >= s_pre["neighborhood_success"] - 0.3
