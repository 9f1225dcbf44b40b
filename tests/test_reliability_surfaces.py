"""Bad inputs of the newer surfaces (undo, export, eval's options, device and memory, --rect,
--norm-anchor, --mend and each method's hyper-parameters, EasyEdit files with odd values, stats
import/export, train-mend), probed as ``edit`` is in test_faults: one line, exit 2, nothing left
beside or in the output, the run read untouched, no offload folder left. Then the journal's
checksums, OS errors on the user's paths, and SIGINT/SIGTERM during eval, undo, export, stats
export, train-mend and an edit's --save-model (130/143, nothing half-written)."""

import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

import editfast.cli.eval
import editfast.cli.shared
import editfast.cli.train_mend
import editfast.cli.undo
import editfast.methods.locate_then_edit.stats_files
import editfast.session.export
from editfast.cli import main
from editfast.cli.exits import outcome
from editfast.core.errors import EditfastError
from editfast.data.requests import load_dataset
from editfast.models.load import load_model
from editfast.session.journal import CHECKSUM, Journal, checksum, load_run
from editfast.session.session import EditSession

TINY = ["--model", "random:tiny-llama", "--quiet"]
EDIT = ["edit", "--n", "2", "--templates", "fixed", "--no-eval", *TINY]
EVAL = ["eval", *TINY, "--tasks", "sst2", "--limit", "2"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: the device exists")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="the machine has MPS")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("surfaces-cache")


@pytest.fixture(autouse=True)
def cache(cache_root, monkeypatch):
    monkeypatch.setenv("EDITFAST_CACHE", str(cache_root))
    return cache_root


@pytest.fixture(scope="module")
def made(tmp_path_factory, cache_root):
    """A 4-edit MEMIT run (batches of 2), a MEND network trained one step, and tiny-llama saved as a
    Hugging Face folder: what the cases read."""
    root = tmp_path_factory.mktemp("surfaces")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITFAST_CACHE", str(cache_root))
        lm = load_model("random:tiny-llama")
        EditSession(lm, "memit", load_dataset("counterfact", 4), batch_size=2, templates="fixed", evaluate=False,
                    progress=False, out=root / "run").run()
        lm = load_model("random:tiny-llama")  # unedited
        lm.model.save_pretrained(root / "hf")
        lm.tokenizer.save_pretrained(root / "hf")
        main(["train-mend", *TINY, "--data", "counterfact", "--steps", "1", "--heldout", "0",
              "--out", str(root / "mend")])
    return root


def entry(run: Path, b: int = 1) -> Path:
    return run / "journal" / f"batch-{b:06d}.safetensors"


def change(run: Path, fn, b: int = 1, resum: bool = False) -> Path:
    """Entry ``b`` rewritten after fn(meta, tensors) (its checksum made anew with ``resum``)."""
    with safe_open(str(entry(run, b)), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    fn(meta, tensors)
    if resum and CHECKSUM in meta:
        meta[CHECKSUM] = checksum(meta, tensors)
    save_file(tensors, str(entry(run, b)), metadata=meta)
    return run


def _bump_u(meta, tensors):
    tensors["u0.U"][0, 0] += 1e-3


def _case_ids(meta, tensors):
    header = json.loads(meta["entry"])
    header["case_ids"] = list(reversed(header["case_ids"]))
    meta["entry"] = json.dumps(header)


def _no_checksum(meta, tensors):
    meta.pop(CHECKSUM)


class Ctx:
    """What a case builds its command from: tmp (t), the run (run, read-only), a changed copy of it
    (changed), a regular file (file), the MEND network (mend), the HF folder (hf), out."""

    def __init__(self, made: Path, tmp: Path):
        self.t, self.made, self.run, self.mend, self.hf = tmp, made, made / "run", made / "mend", made / "hf"
        self.file = tmp / "afile"
        self.file.write_text("x")
        self.out = str(tmp / "out")

    @property
    def changed(self) -> str:
        return str(change(Path(shutil.copytree(self.run, self.t / "changed")), _bump_u))

    def text(self, name: str, text: str) -> str:
        (self.t / name).write_text(text)
        return str(self.t / name)

    def npz(self, name: str, **arrays) -> str:
        np.savez(self.t / name, **arrays)
        return str(self.t / name)

    def mend_copy(self, fn) -> str:
        d = Path(shutil.copytree(self.mend, self.t / "mend"))
        fn(d)
        return str(d)


def stats(n=256, count=5, **kw):
    return {"mom2.mom2": np.eye(n), "mom2.count": np.array(count), **kw}


SURFACES = {  # id: (argv from a Ctx, words of the one line[, a mark])
    # undo
    "undo: RUN a file": (lambda c: ["undo", str(c.file), "--to", "2", "--out", c.out], ["is a file"]),
    "undo: --to not a number": (lambda c: ["undo", str(c.run), "--to", "two", "--out", c.out], ["--to"]),
    "undo: --out under a file": (lambda c: ["undo", str(c.run), "--to", "2", "--out", str(c.file / "o")],
                                 ["afile", "not a directory"]),
    "undo: --out a file": (lambda c: ["undo", str(c.run), "--to", "2", "--out", str(c.file)], ["is a file"]),
    "undo: --out the run's journal, --force": (lambda c: ["undo", str(c.run), "--to", "2", "--force", "--out",
                                                          str(c.run / "journal")], ["would replace the run"]),
    "undo: --out above the run, --force": (lambda c: ["undo", str(c.run), "--to", "2", "--force", "--out",
                                                      str(c.made)], ["would replace the run"]),
    "undo: an entry's bytes changed": (lambda c: ["undo", c.changed, "--to", "2", "--out", c.out],
                                       ["batch-000001", "checksum"]),
    "undo: an entry's header changed": (lambda c: ["undo", str(change(Path(shutil.copytree(c.run, c.t / "h")),
                                                                      _case_ids)), "--to", "2", "--out", c.out],
                                        ["batch-000001", "checksum"]),
    "undo: --save-model, another model": (lambda c: ["undo", str(c.run), "--to", "2", "--save-model", "--model",
                                                     "random:tiny-gpt2", "--out", c.out], ["fingerprint"]),
    "undo: --save-model, no such preset": (lambda c: ["undo", str(c.run), "--to", "2", "--save-model", "--model",
                                                      "random:nosuch", "--out", c.out], ["nosuch"]),
    # export
    "export: RUN a file": (lambda c: ["export", str(c.file), "--lora", c.out], ["is a file"]),
    "export: RUN missing": (lambda c: ["export", str(c.t / "none"), "--lora", c.out], ["not an edit run"]),
    "export: --lora under a file": (lambda c: ["export", str(c.run), "--lora", str(c.file / "o")],
                                    ["not a directory"]),
    "export: --lora ''": (lambda c: ["export", str(c.run), "--lora", ""], ["empty path"]),
    "export: --lora the run's journal, --force": (lambda c: ["export", str(c.run), "--force", "--lora",
                                                             str(c.run / "journal")], ["would replace the run"]),
    "export: --to off a boundary": (lambda c: ["export", str(c.run), "--lora", c.out, "--to", "3"], ["boundary"]),
    "export: --to 0": (lambda c: ["export", str(c.run), "--lora", c.out, "--to", "0"], ["at least one"]),
    "export: --to beyond": (lambda c: ["export", str(c.run), "--lora", c.out, "--to", "99"], ["beyond"]),
    "export: --dtype int8": (lambda c: ["export", str(c.run), "--lora", c.out, "--dtype", "int8"], ["--dtype"]),
    "export: another model": (lambda c: ["export", str(c.run), "--lora", c.out, "--model", "random:tiny-gpt2"],
                              ["fingerprint"]),
    "export: a model path that is gone": (lambda c: ["export", str(c.run), "--lora", c.out, "--model",
                                                     str(c.t / "gone")], ["not available"]),
    "export: an entry's bytes changed": (lambda c: ["export", c.changed, "--lora", c.out], ["batch-000001",
                                                                                           "checksum"]),
    # eval
    "eval: --edits, an entry's bytes changed": (lambda c: [*EVAL, "--edits", c.changed, "--out", c.out],
                                                ["batch-000001", "checksum"]),
    "eval: --edits a file": (lambda c: [*EVAL, "--edits", str(c.file), "--out", c.out], ["is a file"]),
    "eval: --out the --edits run, --force": (lambda c: [*EVAL, "--edits", str(c.run), "--force", "--out",
                                                        str(c.run)], ["would replace the run"]),
    "eval: --out under a file": (lambda c: [*EVAL, "--out", str(c.file / "o")], ["not a directory"]),
    "eval: --out a file": (lambda c: [*EVAL, "--out", str(c.file)], ["is a file"]),
    "eval: --protocol": (lambda c: [*EVAL, "--protocol", "nope", "--out", c.out], ["--protocol"]),
    "eval: --engine vllm": (lambda c: [*EVAL, "--engine", "vllm", "--out", c.out], ["vllm"]),
    "eval: --tasks ''": (lambda c: ["eval", *TINY, "--tasks", "", "--out", c.out], ["no task"]),
    "eval: --limit x": (lambda c: [*EVAL, "--limit", "x", "--out", c.out], ["--limit"]),
    "eval: --batch-tokens nan": (lambda c: [*EVAL, "--batch-tokens", "nan", "--out", c.out], ["--batch-tokens"]),
    "eval: --dtype int8": (lambda c: [*EVAL, "--dtype", "int8", "--out", c.out], ["--dtype"]),
    "eval: --model a missing folder": (lambda c: ["eval", "--model", str(c.t / "m"), "--out", c.out], ["unknown"]),
    # device and memory
    "eval: --device cuda, none here": (lambda c: [*EVAL, "--device", "cuda", "--out", c.out], ["cuda"], NO_CUDA),
    "edit: --device cuda:7, none here": (lambda c: [*EDIT, "--device", "cuda:7", "--out", c.out], ["cuda:7"],
                                         NO_CUDA),
    "eval: --device mps, none here": (lambda c: [*EVAL, "--device", "mps", "--out", c.out], ["mps"], NO_MPS),
    "eval: --device gpu0": (lambda c: [*EVAL, "--device", "gpu0", "--out", c.out], ["cuda:N"]),
    "eval: --max-memory without --device auto": (lambda c: [*EVAL, "--max-memory", "cpu=1GiB", "--out", c.out],
                                                 ["--device auto"]),
    "eval: --max-memory cpu:1GiB": (lambda c: [*EVAL, "--max-memory", "cpu:1GiB", "--out", c.out], ["DEVICE=SIZE"]),
    "eval: --max-memory gpu=1GiB": (lambda c: [*EVAL, "--max-memory", "gpu=1GiB", "--out", c.out], ["gpu=1GiB"]),
    "edit: --max-memory too little (a preset)": (lambda c: [*EDIT, "--device", "auto", "--max-memory", "cpu=10KiB",
                                                            "--out", c.out], ["cpu=10KiB", "too little"]),
    "eval: --max-memory 0 (a preset)": (lambda c: [*EVAL, "--device", "auto", "--max-memory", "cpu=0,disk=0",
                                                   "--out", c.out], ["cpu=0", "too little"]),
    "eval: --max-memory too little (a folder)": (lambda c: ["eval", "--model", str(c.hf), "--quiet", "--tasks",
                                                            "sst2", "--limit", "2", "--device", "auto",
                                                            "--max-memory", "cpu=10KiB", "--out", c.out],
                                                 ["too little"]),
    # method options
    "edit: --rect 0": (lambda c: [*EDIT, "--rect", "0", "--out", c.out], ["--rect"]),
    "edit: --rect 1.5": (lambda c: [*EDIT, "--rect", "1.5", "--out", c.out], ["--rect"]),
    "edit: --rect nan": (lambda c: [*EDIT, "--rect", "nan", "--out", c.out], ["rect"]),
    "edit: --rect half": (lambda c: [*EDIT, "--rect", "half", "--out", c.out], ["--rect"]),
    "edit: --rect with mend": (lambda c: [*EDIT, "--method", "mend", "--rect", "0.5", "--mend", str(c.mend),
                                          "--out", c.out], ["--rect", "mend is not one"]),
    "edit: --norm-anchor with kn": (lambda c: [*EDIT, "--method", "kn", "--norm-anchor", "--out", c.out],
                                    ["--norm-anchor", "kn is not one"]),
    "edit: --set rect=2": (lambda c: [*EDIT, "--set", "rect=2", "--out", c.out], ["rect=2"]),
    "edit: --mend with memit": (lambda c: [*EDIT, "--mend", str(c.mend), "--out", c.out], ["memit has none"]),
    "edit: --mend missing": (lambda c: [*EDIT, "--method", "mend", "--mend", str(c.t / "no"), "--out", c.out],
                             ["not found"]),
    "edit: --mend a file": (lambda c: [*EDIT, "--method", "mend", "--mend", str(c.file), "--out", c.out],
                            ["afile"]),
    "edit: mend without a network": (lambda c: [*EDIT, "--method", "mend", "--out", c.out], ["train-mend"]),
    "edit: --mend of another model": (lambda c: [*EDIT, "--method", "mend", "--mend", str(c.mend), "--model",
                                                 "random:tiny-gpt2", "--out", c.out], ["another model"]),
    "edit: --mend, mend.json broken": (lambda c: [*EDIT, "--method", "mend", "--mend", c.mend_copy(
        lambda d: (d / "mend.json").write_text("{")), "--out", c.out], ["mend.json"]),
    "edit: --mend, mend.json other layers": (lambda c: [*EDIT, "--method", "mend", "--mend", c.mend_copy(
        lambda d: (d / "mend.json").write_text(json.dumps({**json.loads((d / "mend.json").read_text()),
                                                           "layers": [0]}))), "--out", c.out], ["other weights"]),
    "edit: --mend, network truncated": (lambda c: [*EDIT, "--method", "mend", "--mend", c.mend_copy(
        lambda d: (d / "mend.safetensors").write_bytes((d / "mend.safetensors").read_bytes()[:500])),
        "--out", c.out], ["mend.safetensors"]),
    **{f"edit: --method {m} --set {kv}": (lambda c, m=m, kv=kv: [*EDIT, "--method", m, "--set", kv, "--out", c.out],
                                          [kv.split("=")[0]])
       for m, kv in [("alphaedit", "nullspace_threshold=-1"), ("emmet", "emmet_lambda=nan"),
                     ("pmet", "v_num_grad_steps=0"), ("kn", "steps=-1"), ("ultraedit", "lr=abc"),
                     ("memit", "mend_dir=/x")]},  # ROME, MEMIT, R-ROME's: test_reliability_hparams
    # EasyEdit / original hyper-parameter files with odd values
    **{f"edit: --hparams {name}": (lambda c, name=name, text=text: [*EDIT, "--hparams", c.text(name, text),
                                                                    "--out", c.out], words)
       for name, text, words in [
           ("empty.yaml", "", ["mapping"]), ("list.yaml", "- 1\n", ["mapping"]),
           ("tab.yaml", "layers:\n\t- 1\n", ["tab.yaml", "line 2"]),
           ("twice.yaml", "v_lr: 0.5\nv_lr: 0.1\n", ["v_lr", "twice", "line 2"]),
           ("alg.yaml", "alg_name: NOPE\n", ["NOPE"]), ("alg-list.yaml", "alg_name: [MEMIT]\n", ["alg_name"]),
           ("model-number.yaml", "model_name: 5\n", ["model_name"]), ("fp16.yaml", "fp16: maybe\n", ["fp16"]),
           ("device.yaml", "device: gpu0\n", ["gpu0"]), ("device-neg.yaml", "device: -1\n", ["device"]),
           ("parallel.yaml", "model_parallel: sometimes\n", ["model_parallel"]),
           ("layers-all.yaml", "layers: all\n", ["layers"]), ("layers-neg.yaml", "layers: [-1]\n", ["layers"]),
           ("layers-bool.yaml", "layers: [true]\n", ["layers[0]"]), ("lr-inf.yaml", "v_lr: .inf\n", ["v_lr"]),
           ("lr-text.yaml", "v_lr: fast\n", ["v_lr"]), ("samples.yaml", "mom2_n_samples: 1500.5\n", ["mom2_n_samples"]),
           ("module.yaml", "rewrite_module_tmp: 'model.layers.{}.nope'\n", ["does not match"]),
           ("corpus.yaml", "mom2_dataset: nosuch\n", ["nosuch"]), ("stats-dir.yaml", "stats_dir: ''\n", ["stats_dir"]),
           ("comma.json", '{"layers": [1],}', ["not valid JSON"])]},
    "edit: --hparams a folder": (lambda c: [*EDIT, "--hparams", str(c.t), "--out", c.out], ["not found"]),
    "edit: --hparams binary": (lambda c: [*EDIT, "--hparams", (c.t / "b.yaml").write_bytes(b"\xff\xfe\x00" * 9) and
                                          str(c.t / "b.yaml"), "--out", c.out], ["b.yaml"]),
    # stats import / export
    "stats import: missing": (lambda c: ["stats", "import", str(c.t / "n.npz"), *TINY], ["not found"]),
    "stats import: a folder": (lambda c: ["stats", "import", str(c.t), *TINY], ["is a directory"]),
    "stats import: not a .npz": (lambda c: ["stats", "import", str(c.file), *TINY], ["cannot read"]),
    "stats import: no mom2": (lambda c: ["stats", "import", c.npz("x.npz", a=np.zeros(2)), *TINY], ["mom2.mom2"]),
    "stats import: wrong shape": (lambda c: ["stats", "import", c.npz("y.npz", **stats(3)), "--layer", "1", *TINY],
                                  ["[3, 3]", "256"]),
    "stats import: non-finite": (lambda c: ["stats", "import", c.npz("z.npz", **stats(4, **{"mom2.mom2": np.full(
        (4, 4), np.nan)})), "--layer", "1", *TINY], ["non-finite"]),
    "stats import: count 0": (lambda c: ["stats", "import", c.npz("c.npz", **stats(4, 0)), "--layer", "1", *TINY],
                              ["mom2.count"]),
    "stats import: --layer 99": (lambda c: ["stats", "import", c.npz("l.npz", **stats()), "--layer", "99", *TINY],
                                 ["--layer 99"]),
    "stats import: --set mom2_n_samples=-3": (lambda c: ["stats", "import", c.npz("o.npz", **stats()), "--layer",
                                                         "1", *TINY, "--set", "mom2_n_samples=-3"],
                                              ["mom2_n_samples"]),
    "stats import: stats_dir under a file": (lambda c: ["stats", "import", c.npz("s.npz", **stats()), "--layer", "1",
                                                        *TINY, "--hparams", c.text("sd.yaml", f"stats_dir: "
                                                                                   f"{c.file / 'sub'}\n")],
                                             ["cannot write the statistics cache", "not a directory"]),
    "stats export: no --layer": (lambda c: ["stats", "export", "--out", str(c.t / "s.npz"), *TINY], ["--layer"]),
    "stats export: --out not .npz": (lambda c: ["stats", "export", "--out", str(c.t / "s.txt"), "--layer", "1",
                                                *TINY], [".npz"]),
    "stats export: --out under a file": (lambda c: ["stats", "export", "--out", str(c.file / "s.npz"), "--layer",
                                                    "1", *TINY], ["afile", "a file is where a folder is needed"]),
    "stats export: --out a folder": (lambda c: ["stats", "export", "--out", (c.t / "d.npz").mkdir() or
                                                str(c.t / "d.npz"), "--layer", "1", *TINY], ["is a directory"]),
    "stats export: --layer 99": (lambda c: ["stats", "export", "--out", str(c.t / "s.npz"), "--layer", "99", *TINY],
                                 ["--layer 99"]),
    "stats export: --method mend": (lambda c: ["stats", "export", "--out", str(c.t / "s.npz"), "--layer", "1",
                                               "--method", "mend", *TINY], ["--method"]),
    # train-mend
    "train-mend: --steps 0": (lambda c: ["train-mend", *TINY, "--steps", "0", "--out", c.out], ["--steps"]),
    "train-mend: --heldout -1": (lambda c: ["train-mend", *TINY, "--heldout", "-1", "--out", c.out], ["--heldout"]),
    "train-mend: --heldout leaves too few": (lambda c: ["train-mend", *TINY, "--data", "counterfact", "--heldout",
                                                        "499", "--out", c.out], ["requests"]),
    "train-mend: --data missing": (lambda c: ["train-mend", *TINY, "--data", str(c.t / "d.json"), "--out", c.out],
                                   ["not found"]),
    "train-mend: --data broken": (lambda c: ["train-mend", *TINY, "--data", c.text("d.json", "[{"), "--out", c.out],
                                  ["json"]),
    "train-mend: --set mend_dir": (lambda c: ["train-mend", *TINY, "--set", "mend_dir=/x", "--out", c.out],
                                   ["mend_dir"]),
    "train-mend: --set lr=-1": (lambda c: ["train-mend", *TINY, "--set", "lr=-1", "--out", c.out], ["lr"]),
    "train-mend: --hparams a list": (lambda c: ["train-mend", *TINY, "--hparams", c.text("l.yaml", "[1]"),
                                                "--out", c.out], ["mapping"]),
    "train-mend: --out under a file": (lambda c: ["train-mend", *TINY, "--data", "counterfact", "--steps", "1",
                                                  "--heldout", "2", "--out", str(c.file / "o")], ["not a directory"]),
    "train-mend: --device gpu": (lambda c: ["train-mend", *TINY, "--device", "gpu", "--out", c.out], ["--device"]),
    # edit --resume
    "edit --resume: an entry's bytes changed": (lambda c: ["edit", "--n", "4", "--batch-size", "2", "--templates",
                                                           "fixed", "--no-eval", *TINY, "--resume", "--out",
                                                           c.changed], ["batch-000001", "checksum"]),
    "edit --resume: a folder with no run": (lambda c: [*EDIT, "--resume", "--out", str(c.t)], ["no editfast run"]),
}


def _tree(d: Path) -> dict:
    """Every path below ``d`` with its size and modification time (a rewrite changes the time)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def _offload_folders() -> set:
    return set(Path(tempfile.gettempdir()).glob(f"editfast-offload-{os.getpid()}-*"))


@pytest.mark.parametrize("case", [pytest.param(k, marks=v[2:]) for k, v in SURFACES.items()], ids=list(SURFACES))
def test_bad_input_refused(case, made, tmp_path, capsys):
    """One line naming the problem, exit 2; no --out, no staging or lock beside it, the run read and the
    MEND network untouched, no offload folder left."""
    build, words = SURFACES[case][:2]
    c = Ctx(made, tmp_path)
    argv = build(c)
    before, offload = _tree(made), _offload_folders()
    assert_refused(argv, capsys, *words, absent=[tmp_path / "out"])
    assert _tree(made) == before, "the run or the network it read changed"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a lock or staging folder was left"
    assert _offload_folders() <= offload, "an offload folder was left"


# ------------------------------------------------------------------------------ checksums


def test_checksum_is_sha256_of_header_index_and_tensors():
    """The documented layout, byte for byte: header and index as written, then each tensor (sorted by
    name) as name, dtype, shape and its bytes."""
    meta = {"entry": '{"batch": 0}', "updates": "[]", "other": "ignored"}
    tensors = {"b": torch.tensor([1.5], dtype=torch.bfloat16), "a": torch.arange(3, dtype=torch.int64)}
    want = hashlib.sha256(b'entry\0{"batch": 0}\0updates\0[]\0'
                          b"a\0torch.int64\0[3]\0" + np.arange(3, dtype="<i8").tobytes() +
                          b"b\0torch.bfloat16\0[1]\0" + bytes([0xC0, 0x3F])).hexdigest()
    assert checksum(meta, tensors) == want


def test_changed_entry_refused_naming_file_and_batch(made, tmp_path):
    """A journal reads back verified; a value changed by 1e-3 in its first entry is refused (the CLI's
    readers: SURFACES), naming the file, the batch and its edits."""
    run = Path(shutil.copytree(made / "run", tmp_path / "r"))
    assert [e.end for e in Journal(run).read()] == [2, 4]
    change(run, _bump_u, b=0)
    with pytest.raises(EditfastError, match=r"batch-000000\.safetensors \(batch 0, edits 0\.\.1\) does not match"):
        load_run(run)


def test_journal_without_checksums_is_read_with_one_warning(made, tmp_path):
    """Decided: a journal written before checksums (no entry has one) is accepted, with one warning
    saying it is not verified; its updates are those written."""
    run = Path(shutil.copytree(made / "run", tmp_path / "r"))
    for b in (0, 1):
        change(run, _no_checksum, b=b)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        entries = load_run(run)[1]
    said = [str(w.message) for w in got if "checksum" in str(w.message)]
    assert len(said) == 1 and "not verified" in said[0], said
    assert [e.end for e in entries] == [2, 4]


def test_checksum_removed_from_one_entry_refused(made, tmp_path):
    run = change(Path(shutil.copytree(made / "run", tmp_path / "r")), _no_checksum, b=1)
    with pytest.raises(EditfastError, match="batch-000001.safetensors has no checksum while other entries have"):
        Journal(run).read()


# ------------------------------------------------------------------------------ OS errors on the user's paths


@pytest.mark.parametrize("err, words", [
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/afile/o"), ["/x/afile/o", "a file is where a folder"]),
    (FileExistsError(errno.EEXIST, "File exists", "/x/afile"), ["/x/afile", "a file is where a folder"]),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/d.npz"), ["/x/d.npz", "a folder is where a file"]),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/x/" + "n" * 300), ["File name too long"]),
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "/x/loop"), ["/x/loop"]),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/o"), ["/ro/o", "Permission denied"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["No space left"]),
])
def test_os_errors_on_paths_are_one_line_naming_the_path(err, words):
    code, line = outcome(err)
    assert code == 2 and "\n" not in line and all(w in line for w in words), line


@pytest.mark.parametrize("err", [NotADirectoryError(errno.ENOTDIR, "Not a directory"),
                                 FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/index.json")])
def test_os_errors_naming_no_path_or_a_missing_file_stay_bugs(err):
    """Without a path the line could not say where; a missing file mid-run is editfast's bug (a
    user's missing path is refused by its own check before any work): both keep their traceback."""
    assert outcome(err) is None


# ------------------------------------------------------------------------------ signals


def signal_after(monkeypatch, module, name, sig):
    """``module.name`` sends ``sig`` to this process once it has run (the work is then half done)."""
    real = getattr(module, name)

    def then_signal(*a, **kw):
        got = real(*a, **kw)
        os.kill(os.getpid(), sig)
        return got
    monkeypatch.setattr(module, name, then_signal)


INT, TERM = (signal.SIGINT, 130), (signal.SIGTERM, 143)
SIGNALLED = {  # id: (module, the function that sends the signal once it has run, argv from a Ctx, signal)
    "eval: after the first evaluation, SIGINT": (editfast.cli.eval, "evaluate",
                                                 lambda c: [*EVAL, "--edits", str(c.run), "--out", c.out], INT),
    "eval: after the first evaluation, SIGTERM": (editfast.cli.eval, "evaluate",
                                                  lambda c: [*EVAL, "--edits", str(c.run), "--out", c.out], TERM),
    "undo: after the journal is written, SIGTERM": (editfast.cli.undo, "write_entries",
                                                    lambda c: ["undo", str(c.run), "--to", "2", "--out", c.out], TERM),
    "undo --save-model: model written, not renamed, SIGINT": (
        editfast.cli.shared, "normal_permissions",
        lambda c: ["undo", str(c.run), "--to", "2", "--save-model", "--out", c.out], INT),
    "export: adapter weights written, SIGTERM": (editfast.session.export, "save_file",
                                                 lambda c: ["export", str(c.run), "--lora", c.out, "--quiet"], TERM),
    "stats export: the .npz written, not renamed, SIGINT": (
        editfast.methods.locate_then_edit.stats_files, "np",
        lambda c: ["stats", "export", "--out", c.out + ".npz", "--layer", "1", *TINY], INT),
    "train-mend: network written, SIGTERM": (editfast.cli.train_mend, "save_net",
                                             lambda c: ["train-mend", *TINY, "--data", "counterfact", "--steps", "1",
                                                        "--heldout", "0", "--out", c.out], TERM),
}


class _SignallingNumpy:
    """numpy, whose savez sends the signal after writing (the .npz is in its temporary file)."""

    def __init__(self, sig):
        self.sig = sig

    def __getattr__(self, name):
        return getattr(np, name)

    def savez(self, *a, **kw):
        np.savez(*a, **kw)
        os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("case", list(SIGNALLED), ids=list(SIGNALLED))
def test_signal_leaves_nothing_half_written(case, made, tmp_path, capsys, monkeypatch):
    """Exit 130/143 with one line; nothing in or beside --out (the staging folder, the hidden model,
    the temporary .npz removed); the run read untouched."""
    module, name, build, (sig, code) = SIGNALLED[case]
    c = Ctx(made, tmp_path)
    before = _tree(made)
    if name == "np":
        monkeypatch.setattr(module, "np", _SignallingNumpy(sig))
    else:
        signal_after(monkeypatch, module, name, sig)
    got, _, err = run_cli(build(c), capsys)
    lines = err.strip().splitlines()
    assert got == code and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("editfast: "), err
    assert ("interrupted" if sig == signal.SIGINT else "terminated") in lines[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("afile",)], "something was left"
    assert _tree(made) == before


def test_signal_while_an_edit_saves_the_model_keeps_the_journal(made, tmp_path, capsys, monkeypatch):
    """SIGTERM after the model's files are written, before the rename: no hidden .model.* folder, no
    OUT/model, the complete journal kept and the line says --resume."""
    monkeypatch.setattr(editfast.cli.shared, "normal_permissions", lambda *a, **k: os.kill(os.getpid(),
                                                                                          signal.SIGTERM))
    out = tmp_path / "r"
    got, _, err = run_cli([*EDIT, "--save-model", "--out", str(out)], capsys)
    assert got == 143 and len(err.strip().splitlines()) == 1 and "--resume" in err, err
    assert not (out / "model").exists() and not list(out.glob(".model.*"))
    assert [e.end for e in Journal(out).read()] == [2]
