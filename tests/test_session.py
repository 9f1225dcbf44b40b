"""EditSession: sequential runs with checkpoints, an atomic journal, exact resume and undo."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from helpers import STUDY, run_cli

import editfast
from editfast.core.errors import EditfastError
from editfast.data.requests import load_dataset
from editfast.methods.registry import METHODS
from editfast.models.update import restore, snapshot
from editfast.session.journal import Journal
from editfast.session.session import EditSession

TINY = ["--model", "random:tiny-llama", "--templates", "fixed", "--quiet"]


@pytest.fixture
def pristine(pristine_tiny):
    """This module's tests edit the tiny llama (``pristine``: SmolLM2 elsewhere)."""
    return pristine_tiny


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))


def session(lm, n=4, batch_size=2, **kw):
    kw.setdefault("evaluate", False)
    return EditSession(lm, "memit", load_dataset("counterfact", n), batch_size=batch_size, templates="fixed",
                       progress=False, **kw)


def weights(lm, sites):
    return {k: v.clone() for k, v in snapshot(lm, sites).items()}


def test_undo_replays_exactly(pristine):
    lm = pristine
    s = session(lm, n=2)
    s.run()
    after2 = weights(lm, s.sites)
    for k, v in s.base.items():
        lm.model.get_parameter(k).data.copy_(v)
    s2 = session(lm, n=6)  # the same first two requests, then four more, from the base
    s2.run()
    s2.undo(2)
    assert all(torch.equal(after2[k], w) for k, w in weights(lm, s2.sites).items())  # bit for bit
    s2.undo(0)
    assert all(torch.equal(s2.base[k], w) for k, w in weights(lm, s2.sites).items())
    with pytest.raises(EditfastError, match="not a batch boundary"):
        s2.undo(3)


def test_checkpoints_write_curve(pristine, tmp_path):
    out = tmp_path / "run"
    s = session(pristine, n=4, evaluate=True, eval_tasks="sst2", eval_limit=4, eval_at=[0, 2, 4], out=out)
    res = s.run()
    curve = json.loads((out / "curve.json").read_text())
    assert [p["edits"] for p in curve["points"]] == [0, 2, 4] and res.curve["points"][-1]["edits"] == 4
    p = curve["points"][-1]
    assert {"efficacy_success", "paraphrase_success"} <= set(p["edit_metrics"])
    t = p["tasks"]["sst2"]
    assert t["n"] == 4 and "accuracy" in t["metrics"] and "accuracy" in t["stderr"]
    w = p["weights"]
    assert set(w["per_matrix"]) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert w["total"]["l1"] > curve["points"][1]["weights"]["total"]["l1"] > 0 == curve["points"][0]["weights"]["total"]["l1"]
    assert {"0.077", "0.171"} == set(w["total"]["rel_share"]) and w["total"]["spectral"] > 0
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # the unedited results are cached: a second session on the unedited weights reads them instead of evaluating
    restore(pristine, s.base)  # the base weights, and their identity, again
    out2 = tmp_path / "run2"
    session(pristine, n=2, eval_tasks="sst2", eval_limit=4, eval_at=[0, 2], out=out2).run()
    first = json.loads((out2 / "curve.json").read_text())["points"][0]["tasks"]["sst2"]
    assert first.get("cached") and first["metrics"] == curve["points"][0]["tasks"]["sst2"]["metrics"]


def test_non_finite_update_refused_journal_intact(pristine, tmp_path, monkeypatch):
    lm = pristine
    memit = METHODS["memit"]
    calls = []
    solve = memit.solve

    def bad_second_batch(lm_, x, hp, state, backend, trace):
        up = solve(lm_, x, hp, state, backend, trace)
        calls.append(x.layer)
        if len(calls) > len(hp.layers):  # the second batch
            up.U[0, 0] = float("nan")
        return up

    monkeypatch.setattr(memit, "solve", bad_second_batch)
    out = tmp_path / "run"
    s = session(lm, n=4, out=out)
    with pytest.raises(EditfastError, match="non-finite"):
        s.run()
    entries = Journal(out).read()
    assert [(e.start, e.end) for e in entries] == [(0, 2)]
    monkeypatch.undo()
    now = weights(lm, s.sites)
    s.undo(2)  # base + the one good batch
    assert all(torch.equal(now[k], w) for k, w in weights(lm, s.sites).items())
    assert all(torch.isfinite(w).all() for w in now.values())


def test_torn_tail_dropped_and_replayed(pristine, tmp_path):
    lm = pristine
    out = tmp_path / "run"
    s = session(lm, n=4, out=out)
    s.run()
    full = weights(lm, s.sites)
    for k, v in s.base.items():
        lm.model.get_parameter(k).data.copy_(v)
    last = Journal(out).path(1)
    last.write_bytes(last.read_bytes()[:100])  # torn by a crash
    (out / "journal" / ".batch-000002.safetensors.tmp").write_bytes(b"half")
    with pytest.warns(RuntimeWarning) as rec:
        res = session(lm, n=4, out=out).run(resume=True)
    said = " ".join(str(w.message) for w in rec)
    assert "torn" in said and "unfinished" in said
    assert res.timings["batches"][0].get("replayed") and not res.timings["batches"][1].get("replayed")
    assert all(torch.equal(full[k], w) for k, w in weights(lm, s.sites).items())
    assert [e.end for e in Journal(out).read()] == [2, 4]


def test_resume_refuses_a_different_run(pristine, tmp_path):
    out = tmp_path / "run"
    s = session(pristine, n=2, out=out)
    s.run()
    restore(pristine, s.base)  # --resume replays onto the base weights
    with pytest.raises(EditfastError, match="batch_size"):
        session(pristine, n=2, batch_size=1, out=out).run(resume=True)
    with pytest.raises(EditfastError, match="dataset"):
        EditSession(pristine, "memit", load_dataset("counterfact", 3)[1:], batch_size=2, templates="fixed",
                    evaluate=False, progress=False, out=out).run(resume=True)
    with pytest.raises(EditfastError, match="hyper-parameters.*v_lr"):
        session(pristine, n=2, out=out, overrides={"v_lr": 0.1}).run(resume=True)
    with pytest.raises(EditfastError, match="already holds"):
        session(pristine, n=2, out=out).run()
    with pytest.raises(EditfastError, match="no journal"):
        session(pristine, n=2, out=tmp_path / "empty").run(resume=True)


def _spawn(args, env):
    return subprocess.Popen([sys.executable, "-m", "editfast.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path):
    """kill -9 at random points of a sequential run, --resume until done: the same weights and a
    complete curve as an uninterrupted run."""
    from safetensors.torch import load_file

    env = {**os.environ, "EDITFAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["edit", "--method", "memit", "--n", "20", "--batch-size", "1", "--eval", "sst2", "--eval-limit", "4",
              "--eval-at", "0,5,10,15,20", "--save-model", *TINY]
    ref = tmp_path / "ref"
    p = _spawn([*common, "--out", str(ref)], env)
    assert p.wait() == 0, p.stderr.read()
    out = tmp_path / "killed"
    rng = random.Random(0)
    # kill when the journal holds a random number of batches, a random moment later (mid-batch,
    # mid-checkpoint or mid-write)
    targets = sorted(rng.sample(range(1, 19), 3))
    args = [*common, "--out", str(out)]
    kills = 0
    for target in [*targets, None]:
        p = _spawn(args, env)
        if target is not None:
            while p.poll() is None and len(list((out / "journal").glob("batch-*"))) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                args = [*common, "--out", str(out), "--resume"]
                continue
        assert p.wait() == 0, p.stderr.read()
        if target is None:
            break
    assert kills >= 2, f"killed {kills} times"
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pts = json.loads((out / "curve.json").read_text())["points"]
    ref_pts = json.loads((ref / "curve.json").read_text())["points"]
    assert [p["edits"] for p in pts] == [0, 5, 10, 15, 20]
    for p, q in zip(pts, ref_pts):
        assert p["tasks"]["sst2"]["metrics"] == q["tasks"]["sst2"]["metrics"]
        assert p["weights"]["total"]["l1"] == q["weights"]["total"]["l1"]


def test_cli_undo_equals_shorter_run(tmp_path, capsys):
    env_common = ["--method", "memit", "--batch-size", "2", "--no-eval", "--save-model", *TINY]
    code, _, err = run_cli(["edit", "--n", "4", "--out", str(tmp_path / "r4"), *env_common], capsys)
    assert code == 0, err
    code, _, err = run_cli(["edit", "--n", "2", "--out", str(tmp_path / "r2"), *env_common], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["undo", str(tmp_path / "r4"), "--to", "2", "--out", str(tmp_path / "u2"),
                                 "--save-model"], capsys)
    assert code == 0, err
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "r2" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "u2" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e.end for e in Journal(tmp_path / "u2").read()] == [2]
    for argv, word in ((["--to", "6"], "outside"), (["--to", "1"], "batch boundary")):
        code, _, err = run_cli(["undo", str(tmp_path / "r4"), *argv, "--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("eval_at, word", [("0,3", "batch boundary"), ("0,8", "outside"), ("4,2", "increasing"),
                                           ("a,b", "comma list")])
def test_bad_eval_at(eval_at, word, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_cli(["edit", "--n", "4", "--batch-size", "2", "--eval-at", eval_at, "--out", str(out), *TINY],
                           capsys)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_resume_without_run(tmp_path, capsys):
    code, _, err = run_cli(["edit", "--n", "2", "--resume", "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "no editfast run" in err and not (tmp_path / "o").exists()


def test_resume_names_the_differing_field(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_cli(["edit", "--n", "2", "--no-eval", "--out", str(out), *TINY], capsys)
    assert code == 0, err
    code, _, err = run_cli(["edit", "--n", "2", "--no-eval", "--method", "rome", "--resume", "--out", str(out), *TINY],
                           capsys)
    assert code == 2 and "method" in err and len(err.strip().splitlines()) == 1, err


def test_edit_api_is_a_session(pristine):
    res = editfast.edit(pristine, load_dataset("counterfact", 2), "rome", templates="fixed", evaluate=False,
                        progress=False)
    assert res.config["batch_size"] == 1 and len(res.journal) == 2 and all(len(b) == 1 for b in res.journal)
    assert res.journal[0][0].weight == "model.layers.1.mlp.down_proj.weight"


def test_study_runs_the_grid(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(STUDY)
    out = tmp_path / "study"
    code, stdout, err = run_cli(["study", str(f), "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    doc = json.loads((out / "study.json").read_text())
    labels = [l["label"] for l in doc["lines"]]
    assert labels == ["rome · one at a time", "memit · one batch of B", "memit · 1 per batch"]
    for line in doc["lines"]:
        assert [p["edits"] for p in line["points"]] == [0, 1, 2]
        assert {"sst2", "wikitext"} == set(line["points"][-1]["tasks"])
        assert "stderr" in line["points"][-1]["tasks"]["sst2"]
    assert {p.split("/")[-1] for p in doc["plots"]} >= {"sst2.png", "wikitext.png", "weights.png"}
    report = (out / "report.md").read_text()
    assert "## sst2" in report
    # the comparison: one row per run, unedited -> last checkpoint, as study.json has it
    table = report.split("## Comparison")[1].split("\n## ")[0].splitlines()
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ") for r in table if r.startswith("| ") and "---" not in r}
    header = rows.pop("run")
    assert set(rows) == set(labels)
    first, last = doc["lines"][0]["points"][0], doc["lines"][0]["points"][-1]
    row = dict(zip(header, rows["rome · one at a time"]))
    sst2 = lambda p: p["tasks"]["sst2"]["metrics"]["accuracy"]
    assert row["edits"] == "2" and row["sst2"] == f"{sst2(first):.3f} → {sst2(last):.3f}"
    assert row["s / edit"] == f"{last['seconds'] / 2:.2f}"
    # every session's unedited evaluation after the first came from the cache
    cached = [s["curve"]["points"][0]["tasks"]["sst2"].get("cached") for s in doc["sessions"]]
    assert cached[0] is None and all(cached[1:])
    for s in doc["sessions"][1:]:  # what the cache answered cost the checkpoint nothing
        assert set(s["curve"]["points"][0]["eval_s_by"]["tasks"].values()) == {0.0}
    code, _, err = run_cli(["study", str(f), "--out", str(out), "--quiet"], capsys)
    assert code == 2 and "--resume" in err
    code, _, err = run_cli(["study", str(f), "--out", str(out), "--quiet", "--resume"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("edit, word", [
    (lambda s: s.replace("name: tiny", "name: tiny\ncolour: red"), "colour"),
    (lambda s: s.replace("method: rome", "method: kn-typo"), "kn-typo"),
    (lambda s: s.replace("setting: batch,", "setting: once,"), "setting"),
    (lambda s: s.replace("eval: {", "eval: {speed: 1, "), "speed"),
    (lambda s: s.replace("sizes: [1, 2]", "sizse: [1, 2]"), "sizse"),
])
def test_bad_study_file(edit, word, tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(edit(STUDY))
    code, _, err = run_cli(["study", str(f), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(["study", str(f), "--profile", "nope", "--out", str(tmp_path / "o")], capsys)
    assert code == 2


def test_study_profile(tmp_path):
    from editfast.session.study import load_study, sessions_of

    f = tmp_path / "s.yaml"
    f.write_text(STUDY)
    d = load_study(f, "quick")
    assert [r["name"] for r in d["runs"]] == ["rome-seq"] and d["eval"]["limit"] == 2
    assert sessions_of(d["runs"][0]) == [{"dir": "rome-seq", "n": 1, "batch_size": 1, "eval_at": [0, 1]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_study("studies/seed.yaml", "quick")["eval"]["limits"] == {"wikitext": 10}
