"""Files are checked before they are trusted, and caches are robust (issue 12).

Bad model folders, GGUFs, datasets and request ids are one-line errors; corrupt cache entries
(statistics, checkpoints, file hashes) are misses rebuilt with a warning; an unwritable cache
warns and the run goes on; no empty or non-finite statistic is returned or cached.
"""

import errno
import gzip
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_refused, run_cli
from safetensors.torch import load_file, save_file

from editfast.core.errors import (
    DataError,
    EditfastError,
    HParamsError,
    ModelError,
    RequestError,
)
from editfast.core.paths import cache_lock, write_cache
from editfast.data.requests import Request, load_dataset, validate_requests
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.models.load import file_sha256, load_model, max_positions, model_config

ROOT = os.geteuid() == 0  # root writes into read-only folders: simulate with a file in the way instead


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test has its own, initially absent, cache directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EDITFAST_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny llama (embedding tied to the LM head) saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    load_model("random:tiny-llama", seed=2).model.save_pretrained(path)
    return path


@pytest.fixture
def bad_dir(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "bad"))


def _tensors(d: Path) -> dict:
    return load_file(d / "model.safetensors")


def _save(d: Path, tensors: dict) -> None:
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def _config(d: Path, edit) -> None:
    (d / "config.json").write_text(json.dumps(edit(json.loads((d / "config.json").read_text()))))


DOWN = "model.layers.0.mlp.down_proj.weight"
WEIGHTS = {  # corruption of model.safetensors: words of the error
    "random bytes": (lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)), ["cannot load", "header"]),
    "empty file": (lambda d: (d / "model.safetensors").write_bytes(b""), ["cannot load", "header"]),
    "truncated": (lambda d: _truncate(d / "model.safetensors"), ["cannot load"]),
    "missing tensors": (lambda d: _save(d, {k: v for k, v in _tensors(d).items() if ".layers.1." not in k}),
                        ["9 missing tensors", "model.layers.1."]),
    "unexpected tensor": (lambda d: _save(d, {**_tensors(d), "extra.weight": torch.zeros(3)}),
                          ["1 unexpected tensor", "extra.weight"]),
    "foreign tensors": (lambda d: _save(d, {"foo": torch.zeros(3), "bar": torch.zeros(2)}),
                        ["missing tensors", "2 unexpected tensors", "never initialises"]),
    "mismatched shape": (lambda d: _save(d, {**_tensors(d), DOWN: torch.zeros(64, 100)}),
                         ["1 tensor with mismatched shapes", DOWN, "[64, 100]", "[64, 256]"]),
}
CONFIGS = {  # corruption of config.json: words of the error
    "a list": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "json object", "list"]),
    "invalid json": (lambda d: (d / "config.json").write_text('{"model_type": '), ["config.json", "unreadable"]),
    "not utf-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), ["config.json", "unreadable"]),
    "no model_type": (lambda d: _config(d, lambda c: {k: v for k, v in c.items() if k != "model_type"}),
                      ["config.json", "model_type"]),
    "model_type a list": (lambda d: _config(d, lambda c: {**c, "model_type": ["llama"]}), ["model_type"]),
    "wrong value type": (lambda d: _config(d, lambda c: {**c, "hidden_size": "big"}), ["hidden_size"]),
}


@pytest.mark.parametrize("case", WEIGHTS)
def test_bad_weights_refused(bad_dir, case):
    corrupt, words = WEIGHTS[case]
    corrupt(bad_dir)
    with pytest.raises(ModelError) as e:
        load_model(bad_dir)
    msg = str(e.value)
    assert "\n" not in msg and str(bad_dir) in msg
    assert all(w.lower() in msg.lower() for w in words), msg
    assert model_config(bad_dir).num_hidden_layers == 4  # the config alone reads no weights


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize("fn", [load_model, model_config])
def test_bad_config_refused(bad_dir, case, fn):
    corrupt, words = CONFIGS[case]
    corrupt(bad_dir)
    with pytest.raises(ModelError) as e:
        fn(str(bad_dir))
    msg = str(e.value)
    assert "\n" not in msg and all(w.lower() in msg.lower() for w in words), msg


@pytest.mark.parametrize("data", [os.urandom(3000), b"GGUF" + os.urandom(3000), b"GGUF\x03\x00\x00\x00" + bytes(12)],
                         ids=["random", "gguf-magic-random", "gguf-header-only"])
@pytest.mark.parametrize("fn", [load_model, model_config])
def test_bad_gguf_refused(tmp_path, data, fn):
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelError, match=r"GGUF '.*broken\.gguf'") as e:
        fn(path)
    assert "\n" not in str(e.value)


def test_good_dir_and_pathlike(saved):
    """Tied weights are not missing; paths are accepted wherever strings are."""
    lm = load_model(saved)
    assert lm.spec == str(saved) and lm.adapter.family == "llama"
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    ref = load_model("random:tiny-llama", seed=2).model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in lm.model.state_dict().items())
    assert file_sha256(saved / "model.safetensors") == lm.fingerprint
    with pytest.raises(ModelError, match="string or a path"):
        load_model(3)


@pytest.mark.parametrize("spec", ["random:tiny-gpt2", "random:tiny-gptj", "random:tiny-neox", "random:tiny-llama"])
def test_model_config_matches_loaded_model(spec):
    config, lm = model_config(spec), load_model(spec)
    def fields(c):
        return {k: v for k, v in c.to_dict().items() if k != "dtype"}

    assert fields(config) == fields(lm.model.config)
    assert lm.adapter.num_layers(lm.model) == getattr(config, lm.adapter.n_layers_attr)
    assert max_positions(config) == max_positions(lm.model) == max_positions(lm.model.config) == 256


def test_model_config_of_dir_and_max_positions(saved):
    assert model_config(saved).to_dict() == load_model(saved).model.config.to_dict()
    assert model_config(str(saved)).num_hidden_layers == 4
    assert max_positions(model_config("random:llama-3-8b")) == 8192
    assert max_positions(model_config("random:gpt2-xl")) == 1024
    assert max_positions(SimpleNamespace(hidden_size=3)) is None
    with pytest.raises(ModelError, match="unknown random preset"):
        model_config("random:huge")
    with pytest.raises(ModelError, match="unknown model"):
        model_config("/no/such/dir")


CLI_CASES = {"missing tensors": ["missing"], "random bytes": ["cannot load"], "a list": ["json object"]}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_model_dir(bad_dir, tmp_path, capsys, case):
    corrupt, _ = {**WEIGHTS, **CONFIGS}[case]
    corrupt(bad_dir)
    assert_refused(["edit", "--out", str(tmp_path / "o"), "--n", "2", "--model", str(bad_dir), "--templates", "fixed",
                    "--quiet"], capsys, *CLI_CASES[case], absent=[tmp_path / "o"])


# --- datasets and request ids ------------------------------------------------------------------

GOOD = {"prompt": "{} plays", "subject": "Messi", "target_new": "tennis", "target_true": "football"}
GZ = {  # a .json.gz that is not one
    "not gzip": lambda: b"plain text, not gzip",
    "corrupt stream": lambda: (g := gzip.compress(json.dumps([GOOD] * 50).encode()))[:12] + bytes(40) + g[52:],
    "truncated": lambda: gzip.compress(json.dumps([GOOD] * 50).encode())[:30],
}


@pytest.mark.parametrize("case", GZ)
def test_corrupt_gz_dataset(tmp_path, capsys, case):
    path = tmp_path / "mine.json.gz"
    path.write_bytes(GZ[case]())
    with pytest.raises(DataError, match=r"mine\.json\.gz") as e:
        load_dataset(path)
    assert "\n" not in str(e.value)
    assert_refused(["edit", "--dataset", str(path), "--out", str(tmp_path / "o"), "--n", "1", "--model",
                    "random:tiny-llama", "--quiet"], capsys, "mine.json.gz", absent=[tmp_path / "o"])


BAD_IDS = {"list": [1, 2], "dict": {"a": 1}, "bool": True, "float": 1.5, "float integral": 3.0}


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_case_id(tmp_path, capsys, case):
    bad = BAD_IDS[case]
    with pytest.raises(RequestError, match="case_id.*must be an integer or a string"):
        Request.from_dict({**GOOD, "case_id": bad})
    with pytest.raises(RequestError, match=r"request #1: field 'case_id' must be an integer or a string"):
        validate_requests([Request("{} x", "a", "b", case_id=0), Request("{} plays", "Messi", "tennis", case_id=bad)])
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "subject": "Pele", "case_id": bad}]))
    with pytest.raises(DataError, match=r"ids\.json: record 1: .*case_id"):
        load_dataset(path)
    assert_refused(["edit", "--dataset", str(path), "--out", str(tmp_path / "o"), "--n", "2", "--model",
                    "random:tiny-llama", "--quiet"], capsys, "record 1", "case_id", absent=[tmp_path / "o"])


@pytest.mark.parametrize("good", [None, 0, -7, 2**70, "", "cf-12"])
def test_good_case_ids(good):
    r = Request.from_dict({**GOOD, "case_id": good})
    assert r.case_id == good
    validate_requests([r])


def test_validate_requests_needs_requests():
    with pytest.raises(RequestError, match=r"request #0: expected a Request.*dict"):
        validate_requests([GOOD])


# --- statistics and the cache ------------------------------------------------------------------

HP = dict(mom2_dataset="wikitext", mom2_n_samples=12, mom2_max_tokens=16, mom2_dtype="float32")


def hp(**kw):
    return SimpleNamespace(**{**HP, **kw})


@pytest.fixture(scope="module")
def fresh(tiny):
    return second_moments(tiny, [1, 2], hp(), progress=False, use_cache=False)


def _stat_files(cache: Path, pattern: str = "layer*.safetensors") -> list[Path]:
    return sorted(cache.rglob(pattern))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9) for k in a)


STATS = {  # corruption of a cached statistics file
    "random bytes": lambda f: f.write_bytes(os.urandom(2048)),
    "truncated": _truncate,
    "empty": lambda f: f.write_bytes(b""),
    "wrong tensors": lambda f: save_file({"x": torch.zeros(2)}, f),
    "wrong shape": lambda f: save_file({"mom2": torch.eye(8), "count": torch.tensor(5)}, f),
    "wrong dtype": lambda f: save_file({"mom2": torch.eye(256, dtype=torch.float64), "count": torch.tensor(5)}, f),
    "no tokens": lambda f: save_file({"mom2": torch.eye(256), "count": torch.tensor(0)}, f),
    "nan poisoned": lambda f: save_file({"mom2": torch.full((256, 256), float("nan")), "count": torch.tensor(5)}, f),
    "nan entry": lambda f: save_file({"mom2": torch.eye(256).index_fill_(0, torch.tensor([3]), float("nan")),
                                      "count": torch.tensor(99)}, f),
    "inf entry": lambda f: save_file({"mom2": torch.eye(256) * float("inf"), "count": torch.tensor(99)}, f),
}


@pytest.mark.parametrize("case", STATS)
def test_corrupt_cached_statistics_rebuilt(tiny, fresh, cache, case):
    assert _same(second_moments(tiny, [1, 2], hp(), progress=False), fresh)
    files = {int(f.name.split("-")[0].removeprefix("layer")): f for f in _stat_files(cache)}
    assert sorted(files) == [1, 2]
    STATS[case](files[2])
    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = second_moments(tiny, [1, 2], hp(), progress=False)
    assert _same(again, fresh)
    assert _stat_files(cache) == sorted(files.values())  # rebuilt in place, valid again
    assert torch.equal(load_file(files[2])["mom2"], again[2])
    assert not _stat_files(cache, "partial-*")


class Interrupt(Exception):
    pass


PARTIALS = {  # corruption of an interrupted run's checkpoint
    "random bytes": lambda f: f.write_bytes(os.urandom(2048)),
    "truncated": _truncate,
    "wrong layers": lambda f: save_file({"total.layer7": torch.zeros(256, 256)}, f,
                                        metadata={"count": "10", "batches": "1"}),
    "wrong shape": lambda f: save_file({f"total.layer{l}": torch.zeros(4, 4) for l in (1, 2)}, f,
                                       metadata={"count": "10", "batches": "1"}),
    "nan sums": lambda f: save_file({f"total.layer{l}": torch.full((256, 256), float("nan")) for l in (1, 2)}, f,
                                    metadata={"count": "10", "batches": "1"}),
    "no counts": lambda f: save_file({f"total.layer{l}": torch.zeros(256, 256) for l in (1, 2)}, f),
}


@pytest.mark.parametrize("case", PARTIALS)
def test_corrupt_checkpoint_ignored(tiny, fresh, cache, case):
    calls = []

    def stop_second_batch(module, args):  # batches hold 4096 tokens: 300 samples of 16 make two
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt

    hook = tiny.model.model.layers[0].register_forward_pre_hook(stop_second_batch)
    try:
        with pytest.raises(Interrupt):
            second_moments(tiny, [1, 2], hp(mom2_n_samples=300), progress=False, checkpoint_every=1)
    finally:
        hook.remove()
    (partial,) = _stat_files(cache, "partial-*")
    PARTIALS[case](partial)
    full = second_moments(tiny, [1, 2], hp(mom2_n_samples=300), progress=False, use_cache=False)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = second_moments(tiny, [1, 2], hp(mom2_n_samples=300), progress=False, checkpoint_every=1)
    assert _same(again, full)
    assert not _stat_files(cache, "partial-*") and len(_stat_files(cache)) == 2


def _unwritable(cache: Path, how: str, monkeypatch) -> None:
    if how == "a file in the way":
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("not a folder")
    elif how == "permission denied":  # what a read-only folder does to anyone but root
        def denied(*a, **kw):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
        monkeypatch.setattr(tempfile, "mkdtemp", denied)
    else:
        cache.mkdir(parents=True)
        cache.chmod(stat.S_IRUSR | stat.S_IXUSR)


UNWRITABLE = ["a file in the way", "permission denied",
              pytest.param("read-only", marks=pytest.mark.skipif(ROOT, reason="root writes into read-only folders"))]


@pytest.mark.parametrize("how", UNWRITABLE)
def test_unwritable_cache_warns_and_goes_on(tiny, fresh, saved, cache, how, monkeypatch):
    _unwritable(cache, how, monkeypatch)
    try:
        with pytest.warns(RuntimeWarning, match="cannot write the cache"):
            got = second_moments(tiny, [1, 2], hp(), progress=False, checkpoint_every=1)
        assert _same(got, fresh)
        with pytest.warns(RuntimeWarning, match="cannot write the cache"):
            assert load_model(saved).adapter.family == "llama"
        with pytest.warns(RuntimeWarning, match="cannot write the cache"):
            assert not write_cache(cache / "eval" / "x.json", "{}")
    finally:
        if cache.is_dir():
            cache.chmod(0o755)
    assert not cache.is_dir() or not any(p.is_file() for p in cache.rglob("*"))


def test_write_cache(cache):
    assert write_cache(cache / "a" / "t.txt", "text") and (cache / "a" / "t.txt").read_text() == "text"
    assert write_cache(cache / "b.bin", b"\x00\x01") and (cache / "b.bin").read_bytes() == b"\x00\x01"
    assert write_cache(cache / "c.json", lambda tmp: tmp.write_text("[]")) and (cache / "c.json").read_text() == "[]"
    assert stat.S_IMODE((cache / "c.json").stat().st_mode) == 0o644
    with pytest.raises(ZeroDivisionError):  # only failures to write are forgiven
        write_cache(cache / "d.json", lambda tmp: 1 / 0)
    assert sorted(p.name for p in cache.rglob("*")) == ["a", "b.bin", "c.json", "t.txt"]


def _count_under_lock(lock: Path, counter: Path, times: int) -> None:
    for _ in range(times):
        with cache_lock(lock):
            counter.write_text(str(int(counter.read_text() or 0) + 1))


def test_cache_lock_excludes_other_processes(tmp_path):
    """Four processes add 1 to a counter 50 times each, each time under the lock: no update is lost,
    and no lock file is left."""
    import multiprocessing

    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_count_under_lock, args=(tmp_path / "locks" / ".x.lock", counter, 50))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4 and counter.read_text() == "200"
    assert not any((tmp_path / "locks").iterdir())


def test_statistics_computed_meanwhile_by_another_process_are_read(tiny, fresh, cache, monkeypatch):
    """A process that waited for the statistics' lock reads what its holder computed meanwhile:
    one pass over the corpus in all."""
    import editfast.methods.locate_then_edit.stats as st

    passes, one_pass, real_lock = [], st._one_pass, st.cache_lock
    monkeypatch.setattr(st, "_one_pass", lambda *a, **kw: passes.append(1) or one_pass(*a, **kw))

    @contextmanager
    def another_process_first(path):
        monkeypatch.setattr(st, "cache_lock", real_lock)
        second_moments(tiny, [1, 2], hp(), progress=False)  # the lock's holder
        with real_lock(path):
            yield

    monkeypatch.setattr(st, "cache_lock", another_process_first)
    info: dict = {}
    got = second_moments(tiny, [1, 2], hp(), progress=False, info=info)
    assert passes == [1] and info[1]["cached"] and info[2]["cached"] and _same(got, fresh)


@pytest.mark.parametrize("memo", ["[1, 2]", "{not json", '{"sha256": 5}', '{"sha256": "zz"}', ""])
def test_corrupt_hash_memo_is_a_miss(tmp_path, cache, memo):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    sha = file_sha256(f)
    (entry,) = cache.rglob("hashes/*.json")
    entry.write_text(memo)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert file_sha256(f) == sha
    assert json.loads(entry.read_text())["sha256"] == sha  # rewritten
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "sha256": "0" * 64, "size": 99}))
    assert file_sha256(f) == sha  # a stale entry is an ordinary miss


@pytest.mark.parametrize("key, value", [("mom2_max_tokens", 0), ("mom2_max_tokens", -4), ("mom2_n_samples", 0),
                                        ("mom2_n_samples", -5)])
def test_empty_statistics_refused(tiny, cache, key, value):
    with pytest.raises(HParamsError, match=key) as e:
        second_moments(tiny, [1, 2], hp(**{key: value}), progress=False)
    assert key != "mom2_max_tokens" or "layer 1" in str(e.value)
    assert not cache.exists()  # nothing written, nothing poisoned


def test_non_finite_statistics_refused(cache):
    lm = load_model("random:tiny-llama")
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(EditfastError, match="layer 1.*non-finite") as e:
        second_moments(lm, [1, 2], hp(), progress=False, checkpoint_every=1)
    assert "\n" not in str(e.value)
    assert not _stat_files(cache) and not _stat_files(cache, "partial-*")


def test_cli_mom2_max_tokens_zero(tmp_path, cache, capsys):
    assert_refused(["edit", "--method", "memit", "--n", "2", "--out", str(tmp_path / "o"), "--model",
                    "random:tiny-llama", "--templates", "fixed", "--quiet", "--no-eval", "--set", "mom2_max_tokens=0"],
                   capsys, "mom2_max_tokens", absent=[tmp_path / "o", cache / "stats"])


def test_cli_edit_with_unwritable_cache(tmp_path, cache, capsys):
    """The whole run goes on without a cache: statistics are computed, used and not saved."""
    _unwritable(cache, "a file in the way", None)
    with pytest.warns(RuntimeWarning, match="cannot write the cache"):
        code, _, err = run_cli(["edit", "--method", "memit", "--n", "2", "--out", str(tmp_path / "o"), "--model",
                                "random:tiny-llama", "--templates", "fixed", "--no-eval"], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert len(json.loads((tmp_path / "o" / "results.json").read_text())["per_request"]) == 2
    assert cache.read_text() == "not a folder"
