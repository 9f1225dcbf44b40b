"""The method seam: one registry, r-ROME's fixed key in float64, and no method names outside it."""

import re
from pathlib import Path

import pytest
import torch

from editfast.data.requests import load_dataset
from editfast.methods.locate_then_edit.base import LayerInputs, LocateState
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.registry import METHODS, get_method
from editfast.models.load import load_model
from editfast.models.update import weight_param

ROOT = Path(__file__).resolve().parents[1]


def test_registry_feeds_cli_and_hparams():
    from editfast.cli import cli

    from editfast.methods.registry import make_hparams

    assert {"rome", "memit", "r-rome"} <= set(METHODS)
    choices = next(p for p in cli.get_command(None, "edit").params if p.name == "method").type.choices
    assert list(choices) == list(METHODS)
    for name, m in METHODS.items():
        assert m.name == name and m.summary
        assert isinstance(make_hparams(name, m.presets["tiny"]), m.hparams_class)
    with pytest.raises(Exception, match="unknown method"):
        get_method("nope")


def test_no_method_names_outside_methods():
    """Only editfast/methods/ may branch on a method's name."""
    pattern = re.compile(r"""(==|!=|\bin)\s*\(?\s*["'](rome|memit|r-rome)["']|["'](rome|memit|r-rome)["']\s*(==|!=|\bin\b)""")
    offenders = []
    for f in (ROOT / "editfast").rglob("*.py"):
        if "methods" in f.relative_to(ROOT / "editfast").parts:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def inputs(d_in=12, d_out=8, T=6, seed=0):
    """One request's keys over T templates (the first is the bare prompt), a linear module W, a target."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    keys = torch.randn(1, T, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / d_in + torch.eye(d_in, dtype=torch.float64)
    outs = keys @ W.T
    target = torch.randn(d_out, 1, generator=g, dtype=torch.float64)
    x = LayerInputs(layer=0, index=0, keys_per_template=keys, keys=keys[0].mean(0)[:, None], outs_per_template=outs,
                    k_bare=keys[0, :1].T, w_k_bare=outs[0, :1].T, cur=outs[0, :1].T, targets=target)
    return W, C, x


class FakeLM:
    class adapter:
        rewrite_tmp = "mlp.{}"


@pytest.mark.parametrize("seed", [0, 1])
def test_r_rome_uses_the_averaged_key_in_both_vectors(seed):
    W, C, x = inputs(seed=seed)
    hp = METHODS["rome"].hparams_class(layers=[0])
    state = LocateState(moments={0: Moment(C)})
    rome = METHODS["rome"].solve(FakeLM, x, hp, state, "reference", {})
    rrome = METHODS["r-rome"].solve(FakeLM, x, hp, state, "reference", {})
    k_bar, k_bare, v_star = x.keys[:, 0], x.k_bare[:, 0], x.targets[:, 0]
    u_exact = torch.linalg.solve(C, k_bar)
    assert torch.allclose(rome.V[:, 0], u_exact / u_exact.norm(), rtol=1e-5)  # C⁻¹ in fp32, as the original
    u = rome.V[:, 0]
    # the two formulas, written out
    v_rome = (v_star - W @ k_bare) / (k_bare @ u)
    v_rrome = (v_star - W @ k_bar) / (k_bar @ u)
    assert torch.allclose(rome.U[:, 0], v_rome, rtol=1e-10) and torch.allclose(rrome.U[:, 0], v_rrome, rtol=1e-10)
    assert torch.equal(rome.V, rrome.V)  # the same left vector
    W_rome, W_rrome = W + rome.dense(), W + rrome.dense()
    # ROME writes v* for the bare prompt's key only; r-ROME for the averaged key it built u from
    assert torch.allclose(W_rome @ k_bare, v_star, atol=1e-9)
    assert torch.allclose(W_rrome @ k_bar, v_star, atol=1e-9)
    miss_rome = (W_rome @ k_bar - v_star).norm() / v_star.norm()
    diff = (rome.dense() - rrome.dense()).norm() / rome.dense().norm()
    print(f"seed {seed}: ROME misses v* at the averaged key by {miss_rome:.3f} (relative); "
          f"updates differ by {diff:.3f}")
    assert miss_rome > 1e-3 and diff > 1e-3
    # with one template the keys agree and so do the methods
    x1 = LayerInputs(0, 0, x.keys_per_template[:, :1], x.k_bare, x.outs_per_template[:, :1], x.k_bare, x.w_k_bare,
                     x.cur, x.targets)
    a = METHODS["rome"].solve(FakeLM, x1, hp, state, "reference", {})
    b = METHODS["r-rome"].solve(FakeLM, x1, hp, state, "reference", {})
    assert torch.allclose(a.dense(), b.dense(), rtol=1e-12)


def test_r_rome_edits_a_model():
    lm = load_model("random:tiny-llama")
    saved = {k: v.clone() for k, v in lm.model.state_dict().items()}
    try:
        from editfast import edit

        r = load_dataset("counterfact", 1)
        res = edit(lm, r, "r-rome", templates="fixed", progress=False)
        up = res.journal[0][0]
        assert up.rank == 1 and torch.isfinite(up.U).all()
        W = weight_param(lm.model, up.weight)[0]
        assert not torch.equal(W, saved[up.weight])
    finally:
        lm.model.load_state_dict(saved)
