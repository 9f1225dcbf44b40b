"""Weights identity: the fingerprint follows the weights, sessions and caches are keyed by the
weights they measured, and statistics are found in a hparams file's stats_dir and in the cache."""

import json

import pytest
import torch
from helpers import run_cli

import editfast
from editfast.core.errors import EditfastError
from editfast.data.requests import load_dataset
from editfast.eval.evaluator import Evaluator
from editfast.methods.locate_then_edit import stats
from editfast.methods.registry import make_hparams
from editfast.cli.shared import save_model_to
from editfast.models import routing
from editfast.models.load import load_model
from editfast.models.update import (
    Dense,
    LowRank,
    Sparse,
    apply_update,
    guard,
    restore,
    snapshot,
    update_digest,
)
from editfast.session.session import EditSession

DOWN = "model.layers.{}.mlp.down_proj.weight"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def rank_one(lm, layer, seed):
    W = lm.model.get_parameter(DOWN.format(layer))
    g = torch.Generator().manual_seed(seed)
    return LowRank(DOWN.format(layer), torch.randn(W.shape[0], 1, generator=g) * 1e-2,
                   torch.randn(W.shape[1], 1, generator=g))


def test_the_fingerprint_follows_the_weights(pristine_tiny):
    lm = pristine_tiny
    base = lm.weights_fingerprint
    assert base == lm.fingerprint and not lm.edited
    a, b = rank_one(lm, 1, 0), rank_one(lm, 2, 1)
    saved = snapshot(lm, [a, b])
    apply_update(lm, a)
    after_a = lm.weights_fingerprint
    assert lm.edited and after_a != base and lm.fingerprint == base  # the loaded file's identity stays
    apply_update(lm, b)
    ab = lm.weights_fingerprint
    restore(lm, saved)
    assert lm.weights_fingerprint == base and not lm.edited  # a snapshot puts the identity back with the weights
    apply_update(lm, b)
    apply_update(lm, a)
    assert lm.weights_fingerprint == ab  # updates of different weights commute
    restore(lm, saved)
    apply_update(lm, a)
    apply_update(lm, a, alpha=-1)  # rounds twice: not the base weights, not the base identity
    assert lm.weights_fingerprint not in (base, after_a)
    restore(lm, saved)
    with pytest.raises(EditfastError), guard(lm, [a.weight]):  # a failed block: weights and identity as before
        apply_update(lm, a)
        apply_update(lm, LowRank(a.weight, a.U * float("inf"), a.V))
    assert lm.weights_fingerprint == base
    restore(lm, {a.weight: saved[a.weight] + 1})  # tensors from elsewhere: a change of their own
    assert lm.edited
    lm.model.get_parameter(a.weight).data.copy_(saved[a.weight])  # written back outside editfast: its loaded
    assert not lm.edited and lm.weights_fingerprint == base       # content again, so unchanged
    apply_update(lm, a)
    state = lm.model.state_dict()
    state[a.weight] = saved[a.weight]
    lm.model.load_state_dict(state)  # the way tests and EasyEdit-style code put weights back
    assert not lm.edited
    lm.advance("model.layers.1.mlp#grace", "state-digest")  # a routed method installs a module
    assert lm.weights_fingerprint not in (base, after_a)
    restore(lm, saved)  # a snapshot of weights does not undo an installed module
    assert lm.edited
    del lm.changes["model.layers.1.mlp#grace"]  # the routed method removes its module: the chain it found
    assert lm.weights_fingerprint == base


def test_a_routed_memory_is_part_of_the_identity(pristine_tiny, tmp_path):
    """GRACE/WISE leave the weights as they were: whatever routes the model through a memory (a session,
    the facade, ``eval --edits``) changes its identity, with nobody calling ``advance``; a saved routed
    model loads as its own, unedited."""
    lm = pristine_tiny
    base = lm.weights_fingerprint
    name = "model.layers.1.mlp.down_proj"
    d_in, d_out = lm.model.get_submodule(name).in_features, lm.model.get_submodule(name).out_features
    g = torch.Generator().manual_seed(0)
    book = routing.Codebook(torch.randn(3, d_in, generator=g), torch.randn(3, d_out, generator=g), torch.ones(3))
    try:
        routing.install(lm.model, name, book)
        one = lm.weights_fingerprint
        assert lm.edited and one != base
        book.values[0] += 1  # the memory trained further: another model
        assert lm.weights_fingerprint not in (base, one)
        save_model_to(lm, tmp_path)
    finally:
        routing.uninstall(lm.model)
    assert lm.weights_fingerprint == base and not lm.edited
    again = load_model(str(tmp_path / "model"))
    assert routing.routes(again.model) and not again.edited  # as loaded: its fingerprint covers its memory
    assert again.weights_fingerprint == again.fingerprint != base


def test_update_digests_name_kind_weight_scale_and_content():
    U, V = torch.ones(4, 1), torch.ones(3, 1)
    d = {update_digest(LowRank("w", U, V)), update_digest(LowRank("w", U, V), alpha=-1),
         update_digest(LowRank("v", U, V)), update_digest(LowRank("w", U * 2, V)),
         update_digest(LowRank("w", U.double(), V.double())), update_digest(Dense("w", U @ V.T)),
         update_digest(Sparse("w", (4, 3), torch.tensor([0]), torch.tensor([1.0])))}
    assert len(d) == 7 and update_digest(LowRank("w", U.clone(), V.clone())) in d


def test_the_readme_stacking_sequence_is_honest(pristine_tiny, tmp_path, capsys, monkeypatch, cache):
    """editfast.edit(lm, ...) then EditSession(lm, ...) on the same model object (the README's
    Python example): a run folder is refused with one line; without one, the session's "pre" and
    its 0-edit point measure the edited weights, its evaluation is cached under their key, and the
    unedited model's results read from that cache equal a cold run's."""
    lm = pristine_tiny
    reqs = load_dataset("counterfact", 2)
    small = {"mom2_n_samples": 40, "mom2_max_tokens": 32}  # statistics of 40 texts: the test's size
    first = editfast.edit(lm, reqs, method="memit", templates="fixed", progress=False, overrides=small)
    assert lm.edited
    kw = {"templates": "fixed", "eval_tasks": "sst2", "eval_limit": 4, "eval_at": [0], "progress": True,
          "overrides": small}
    with pytest.raises(EditfastError, match="edited in this process since it was loaded.*load the model again"):
        EditSession(lm, "rome", reqs, out=tmp_path / "run", **kw)
    assert not (tmp_path / "run").exists()
    capsys.readouterr()
    second = EditSession(lm, "rome", reqs, **kw).run()
    err = capsys.readouterr().err
    assert "scoring before the edits" in err and "scoring after the edits" in err  # progress of the long steps
    assert "edited since it was loaded" in err and "statistics of layer" in err  # why statistics are computed
    assert [r["pre"] for r in second.per_request] == [r["post"] for r in first.per_request]  # the model as it is
    assert second.config["weights_fingerprint"] != second.config["model_fingerprint"] == lm.fingerprint
    with pytest.raises(EditfastError, match="not saved as a run folder"):
        second.save(tmp_path / "run")
    assert not second.curve["points"][0]["tasks"]["sst2"].get("cached")
    (written,) = (cache / "eval").glob("sst2-*.json")
    assert json.loads(written.read_text())["cache_key"][0] == second.config["weights_fingerprint"]  # its own key
    fresh = load_model("random:tiny-llama")
    warm = Evaluator(fresh, "sst2", "standard", 4, 0, progress=False).run(base=True)["sst2"]
    assert not warm.get("cached")  # nothing was written under the unedited model's key
    again = Evaluator(fresh, "sst2", "standard", 4, 0, progress=False).run(base=True)["sst2"]
    assert again.get("cached") and again["metrics"] == warm["metrics"]
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cold"))  # a cold cache for the same evaluation
    cold = Evaluator(fresh, "sst2", "standard", 4, 0, progress=False).run(base=True)["sst2"]
    assert not cold.get("cached") and cold["metrics"] == warm["metrics"]


def test_the_eval_cache_returns_only_what_was_written_under_its_key(pristine_tiny, cache):
    ev = Evaluator(pristine_tiny, "sst2", "standard", 2, 0, progress=False)
    first = ev.run(base=True)["sst2"]
    (f,) = (cache / "eval").glob("sst2-*.json")
    doc = json.loads(f.read_text())
    assert doc["cache_key"] == ev.cache_key("sst2", "standard", 2) and doc["cache_key"][0] == pristine_tiny.fingerprint
    assert ev.run(base=True)["sst2"].get("cached")
    for bad in ({**doc, "cache_key": ["0" * 64, *doc["cache_key"][1:]]},  # another model's results at this name
                {k: v for k, v in doc.items() if k != "cache_key"}):  # written before keys were kept
        f.write_text(json.dumps({**bad, "metrics": {"accuracy": -1.0}}))
        again = ev.run(base=True)["sst2"]
        assert not again.get("cached") and again["metrics"] == first["metrics"]
        assert json.loads(f.read_text())["cache_key"] == doc["cache_key"]  # rewritten under its key


class SecondPass(Exception):
    pass


def second_pass(*args, **kw):
    raise SecondPass("a second pass over the corpus")


def test_statistics_in_the_cache_serve_a_file_with_stats_dir(pristine_tiny, tmp_path, cache, capsys, monkeypatch):
    """Statistics editfast computed into its cache are found when a hparams file's stats_dir (EasyEdit's
    ./data/stats) is in effect: no second pass. A miss says why and where the result goes."""
    lm = pristine_tiny
    hp = make_hparams("memit", {"layers": [1, 2], "mom2_n_samples": 40, "mom2_max_tokens": 32})
    first = stats.second_moments(lm, [1, 2], hp, progress=True)
    err = capsys.readouterr().err
    assert f"statistics of layers 1, 2 (wikitext, 40 texts, <= 32 tokens each, float32) are not in {cache / 'stats'}" \
        in err and f"written to {cache / 'stats' / lm.fingerprint[:24]}" in err
    monkeypatch.setattr(stats, "_one_pass", second_pass)
    info: dict = {}
    with stats.stats_location(tmp_path / "data" / "stats"):
        again = stats.second_moments(lm, [1, 2], hp, progress=True, info=info)
    assert all(torch.equal(first[l], again[l]) and info[l]["cached"] for l in (1, 2))
    assert "statistics of" not in capsys.readouterr().err and not (tmp_path / "data").exists()
    apply_update(lm, rank_one(lm, 0, 0))  # statistics belong to the weights they measured: edited, a miss
    with pytest.raises(SecondPass):
        stats.second_moments(lm, [1], hp, progress=True)
    assert "edited since it was loaded" in capsys.readouterr().err


def test_edit_shows_progress_unless_quiet(tmp_path, capsys, cache):
    """`editfast edit` says why statistics are computed and where they go, and shows the scoring
    before and after the edits; with --quiet it prints nothing on stderr."""
    args = ["edit", "--method", "rome", "--n", "1", "--model", "random:tiny-llama", "--templates", "fixed",
            "--set", "mom2_n_samples=40", "--set", "mom2_max_tokens=32"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert f"are not in {cache / 'stats'}: computing them in one pass, to be written to {cache / 'stats'}" in err
    assert "scoring before the edits" in err and "scoring after the edits" in err and "rome edits" in err
    code, _, err = run_cli([*args, "--out", str(tmp_path / "b"), "--quiet"], capsys)
    assert code == 0 and err == ""
