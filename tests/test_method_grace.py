"""GRACE (editfast/methods/grace.py): the codebook's equations in float64 against a reference written
out here, efficacy on SmolLM2 with the weights untouched, resume and undo bit-identical, a saved model
that reloads with its codebook, the LoRA export refused, bad hyper-parameters refused, EasyEdit's
GRACE file through the facade."""

import shutil
import warnings

import pytest
import torch
from helpers import assert_refused, run_cli

from editfast.data.requests import load_dataset
from editfast.methods.grace import SPLIT_MARGIN, codebook_step
from editfast.models import routing
from editfast.models.load import load_model
from editfast.session.journal import Journal
from editfast.session.session import EditSession

TINY = ["--model", "random:tiny-llama", "--templates", "fixed", "--quiet"]
CODEBOOK = ("codebook.keys", "codebook.values", "codebook.eps", "codebook.labels")


# ------------------------------------------------------------------------------- the equations


def _ref_step(keys, eps, labels, q, label, init, expand):
    """The originals' iteration-0 branch, written out with Python lists of float64 vectors."""
    keys, eps, labels = [k.clone() for k in keys], list(eps), list(labels)
    if keys:
        d = [float(((k - q) ** 2).sum().sqrt()) for k in keys]
        j = min(range(len(d)), key=d.__getitem__)
        if d[j] > init + eps[j]:
            keys, eps, labels = keys + [q], eps + [init], labels + [label]
        elif labels[j] != label:
            keys, eps, labels = keys + [q], eps + [init], labels + [label]
            eps[j], eps[-1] = d[j] / 2 - 1e-5, d[j] / 2
        elif d[j] > eps[j]:
            if expand == "moving_average":
                keys[j] = 0.5 * keys[j] + 0.5 * q
            eps[j] = d[j]
    else:
        keys, eps, labels = [q], [init], [label]
    d = [float(((k - q) ** 2).sum().sqrt()) for k in keys]
    c = min(range(len(d)), key=d.__getitem__)
    return keys, eps, labels, c


@pytest.mark.parametrize("expand", ["coverage", "moving_average"])
def test_codebook_step_float64(expand):
    """Every branch: first key, a far query (new key), a conflicting label near a key (split radii),
    the same label outside the ball (expansion), the same label inside (nothing changes)."""
    g = torch.Generator().manual_seed(0)
    d = 6
    base = torch.randn(d, generator=g, dtype=torch.float64)
    unit = torch.randn(d, generator=g, dtype=torch.float64)
    unit /= unit.norm()
    stream = [(base, 7), (base + 10 * unit, 8), (base + 0.6 * unit, 9), (base - 1.2 * unit, 7),
              (base - 0.2 * unit, 7), (base + 10.3 * unit, 8)]
    keys = torch.zeros(0, d, dtype=torch.float64)
    eps = torch.zeros(0, dtype=torch.float64)
    labels = torch.zeros(0, dtype=torch.long)
    rk, re_, rl = [], [], []
    for q, lab in stream:
        s = codebook_step(keys, eps, labels, q, lab, 1.0, expand)
        rk, re_, rl, rc = _ref_step(rk, re_, rl, q, lab, 1.0, expand)
        keys, eps, labels = s.keys, s.eps, s.labels
        assert torch.allclose(keys, torch.stack(rk), atol=1e-12) and eps.tolist() == pytest.approx(re_, abs=1e-12)
        assert labels.tolist() == rl and s.chosen == rc and s.hit
    # the conflict split the first ball (0.3 - margin | 0.3), the same label 1.2 away grew it again
    assert len(keys) == 3 and float(eps[0]) == pytest.approx(1.2) and float(eps[2]) == pytest.approx(0.3)
    moved = base - 0.6 * unit if expand == "moving_average" else base
    assert torch.allclose(keys[0], moved, atol=1e-12)
    s = codebook_step(keys[:1], torch.tensor([5.0], dtype=torch.float64), labels[:1], keys[0] + 0.5 * unit, 9, 1.0)
    assert s.eps.tolist() == pytest.approx([0.25 - SPLIT_MARGIN, 0.25]) and s.chosen == 1 and s.new


# ------------------------------------------------------------------------------- on a real model


def test_grace_efficacy_on_smollm2_weights_untouched(pristine):
    """Three known facts in one batch: each rewritten, the unrelated neighbourhood prompts as they
    were, and no weight changed (zero drift reported, the codebook's size)."""
    lm = pristine
    reqs = load_dataset("counterfact", 3)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    s = EditSession(lm, "grace", reqs, batch_size=3, templates="fixed", progress=False)  # the preset: 10 steps
    try:
        res = s.run()
        pre, post = res.summary["pre"], res.summary["post"]
        assert post["efficacy_success"] == 1.0 > pre["efficacy_success"]
        assert post["neighborhood_success"] == pre["neighborhood_success"]
        assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
        assert s.weight_changes()["total"]["l1"] == 0 and s.method.memory_size(s.state)["keys"] == 3
    finally:
        routing.uninstall(lm.model)


# ------------------------------------------------------------------------------- sessions


def _codebook(s):
    return {k: s.state.tensors[k].clone() for k in CODEBOOK}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_and_undo_are_bit_identical(tiny, tmp_path):
    reqs = load_dataset("counterfact", 4)
    kw = {"batch_size": 1, "templates": "fixed", "evaluate": False, "progress": False}
    full = EditSession(tiny, "grace", reqs, out=tmp_path / "a", **{**kw, "evaluate": True}, eval_at=[0, 4])
    pts = full.run().curve["points"]  # the curve: zero drift of the routed module, the codebook's size
    assert [p["memory"]["keys"] for p in pts] == [0, len(full.state.tensors["codebook.keys"])]
    assert pts[-1]["memory"]["keys"] >= 1 and all(p["weights"]["total"]["l1"] == 0 for p in pts)
    after4, logits4 = _codebook(full), _logits(tiny)
    # undo to 2 edits = a run of the first two requests alone (codebook, routed logits)
    full.undo(2)
    two = EditSession(tiny, "grace", reqs[:2], **kw)
    routing.uninstall(tiny.model)
    two.run()
    assert _same(_codebook(full), _codebook(two))
    # resume from the journal's first two batches reaches the same codebook as the whole run
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    for f in sorted((b / "journal").glob("batch-*.safetensors"))[2:]:
        f.unlink()
    assert len(Journal(b).read()) == 2
    routing.uninstall(tiny.model)
    again = EditSession(tiny, "grace", reqs, out=b, **{**kw, "evaluate": True}, eval_at=[0, 4])
    again.run(resume=True)
    assert _same(_codebook(again), after4) and torch.equal(_logits(tiny), logits4)
    again.undo(0)
    assert not routing.routes(tiny.model)


def _logits(lm, text="The mother tongue of Danielle Darrieux is"):
    ids = lm.tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return lm.model(ids).logits


def test_saved_model_export_and_bad_hparams(tmp_path, capsys):
    """`editfast edit --method grace --save-model` on the tiny model: the saved folder reloads with
    its codebook (the run's routed logits), `undo --to 0 --save-model` saves the plain base, `export
    --lora` is refused in one line, and bad hyper-parameters are refused before anything is written."""
    out = tmp_path / "run"
    code, _, err = run_cli(["edit", "--method", "grace", "--n", "2", "--no-eval", "--save-model", "--out", str(out),
                            "--set", "n_iter=5", *TINY], capsys)
    assert code == 0, err
    saved = load_model(out / "model")
    assert list(routing.routes(saved.model)) == ["model.layers.1.mlp.down_proj"]
    assert "base model without it" in (out / "model" / "README.md").read_text()  # the card says so
    base = load_model("random:tiny-llama")
    edited = load_dataset("counterfact", 1)[0].filled()  # routed at its last token
    plain = _logits(base, edited)
    from editfast.session.journal import load_run
    from editfast.session.session import apply_entries

    apply_entries(base, *load_run(out, base))  # the run replayed: what the session's model was
    assert torch.equal(_logits(saved, edited), _logits(base, edited))
    assert not torch.allclose(_logits(saved, edited), plain)
    code, _, err = run_cli(["undo", str(out), "--to", "0", "--out", str(tmp_path / "u0"), "--save-model"], capsys)
    assert code == 0, err
    assert not (tmp_path / "u0" / "model" / "routing.json").exists()
    assert torch.equal(_logits(load_model(tmp_path / "u0" / "model"), edited), plain)
    assert_refused(["export", str(out), "--lora", str(tmp_path / "lora")], capsys, "grace", "LoRA")
    assert not (tmp_path / "lora").exists()
    for bad, words in ((["--set", "replacement=replace_all"], ("replacement",)),
                       (["--set", "eps=-1"], ("eps",)),
                       (["--set", "layers=[1,2]"], ("one layer",)),
                       (["--set", "val_init=hot"], ("val_init",)),
                       (["--set", "module=mlp.nope"], ("mlp.nope",))):
        o = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        assert_refused(["edit", "--method", "grace", "--n", "1", "--out", str(o), *bad, *TINY], capsys, *words)
        assert not o.exists()


GRACE_YAML = """
alg_name: "GRACE"
model_name: "random:tiny-llama"
device: 0
inner_params:
- model.layers[2].mlp.down_proj.weight
edit_lr: 1.0
n_iter: 8
eps: 1.0
dist_fn: euc
val_init: cold
val_train: sgd
val_reg: None
reg: early_stop
replacement: replace_last
eps_expand: coverage
num_pert: 8
dropout: 0.0
"""


def test_easyedit_grace_file_through_the_facade(tmp_path):
    """EasyEdit's hparams/GRACE layout (sized for tiny-llama) loads, names layer 2's down_proj, and
    BaseEditor edits with it; the facade restores the codebook when not sequential."""
    import editfast.easyedit as ee

    path = tmp_path / "grace.yaml"
    path.write_text(GRACE_YAML)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # device 0 without CUDA
        hp = ee.GraceHyperParams.from_hparams(str(path))
        assert hp.editfast_hparams().layers == [2] and hp.editfast_hparams().module == "mlp.down_proj"
        editor = ee.BaseEditor.from_hparams(hp)
        metrics, model, _ = editor.edit(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
                                        subject=["Danielle Darrieux"],
                                        sequential_edit=True, verbose=False)
    assert metrics[0]["post"]["rewrite_acc"] == [1.0]
    assert list(routing.routes(model)) == ["model.layers.2.mlp.down_proj"]
