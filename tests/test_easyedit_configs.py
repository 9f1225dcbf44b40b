"""Issue 14, configs: EasyEdit's YAML hparams files (tests/data/easyedit_hparams, MIT, see NOTICE.md)
and the originals' JSON load unchanged; numbers in any spelling; every hparams error before the
weights load; mom2_dataset corpora with the real counts recorded; the originals' statistics .npz
files imported and exported."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_refused, run_cli
from editfast.cli.shared import preflight
from safetensors import safe_open

from editfast.core.errors import DataError, HParamsError
from editfast.data.corpus import corpus_texts
from editfast.data.requests import Request
from editfast.methods.hparams import read_hparams_file
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.methods.registry import make_hparams, resolve_hparams, split_options
from editfast.models.load import load_model, model_config

DATA = Path(__file__).parent / "data" / "easyedit_hparams"
FILES = sorted(p for p in DATA.glob("*/*.yaml") if p.parent.name != "FT")  # FT's: tests/test_method_ft.py
METHOD = {"ROME": "rome", "MEMIT": "memit", "AlphaEdit": "alphaedit"}
BOOKKEEPING = {"alg_name", "model_name", "device", "fp16", "model_parallel", "stats_dir", "max_length", "P_loc"}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private editfast cache and an empty Hugging Face datasets cache; the cwd in tmp_path (the
    files' stats_dir is relative)."""
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.chdir(tmp_path)


def test_the_31_files_are_there():
    assert [len(list((DATA / d).glob("*.yaml"))) for d in ("ROME", "MEMIT", "AlphaEdit")] == [14, 11, 6]


def expected_options(raw: dict) -> tuple[dict, set]:
    """The mapping the README states, written out independently: (options, warned keys)."""
    opts, warned = {}, set()
    opts["method"] = {"rome": "rome", "memit": "memit", "alphaedit": "alphaedit"}[raw["alg_name"].lower()]
    opts["model"] = raw["model_name"]
    opts["device"] = f"cuda:{raw['device']}" if isinstance(raw["device"], int) else raw["device"]
    if "fp16" in raw:
        opts["dtype"] = "float16" if raw["fp16"] else "float32"
    if "model_parallel" in raw:
        opts["device_map"] = "auto" if raw["model_parallel"] else None  # applied: --device auto
    opts["stats_dir"] = Path(raw["stats_dir"])
    for k in ("max_length", "P_loc"):
        if k in raw:
            opts[k] = raw[k]
            warned.add(k)
    return opts, warned


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_every_easyedit_file_resolves_with_its_keys_mapped(path):
    raw = yaml.safe_load(path.read_text())  # YAML 1.1: "5e-1" is a string here, a number in editfast
    method = METHOD[path.parent.name]
    options = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hp = resolve_hparams(method, raw["model_name"], None, None, path, options=options)
    opts, warned = expected_options(raw)
    assert options == opts
    messages = [str(x.message) for x in w]
    if warned:  # one warning naming exactly the keys without effect
        assert len(messages) == 1 and all(k in messages[0] for k in warned), messages
        assert not any(k in messages[0].split("(")[0] for k in BOOKKEEPING - warned)
    else:
        assert messages == []
    # every other key became the hyper-parameter of the same name, numbers as numbers
    for key, value in raw.items():
        if key in BOOKKEEPING and not (method == "alphaedit" and key == "model_name"):
            continue
        got = getattr(hp, key)
        if isinstance(value, str) and key in ("v_lr", "v_weight_decay", "nullspace_threshold"):
            value = float(value)
        assert got == value and type(got) is not str or isinstance(value, str), (key, got, value)
    assert hp.layers == raw["layers"] and hp.mom2_dataset == "wikipedia"


def test_numbers_in_every_spelling(tmp_path):
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"layers": ["1"], "v_lr": "5e-1", "mom2_update_weight": "1.5e4", "mom2_n_samples": "1e4",
                             "kl_factor": 1e-1}))
    hp = make_hparams("memit", read_hparams_file(f))
    assert (hp.layers, hp.v_lr, hp.mom2_update_weight, hp.mom2_n_samples, hp.kl_factor) == ([1], 0.5, 15000.0, 10000,
                                                                                             0.1)
    assert isinstance(hp.mom2_n_samples, int)
    g = tmp_path / "h.yaml"
    g.write_text("layers: [1]\nv_lr: 5e-1\nmom2_update_weight: 1e4\n")
    assert make_hparams("memit", read_hparams_file(g)).mom2_update_weight == 1e4
    with pytest.raises(HParamsError, match="v_lr"):
        make_hparams("memit", {"layers": [1], "v_lr": "fast"})


# --- the gpt2-xl and llama files against the matching presets' configs (no weights) and SmolLM2's ---
MATCHING = [("ROME/gpt2-xl.yaml", "random:gpt2-xl"), ("MEMIT/gpt2-xl.yaml", "random:gpt2-xl"),
            ("AlphaEdit/gpt2-xl.yaml", "random:gpt2-xl"), ("ROME/llama-7b.yaml", "random:llama-2-7b"),
            ("MEMIT/llama-7b.yaml", "random:llama-2-7b"), ("AlphaEdit/llama3-8b.yaml", "random:llama-2-7b")]


@pytest.mark.parametrize("name,model", MATCHING)
def test_matching_presets_resolve_from_the_config_alone(name, model, monkeypatch):
    import editfast.models.load

    monkeypatch.setattr(editfast.models.load, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    method = METHOD[name.split("/")[0]]
    raw = yaml.safe_load((DATA / name).read_text())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hp = preflight(model, method, DATA / name, {"mom2_dataset": "wikitext"})
    assert all("P_loc" in str(x.message) or "differs" in str(x.message) for x in w)
    assert hp.layers == raw["layers"] and hp.v_loss_layer == raw["v_loss_layer"]
    assert hp.mom2_adjustment is raw["mom2_adjustment"]
    if not raw["mom2_adjustment"]:  # EasyEdit's ROME files: no statistics, so wikipedia need not be cached
        preflight(model, method, DATA / name, {})
    else:  # wikipedia is not in the (empty) datasets cache: a clear error before the weights load
        with pytest.raises(HParamsError, match="wikimedia/wikipedia 20231101.en.*hf-datasets"):
            preflight(model, method, DATA / name, {})


@pytest.fixture(scope="module")
def smollm2_config():
    return model_config("smollm2-135m")  # read once (the GGUF's metadata or the cached conversion's config)


@pytest.mark.parametrize("name", ["ROME/llama-7b.yaml", "MEMIT/llama-7b.yaml", "AlphaEdit/llama3-8b.yaml"])
def test_llama_files_on_smollm2_with_layers_set(name, smollm2_config, monkeypatch):
    import editfast.cli.shared

    monkeypatch.setattr(editfast.cli.shared, "model_config", lambda spec, *a: smollm2_config)
    method = METHOD[name.split("/")[0]]
    layers = [5] if method == "rome" else [4, 5, 6, 7, 8]
    with pytest.warns(UserWarning, match="differs"):
        hp = preflight("smollm2-135m", method, DATA / name, {"layers": layers, "v_loss_layer": 29,
                                                             "mom2_dataset": "wikitext"})
    assert hp.layers == layers
    with pytest.raises(HParamsError, match="v_loss_layer 31 out of range"):  # the file's own loss layer
        preflight("smollm2-135m", method, DATA / name, {"layers": layers, "mom2_dataset": "wikitext"})


def test_gpt2_module_names_refused_on_a_llama():
    with pytest.raises(HParamsError, match="rewrite_module_tmp"):
        preflight("random:tiny-llama", "memit", DATA / "MEMIT/gpt2-xl.yaml",
                  {"layers": [1, 2], "v_loss_layer": 3, "mom2_dataset": "wikitext"})


# --- bad files ---
def edited(tmp_path, name, **changes):
    raw = read_hparams_file(DATA / name)
    raw.update(changes)
    f = tmp_path / Path(name).name
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.mark.parametrize("change,words", [
    ({"rewrite_everything": True}, ["unknown key", "rewrite_everything"]),
    ({"alg_name": "GRACE"}, ["alg_name", "GRACE"]),
    ({"fp16": "maybe"}, ["fp16", "maybe"]),
    ({"device": [0, 1]}, ["device", "[0, 1]"]),
    ({"layer_selection": "random"}, ["layer_selection", "random"]),
])
def test_keys_editfast_cannot_honour(tmp_path, change, words):
    f = edited(tmp_path, "MEMIT/llama-7b.yaml", **change)
    with pytest.raises(HParamsError) as e:
        resolve_hparams("memit", "random:tiny-llama", None, None, f, options={})
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_alg_name_mismatch_names_both():
    with pytest.raises(HParamsError, match="alg_name='ROME' does not match the method 'memit'"):
        resolve_hparams("memit", "x", None, None, DATA / "ROME/gpt2-xl.yaml", options={})
    _, opts, _ = split_options({"alg_name": "R-ROME"})
    assert opts["method"] == "r-rome"


def test_cli_bad_key_exits_2_before_the_weights_load(tmp_path, capsys, monkeypatch):
    import editfast.cli.edit

    monkeypatch.setattr(editfast.cli.edit, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    f = edited(tmp_path, "ROME/llama-7b.yaml", mom2_speed="fast")
    out = tmp_path / "out"
    assert_refused(["edit", "--hparams", str(f), "--set", "layers=[1]", "--model", "random:tiny-llama", "--n", "1",
                    "--out", str(out), "--quiet"], capsys, "mom2_speed", absent=[out])
    g = edited(tmp_path, "MEMIT/llama-7b.yaml")  # wikipedia not cached: before the weights too
    assert_refused(["edit", "--hparams", str(g), "--set", "layers=[1,2]", "--set", "v_loss_layer=3", "--model",
                    "random:tiny-llama", "--n", "1", "--out", str(out), "--quiet"], capsys, "wikipedia",
                   "datasets cache", absent=[out])


def test_cli_runs_an_easyedit_file_on_the_tiny_preset(tmp_path, capsys):
    """The file's alg_name picks the method (no --method), its stats_dir holds the statistics."""
    out = tmp_path / "out"
    (tmp_path / "corpus.txt").write_text("".join(f"Paragraph {i} of a small local corpus.\n" for i in range(40)))
    code, stdout, err = run_cli(["edit", "--hparams", str(DATA / "MEMIT/llama-7b.yaml"), "--model", "random:tiny-llama",
                                 "--set", "layers=[1,2]", "--set", "v_loss_layer=3", "--set", "mom2_dataset=corpus.txt",
                                 "--set", "mom2_n_samples=8000", "--set", "mom2_max_tokens=16", "--set",
                                 "v_num_grad_steps=2", "--n", "2", "--no-eval", "--templates", "fixed", "--out",
                                 str(out), "--quiet"], capsys)
    assert code == 0, err
    doc = json.loads((out / "results.json").read_text())
    assert doc["method"] == "memit" and doc["config"]["device"] == "cpu"
    st = doc["timings"]["statistics"]["2"]
    assert (st["n_samples_requested"], st["n_samples"]) == (8000, 40)
    assert "40 texts (asked 8,000)" in stdout
    assert len(list((tmp_path / "data" / "stats").glob("*/layer2-*.safetensors"))) == 1  # the file's stats_dir


# --- corpora ---
def test_local_text_and_jsonl_corpora_and_the_cap(tmp_path):
    (tmp_path / "c.txt").write_text("first text\n\nsecond text\nthird text\n")
    assert corpus_texts(str(tmp_path / "c.txt"), 10) == ["first text", "second text", "third text"]
    (tmp_path / "c.jsonl").write_text('{"text": "a b"}\n{"text": "c d", "id": 2}\n')
    assert corpus_texts(str(tmp_path / "c.jsonl"), 1) == ["a b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match="line 2"):
        corpus_texts(str(tmp_path / "bad.jsonl"), 5)


def test_wikipedia_from_the_local_datasets_cache(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"id": ["1", "2", "3"], "text": ["Paris is in France.", "", "Rome is in Italy."]}).save_to_disk(
        tmp_path / "saved")
    d = tmp_path / "hf-datasets" / "wikimedia___wikipedia" / "20231101.en" / "0.0.0" / "abc123"
    d.mkdir(parents=True)
    next((tmp_path / "saved").glob("*.arrow")).rename(d / "wikipedia-train-00000-of-00001.arrow")
    assert corpus_texts("wikipedia", 5) == ["Paris is in France.", "Rome is in Italy."]


def test_real_counts_in_the_cache_key_and_metadata(tmp_path):
    lm = load_model("random:tiny-llama")
    (tmp_path / "c.txt").write_text("\n".join(f"text number {i} of the corpus" for i in range(5)) + "\n")
    hp = make_hparams("memit", {"layers": [1], "mom2_dataset": str(tmp_path / "c.txt"), "mom2_n_samples": 100,
                                "mom2_max_tokens": 16})
    info = {}
    with pytest.warns(UserWarning, match="mom2_n_samples=100 but the corpus .* has 5 texts; using 5") as w:
        C = second_moments(lm, [1], hp, progress=False, info=info)[1]
    assert len([x for x in w if "mom2_n_samples" in str(x.message)]) == 1
    assert (info[1]["n_samples"], info[1]["n_samples_requested"], info[1]["cached"]) == (5, 100, False)
    files = list((tmp_path / "cache" / "stats").rglob("layer1-*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    assert (meta["n_samples"], meta["n_samples_requested"], meta["tokens"]) == ("5", "100", str(info[1]["tokens"]))
    hp5 = make_hparams("memit", {**{k: getattr(hp, k) for k in ("layers", "mom2_dataset", "mom2_max_tokens")},
                                 "mom2_n_samples": 5})
    info5 = {}
    assert torch.equal(second_moments(lm, [1], hp5, progress=False, info=info5)[1], C) and info5[1]["cached"]
    (tmp_path / "c.txt").write_text("another corpus entirely\n")  # the same path, new content: recomputed
    info6 = {}
    second_moments(lm, [1], hp5, progress=False, info=info6)
    assert not info6[1]["cached"] and info6[1]["n_samples"] == 1


# --- the originals' statistics files ---
def original_npz(path: Path, C: torch.Tensor, count: int, n: int):
    """The layout ROME's layer_stats saves (CombinedStat(mom2=SecondMoment()) through numpy.savez)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": np.array(count),
                      "mom2.mom2": (C.double() * count).float().numpy(), "sample_size": np.array(n)})


def test_stats_import_export_round_trip_and_edit_equality(tmp_path, capsys, monkeypatch):
    lm = load_model("random:tiny-llama")
    sets = {"mom2_dataset": "wikitext", "mom2_n_samples": 64, "mom2_max_tokens": 16}
    hp = resolve_hparams("rome", lm.spec, lm.model.config, {"layers": [1], **sets})
    info = {}
    C = second_moments(lm, [1], hp, progress=False, info=info)[1]
    count = info[1]["tokens"]
    # an original file, named as layer_stats names it, into a fresh cache
    npz = tmp_path / "stats" / "tiny-llama" / "wikitext_stats" / "model.layers.1.mlp.down_proj_float32_mom2_64.npz"
    original_npz(npz, C, count, 64)
    fresh = ["--set", "mom2_max_tokens=16", "--model", "random:tiny-llama", "--quiet"]
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache2"))
    code, stdout, err = run_cli(["stats", "import", str(npz), "--method", "rome", *fresh], capsys)
    assert code == 0, err
    assert "layer 1" in stdout
    imported = list((tmp_path / "cache2" / "stats").rglob("layer1-*.safetensors"))
    assert len(imported) == 1
    # export writes the original layout back, equal to the file imported
    back = tmp_path / "back.npz"
    code, _, err = run_cli(["stats", "export", "--layer", "1", "--out", str(back), "--method", "rome",
                            "--set", "mom2_n_samples=64", "--set", "mom2_dataset=wikitext", *fresh], capsys)
    assert code == 0, err
    with np.load(npz) as a, np.load(back) as b:
        assert set(b.files) == {"mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"}
        assert str(b["mom2.constructor"]) == "util.runningstats.SecondMoment()"
        assert int(b["mom2.count"]) == count and int(b["sample_size"]) == 64 and b["mom2.mom2"].dtype == np.float32
        np.testing.assert_allclose(b["mom2.mom2"], a["mom2.mom2"], rtol=1e-6, atol=1e-3)
    # an edit reading the imported statistics equals one with editfast's own
    from editfast.api import edit

    req = [Request(prompt="{} is located in", subject="The Eiffel Tower", target_new="Rome", case_id=0)]
    results = []
    for cache in ("cache", "cache2"):
        monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / cache))
        m = load_model("random:tiny-llama")
        r = edit(m, req, "rome", hparams=hp, templates=[["{}"]], evaluate=False, progress=False)
        results.append((m.adapter.rewrite_weight(m.model, 1).detach().clone(), r.timings["statistics"]["1"]))
    assert results[1][1]["cached"] and results[0][1]["cached"]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0][0], lm.adapter.rewrite_weight(lm.model, 1))  # the edit changed it


def test_bad_npz_files_exit_2_and_write_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    d = tmp_path / "s" / "wikitext_stats"
    wrong_width = d / "model.layers.1.mlp.down_proj_float32_mom2_64.npz"
    original_npz(wrong_width, torch.eye(7), 10, 64)
    assert_refused(["stats", "import", str(wrong_width), "--model", "random:tiny-llama", "--quiet"], capsys,
                   "shape [7, 7]", "MLP width", absent=[cache / "stats"])
    lm = load_model("random:tiny-llama")
    d_mlp = lm.adapter.d_mlp(lm.model)
    right = d / "model.layers.2.mlp.down_proj_float32_mom2_64.npz"
    original_npz(right, torch.eye(d_mlp), 10, 64)
    assert_refused(["stats", "import", str(right), "--layer", "1", "--model", "random:tiny-llama", "--quiet"], capsys,
                   "layer 2", "not layer 1", absent=[cache / "stats"])
    gpt2 = d / "transformer.h.1.mlp.c_proj_float32_mom2_64.npz"
    original_npz(gpt2, torch.eye(d_mlp), 10, 64)
    assert_refused(["stats", "import", str(gpt2), "--model", "random:tiny-llama", "--quiet"], capsys,
                   "transformer.h.1.mlp.c_proj", absent=[cache / "stats"])
    junk = tmp_path / "junk.npz"
    np.savez(junk, weights=np.zeros(3))
    assert_refused(["stats", "import", str(junk), "--layer", "1", "--model", "random:tiny-llama", "--quiet"], capsys,
                   "mom2.mom2", absent=[cache / "stats"])
    (tmp_path / "text.npz").write_text("not a zip")
    assert_refused(["stats", "import", str(tmp_path / "text.npz"), "--layer", "1", "--model", "random:tiny-llama"],
                   capsys, "cannot read", absent=[cache / "stats"])


def test_a_cache_file_written_before_the_cap_is_still_found(tmp_path):
    """Statistics of the bundled corpus cached under the requested size (before sizes were capped)
    hold the same 4,736 paragraphs: they are read, not recomputed, and the run says what was used."""
    from safetensors.torch import save_file

    from editfast.methods.locate_then_edit.stats import cache_file, cache_tag

    lm = load_model("random:tiny-llama")
    d = lm.adapter.d_mlp(lm.model)
    hp = make_hparams("memit", {"layers": [1], "mom2_n_samples": 100000, "mom2_max_tokens": 16})
    old = cache_file(lm.fingerprint, 1, cache_tag("wikitext", 100000, 16, "float32", lm.dtype))
    old.parent.mkdir(parents=True)
    C = torch.eye(d) * 3
    save_file({"mom2": C, "count": torch.tensor(1234)}, str(old))
    info = {}
    with pytest.warns(UserWarning, match="has 4,736 texts; using 4,736"):
        got = second_moments(lm, [1], hp, progress=False, info=info)[1]
    assert torch.equal(got, C) and info[1] == {"corpus": "wikitext", "n_samples_requested": 100000,
                                               "n_samples": 4736, "tokens": 1234, "cached": True}


def test_a_bad_corpus_line_is_refused_before_the_weights_load(tmp_path, capsys, monkeypatch):
    import editfast.cli.edit

    monkeypatch.setattr(editfast.cli.edit, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
    assert_refused(["edit", "--model", "random:tiny-llama", "--set", "mom2_dataset=c.jsonl", "--n", "1", "--out",
                    str(tmp_path / "out"), "--quiet"], capsys, "c.jsonl line 2", absent=[tmp_path / "out"])


def test_without_options_one_warning_names_the_keys_not_applied():
    """resolve_hparams alone (the Python API's path) applies no bookkeeping key: one warning names them."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hp = resolve_hparams("memit", "./hugging_cache/llama-2-7b", None, None, DATA / "MEMIT/llama-7b.yaml")
    messages = [str(x.message) for x in w]
    assert len(messages) == 1 and all(k in messages[0] for k in ("model_name", "device", "stats_dir",
                                                                 "model_parallel")), messages
    assert "alg_name" not in messages[0] and hp.mom2_update_weight == 15000.0
