"""The study file checked whole before the model loads (bad values refused in one line, exit 2,
nothing written), ``--plan`` (an estimate, nothing written but its cache), ``--only`` (one run at
a time, the others read back) and ``--resume``/``--only`` continuing only the same study."""

from __future__ import annotations

import json

import pytest
from helpers import STUDY, assert_refused, run_cli

import editfast.cli.study as cli_study
import editfast.session.study as session_study
from editfast.session.study import report_md


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the study file was checked")


BAD = {  # edit of helpers.STUDY -> words its one line must hold
    "seed not an integer": (lambda s: s.replace("templates: fixed", "templates: fixed\nseed: ten"), ["seed", "ten"]),
    "unknown template mode": (lambda s: s.replace("templates: fixed", "templates: random"), ["templates", "random"]),
    "unknown dtype": (lambda s: s.replace("templates: fixed", "templates: fixed\ndtype: float8"), ["dtype", "float8"]),
    "negative offset": (lambda s: s.replace("templates: fixed", "templates: fixed\noffset: -1"), ["offset"]),
    "limit below 1": (lambda s: s.replace("limit: 4", "limit: -1"), ["limit", "-1"]),
    "unknown task": (lambda s: s.replace('"sst2,wikitext"', '"sst2,wikitxt"'), ["wikitxt"]),
    "limits of a task not run": (lambda s: s.replace('"sst2,wikitext"', '"sst2"'), ["limits", "wikitext"]),
    "unknown protocol": (lambda s: s.replace("limit: 4,", "limit: 4, protocols: [standard, papr],"), ["protocols"]),
    "edit_metrics not a boolean": (lambda s: s.replace("limit: 4,", "limit: 4, edit_metrics: 'yes',"), ["edit_metrics"]),
    "not YAML": (lambda s: s.replace("eval: {", "eval: {{"), ["YAML"]),
    "n not an integer": (lambda s: s.replace("n: 2,", "n: ten,"), ["rome-seq", "n", "ten"]),
    "eval_at beyond n": (lambda s: s.replace("eval_at: [0, 1, 2]", "eval_at: [0, 1, 3]"), ["rome-seq", "eval_at", "3"]),
    "eval_at decreasing": (lambda s: s.replace("eval_at: [0, 1, 2]", "eval_at: [0, 2, 1]"), ["eval_at", "increasing"]),
    "a key of another setting": (lambda s: s.replace("n: 2,", "n: 2, sizes: [1],"), ["rome-seq", "sizes", "sequential"]),
    "rome in batches": (lambda s: s.replace("n: 2,", "n: 2, batch_size: 5,"), ["rome-seq", "at most 1", "5"]),
    "a later run: batches 0": (lambda s: s.replace("batches: 2", "batches: 0"), ["memit-seq", "batches"]),
    "a later run: unknown method": (lambda s: s.replace("method: memit, setting: batches", "method: memitt, setting: batches"),
                                    ["memit-seq", "memitt"]),
    "a later run: layers beyond the model": (lambda s: s.replace("batches: 2}", "batches: 2, hparams: {layers: [9]}}"),
                                             ["memit-seq", "layers", "9", "4 layers"]),
    "a later run: unknown hparam": (lambda s: s.replace("batches: 2}", "batches: 2, hparams: {speed: 1}}"),
                                    ["memit-seq", "speed"]),
    "n beyond the dataset": (lambda s: s.replace("sizes: [1, 2]", "sizes: [1, 5000]"), ["5000", "1000 requests"]),
    "two runs of one name": (lambda s: s.replace("name: memit-seq", "name: rome-seq"), ["two runs", "rome-seq"]),
    "a name that is a path": (lambda s: s.replace("name: memit-batch,", "name: ../x,"), ["name", "folder"]),
    "a label not a string": (lambda s: s.replace("sizes: [1, 2]", "sizes: [1, 2], label: 5"), ["label"]),
    "profile of an unknown run": (lambda s: s.replace("only: [rome-seq]", "only: [rome-sq]"), ["rome-sq"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_study_file_refused_before_the_model(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_study, "load_model", no_model)
    monkeypatch.setattr(session_study, "load_model", no_model)
    edit, words = BAD[case]
    f = tmp_path / "s.yaml"
    f.write_text(edit(STUDY))
    out = tmp_path / "o"
    prof = ["--profile", "quick"] if "profile" in case else []
    assert_refused(["study", str(f), *prof, "--out", str(out)], capsys, *words, absent=[out])
    assert_refused(["study", str(f), *prof, "--plan", "--out", str(out)], capsys, *words, absent=[out])


SMALL = """
name: small
model: random:tiny-llama
dataset: zsre-alt
templates: fixed
eval: {tasks: sst2, limit: 2}
runs:
  - {name: rome-seq, method: rome, setting: sequential, n: 1, eval_at: [0, 1]}
  - {name: memit-batch, method: memit, setting: batch, sizes: [1]}
"""


def files(d):
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_plan_only_and_same_study(tmp_path, capsys, monkeypatch):
    """--plan: every session with an estimate, nothing written but its cache, the second plan read
    from it; --only runs one run and names the missing, the next --only reads the first back and the
    report sets each session's estimate beside its measured time; a changed study file, or a folder
    that holds no study, is refused in one line naming the difference, the folder untouched."""
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "s.yaml"
    f.write_text(SMALL)
    out = tmp_path / "o"
    code, plan, err = run_cli(["study", str(f), "--plan", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    rows = [r for r in plan.splitlines() if r.startswith(("| rome-seq", "| memit-batch-1"))]
    assert len(rows) == 2 and "Estimated total" in plan and not out.exists()
    assert len(list((tmp_path / "cache" / "study-plan").glob("*.json"))) == 2  # a file per run key: rome, memit
    code, again, err = run_cli(["study", str(f), "--plan", "--quiet"], capsys)
    assert code == 0 and "read from" in again and [r for r in again.splitlines() if r in rows] == rows, err

    code, _, err = run_cli(["study", str(f), "--only", "rome-seq", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    doc = json.loads((out / "study.json").read_text())
    assert [l["label"] for l in doc["lines"]] == ["rome · one at a time"] and doc["missing"] == ["memit-batch-1"]
    assert "not finished yet): memit-batch-1" in (out / "report.md").read_text()
    assert {"curve.json", "results.json", "session.json"} <= {p.name for p in (out / "runs" / "rome-seq").iterdir()}
    assert "runs/*/journal/" in (out / ".gitignore").read_text()
    rome_curve = (out / "runs" / "rome-seq" / "curve.json").read_text()

    code, _, err = run_cli(["study", str(f), "--only", "memit-batch", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    doc = json.loads((out / "study.json").read_text())
    assert len(doc["lines"]) == 2 and doc["missing"] == []
    assert (out / "runs" / "rome-seq" / "curve.json").read_text() == rome_curve  # read back, not run again
    report = (out / "report.md").read_text()
    assert "not finished" not in report
    for s in doc["sessions"]:  # the estimate beside the measured time
        row = next(r for r in report.split("## Where the time went")[1].splitlines() if r.startswith(f"| {s['session']} "))
        assert row.split(" | ")[1:3] == [f"{s['estimate_s']:.0f}", f"{s['timings']['total_s']:.0f}"]

    before = files(out)
    f.write_text(SMALL.replace("limit: 2", "limit: 3"))
    assert_refused(["study", str(f), "--resume", "--out", str(out)], capsys, "eval.limit 2", "has 3", "small")
    assert_refused(["study", str(f), "--only", "rome-seq", "--out", str(out)], capsys, "limit")
    f.write_text(SMALL.replace("n: 1, eval_at: [0, 1]", "n: 2, eval_at: [0, 2]"))
    assert_refused(["study", str(f), "--resume", "--out", str(out)], capsys, "rome-seq", "n", "1", "2")
    assert files(out) == before
    f.write_text(SMALL)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert_refused(["study", str(f), "--resume", "--out", str(tmp_path / "other")], capsys, "holds no study")
    assert_refused(["study", str(f), "--resume", "--out", str(tmp_path / "none")], capsys, "holds no study",
                   absent=[tmp_path / "none"])
    assert_refused(["study", str(f), "--only", "nope", "--out", str(tmp_path / "o2")], capsys, "nope",
                   absent=[tmp_path / "o2"])


def test_report_time_and_fluency_from_the_points():
    """Hand-made points with the fluency keys (point["generation"], point["eval_s_by"]): fluency is a
    column of the comparison and a table of its own; the time table splits each checkpoint by part."""
    def point(e, flu):
        return {"edits": e, "seconds": 3.0 * e, "eval_s": 10.0,
                "tasks": {"rte": {"primary": "accuracy", "higher_is_better": True, "metrics": {"accuracy": 0.6},
                                  "stderr": {"accuracy": 0.05}, "n": 100, "seconds": 4.0}},
                "generation": {"fluency": flu, "fluency_stderr": 0.01, "n": 20, "prompts": 20, "seconds": 5.0},
                "eval_s_by": {"edit_metrics": 0.5, "tasks": {"rte": 4.0}, "generation": 5.0}}

    line = {"label": "memit · 10 per batch", "model": "m", "method": "memit", "setting": "sequential",
            "points": [point(0, 6.25), point(10, 5.5)]}
    doc = {"study": {"name": "t"}, "model": "m", "seconds": 60.0, "lines": [line], "plots": [],
           "sessions": [{"session": "memit", "curve": line, "estimate_s": 50.0,
                         "timings": {"total_s": 61.0, "edit_s": 30.0, "targets_s": 25.0}}]}
    md = report_md(doc)
    table = md.split("## Comparison")[1].split("\n## ")[0]
    assert table.splitlines()[2].count("| fluency |") == 1 and "6.250 → 5.500" in table
    assert md.count("## Fluency (n-gram entropy") == 1 and "## fluency" not in md and "| memit · 10 per batch | 6.250 ± 0.010 | 5.500 ± 0.010 |" in md
    time = md.split("## Where the time went")[1].splitlines()
    assert time[2] == ("| session | estimate | measured | editing | of it targets | edit metrics | rte | generation "
                       "| weights, other |")
    assert time[4] == "| memit | 50 | 61 | 30 | 25 | 1 | 8 | 10 | 1 |"


def test_run_study_api_checks_every_run_before_writing(tmp_path):
    """The library path (no CLI preflight): a later run's layers beyond the model refused after the
    model loads, before anything is written."""
    from editfast.core.errors import EditfastError
    from editfast.session.study import load_study, run_study

    f = tmp_path / "s.yaml"
    f.write_text(SMALL.replace("sizes: [1]}", "sizes: [1], hparams: {layers: [9]}}"))
    with pytest.raises(EditfastError, match="memit-batch.*layers"):
        run_study(load_study(f), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
