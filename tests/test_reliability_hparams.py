"""Issue 12, hyper-parameters: every field's range and finiteness, `--set` parsing with YAML 1.2
numbers, one-line errors naming the key, and checks that need no model weights."""

import json
import math
import typing

import pytest
from helpers import GOLDEN, assert_refused
from transformers import LlamaConfig

from editfast.core.errors import HParamsError
from editfast.methods.hparams import check_layers, parse_overrides, read_hparams_file
from editfast.methods.memit import MEMITHyperParams
from editfast.methods.registry import METHODS, make_hparams, resolve_hparams

LAYERS = {name: m.presets["tiny"]["layers"] for name, m in METHODS.items()}  # every method has a tiny preset


def build(method, items):
    """What the CLI does with `--method method --set items...` on a model without a preset."""
    return make_hparams(method, {"layers": LAYERS[method], **parse_overrides(items)})


def refused(call, *words):
    with pytest.raises(HParamsError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# --- --set values that are refused, each naming the key (and the value given) ---
BAD_SETS = [
    ("memit", "mom2_update_weight=.nan", "nan"),
    ("memit", "mom2_update_weight=.inf", "inf"),
    ("memit", "mom2_update_weight=-.inf", "-inf"),
    ("memit", "mom2_update_weight=0", "0"),
    ("memit", "mom2_update_weight=-1e4", "-10000"),
    ("rome", "v_lr=.nan", "nan"),
    ("rome", "v_lr=0", "0"),
    ("rome", "v_lr=-5e-1", "-0.5"),
    ("rome", "v_weight_decay=-5", "-5"),
    ("rome", "v_weight_decay=.inf", "inf"),
    ("rome", "kl_factor=-1", "-1"),
    ("r-rome", "kl_factor=.NaN", "nan"),
    ("rome", "clamp_norm_factor=0", "0"),
    ("memit", "clamp_norm_factor=-.inf", "-inf"),
    ("rome", "mom2_n_samples=0", "0"),
    ("rome", "mom2_n_samples=-5", "-5"),
    ("memit", "mom2_max_tokens=0", "0"),
    ("rome", "v_num_grad_steps=0", "0"),
    ("rome", "v_loss_layer=-2", "-2"),
    ("memit", "layers=[1, 1]", "[1, 1]"),
    ("memit", "layers=[-1, 2]", "-1"),
    ("rome", "layers=[]", "layers"),
    ("rome", "v_lr=abc", "abc"),
    ("rome", "v_lr=true", "True"),
    ("rome", "mom2_n_samples=2.5", "2.5"),
    ("rome", "mom2_n_samples=1e400", "inf"),
    ("rome", "v_num_grad_steps=.nan", "nan"),
    ("rome", "mom2_adjustment=maybe", "maybe"),
    ("rome", "mom2_dtype=float16", "float16"),
    ("rome", "fact_token=subject_first", "subject_first"),
    ("memit", "layer_selection=random", "random"),
    ("rome", "context_template_length_params=[[5, 0]]", "[[5, 0]]"),
    ("r-rome", "context_template_length_params=[[5]]", "[[5]]"),
]


@pytest.mark.parametrize("method,item,value", BAD_SETS, ids=[f"{m}:{i}" for m, i, _ in BAD_SETS])
def test_bad_set_values_refused_naming_key_and_value(method, item, value):
    key = item.split("=")[0]
    refused(lambda: build(method, [item]), key, value)


# --- --set items that are not key=YAML ---
BAD_ITEMS = [
    ("layers=[4", "layers"),
    ("v_lr=: x", "v_lr"),
    ("layers={1", "layers"),
    ("mom2_dataset='wiki", "mom2_dataset"),
    ("v_lr", "v_lr"),
    ("=0.5", "=0.5"),
    ("v_lr=!!python/object/apply:os.system [ls]", "v_lr"),
]


@pytest.mark.parametrize("item,word", BAD_ITEMS, ids=[i for i, _ in BAD_ITEMS])
def test_malformed_set_items_are_one_line_errors(item, word):
    msg = refused(lambda: parse_overrides([item]), word, "--set")
    assert repr(item) in msg  # the item as given


# --- numbers: YAML 1.2 floats, typed by the field ---
@pytest.mark.parametrize("text,value", [("1e4", 1e4), ("5e-1", 0.5), ("1E+3", 1000.0), (".5", 0.5),
                                        ("-2.5e-3", -2.5e-3), ("+1e3", 1000.0), ("2.", 2.0), ("7", 7)])
def test_yaml12_numbers(text, value):
    got = parse_overrides([f"x={text}"])["x"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", [".nan", ".NaN", ".inf", "-.inf", "+.Inf"])
def test_non_finite_yaml_floats_parse_as_floats(text):
    x = parse_overrides([f"x={text}"])["x"]
    assert isinstance(x, float) and not math.isfinite(x)


def test_values_typed_by_field():
    hp = build("memit", ["mom2_update_weight=1e4", "v_num_grad_steps=1e3", "v_lr=1", "layers=[4, 5]",
                         "mom2_dataset=wikitext", "kl_factor=0"])
    assert hp.mom2_update_weight == 10000.0 and isinstance(hp.mom2_update_weight, float)
    assert hp.v_num_grad_steps == 1000 and isinstance(hp.v_num_grad_steps, int)
    assert hp.v_lr == 1.0 and isinstance(hp.v_lr, float) and hp.layers == [4, 5] and hp.kl_factor == 0
    assert parse_overrides(["v_lr = 0.1", "v_lr=0.2"]) == {"v_lr": 0.2}  # spaces stripped, the last wins


# --- every float field of every method refuses NaN and ±inf (a new method is covered as it is added) ---
FLOAT_FIELDS = [(m, k) for m, meth in METHODS.items()
                for k, t in typing.get_type_hints(meth.hparams_class).items() if t is float]


@pytest.mark.parametrize("method,key", FLOAT_FIELDS, ids=[f"{m}:{k}" for m, k in FLOAT_FIELDS])
@pytest.mark.parametrize("x", [math.nan, math.inf, -math.inf])
def test_every_float_field_refuses_non_finite(method, key, x):
    refused(lambda: make_hparams(method, {"layers": LAYERS[method], key: x}), key)


def test_float_fields_found():
    assert {"v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor"} <= {k for _, k in FLOAT_FIELDS}
    assert ("memit", "mom2_update_weight") in FLOAT_FIELDS


# --- hyper-parameter files: JSON may hold NaN/Infinity; YAML uses the same 1.2 numbers ---
BAD_FILES = [
    ("h.json", '{"mom2_update_weight": NaN}', "mom2_update_weight"),
    ("h.json", '{"v_lr": Infinity}', "v_lr"),
    ("h.json", '{"kl_factor": -Infinity}', "kl_factor"),
    ("h.json", '{"layers": [1, NaN]}', "layers"),
    ("h.yaml", "mom2_update_weight: .nan\n", "mom2_update_weight"),
    ("h.yaml", "mom2_max_tokens: 0\n", "mom2_max_tokens"),
    ("h.yaml", "v_weight_decay: -1e-3\n", "v_weight_decay"),
]


@pytest.mark.parametrize("name,text,key", BAD_FILES, ids=[t for _, t, _ in BAD_FILES])
def test_bad_values_in_files(tmp_path, name, text, key):
    f = tmp_path / name
    f.write_text(text)
    refused(lambda: make_hparams("memit", {"layers": [1, 2], **read_hparams_file(f)}), key)


def test_file_numbers_and_syntax(tmp_path):
    f = tmp_path / "h.yaml"
    f.write_text("mom2_update_weight: 1.5e4\nv_lr: 5e-1\n")
    assert read_hparams_file(f) == {"mom2_update_weight": 15000.0, "v_lr": 0.5}
    f.write_text("v_lr: 0.5\nlayers: [4\n")
    refused(lambda: read_hparams_file(f), "not valid YAML", str(f), "line")
    f.write_text("1: 2\nv_lr: 0.5\n")  # a non-string key
    refused(lambda: make_hparams("rome", {"layers": [1], **read_hparams_file(f)}), "unknown key")


# --- what stays valid: every preset, the original hparams files, direct construction ---
def test_presets_and_original_files_pass():
    for name, meth in METHODS.items():
        for family, values in meth.presets.items():
            make_hparams(name, dict(values))
    for case in ("rome_tiny_gpt2", "rome_tiny_llama", "memit_tiny_gpt2", "memit_tiny_llama",
                 "rome_smollm2_b", "memit_smollm2_b"):
        path = GOLDEN / case / "hparams.json"
        if path.is_file():
            make_hparams(case.split("_")[0], json.loads(path.read_text()))


def test_direct_construction_and_mutation_validated():
    with pytest.raises(HParamsError, match="mom2_update_weight"):
        MEMITHyperParams(layers=[1], mom2_update_weight=float("nan"))
    hp = MEMITHyperParams(layers=[1], v_lr=1)
    assert hp.v_lr == 1.0 and isinstance(hp.v_lr, float)
    hp.v_lr = float("nan")
    with pytest.raises(HParamsError, match="v_lr"):
        hp.validate()


# --- before the model loads: a config and a layer count are enough ---
def test_resolve_needs_only_the_config():
    config = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         vocab_size=100)
    hp = resolve_hparams("memit", "random:tiny-llama", config, {"mom2_update_weight": 1e4})
    assert hp.layers == [1, 2] and hp.mom2_update_weight == 1e4
    refused(lambda: resolve_hparams("memit", "random:tiny-llama", config, parse_overrides(["mom2_update_weight=.nan"])),
            "mom2_update_weight")


@pytest.mark.parametrize("values,n,word", [({"layers": [4]}, 4, "layers [4]"), ({"layers": [1], "v_loss_layer": 4}, 4,
                                                                                "v_loss_layer 4")])
def test_check_layers(values, n, word):
    hp = make_hparams("rome", values)
    refused(lambda: check_layers(hp, n), word, str(n))
    check_layers(make_hparams("rome", {"layers": [3], "v_loss_layer": -1}), 4)
    check_layers(make_hparams("rome", {"layers": [0], "v_loss_layer": 3}), 4)


# --- end to end: one line on stderr, exit 2, no output left ---
CLI_CASES = [
    (["--set", "mom2_update_weight=.nan"], "mom2_update_weight"),
    (["--set", "mom2_max_tokens=0"], "mom2_max_tokens"),
    (["--set", "layers=[4"], "layers"),
    (["--set", "v_lr=: x"], "v_lr"),
    (["--set", "v_lr"], "v_lr"),
    (["--set", "layers=[1, 1]"], "layers"),
    (["--hparams", "{file}"], "mom2_update_weight"),
]


@pytest.mark.parametrize("extra,word", CLI_CASES, ids=[" ".join(e) for e, _ in CLI_CASES])
def test_cli_refuses_bad_hparams(tmp_path, capsys, extra, word):
    f = tmp_path / "h.json"
    f.write_text('{"mom2_update_weight": NaN}')
    out = tmp_path / "o"
    argv = ["edit", "--out", str(out), "--n", "2", "--model", "random:tiny-llama", "--templates", "fixed", "--quiet",
            *[a.format(file=f) for a in extra]]
    assert_refused(argv, capsys, word, absent=[out])
