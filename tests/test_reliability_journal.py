"""Weight updates and run journals are validated whole before they are trusted; nothing non-finite
reaches the weights. A real run directory is made once, copied per case and corrupted; each bad
run is refused with one line (API: EditfastError; CLI: exit 2) before any evaluation starts."""

import json
import os
import shutil

import pytest
import torch
from helpers import assert_refused
from safetensors import safe_open
from safetensors.torch import save_file

import editfast.cli.eval
from editfast.api import load_journal
from editfast.core.errors import EditfastError
from editfast.data.requests import load_dataset
from editfast.models.load import load_model
from editfast.models.update import (
    Dense,
    LowRank,
    Sparse,
    apply_update,
    restore,
    snapshot,
    validate_updates,
)
from editfast.session.journal import CHECKSUM, checksum
from editfast.session.session import EditSession

W1 = "model.layers.1.mlp.down_proj.weight"  # [64, 256] on random:tiny-llama


@pytest.fixture(scope="module")
def lm():
    return load_model("random:tiny-llama")


@pytest.fixture(scope="module")
def good_run(lm, tmp_path_factory):
    """A 3-batch MEMIT run (session.json + journal/batch-00000{0,1,2}); the model is restored after."""
    root = tmp_path_factory.mktemp("reliability")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITFAST_CACHE", str(root / "cache"))
        s = EditSession(lm, "memit", load_dataset("counterfact", 6), batch_size=2, templates="fixed", evaluate=False,
                        progress=False, out=root / "run")
        s.run()
        restore(lm, s.base)
    return root / "run"


@pytest.fixture
def run(good_run, tmp_path):
    shutil.copytree(good_run, tmp_path / "run")
    return tmp_path / "run"


def entry(run, b=1):
    return run / "journal" / f"batch-{b:06d}.safetensors"


def rewrite(fn, b=1):
    """A corruption that rewrites entry ``b`` as valid safetensors: fn(meta, tensors, index, header); its
    checksum is made anew (an entry as a faulty writer would make it: the checks behind the checksum)."""
    def corrupt(run):
        with safe_open(str(entry(run, b)), "pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        index, header, orig = json.loads(meta["updates"]), json.loads(meta["entry"]), dict(meta)
        fn(meta, tensors, index, header)
        for key, obj in (("updates", index), ("entry", header)):
            if key in meta and meta[key] == orig[key]:  # fn changed the objects, not the text
                meta[key] = json.dumps(obj)
        if CHECKSUM in meta:
            meta[CHECKSUM] = checksum(meta, tensors)
        save_file(tensors, str(entry(run, b)), metadata=meta)
    return corrupt


def doc(text, name="session.json", drop_session=False):
    def corrupt(run):
        if drop_session:
            (run / "session.json").unlink()
        (run / name).write_text(text)
    return corrupt


def config(**kw):
    def corrupt(run):
        d = json.loads((run / "session.json").read_text())
        d["config"].update(kw)
        (run / "session.json").write_text(json.dumps(d))
    return corrupt


def _sparse(m, t, idx, h):
    del t["u0.U"], t["u0.V"]
    t.update({"u0.index": torch.tensor([64 * 256]), "u0.values": torch.ones(1), "u0.shape": torch.tensor([64, 256])})
    idx[0].update(kind="sparse", tensors={p: f"u0.{p}" for p in ("index", "values", "shape")})


def _nan(m, t, idx, h):
    t["u0.U"][0, 0] = float("nan")


BAD_RUNS = [  # id, corruption, words of the one-line error
    ("u-without-v", rewrite(lambda m, t, idx, h: (t.pop("u0.V"), idx[0]["tensors"].pop("V"))),
     ["batch-000001", "needs U and V"]),
    ("v-tensor-missing", rewrite(lambda m, t, idx, h: t.pop("u0.V")), ["u0.V", "missing"]),
    ("foreign-weight", rewrite(lambda m, t, idx, h: idx[0].update(weight="model.layers.1.mlp.nope.weight")),
     ["batch 1", "no weight", "nope"]),
    ("shape-mismatch", rewrite(lambda m, t, idx, h: t.update({"u0.U": t["u0.U"][:-1].clone()})), ["shape", W1]),
    ("rank-mismatch", rewrite(lambda m, t, idx, h: t.update({"u0.V": torch.cat([t["u0.V"]] * 2, 1)})), ["same r"]),
    ("non-float", rewrite(lambda m, t, idx, h: t.update({"u0.U": t["u0.U"].to(torch.int64)})), ["floating point", "U"]),
    ("nan-in-u", rewrite(_nan), ["non-finite", W1]),
    ("unknown-kind", rewrite(lambda m, t, idx, h: idx[0].update(kind="lowrank2")), ["unknown update kind", "lowrank2"]),
    ("unknown-kind-last-entry", rewrite(lambda m, t, idx, h: idx[0].update(kind="?"), b=2),
     ["batch-000002", "unknown"]),
    ("foreign-tensor", rewrite(lambda m, t, idx, h: t.update(extra=torch.zeros(2))), ["does not name", "extra"]),
    ("sparse-index-out-of-bounds", rewrite(_sparse), ["out of bounds"]),
    ("foreign-header", rewrite(lambda m, t, idx, h: (m.clear(), m.update(format="pt"))), ["not an editfast journal"]),
    ("header-not-json", rewrite(lambda m, t, idx, h: m.update(entry="{")), ["not json"]),
    ("index-not-a-list", rewrite(lambda m, t, idx, h: m.update(updates='{"kind": "lowrank"}')), ["not a json list"]),
    ("index-entry-not-an-object", rewrite(lambda m, t, idx, h: idx.__setitem__(0, "u0")),
     ["update 0", "not an object"]),
    ("header-batch-not-int", rewrite(lambda m, t, idx, h: h.update(batch="1")), ["batch"]),
    ("random-bytes-middle", lambda run: entry(run).write_bytes(os.urandom(4096)), ["batch-000001", "unreadable"]),
    ("zero-length-middle", lambda run: entry(run).write_bytes(b""), ["batch-000001", "unreadable"]),
    ("batch-gap", lambda run: entry(run).unlink(), ["batch 2", "missing"]),
    ("entry-renamed", lambda run: entry(run, 2).rename(entry(run, 7)), ["batch-000007", "holds batch 2", "renamed"]),
    ("session-json-a-list", doc("[]"), ["session.json", "json list"]),
    ("session-json-no-config", doc('{"hparams": {}}'), ["session.json", "config"]),
    ("session-json-not-json", doc("{"), ["session.json", "cannot read"]),
    ("results-json-a-list", doc("[1]", "results.json", drop_session=True), ["results.json", "json list"]),
    ("other-model", config(model_fingerprint="0" * 64), ["fingerprint"]),
    ("no-entries", lambda run: shutil.rmtree(run / "journal"), ["no journal entries"]),
]


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg.lower()


@pytest.mark.parametrize("corrupt,words", [c[1:] for c in BAD_RUNS], ids=[c[0] for c in BAD_RUNS])
def test_bad_run_refused_by_the_api(lm, run, corrupt, words):
    corrupt(run)
    with pytest.raises(EditfastError) as e:
        load_journal(run, lm)
    msg = one_line(e)
    assert all(w.lower() in msg for w in words), msg


@pytest.mark.parametrize("corrupt,words", [c[1:] for c in BAD_RUNS], ids=[c[0] for c in BAD_RUNS])
def test_bad_run_refused_by_eval_before_any_evaluation(run, tmp_path, capsys, monkeypatch, corrupt, words):
    def evaluate(*a, **kw):
        raise AssertionError("evaluated before the run was checked")

    monkeypatch.setattr(editfast.cli.eval, "evaluate", evaluate)
    corrupt(run)
    out = tmp_path / "out"
    assert_refused(["eval", "--model", "random:tiny-llama", "--edits", str(run), "--tasks", "sst2", "--limit", "2",
                    "--out", str(out), "--quiet"], capsys, *words, absent=[out])


def test_a_good_run_loads_whole(lm, run):
    cfg, batches = load_journal(run, lm)
    assert cfg["n"] == 6 and [len(b) for b in batches] == [2, 2, 2]
    assert [u.weight for u in batches[0]] == [W1, "model.layers.2.mlp.down_proj.weight"]


@pytest.mark.parametrize("tear", [lambda p: p.write_bytes(b""), lambda p: p.write_bytes(os.urandom(4096)),
                                  lambda p: p.write_bytes(p.read_bytes()[:200])], ids=["empty", "random", "truncated"])
def test_torn_last_entry_dropped_with_a_warning(lm, run, tear):
    tear(entry(run, 2))
    with pytest.warns(RuntimeWarning, match="torn"):
        _, batches = load_journal(run, lm)
    assert len(batches) == 2


# ---------------------------------------------------------------- apply_update

def _factors(shape=(64, 256), u=1.0, v=1.0):
    return torch.full((shape[0], 1), u), torch.full((shape[1], 1), v)


@pytest.fixture
def fp16():
    return load_model("random:tiny-llama", dtype="float16")


NON_FINITE = [
    ("nan-U", lambda: LowRank(W1, *_factors(u=float("nan")))),
    ("inf-V", lambda: LowRank(W1, _factors()[0], torch.cat([torch.ones(255, 1), torch.full((1, 1), float("inf"))]))),
    ("nan-dense", lambda: Dense(W1, torch.full((64, 256), float("nan")))),
    ("inf-sparse", lambda: Sparse(W1, (64, 256), torch.tensor([0, 5]), torch.tensor([1.0, float("-inf")]))),
]


@pytest.mark.parametrize("make", [c[1] for c in NON_FINITE], ids=[c[0] for c in NON_FINITE])
def test_apply_refuses_non_finite_factors(lm, make):
    before = snapshot(lm, [W1])[W1]
    with pytest.raises(EditfastError) as e:
        apply_update(lm, make())
    assert "non-finite" in one_line(e) and W1.lower() in one_line(e)
    assert torch.equal(lm.model.get_parameter(W1), before)


def _overflowing_v(dtype):
    """V = 1 except one element that takes its column past the largest value of ``dtype``."""
    v = torch.ones(256, 1)
    v[7] = 7e4 if dtype == "float16" else 3.4e38  # finite in fp32, past the largest fp16 / bf16
    return v


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["lowrank", "dense"])
def test_overflow_refused_and_weight_bit_identical(dtype, kind):
    lm16 = load_model("random:tiny-llama", dtype=dtype)
    U, V = torch.ones(64, 1), _overflowing_v(dtype)
    u = LowRank(W1, U, V) if kind == "lowrank" else Dense(W1, U @ V.T)
    before = snapshot(lm16, [W1])[W1]
    with pytest.raises(EditfastError) as e:
        apply_update(lm16, u)
    msg = one_line(e)
    assert "non-finite" in msg and "overflow" in msg and dtype in msg
    W = lm16.model.get_parameter(W1)
    assert torch.equal(W, before) and torch.isfinite(W).all()


def test_a_large_update_that_fits_is_applied(fp16):
    """Large enough for the overflow check to copy the weight, small enough to fit fp16: applied."""
    W = fp16.model.get_parameter(W1)
    U, V = torch.full((64, 1), 2e4), torch.ones(256, 1)
    want = (W.float() + U @ V.T).half()
    apply_update(fp16, LowRank(W1, U, V))
    assert torch.equal(W, want)


MISFITS = [
    ("foreign-weight", lambda: LowRank("model.layers.1.mlp.nope.weight", *_factors()), "no weight"),
    ("not-a-matrix", lambda: LowRank("model.layers.1.input_layernorm.weight", *_factors((64, 1))), "not a floating"),
    ("shape", lambda: LowRank(W1, *_factors((256, 64))), "shape"),
    ("dense-shape", lambda: Dense(W1, torch.zeros(64, 255)), "shape"),
    ("sparse-bounds", lambda: Sparse(W1, (64, 256), torch.tensor([64 * 256]), torch.ones(1)), "out of bounds"),
    ("sparse-float-index", lambda: Sparse(W1, (64, 256), torch.tensor([1.0]), torch.ones(1)), "integers"),
    ("int-delta", lambda: Dense(W1, torch.zeros(64, 256, dtype=torch.int32)), "floating point"),
    ("rank", lambda: LowRank(W1, torch.ones(64, 2), torch.ones(256, 3)), "same r"),
]


@pytest.mark.parametrize("make,word", [c[1:] for c in MISFITS], ids=[c[0] for c in MISFITS])
def test_misfit_updates_refused(lm, make, word):
    before = snapshot(lm, [W1])[W1]
    for check in (lambda u: validate_updates(lm, [u]), lambda u: apply_update(lm, u)):
        with pytest.raises(EditfastError) as e:
            check(make())
        assert word in one_line(e)
    assert torch.equal(lm.model.get_parameter(W1), before)


def test_conv1d_updates_are_checked_in_out_in_layout():
    gpt2 = load_model("random:tiny-gpt2")
    name = f"{gpt2.adapter.rewrite_tmp.format(1)}.weight"
    n_in, n_out = gpt2.model.get_parameter(name).shape  # Conv1D stores [in, out]
    assert n_in != n_out
    validate_updates(gpt2, [LowRank(name, torch.ones(n_out, 1), torch.ones(n_in, 1))])
    with pytest.raises(EditfastError, match="shape"):
        validate_updates(gpt2, [LowRank(name, torch.ones(n_in, 1), torch.ones(n_out, 1))])


def test_snapshot_restore_is_the_exact_undo(lm):
    u = LowRank(W1, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)),
                torch.randn(256, 2, generator=torch.Generator().manual_seed(1)))
    saved = snapshot(lm, [u])  # updates stand for their weights
    apply_update(lm, u)
    assert not torch.equal(lm.model.get_parameter(W1), saved[W1])
    restore(lm, saved)
    assert torch.equal(lm.model.get_parameter(W1), saved[W1])
