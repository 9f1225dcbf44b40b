"""The CLI: a real edit run on a tiny model, and every kind of bad input (one line, exit 2, no files)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import assert_refused, run_cli

from editfast.session.journal import Journal

TINY = ["--model", "random:tiny-llama", "--templates", "fixed", "--quiet"]


def run(argv, capsys):
    return run_cli(argv, capsys)


def test_edit_memit_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(["edit", "--method", "memit", "--n", "4", "--batch-size", "2", "--out", str(out), *TINY], capsys)
    assert code == 0, err
    assert "efficacy" in stdout and "edits/s" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["n"] == 4 and res["config"]["batch_size"] == 2
    assert len(res["per_request"]) == 4 and {"pre", "post"} <= set(res["per_request"][0])
    assert set(res["summary"]["post"]) >= {"efficacy_success", "paraphrase_success", "neighborhood_success"}
    assert res["timings"]["edit_s"] > 0 and len(res["timings"]["batches"]) == 2
    entries = Journal(out).read()
    assert [(e.start, e.end) for e in entries] == [(0, 2), (2, 4)]
    assert [u.weight for u in entries[0].updates] == ["model.layers.1.mlp.down_proj.weight",
                                                      "model.layers.2.mlp.down_proj.weight"]
    assert entries[0].updates[0].U.shape[1] == 2  # rank = facts per batch
    assert not [p for p in out.rglob(".*")]  # no temp files left


def test_counterfact_full_beyond_the_500_records_is_said(tmp_path, capsys):
    """--n 500 and --n 501 never edit different datasets silently: without --dataset, beyond the
    500 full-schema records the run edits counterfact-full and says so (its first line and
    results.json); --dataset counterfact beyond them is refused, naming counterfact-full."""
    assert_refused(["edit", "--n", "2", "--offset", "499", "--dataset", "counterfact", "--no-eval",
                    "--out", str(tmp_path / "r"), *TINY], capsys, "counterfact-full", absent=[tmp_path / "r"])
    code, stdout, err = run(["edit", "--n", "2", "--offset", "21603", "--no-eval", "--out", str(tmp_path / "r"), *TINY],
                            capsys)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("editfast: memit, 2 edits of counterfact-full from 21603 (CounterFact in "
                                             "EasyEdit's schema"), stdout
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["case_id"] for r in res["per_request"]] == [21917, 21918]
    assert res["config"]["dataset"]["name"] == "counterfact-full" and "EasyEdit" in res["config"]["dataset"]["schema"]


def test_edit_without_out_writes_a_new_run_folder(tmp_path, capsys, monkeypatch):
    """The design's command as written (no --out): runs/METHOD-N below the current directory, a new
    one for every run (an earlier run is never overwritten), named on the first line."""
    monkeypatch.chdir(tmp_path)
    firsts = []
    for _ in range(2):
        code, stdout, err = run(["edit", "--n", "1", "--no-eval", *TINY], capsys)
        assert code == 0, err
        firsts.append(stdout.splitlines()[0])
    assert firsts[0].endswith("run folder runs/memit-1") and firsts[1].endswith("run folder runs/memit-1-2"), firsts
    assert (tmp_path / "runs" / "memit-1" / "results.json").is_file()
    assert (tmp_path / "runs" / "memit-1-2" / "results.json").is_file()
    assert_refused(["edit", "--n", "1", "--resume", *TINY], capsys, "--resume needs --out")


def test_edit_rome_save_model(tmp_path, capsys):
    out = tmp_path / "rome"
    code, stdout, err = run(["edit", "--method", "rome", "--n", "2", "--save-model", "--out", str(out), *TINY], capsys)
    assert code == 0, err
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["batch_size"] == 1 and res["hparams"]["layers"] == [1]


def test_zsre_dataset(tmp_path, capsys):
    code, stdout, err = run(["edit", "--dataset", "zsre", "--n", "2", "--out", str(tmp_path / "z"), *TINY], capsys)
    assert code == 0, err
    assert "rewrite acc" in stdout


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("records,word", [
    ([{"prompt": "The capital is", "subject": "France", "target_new": "Rome"}], "subject"),
    ([{"prompt": "{} is in", "subject": "Paris", "target_new": " "}], "target"),
    ([{"prompt": "{} is in", "subject": "Paris"}], "target_new"),
], ids=["subject missing from prompt", "empty target", "missing field"])
def test_bad_request_file(records, word, tmp_path, capsys):
    data = write(tmp_path / "reqs.json", records)
    code, _, err = run(["edit", "--dataset", str(data), "--n", "1", "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_corrupt_and_missing_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": ')
    code, _, err = run(["edit", "--dataset", str(bad), "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "bad.json" in err
    code, _, err = run(["edit", "--hparams", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "none.yaml" in err
    hp = tmp_path / "hp.yaml"
    hp.write_text("layers: [1]\nmom2_update_weight: lots\n")
    code, _, err = run(["edit", "--hparams", str(hp), "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "mom2_update_weight" in err
    hp.write_text("layers: [1]\nnot_a_key: 3\n")
    code, _, err = run(["edit", "--hparams", str(hp), "--out", str(tmp_path / "o"), *TINY], capsys)
    assert code == 2 and "not_a_key" in err and "valid keys" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = run(["edit", "--out", str(ro / "x"), *TINY], capsys)
    assert code == 2 and "not writable" in err


def test_out_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    code, _, err = run(["edit", "--out", str(f / "sub"), *TINY], capsys)
    assert code == 2 and "not writable" in err
    assert f.read_text() == "keep"


def test_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "editfast.cli", "edit", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--method" in res.stdout and "--batch-size" in res.stdout


def test_help_lists_every_command_without_torch():
    """`editfast --help` imports no command module (so no torch) and lists each command with the
    opening of its own help (the table of editfast/cli/__init__.py)."""
    code = "import sys; from editfast.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from editfast.cli import COMMANDS, cli

    for name, (_, opening) in COMMANDS.items():
        assert f"  {name} " in res.stdout
        assert " ".join(cli.get_command(None, name).help.split("\n\n")[0].split()) == opening, name


def test_quiet_is_quiet_and_progress_is_shown(tmp_path, capsys):
    """--quiet: nothing on stderr, not even the bar transformers draws while de-quantising a GGUF.
    Without it, template generation (minutes on a 7B model) shows its progress."""
    from helpers.gguf import write_llama_gguf

    from editfast.methods.locate_then_edit.templates import context_templates
    from editfast.models.load import load_model

    lm = load_model("random:tiny-llama", seed=1)
    write_llama_gguf(lm.model, tmp_path / "tiny.gguf")
    code, stdout, err = run(["eval", "--model", str(tmp_path / "tiny.gguf"), "--tasks", "sst2", "--limit", "2",
                             "--quiet", "--out", str(tmp_path / "out")], capsys)
    assert code == 0 and "sst2" in stdout and err == ""
    templates = context_templates(lm, "groups", None, seed=0, progress=True)
    assert len(templates[1]) == 5 and "context templates" in capsys.readouterr().err


def test_options_list_their_choices():
    res = subprocess.run([sys.executable, "-m", "editfast.cli", "eval", "--help"], capture_output=True, text=True)
    assert "float32|bfloat16|float16" in res.stdout and "cpu|cuda|cuda:N|mps" in res.stdout
    assert "--batch-tokens" in res.stdout and "--batch-size" not in res.stdout  # edit's --batch-size counts edits
