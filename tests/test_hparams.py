"""Hyper-parameters: presets, original-format files, overrides and their errors."""

import json

import pytest
from helpers import GOLDEN

from editfast.core.errors import HParamsError
from editfast.methods.hparams import read_hparams_file
from editfast.methods.memit import MEMITHyperParams
from editfast.methods.registry import make_hparams, resolve_hparams
from editfast.models.load import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-gpt2")


def test_original_hparams_files_load_unchanged(tiny):
    for case in ("rome_tiny_gpt2", "memit_tiny_gpt2"):
        path = GOLDEN / case / "hparams.json"
        if not path.is_file():
            pytest.skip("golden data absent")
        hp = make_hparams(case.split("_")[0], json.loads(path.read_text()))
        hp.check_modules(tiny.adapter)  # names match the GPT-2 adapter
    assert isinstance(hp, MEMITHyperParams) and hp.mom2_update_weight == 20000.0


def test_module_names_checked_against_adapter():
    llama = load_model("random:tiny-llama")
    hp = make_hparams("rome", {"layers": [1], "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"})
    with pytest.raises(HParamsError, match="rewrite_module_tmp"):
        hp.check_modules(llama.adapter)


def test_presets_and_precedence(tmp_path, tiny):
    hp = resolve_hparams("memit", "random:gpt2-xl", None)
    assert hp.layers == [13, 14, 15, 16, 17] and hp.mom2_update_weight == 20000 and hp.v_loss_layer == 47
    f = tmp_path / "h.yaml"
    f.write_text("mom2_update_weight: 1000\nv_num_grad_steps: 5\n")
    hp = resolve_hparams("memit", "smollm2-135m", None, {"v_num_grad_steps": 7}, f)
    assert hp.mom2_update_weight == 1000 and hp.v_num_grad_steps == 7 and hp.layers == [4, 5, 6, 7, 8]
    assert resolve_hparams("rome", tiny.spec, tiny.model.config).layers == [1]


@pytest.mark.parametrize("values,word", [
    ({"layers": [1], "lr": 0.1}, "lr"),
    ({"layers": "1"}, "layers"),
    ({"layers": [1], "v_num_grad_steps": 2.5}, "v_num_grad_steps"),
    ({"layers": [1], "mom2_adjustment": "yes"}, "mom2_adjustment"),
    ({"layers": [1, 2]}, "exactly one layer"),
    ({"layers": []}, "layers"),
    ({"v_lr": 0.1}, "layers"),
])
def test_bad_values(values, word):
    with pytest.raises(HParamsError, match=word):
        make_hparams("rome", values)


def test_memit_layers_increasing_and_lambda_positive():
    with pytest.raises(HParamsError, match="increasing"):
        make_hparams("memit", {"layers": [3, 2]})
    with pytest.raises(HParamsError, match="mom2_update_weight"):
        make_hparams("memit", {"layers": [1], "mom2_update_weight": -1})


def test_unknown_method_and_no_preset():
    with pytest.raises(HParamsError, match="unknown method"):
        make_hparams("no-such-method", {"layers": [1]})
    with pytest.raises(HParamsError, match="--hparams"):
        resolve_hparams("memit", "some/model", None)


def test_file_errors(tmp_path):
    with pytest.raises(HParamsError, match="not found"):
        read_hparams_file(tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(HParamsError, match="not valid JSON"):
        read_hparams_file(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(HParamsError, match="mapping"):
        read_hparams_file(lst)
