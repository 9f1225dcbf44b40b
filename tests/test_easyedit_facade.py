"""editfast.easyedit: EasyEdit's BaseEditor calls, unchanged but for the import, on editfast's methods.

The expected structures are written from reading EasyEdit (zjunlp/EasyEdit 14cea82: editors/editor.py,
editors/utils.py, evaluate/evaluate.py, evaluate/evaluate_utils.py); the metric values are checked
against a direct computation with the HF model, not against the facade's own helpers.
"""

import json
import logging
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from editfast.core.errors import EditfastError, HParamsError, RequestError

TINY_LLAMA_MODULES = """
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
"""
# EasyEdit's file layout (hparams/ROME/llama-7b.yaml, hparams/MEMIT/llama-7b.yaml) sized for tiny-llama.
ROME_YAML = """
alg_name: "ROME"
model_name: "random:tiny-llama"
stats_dir: "./data/stats"
device: 0
layers: [1]
fact_token: "subject_last"
v_num_grad_steps: 6
v_lr: 5e-1
v_loss_layer: 3
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 5]]
mom2_dataset: "wikitext"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
""" + TINY_LLAMA_MODULES
MEMIT_YAML = """
alg_name: "MEMIT"
model_name: "random:tiny-llama"
stats_dir: "./data/stats"
device: 0
layers: [1, 2]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 6
v_lr: 5e-1
v_loss_layer: 3
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
mom2_dataset: "wikitext"
mom2_n_samples: 64
mom2_dtype: "float32"
model_parallel: false
""" + TINY_LLAMA_MODULES

# The call shapes of EasyEdit's README ("BaseEditor", step 6) and examples/run_zsre_llama2.py; only the
# import line differs from an EasyEdit script.
SCRIPT = """
from editfast.easyedit import BaseEditor, {cls}

hparams = {cls}.from_hparams('{path}')
prompts = ['Ray Charles, the', 'Grant Hill is a professional']
ground_truth = ['piano', 'basketball']
target_new = ['violin', 'soccer']
subject = ['Ray Charles', 'Grant Hill']
rephrase_prompts = ['Ray Charles plays the', 'Grant Hill plays professional']
locality_inputs = {{
    'neighborhood': {{
        'prompt': ['Joseph Fischhof, the', 'Larry Bird is a professional'],
        'ground_truth': ['piano', 'basketball'],
    }},
}}
portability_inputs = {{
    'synonym': {{
        'prompt': ['Ray Charles, the musician who plays the', 'Grant Hill, the athlete who plays'],
        'ground_truth': ['violin', 'soccer'],
    }},
}}
editor = BaseEditor.from_hparams(hparams)
{call}
"""
README_CALL = """
metrics, edited_model, _ = editor.edit(
    prompts=prompts,
    ground_truth=ground_truth,
    target_new=target_new,
    subject=subject,
    rephrase_prompts=rephrase_prompts,
    locality_inputs=locality_inputs,
    portability_inputs=portability_inputs,
    sequential_edit=False,
    verbose=False,
)
"""
ZSRE_EXAMPLE_CALL = """
metrics, edited_model, _ = editor.edit(
    prompts=prompts,
    rephrase_prompts=rephrase_prompts,
    target_new=target_new,
    subject=subject,
    train_ds=None,
    locality_inputs=locality_inputs,
    portability_inputs=portability_inputs,
    keep_original_weight=True,
    verbose=False,
)
"""


@pytest.fixture(scope="module")
def hparams_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hparams")
    stats = f'stats_dir: "{d / "stats"}"'  # the statistics these tests compute, kept out of the working directory
    (d / "rome.yaml").write_text(ROME_YAML.replace('stats_dir: "./data/stats"', stats))
    (d / "memit.yaml").write_text(MEMIT_YAML.replace('stats_dir: "./data/stats"', stats))
    return d


def _editor(path, cls_name):
    import editfast.easyedit as ee

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # P_loc without effect, device 0 without CUDA
        return ee.BaseEditor.from_hparams(getattr(ee, cls_name).from_hparams(str(path)))


@pytest.fixture(scope="module")
def rome(hparams_dir):
    return _editor(hparams_dir / "rome", "ROMEHyperParams")


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def teacher_forced(model, tok, prompt, target):
    """Directly: prompt + " " + target as one text; the target's tokens are those after the prompt's;
    the model's argmax at each position before them."""
    ids = tok(prompt + " " + target)["input_ids"]
    n = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        argmax = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
    return argmax[n - 1: len(ids) - 1], ids[n:]


def acc(pred, labels):
    return sum(p == t for p, t in zip(pred, labels)) / len(labels)


def check_structure(metrics, n, rephrase, loc_key="neighborhood", por_key="synonym", batch=False):
    """EasyEdit's layout: per edit pre/case_id/requested_rewrite/post (+ time in batch_edit)."""
    assert isinstance(metrics, list) and len(metrics) == n
    for i, m in enumerate(metrics):
        assert list(m) == (["case_id", "requested_rewrite", "pre", "time", "post"] if batch  # EasyEdit's order
                           else ["pre", "case_id", "requested_rewrite", "post"])
        rr = m["requested_rewrite"]
        assert set(rr) == {"prompt", "target_new", "ground_truth", "portability", "locality", "subject"} | (
            {"rephrase_prompt"} if rephrase else set())
        assert set(rr["locality"]) == {loc_key} and set(rr["locality"][loc_key]) == {"prompt", "ground_truth"}
        assert set(rr["portability"]) == {por_key}
        common = {"rewrite_acc", "metric_meta", "locality", "portability"} | ({"rephrase_acc"} if rephrase else set())
        assert set(m["pre"]) == common and set(m["post"]) == common
        assert set(m["pre"]["metric_meta"]) == {"rewrite"} | ({"rephrase"} if rephrase else set())
        assert set(m["post"]["metric_meta"]) == set(m["pre"]["metric_meta"]) | {f"locality.{loc_key}"}
        assert set(m["pre"]["locality"]) == {f"{loc_key}_output"}
        assert set(m["post"]["locality"]) == {f"{loc_key}_output", f"{loc_key}_acc"}
        assert set(m["pre"]["portability"]) == set(m["post"]["portability"]) == {f"{por_key}_acc"}
        for phase in ("pre", "post"):
            ra = m[phase]["rewrite_acc"]
            assert isinstance(ra, list) and len(ra) == 1 and 0.0 <= ra[0] <= 1.0
            out = m[phase]["locality"][f"{loc_key}_output"]
            assert isinstance(out, list) and all(isinstance(t, int) for t in out[0])
        json.dumps(m)  # EasyEdit's scripts json.dump the metrics


@pytest.mark.parametrize("cls,file,call", [("ROMEHyperParams", "rome", ZSRE_EXAMPLE_CALL),
                                           ("MEMITHyperParams", "memit", README_CALL)], ids=["rome", "memit"])
def test_easyedit_script_runs_unchanged(hparams_dir, cls, file, call, caplog):
    caplog.set_level(logging.INFO, logger="editfast.easyedit")
    code = textwrap.dedent(SCRIPT.format(cls=cls, path=hparams_dir / file, call=call))
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"easyedit-{file}.py", "exec"), scope)
    metrics, edited_model, editor = scope["metrics"], scope["edited_model"], scope["editor"]
    check_structure(metrics, 2, rephrase=True)
    assert [m["case_id"] for m in metrics] == [0, 1]
    assert edited_model is editor.model
    assert metrics[1]["requested_rewrite"]["prompt"] == "Grant Hill is a professional"
    said = [r.getMessage() for r in caplog.records]  # EasyEdit's log lines, whatever verbose says
    assert any(m.startswith("Execution 1 editing took ") for m in said) and "Evaluation took" in caplog.text


def test_metrics_mean_what_easyedit_means(rome):
    model, tok = rome.model, rome.tok
    w0 = weights(model)
    prompt, target, loc, loc_truth = "Ray Charles, the", "violin", "Joseph Fischhof, the", "piano"
    pre_rewrite = teacher_forced(model, tok, prompt, target)
    pre_loc, _ = teacher_forced(model, tok, loc, loc_truth)
    try:
        metrics, edited, wcopy = rome.edit(prompts=[prompt], target_new=[target], subject=["Ray Charles"],
                                           locality_inputs={"nb": {"prompt": [loc], "ground_truth": [loc_truth]}},
                                           sequential_edit=True, verbose=False)
        m = metrics[0]
        assert not same(weights(model), w0)  # sequential: the edit stays
        post_rewrite = teacher_forced(model, tok, prompt, target)
        post_loc, _ = teacher_forced(model, tok, loc, loc_truth)
        # rewrite_acc: teacher-forced argmax accuracy on the target's tokens, before and after
        assert m["pre"]["rewrite_acc"] == [acc(*pre_rewrite)]
        assert m["post"]["rewrite_acc"] == [acc(*post_rewrite)]
        # locality: the model's own predictions, and their agreement after the edit with before
        assert m["pre"]["locality"]["nb_output"] == [pre_loc]
        assert m["post"]["locality"]["nb_output"] == [post_loc]
        assert m["post"]["locality"]["nb_acc"] == [acc(post_loc, pre_loc)]
        # weights_copy: the weights the edit changed, as they were before it
        name = "model.layers.1.mlp.down_proj.weight"
        assert list(wcopy) == [name] and torch.equal(wcopy[name], w0[name]) and edited is model
    finally:
        model.load_state_dict(w0)
    # undone: the model's own predictions agree with themselves (locality 1.0), bitwise weights
    again, _, _ = rome.edit(prompts=prompt, target_new=target, subject="Ray Charles",
                            locality_inputs={"nb": {"prompt": loc, "ground_truth": loc_truth}}, verbose=False)
    assert again[0]["pre"] == m["pre"] and same(weights(model), w0)
    assert teacher_forced(model, tok, loc, loc_truth)[0] == pre_loc


def test_test_generation_adds_easyedit_fluency(rome):
    """test_generation=True: EasyEdit's "fluency": {"ngram_entropy": x} in pre and post, x ROME's n-gram
    entropy of the rewrite prompt's top-k sample (prompt + sample: 100 tokens), seeded by the prompt."""
    from editfast.engine.engine import Engine
    from editfast.eval.generation import (
        GENERATION_SEED,
        fluency,
        sample_seed,
        samples,
        texts,
    )

    prompt = "Ray Charles, the"
    w0 = weights(rome.model)
    want = fluency(texts(Engine(rome.lm, progress=False),
                         samples(rome.tok, [prompt], [sample_seed(GENERATION_SEED, prompt, 0)])))
    metrics, _, _ = rome.edit(prompts=[prompt], target_new=["violin"], subject=["Ray Charles"], test_generation=True,
                              verbose=False)
    assert metrics[0]["pre"]["fluency"] == {"ngram_entropy": want}
    assert isinstance(metrics[0]["post"]["fluency"]["ngram_entropy"], float) and same(weights(rome.model), w0)


def test_restore_after_each_edit_unless_sequential(rome):
    model = rome.model
    w0 = weights(model)
    prompts, targets, subjects = ["Ray Charles, the", "Grant Hill is a professional"], ["violin", "soccer"], \
        ["Ray Charles", "Grant Hill"]
    alone = []
    for p, t, s in zip(prompts, targets, subjects):  # each edit by itself
        alone.append(rome.edit(prompts=[p], target_new=[t], subject=[s], verbose=False)[0][0]["post"])
        assert same(weights(model), w0)
    with pytest.warns(UserWarning, match="keep_original_weight=False"):  # old EasyEdit kept the edits then
        both, edited, _ = rome.edit(prompts=prompts, target_new=targets, subject=subjects, keep_original_weight=False,
                                    verbose=False)
    assert same(weights(model), w0) and edited is model  # EasyEdit returns the restored model
    assert [m["post"]["rewrite_acc"] for m in both] == [a["rewrite_acc"] for a in alone]
    try:
        seq, _, wcopy = rome.edit(prompts=prompts, target_new=targets, subject=subjects, sequential_edit=True,
                                  verbose=False)
        assert seq[0]["post"] == both[0]["post"]  # the first edit sees the unedited model either way
        assert not same(weights(model), w0)
        name = next(iter(wcopy))
        assert not torch.equal(wcopy[name], w0[name])  # the weights before the *last* edit
    finally:
        model.load_state_dict(w0)


def test_hparams_changed_after_the_editor_was_made(rome):
    """EasyEdit reads hparams at each call: a layer set on editor.hparams is the one edited next."""
    args = dict(prompts="Ray Charles, the", target_new="violin", subject="Ray Charles", verbose=False)
    rome.hparams.layers = [2]
    try:
        _, _, wcopy = rome.edit(**args)
        assert list(wcopy) == ["model.layers.2.mlp.down_proj.weight"]
        rome.hparams.layers = [9]
        with pytest.raises(HParamsError, match="out of range"):
            rome.edit(**args)
    finally:
        rome.hparams.layers = [1]
    assert list(rome.edit(**args)[2]) == ["model.layers.1.mlp.down_proj.weight"]


def test_batch_edit_memit(hparams_dir):
    memit = _editor(hparams_dir / "memit", "MEMITHyperParams")
    model = memit.model
    w0 = weights(model)
    memit.hparams.batch_size = 2
    loc = {"nb": {"prompt": [["Joseph Fischhof, the", "Larry Bird is a"]] * 3,
                  "ground_truth": [["piano", "basketball"]] * 3}}
    por = {"p": {"prompt": ["A", "B", "C"], "ground_truth": ["x", "y", "z"]}}
    metrics, edited, wcopy = memit.batch_edit(
        prompts=["Ray Charles, the", "Grant Hill is a professional", "The law in Ikaalinen declares the language"],
        target_new=["violin", "soccer", "Swedish"], subject=["Ray Charles", "Grant Hill", "Ikaalinen"],
        locality_inputs=loc, portability_inputs=por, verbose=False)
    check_structure(metrics, 3, rephrase=False, loc_key="nb", por_key="p", batch=True)
    assert [m["case_id"] for m in metrics] == [0, 1, 0]  # EasyEdit: the index inside the batch
    assert metrics[0]["time"] == metrics[1]["time"] != metrics[2]["time"]
    assert len(metrics[0]["post"]["locality"]["nb_acc"]) == 2  # one agreement per locality prompt
    assert sorted(wcopy) == [f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)]
    assert same(weights(model), w0)
    assert list((hparams_dir / "stats").rglob("layer1-*.safetensors"))  # the file's stats_dir holds the statistics
    with pytest.raises(HParamsError, match="batch_size is 2"):
        memit.edit(prompts="Ray Charles, the", target_new="violin", subject="Ray Charles", verbose=False)


def test_alphaedit_keys_do_not_leak_from_restored_edits(hparams_dir):
    """Restoring after an edit restores AlphaEdit's accumulated keys too: a later edit gives the weights it
    gives on a fresh editor (EasyEdit keeps them in a global across restored edits)."""
    (hparams_dir / "alpha.yaml").write_text((hparams_dir / "memit.yaml").read_text().replace('"MEMIT"', '"AlphaEdit"') +
                                            'nullspace_threshold: 2e-2\nL2: 10\nP_loc: "./null_space_project.pt"\n')
    first, fresh = (_editor(hparams_dir / "alpha", "AlphaEditHyperParams") for _ in range(2))
    w0 = weights(first.model)
    first.batch_edit(prompts=["Ray Charles, the", "Grant Hill is a professional"], target_new=["violin", "soccer"],
                     subject=["Ray Charles", "Grant Hill"], verbose=False)
    assert same(weights(first.model), w0)
    for editor in (first, fresh):
        editor.batch_edit(prompts=["The law in Ikaalinen declares the language"], target_new=["Swedish"],
                          subject=["Ikaalinen"], sequential_edit=True, verbose=False)
    assert not same(weights(first.model), w0) and same(weights(first.model), weights(fresh.model))


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_new=["violin"]), "target_new has 1 entries for 2 prompts"),
    (dict(subject=["Ray Charles"]), "subject has 1 entries for 2 prompts"),
    (dict(subject=None), "subject= is required"),
    (dict(subject=["Ray Charles", "Larry Bird"]), "subject 'Larry Bird' does not occur"),
    (dict(colour="red"), "unknown or unsupported argument.*colour"),
    (dict(test_generation="yes"), "test_generation must be True or False"),
    (dict(train_ds=[{"prompt": "x"}]), "IKE"),
    (dict(eval_metric="ppl"), "eval_metric='ppl'"),
    (dict(keep_original_weight=True, sequential_edit=True), "contradicts"),
    (dict(locality_inputs={"nb": {"prompt": ["a"], "ground_truth": ["b"]}}),
     r"locality_inputs\['nb'\]\['prompt'\] has 1"),
    (dict(portability_inputs={"p": {"prompt": ["a", ["b"]], "ground_truth": ["x", "y"]}}), "two strings or two lists"),
])
def test_bad_input_is_refused_with_weights_untouched(rome, kwargs, match):
    w0 = weights(rome.model)
    args = dict(prompts=["Ray Charles, the", "Grant Hill is a professional"], target_new=["violin", "soccer"],
                subject=["Ray Charles", "Grant Hill"], verbose=False)
    with pytest.raises(RequestError, match=match):
        rome.edit(**{**args, **kwargs})
    assert same(weights(rome.model), w0)


def test_bad_hparams(hparams_dir, tmp_path, rome):
    from editfast.easyedit import (
        AlphaEditHyperParams,
        MEMITHyperParams,
        ROMEHyperParams,
    )

    with pytest.raises(HParamsError, match="alg_name='ROME' does not match the method 'memit'"):
        MEMITHyperParams.from_hparams(str(hparams_dir / "rome"))
    (tmp_path / "typo.yaml").write_text(ROME_YAML.replace("kl_factor", "kl_factr"))
    with pytest.raises(HParamsError, match="kl_factr"):
        ROMEHyperParams.from_hparams(str(tmp_path / "typo"))
    with pytest.raises(HParamsError, match="not found"):
        ROMEHyperParams.from_hparams(str(tmp_path / "missing"))
    (tmp_path / "fp16.yaml").write_text(ROME_YAML + "fp16: 1\n")
    with pytest.raises(HParamsError, match="fp16=1 is not allowed; fp16 must be true or false"):
        ROMEHyperParams.from_hparams(str(tmp_path / "fp16"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stats_dir is used, so nothing here is without effect
        hp = ROMEHyperParams.from_hparams(str(hparams_dir / "rome.yaml"))
    assert hp.v_lr == 0.5 and hp.layers == [1] and hp.max_length == 40  # "5e-1" read as a number
    assert ROMEHyperParams(layers=[1], v_lr="1e-1").v_lr == 0.1  # quoted, as in a JSON file
    (tmp_path / "alpha.yaml").write_text(MEMIT_YAML.replace('"MEMIT"', '"AlphaEdit"') + 'P_loc: "./P.pt"\n')
    with pytest.warns(UserWarning, match="accepted without effect: P_loc"):
        AlphaEditHyperParams.from_hparams(str(tmp_path / "alpha"))
    hp.model_parallel = True  # accelerate's device_map="auto" (here: every layer on the CPU)
    assert rome.from_hparams(hp).lm.device.type == "cpu"
    with pytest.raises(EditfastError, match="can not batch edit"):
        rome.batch_edit(prompts=["Ray Charles, the"], target_new=["violin"], subject=["Ray Charles"])


EASYEDIT_FILES = sorted(p for p in (Path(__file__).parent / "data" / "easyedit_hparams").glob("*/*.yaml")
                        if p.parent.name != "FT")  # FT's: tests/test_method_ft.py


def test_every_easyedit_file_loads_through_the_facade():
    """EasyEdit's 31 ROME/MEMIT/AlphaEdit files (tests/data/easyedit_hparams) through the classes' from_hparams:
    every key an attribute of EasyEdit's name with the file's value, numbers as numbers; one warning naming
    max_length/P_loc where the file has them (no model is loaded)."""
    import yaml

    import editfast.easyedit as ee

    method = {"ROME": "rome", "MEMIT": "memit", "AlphaEdit": "alphaedit"}
    assert len(EASYEDIT_FILES) == 31
    for path in EASYEDIT_FILES:
        raw = yaml.safe_load(path.read_text())  # YAML 1.1: "5e-1" is a string here
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            hp = getattr(ee, f"{path.parent.name}HyperParams").from_hparams(path)
        assert (hp.alg_name, hp.method, hp.layers) == (raw["alg_name"], method[raw["alg_name"]], raw["layers"]), path
        for key, value in raw.items():
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            got = getattr(hp, key)
            assert got == value and (type(got) is not str or isinstance(value, str)), (path, key, got)
        warned = [k for k in ("max_length", "P_loc") if k in raw]
        assert len(w) == (1 if warned else 0) and all(k in str(w[0].message) for k in warned), (path, w)
        assert hp.editfast_hparams().layers == raw["layers"]


def test_corpus_checked_in_stats_dir_before_the_model_loads(tmp_path, monkeypatch):
    """EasyEdit's MEMIT files name mom2_dataset: wikipedia; neither in the datasets cache nor in the file's
    stats_dir, it is refused before the weights load."""
    import editfast.models.load
    from editfast.easyedit import BaseEditor, MEMITHyperParams

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(editfast.models.load, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    (tmp_path / "wiki.yaml").write_text(MEMIT_YAML.replace('"wikitext"', '"wikipedia"')
                                        .replace("./data/stats", str(tmp_path / "stats")))
    with pytest.raises(HParamsError, match="wikipedia"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BaseEditor.from_hparams(MEMITHyperParams.from_hparams(tmp_path / "wiki.yaml"))


def test_easyedit_zsre_file_edits_toward_alt(tmp_path):
    from editfast.data.requests import load_dataset

    rec = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "unmanned aircraft",
           "answers": ["uniform"], "rephrase": "What will be the product of UniFirst?",
           "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare",
           "portability": {"New Question": "q", "New Answer": "a"}}
    f = tmp_path / "zsre_mend_eval_portability_gpt4.json"
    f.write_text(json.dumps([rec, {**rec, "alt": "", "subject": "Hamlet", "src": "Who wrote Hamlet?"}]))
    got = load_dataset(str(f))
    assert [r.target_new for r in got] == ["unmanned aircraft", "uniform"]  # EasyEdit's alt; no alt: answers[0]
    assert load_dataset("zsre", 1)[0].target_new == "uniform"  # the bundled set keeps MEMIT's answers[0]


@pytest.mark.slow
def test_rome_on_smollm2_writes_a_known_fact(tmp_path):
    from editfast.data.requests import load_dataset

    (tmp_path / "smol.yaml").write_text(
        ROME_YAML.replace("random:tiny-llama", "smollm2-135m").replace("layers: [1]", "layers: [5]")
        .replace("v_loss_layer: 3", "v_loss_layer: 29").replace("v_num_grad_steps: 6", "v_num_grad_steps: 20"))
    r = load_dataset("counterfact")[52]  # a fact SmolLM2 knows (tests/test_edit.py's KNOWN)
    try:
        editor = _editor(tmp_path / "smol", "ROMEHyperParams")
    except EditfastError as e:
        pytest.skip(str(e))
    metrics, _, _ = editor.edit(prompts=[r.filled()], target_new=[r.target_new], ground_truth=[r.target_true],
                                subject=[r.subject], verbose=False)
    assert metrics[0]["pre"]["rewrite_acc"][0] < 1.0
    assert metrics[0]["post"]["rewrite_acc"] == [1.0]
