"""Every code block of README.md and docs/*.md that a user would run is run here, so an example
cannot rot or mislead.

- The blocks are found when the tests are collected (``blocks()``): a block added to any page is
  run without a change here. One test per block, named ``page:line``.
- ```python blocks run as they are written, in-process, each in a fresh working directory that
  holds the files the examples name (``workdir``: an edit run ``runs/memit-10``, its adapter
  ``adapters/memit-10``, EasyEdit's ``hparams/ROME/llama-7b.yaml``), after the substitutions below.
- ```bash blocks run line by line (a ``\\`` continues a line; ``#`` starts a comment): a line
  ``editfast ...`` through editfast's command line, ``python -m editfast.harness ...`` through the
  lm-eval bridge, each in-process and required to exit 0. Any other command fails the test.
- A block that cannot run here (it installs packages, needs GPUs, the internet or hours) carries
  the marker ``<!-- not run: REASON -->`` on the line before its fence; the reason is required.
  A block with no language (or ``text``) is output or a synopsis, not code; any other language
  fails unless marked.

SUBSTITUTIONS is the one place where the examples are changed to run in the test suite's time:
SmolLM2 becomes the tiny random Llama and the documented sizes small ones. Nothing else is changed:
a new block runs at the sizes it states, so keep examples small, add its substitution here, or
mark it.
"""

import os
import re
import shlex
import shutil
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```|~~~)(?P<lang>[^\n`]*)\n(?P<code>.*?)^(?P=indent)(?P=fence)[ \t]*$",
                   re.MULTILINE | re.DOTALL)  # also a block indented in a list item
MARK = re.compile(r"<!--\s*not run:\s*(?P<why>\S.*?)\s*-->\s*$")
TEXT = {"", "text"}  # output, synopses: not code

SUBSTITUTIONS = [  # (pattern, replacement, why): applied to every runnable block, in this order
    (r"smollm2-135m", "random:tiny-llama", "the tiny random Llama instead of SmolLM2 (seconds, not minutes)"),
    (r"\bn=10\b", "n=2", "2 requests instead of 10"),
    (r"eval_limit=50\b", "eval_limit=2", "2 examples per task"),
    (r"eval_at=\[0, 5, 10\]", "eval_at=[0, 2]", "checkpoints within the 2 edits"),
    (r"\.undo\(5\)", ".undo(1)", "undo within the 2 edits"),
    (r"task_manager\(\)", "task_manager(include_defaults=False)",
     "editfast's task files only: lm-eval's own index costs seconds and is not what the example runs"),
    (r"(--tasks editfast_\w+)", r"\1 --limit 4", "4 documents"),
    (r'(tasks=\["editfast_\w+"\])', r"\1, limit=4", "4 documents"),
]


def substituted(code: str) -> str:
    for pattern, replacement, _ in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


def blocks() -> list:
    """(page, line, language, code, not-run reason or None) of every fenced block of the pages."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARK.search(before)
            code = textwrap.dedent(m["code"])
            out.append(pytest.param(page, line, m["lang"].strip().lower(), code, mark and mark["why"],
                                    id=f"{page.relative_to(ROOT).as_posix()}:{line}"))
    return out


def commands(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [c for c in (line.split(" #", 1)[0].strip() for line in joined.splitlines()) if c and not c.startswith("#")]


def run_command(cmd: str) -> None:
    argv = shlex.split(cmd)
    if argv[0] == "editfast":
        from editfast.cli import main
    elif argv[:3] == ["python", "-m", "editfast.harness"]:
        from editfast.harness import main

        argv = argv[2:]
    else:
        pytest.fail(f"cannot run {cmd!r} here: mark its block <!-- not run: REASON --> or run editfast commands only")
    with pytest.raises(SystemExit) as e:
        main(argv[1:])
        raise SystemExit(0)
    assert not e.value.code, f"{cmd!r} exited {e.value.code}"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The files the examples name, made once: a 2-edit MEMIT run of the tiny Llama (runs/memit-10),
    the base in Hugging Face layout and the run's adapter naming it (adapters/memit-10), EasyEdit's
    ROME file for Llama-7B with the tiny model's name and layers (hparams/ROME/llama-7b.yaml)."""
    home = tmp_path_factory.mktemp("home")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        for cmd in [("editfast edit --method memit --n 2 --model random:tiny-llama --templates fixed --no-eval --quiet "
                     "--set v_num_grad_steps=3 --out runs/memit-10"),
                    "editfast export-base random:tiny-llama base/tiny-llama --quiet",
                    "editfast export runs/memit-10 --lora adapters/memit-10 --base base/tiny-llama --quiet"]:
            run_command(cmd)
    finally:
        os.chdir(cwd)
    easyedit = (ROOT / "tests/data/easyedit_hparams/ROME/llama-7b.yaml").read_text()
    easyedit = re.sub(r"(?m)^model_name: .*$", "model_name: random:tiny-llama", easyedit)
    easyedit = re.sub(r"(?m)^layers: .*$", "layers: [1]", easyedit)
    easyedit = re.sub(r"(?m)^v_loss_layer: .*$", "v_loss_layer: 3", easyedit)
    easyedit = re.sub(r"(?m)^v_num_grad_steps: .*$", "v_num_grad_steps: 3", easyedit)
    (home / "hparams/ROME").mkdir(parents=True)
    (home / "hparams/ROME/llama-7b.yaml").write_text(easyedit)
    return home


@pytest.fixture
def workdir(home, tmp_path, monkeypatch):
    """A fresh working directory holding a copy of ``home`` (the base model linked, not copied) and,
    as in a checkout, the repository's ``studies/``."""
    (tmp_path / "studies").symlink_to(ROOT / "studies")
    for entry in home.iterdir():
        if entry.name == "base":
            (tmp_path / "base").symlink_to(entry)
        else:
            shutil.copytree(entry, tmp_path / entry.name, symlinks=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_the_runner_finds_the_blocks():
    """The runner sees blocks of every kind, and the marker with its reason."""
    found = blocks()
    langs = {p.values[2] for p in found}
    assert {"python", "bash"} <= langs and len(found) >= 8
    assert any(p.values[4] for p in found)
    assert commands("editfast a \\\n   --b 1  # why\n# c\n\npython -m editfast.harness run\n") == \
        ["editfast a --b 1", "python -m editfast.harness run"]
    assert substituted('load_model("smollm2-135m"); load_dataset("counterfact", n=10)') == \
        'load_model("random:tiny-llama"); load_dataset("counterfact", n=2)'
    assert MARK.search("<!-- not run: needs a GPU -->")["why"] == "needs a GPU"
    assert MARK.search("<!-- not run: -->") is None  # a marker states its reason
    with pytest.raises(pytest.fail.Exception, match="mark its block"):
        run_command("pip install editfast")


@pytest.mark.parametrize("page, line, lang, code, not_run", blocks())
def test_block_runs(page, line, lang, code, not_run, request):
    where = f"{page.relative_to(ROOT).as_posix()}:{line}"
    if not_run is not None or lang in TEXT:
        return  # marked with its reason, or not code
    if lang not in ("python", "bash"):
        pytest.fail(f"{where}: a ```{lang} block cannot run here: mark it <!-- not run: REASON -->")
    request.getfixturevalue("workdir")
    code = substituted(code)
    if lang == "python":
        exec(compile(code, where, "exec"), {"__name__": "__main__"})  # noqa: S102 (the documentation's own code)
    else:
        for cmd in commands(code):
            run_command(cmd)
