"""Bad inputs and faults, end to end: every case is refused with exit 2 (130/143 for SIGINT/SIGTERM),
one line on stderr without a traceback, no files left behind, the cache unpoisoned, and (in the
Python API) the weights untouched. Signals and kill -9 run the real entry point in a subprocess."""

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import STUDY, assert_refused, run_cli
from safetensors.torch import load_file

import editfast
from editfast.core.errors import EditfastError
from editfast.data.requests import Request, load_dataset
from editfast.models.load import load_model
from editfast.models.update import LowRank, apply_update
from editfast.session.journal import Journal
from editfast.session.outputs import OutputDir
from editfast.session.session import EditSession

TINY = ["--model", "random:tiny-llama", "--templates", "fixed", "--quiet"]
EDIT = ["edit", "--n", "2", *TINY]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-cache")


@pytest.fixture(autouse=True)
def cache(cache_root, monkeypatch):
    """One cache for the module (statistics computed once); checked for poison after every test."""
    root = cache_root
    monkeypatch.setenv("EDITFAST_CACHE", str(root))
    yield root
    for f in root.rglob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{f}: {name} is not finite"


def write(path: Path, obj, text: str | None = None) -> str:
    path.write_text(text if text is not None else json.dumps(obj))
    return str(path)


REQ = {"prompt": "{} is located in", "subject": "Paris", "target_new": "Rome", "target_true": "France"}
LONG = " ".join(["word"] * 300)  # tiny-llama's context is 256 tokens


def gz_corrupt(p: Path) -> str:
    p.write_bytes(gzip.compress(json.dumps([REQ]).encode())[:-12] + b"garbage!")
    return str(p)


def model_dir(p: Path, fault: str) -> str:
    """A saved tiny-llama directory with one fault."""
    lm = load_model("random:tiny-llama")
    lm.model.save_pretrained(p)
    weights = p / "model.safetensors"
    if fault == "config list":
        (p / "config.json").write_text("[1, 2]")
    elif fault == "random bytes":
        weights.write_bytes(os.urandom(4096))
    elif fault == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif fault == "missing tensors":
        from safetensors.torch import save_file

        t = load_file(str(weights))
        save_file({k: v for k, v in t.items() if "layers.1." not in k}, str(weights), metadata={"format": "pt"})
    return str(p)


# (extra argv for `editfast edit --n 2` on tiny-llama, or a function of tmp_path giving it; a word the line names)
EDIT_CASES = {
    "nan update weight": (["--set", "mom2_update_weight=.nan"], "mom2_update_weight"),
    "inf learning rate": (["--set", "v_lr=.inf"], "v_lr"),
    "nan learning rate": (["--set", "v_lr=.nan"], "v_lr"),
    "zero statistics tokens": (["--set", "mom2_max_tokens=0"], "mom2_max_tokens"),
    "negative samples": (["--set", "mom2_n_samples=-5"], "mom2_n_samples"),
    "zero samples": (["--set", "mom2_n_samples=0"], "mom2_n_samples"),
    "negative kl factor": (["--set", "kl_factor=-1"], "kl_factor"),
    "negative weight decay": (["--set", "v_weight_decay=-5"], "v_weight_decay"),
    "zero grad steps": (["--set", "v_num_grad_steps=0"], "v_num_grad_steps"),
    "zero clamp": (["--set", "clamp_norm_factor=0"], "clamp_norm_factor"),
    "unclosed list": (["--set", "layers=[4"], "layers"),
    "yaml colon": (["--set", "v_lr=: x"], "v_lr"),
    "set without =": (["--set", "v_lr"], "v_lr"),
    "duplicate layers": (["--set", "layers=[1,1]"], "layers"),
    "layer out of range": (["--set", "layers=[99]"], "layers"),
    "unknown key": (["--set", "bogus_key=1"], "bogus_key"),
    "foreign module": (["--set", "rewrite_module_tmp=transformer.h.{}.mlp.c_proj"], "rewrite_module_tmp"),
    "missing corpus": (["--set", "mom2_dataset=/no/such/corpus.txt"], "mom2_dataset"),
    "json nan hparams": (lambda t: ["--hparams", write(t / "hp.json", None, '{"layers": [1], "v_lr": NaN}')], "v_lr"),
    "hparams a list": (lambda t: ["--hparams", write(t / "hp.json", [1, 2])], "mapping"),
    "hparams yaml typo": (lambda t: ["--hparams", write(t / "hp.yaml", None, "layers: [1\n")], "hp.yaml"),
    "hparams missing": (lambda t: ["--hparams", str(t / "none.yaml")], "none.yaml"),
    "seed beyond int64": (["--seed", str(2**70)], "seed"),
    "negative seed": (["--seed", "-1"], "seed"),
    "zero edits": (["--n", "0"], "--n"),
    "negative edits": (["--n", "-3"], "--n"),
    "zero batch": (["--batch-size", "0"], "batch-size"),
    "negative offset": (["--offset", "-1"], "offset"),
    "beyond the 500 records": (["--n", "2", "--offset", "499", "--dataset", "counterfact"], "counterfact-full"),
    "n larger than dataset": (["--n", "100000", "--dataset", "zsre"], "100000"),
    "n larger than counterfact": (["--n", "100000"], "100000"),
    "wrong hparam type": (["--set", "v_lr=fast"], "v_lr"),
    "unknown dataset": (["--dataset", "nosuch"], "nosuch"),
    "case_id a list": (lambda t: ["--dataset", write(t / "r.json", [{**REQ, "case_id": [1, 2]}])], "case_id"),
    "case_id an object": (lambda t: ["--dataset", write(t / "r.json", [{**REQ, "case_id": {"a": 1}}])], "case_id"),
    "case_id a bool": (lambda t: ["--dataset", write(t / "r.json", [{**REQ, "case_id": True}])], "case_id"),
    "duplicate case_id": (lambda t: ["--dataset", write(t / "r.json", [{**REQ, "case_id": 1},
                                                                       {**REQ, "subject": "Rome", "case_id": 1}])],
                          "duplicate"),
    "corrupt gzip dataset": (lambda t: ["--dataset", gz_corrupt(t / "r.json.gz")], "r.json.gz"),
    "prompt beyond context": (lambda t: ["--n", "1", "--dataset", write(t / "r.json", [{**REQ, "prompt": "{} " + LONG}])],
                              "context"),
    "target beyond context": (lambda t: ["--n", "1", "--dataset", write(t / "r.json", [{**REQ, "target_new": LONG}])],
                              "context"),
    "unknown method": (["--method", "nope"], "nope"),
    "unknown model": (["--model", "no-such-model"], "no-such-model"),
    "model dir config a list": (lambda t: ["--model", model_dir(t / "m", "config list")], "config.json"),
    "model weights random bytes": (lambda t: ["--model", model_dir(t / "m", "random bytes")], "model"),
    "model weights truncated": (lambda t: ["--model", model_dir(t / "m", "truncated")], "model"),
    "model missing tensors": (lambda t: ["--model", model_dir(t / "m", "missing tensors")], "missing"),
    "bad dtype": (["--dtype", "int8"], "int8"),
    "no cuda": (["--device", "cuda"], "cuda"),
    "unknown task": (["--eval", "nosuchtask"], "nosuchtask"),
    "eval limit zero": (["--eval", "sst2", "--eval-limit", "0"], "eval-limit"),
    "checkpoint off boundary": (["--batch-size", "2", "--n", "4", "--eval-at", "0,3"], "boundary"),
    "checkpoints unsorted": (["--batch-size", "1", "--eval-at", "2,1"], "increasing"),
    "bad template mode": (["--templates", "bogus"], "templates"),
    "resume without a run": (["--resume"], "resume"),
    "resume and force": (["--resume", "--force"], "exclude"),
}


@pytest.mark.parametrize("case", list(EDIT_CASES), ids=list(EDIT_CASES))
def test_edit_refuses(case, tmp_path, capsys):
    extra, word = EDIT_CASES[case]
    extra = extra(tmp_path) if callable(extra) else extra
    out = tmp_path / "out"
    assert_refused([*EDIT, "--out", str(out), *extra], capsys, word, absent=[out])
    assert not list(tmp_path.glob(".out.*")), "a lock or staging file was left beside --out"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_root):
    """A finished 4-edit run (batches of 2) on tiny-llama."""
    out = tmp_path_factory.mktemp("run") / "r"
    with pytest.MonkeyPatch.context() as mp:  # set before the tests' own monkeypatch: it must not outlive the module
        mp.setenv("EDITFAST_CACHE", str(cache_root))
        lm = load_model("random:tiny-llama")
        EditSession(lm, "memit", load_dataset("counterfact", 4), batch_size=2, templates="fixed", evaluate=False,
                    progress=False, out=out).run()
    return out


def eval_argv(t: Path, *extra):
    return ["eval", "--model", "random:tiny-llama", "--tasks", "sst2", "--limit", "2", "--quiet",
            "--out", str(t / "out"), *extra]


OTHER_CASES = {
    "eval limit zero": (lambda t, r: eval_argv(t, "--limit", "0"), "limit"),
    "eval batch tokens": (lambda t, r: eval_argv(t, "--batch-tokens", "-5"), "batch-tokens"),
    "eval's --batch-size (edit's option)": (lambda t, r: eval_argv(t, "--batch-size", "4096"), "--batch-tokens"),
    "eval bad device": (lambda t, r: eval_argv(t, "--device", "gpu0"), "cuda:N"),
    "eval unknown task": (lambda t, r: eval_argv(t, "--tasks", "nosuch"), "nosuch"),
    "eval seed overflow": (lambda t, r: eval_argv(t, "--seed", str(2**64)), "seed"),
    "eval edits missing": (lambda t, r: eval_argv(t, "--edits", str(t / "none")), "none"),
    "eval edits session a list": (lambda t, r: eval_argv(t, "--edits", write((t / "e").mkdir() or t / "e" /
                                                                            "session.json", [1]) and str(t / "e")),
                                  "session.json"),
    "eval out empty": (lambda t, r: eval_argv(t)[:-2] + ["--out", ""], "out"),
    "undo off boundary": (lambda t, r: ["undo", str(r), "--to", "3", "--out", str(t / "out")], "boundary"),
    "undo beyond run": (lambda t, r: ["undo", str(r), "--to", "100", "--out", str(t / "out")], "100"),
    "undo negative": (lambda t, r: ["undo", str(r), "--to", "-1", "--out", str(t / "out")], "--to"),
    "undo into the run": (lambda t, r: ["undo", str(r), "--to", "2", "--out", str(r)], "would replace"),
    "undo not a run": (lambda t, r: ["undo", str(t), "--to", "2", "--out", str(t / "out")], "not an edit run"),
    "study resume and force": (lambda t, r: ["study", write(t / "s.yaml", None, "x: 1"), "--resume", "--force",
                                             "--out", str(t / "out")], "exclude"),
    "study unknown key": (lambda t, r: ["study", write(t / "s.yaml", None, "colour: red"), "--out", str(t / "out")],
                          "colour"),
    "edit out empty": (lambda t, r: [*EDIT, "--out", ""], "out"),
}


@pytest.mark.parametrize("case", list(OTHER_CASES), ids=list(OTHER_CASES))
def test_other_commands_refuse(case, run_dir, tmp_path, capsys):
    build, word = OTHER_CASES[case]
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert_refused(build(tmp_path, run_dir), capsys, word, absent=[tmp_path / "out"])
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # the run is untouched
    assert not list(Path.cwd().glob(".probe.*")) and not list(tmp_path.glob(".out.*"))


# ------------------------------------------------------------------------------ output directories


def test_non_empty_out_needs_resume_or_force(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_refused([*EDIT, "--no-eval", "--out", str(out)], capsys, "not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, err = run_cli([*EDIT, "--no-eval", "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "results.json").is_file()


def test_eval_force_replaces_whole(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(eval_argv(tmp_path, "--tasks", "sst2,rte"), capsys)
    assert code == 0, err
    assert {p.name for p in (out / "tasks").iterdir()} == {"sst2.json", "rte.json"}
    assert_refused(eval_argv(tmp_path), capsys, "--force")
    code, _, err = run_cli(eval_argv(tmp_path, "--force"), capsys)
    assert code == 0, err
    assert {p.name for p in (out / "tasks").iterdir()} == {"sst2.json"}  # no stale rte.json
    assert "versions" in json.loads((out / "eval.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_second_writer_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with OutputDir(out):
        assert_refused([*EDIT, "--out", str(out)], capsys, "another editfast process", f"pid {os.getpid()}")
        assert not any(out.iterdir())
    code, _, err = run_cli([*EDIT, "--no-eval", "--out", str(out)], capsys)  # the lock is free again
    assert code == 0, err


def test_leftovers_of_a_killed_run_are_removed(run_dir, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    for p in run_dir.iterdir():
        os.system(f"cp -r {p} {out}")
    (out / ".model.abc123").mkdir()
    (out / ".model.abc123" / "model.safetensors").write_bytes(b"x" * 1000)
    (out / ".results.json.xyz.tmp").write_text("{")
    staging = tmp_path / ".r.editfast-tmp-dead"
    staging.mkdir()
    code, _, err = run_cli([*EDIT[:1], "--n", "4", "--batch-size", "2", *TINY, "--no-eval", "--resume",
                            "--out", str(out)], capsys)
    assert code == 0, err
    assert "removed 3 leftover" in err
    assert not (out / ".model.abc123").exists() and not staging.exists()


def test_results_record_versions_and_saved_model_is_readable(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["edit", "--method", "rome", "--n", "1", "--save-model", "--no-eval", "--out", str(out),
                            *TINY], capsys)
    assert code == 0, err
    v = json.loads((out / "results.json").read_text())["config"]["versions"]
    assert v["torch"] == torch.__version__ and v["python"] and v["transformers"] and v["editfast"] and v["device"]
    assert (out / "model").stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in (out / "model").iterdir()} == {0o644}


# ------------------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def lm():
    return load_model("random:tiny-llama")


def requests(n=4):
    return load_dataset("counterfact", n)


API_CASES = {
    "nan override": lambda lm: editfast.edit(lm, requests(), overrides={"mom2_update_weight": float("nan")},
                                             templates="fixed", evaluate=False, progress=False),
    "inf lr override": lambda lm: editfast.edit(lm, requests(), overrides={"v_lr": float("inf")}, templates="fixed",
                                                evaluate=False, progress=False),
    "mutated hparams": lambda lm: editfast.edit(lm, requests(), hparams=_mutated(lm), templates="fixed",
                                                evaluate=False, progress=False),
    "seed overflow": lambda lm: editfast.edit(lm, requests(), seed=2**70, templates="fixed", evaluate=False,
                                              progress=False),
    "prompt beyond context": lambda lm: editfast.edit(lm, [Request("{} " + LONG, "Paris", "Rome", "France")],
                                                      templates="fixed", evaluate=False, progress=False),
    "case_id a list": lambda lm: editfast.edit(lm, [Request("{} is in", "Paris", "Rome", "France", case_id=[1])],
                                               templates="fixed", evaluate=False, progress=False),
    "nan update applied": lambda lm: apply_update(
        lm, LowRank("model.layers.1.mlp.down_proj.weight", torch.full((64, 1), float("nan")), torch.ones(256, 1))),
    "overflowing update": lambda lm: apply_update(
        lm, LowRank("model.layers.1.mlp.down_proj.weight", torch.full((64, 1), 3e38), torch.full((256, 1), 3e38))),
    "foreign weight": lambda lm: apply_update(lm, LowRank("model.layers.9.mlp.down_proj.weight",
                                                          torch.ones(64, 1), torch.ones(256, 1))),
}


def _mutated(lm):
    hp = editfast.resolve_hparams("memit", lm.spec, lm.model.config)
    hp.kl_factor = float("nan")
    return hp


@pytest.mark.parametrize("case", list(API_CASES), ids=list(API_CASES))
def test_api_refuses_and_weights_stay(case, lm):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(EditfastError):
        API_CASES[case](lm)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_batch_stops_with_journal_intact(lm, tmp_path, monkeypatch, capsys):
    """A batch whose update is not finite stops the run: exit 2, the good batches journaled, the
    weights as after them, and --resume (once the cause is gone) continues from there."""
    from editfast.methods.registry import METHODS

    memit = METHODS["memit"]
    real = memit.solve
    calls = {"n": 0}

    def poisoned(lm, x, *a, **k):
        up = real(lm, x, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # the second batch's first layer
            up.U[0, 0] = float("nan")
        return up

    monkeypatch.setattr(memit, "solve", poisoned)
    out = tmp_path / "out"
    argv = ["edit", "--n", "4", "--batch-size", "2", "--no-eval", "--out", str(out), *TINY]
    line = assert_refused(argv, capsys, "non-finite")
    assert "--resume" in line and [e.end for e in Journal(out).read()] == [2]
    monkeypatch.setattr(memit, "solve", real)
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert [e.end for e in Journal(out).read()] == [2, 4]


def test_disk_full_is_one_line_and_keeps_good_batches(tmp_path, monkeypatch, capsys):
    import editfast.session.journal as journal

    real, calls = journal.save_file, {"n": 0}

    def full(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(journal, "save_file", full)
    out = tmp_path / "out"
    line = assert_refused(["edit", "--n", "4", "--batch-size", "2", "--no-eval", "--out", str(out), *TINY], capsys,
                          "No space left on device", "--resume")
    assert [e.end for e in Journal(out).read()] == [2] and not list((out / "journal").glob(".*"))
    assert line.count("editfast") == 1


# ------------------------------------------------------------------------------ signals and kill -9


def cli(*argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "editfast.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for(pred, proc, timeout=120):
    t = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.02)


SEQ = ["edit", "--n", "6", "--batch-size", "1", "--no-eval", *TINY]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_root):
    out = tmp_path_factory.mktemp("full") / "r"
    p = cli(*SEQ, "--save-model", "--out", str(out), env={"EDITFAST_CACHE": str(cache_root)})
    assert p.wait() == 0, p.communicate()
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, when", [
    (signal.SIGTERM, 143, "at start"), (signal.SIGTERM, 143, "after 2 batches"),
    (signal.SIGINT, 130, "after 3 batches"), (signal.SIGKILL, -9, "after 4 batches"),
    (signal.SIGTERM, 143, "saving the model"), (signal.SIGKILL, -9, "saving the model"),
])
def test_interrupted_edit_cleans_up_and_resumes_exactly(sig, code, when, uninterrupted, tmp_path):
    out = tmp_path / "r"
    p = cli(*SEQ, "--save-model", "--out", str(out))
    if when == "at start":  # the output directory exists, statistics or templates under way
        wait_for(lambda: (tmp_path / ".r.editfast-lock").exists(), p)
    elif when.startswith("after"):
        k = int(when.split()[1])
        wait_for(lambda: len(list((out / "journal").glob("batch-*.safetensors"))) >= k if out.exists() else False, p)
    else:
        wait_for(lambda: out.exists() and any(out.glob(".model.*")), p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    if sig != signal.SIGKILL:
        lines = err.strip().splitlines()
        assert "Traceback" not in err and lines[-1].startswith("editfast: "), err
        assert not list(out.glob(".model.*")) if out.exists() else True
    assert not list(tmp_path.glob(".r.editfast-lock")) or sig == signal.SIGKILL
    if not out.exists() or not Journal(out).exists():  # interrupted before its first batch: nothing left
        assert not out.exists() or not any(out.iterdir())
        p = cli(*SEQ, "--save-model", "--out", str(out))
    else:
        p = cli(*SEQ, "--save-model", "--resume", "--out", str(out))
    assert p.wait() == 0, p.communicate()
    assert not list(out.glob(".model.*"))
    got = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interruption_python_drops_in_a_del_still_stops_the_run(sig, code, tmp_path, capsys, monkeypatch):
    """A signal whose exception is raised inside a ``__del__`` (Python prints "Exception ignored" and
    goes on) still stops the run at the next batch, exit 130/143, one line, no traceback, resumable."""
    append = Journal.append

    class Dropped:
        def __del__(self):
            os.kill(os.getpid(), sig)  # the handler runs here, inside __del__: its exception is dropped

    def append_then_signal(self, entry):
        append(self, entry)
        if entry.batch == 1:
            Dropped()  # collected at once
    monkeypatch.setattr(Journal, "append", append_then_signal)
    out = tmp_path / "r"
    code_, _, err = run_cli([*SEQ, "--out", str(out)], capsys)
    assert code_ == code and "Traceback" not in err and "Exception ignored" not in err
    assert len(err.strip().splitlines()) == 1 and err.strip().startswith("editfast: "), err
    assert [e.end for e in Journal(out).read()] == [1, 2]  # stopped at the batch boundary after it arrived
    monkeypatch.setattr(Journal, "append", append)
    assert run_cli([*SEQ, "--resume", "--out", str(out)], capsys)[0] == 0
    assert [e.end for e in Journal(out).read()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_quiet_is_quiet(tmp_path):
    """--quiet: nothing on stderr from editfast or transformers on a model loaded from a directory."""
    d = tmp_path / "m"
    load_model("random:tiny-gpt2").model.save_pretrained(d)
    p = cli("edit", "--n", "1", "--model", str(d), "--templates", "fixed", "--quiet", "--no-eval",
            "--out", str(tmp_path / "o"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and err.strip() == "", err


# ------------------------------------------------------------------------------ a busy machine


def test_wait_policy_passive_only_when_busy_and_unchosen(monkeypatch):
    from editfast.core import threads as load

    assert load.busy_cores(0.01) >= 0.0
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(load, "busy_cores", lambda seconds=0.1: 1.5)
    assert load.choose_wait_policy() is None  # torch is loaded here: too late to change, left alone
    monkeypatch.setattr(load, "busy_cores", lambda seconds=0.1: 0.1)
    assert load.choose_wait_policy(torch_loaded=False) is None  # a quiet machine: spinning is fastest
    monkeypatch.setattr(load, "busy_cores", lambda seconds=0.1: 1.5)
    assert load.choose_wait_policy(torch_loaded=False) == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert load.choose_wait_policy(torch_loaded=False) == "ACTIVE"  # the user's choice stands


# ------------------------------------------------------------------------------ the study


def test_study_disk_full_at_the_report_resumes(tmp_path, monkeypatch, capsys):
    """A full disk while the study writes its report: one line naming --resume, the finished
    sessions kept (no report.md half-written), and --resume completes the study."""
    import editfast.session.study as paths  # the study's report is written through its write_text

    f = tmp_path / "s.yaml"
    f.write_text(STUDY)
    out = tmp_path / "study"
    argv = ["study", str(f), "--profile", "quick", "--out", str(out), "--quiet"]
    real = paths.write_text

    def full(path, text):
        if Path(path).name == "report.md":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(paths, "write_text", full)
    assert_refused(argv, capsys, "No space left on device", "--resume")
    assert Journal(out / "runs" / "rome-seq").exists() and not (out / "report.md").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(paths, "write_text", real)
    assert_refused(argv, capsys, "--resume")  # not empty: continue or replace
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert (out / "report.md").is_file() and (out / "study.json").is_file()
