"""editfast export RUN --lora DIR: a PEFT LoRA adapter equal to the edited model; saved models'
permissions and model card.

Three short runs on tiny random models: MEMIT on tiny-llama (two batches: factors concatenated),
ROME with --norm-anchor on tiny-llama (a Dense update: the SVD path, under umask 027) and ROME
through `editfast study` on tiny-gpt2 (Conv1D, fan_in_fan_out), its model saved by `undo`.
"""

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import assert_refused, run_cli
from peft import AutoPeftModelForCausalLM, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

import editfast
from editfast.core.errors import EditfastError
from editfast.models.load import load_model
from editfast.models.update import Dense, LowRank, Sparse, apply_update
from editfast.session import export
from editfast.session.export import entries_up_to, lora_from_run, module_factors
from editfast.session.journal import Entry, load_run

QUICK = ["--templates", "fixed", "--no-eval", "--quiet", "--set", "v_num_grad_steps=3"]
STUDY = """
name: g
model: random:tiny-gpt2
dataset: counterfact
templates: fixed
runs:
  - {name: rome-seq, method: rome, setting: sequential, n: 2, hparams: {v_num_grad_steps: 3}}
"""


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (run dir, saved model dir, base spec)}."""
    root = tmp_path_factory.mktemp("export")
    from editfast.cli import main

    def cli(argv):
        try:
            main(argv)
        except SystemExit as e:
            assert not e.code, argv

    old = os.umask(0o022)
    try:
        cli(["edit", "--method", "memit", "--n", "2", "--batch-size", "1", "--model", "random:tiny-llama",
             "--save-model", "--out", str(root / "memit"), *QUICK])
        os.umask(0o027)
        cli(["edit", "--method", "rome", "--n", "1", "--norm-anchor", "--model", "random:tiny-llama", "--save-model",
             "--out", str(root / "rome"), *QUICK])
        os.umask(0o022)
        (root / "s.yaml").write_text(STUDY)
        cli(["study", str(root / "s.yaml"), "--out", str(root / "study"), "--quiet"])
        run = root / "study" / "runs" / "rome-seq"
        cli(["undo", str(run), "--to", "2", "--save-model", "--out", str(root / "gpt2-undo"), "--quiet"])
    finally:
        os.umask(old)
    return {"memit": (root / "memit", root / "memit" / "model", "random:tiny-llama"),
            "rome-dense": (root / "rome", root / "rome" / "model", "random:tiny-llama"),
            "rome-gpt2-study": (run, root / "gpt2-undo" / "model", "random:tiny-gpt2")}


def linear_leaves(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}


def check_vllm_loadable(adapter: Path, model) -> dict:
    """What vLLM's LoRA loader (vllm/lora/peft_helper.py, lora_model.py, utils.py) asks of an adapter:
    r, lora_alpha and target_modules in the config; no bias, DoRA or modules_to_save; r at most
    512 (its largest max_lora_rank); every tensor named base_model.model.<module>.lora_A/B.weight
    of a linear module, A [r, in] and B [out, r]."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(cfg) and cfg["lora_alpha"] == cfg["r"] <= 512
    assert cfg["bias"] == "none" and not cfg["use_dora"] and not cfg["use_rslora"] and cfg["modules_to_save"] is None
    leaves = linear_leaves(model)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for k in keys:
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
            assert m and m[1] in cfg["target_modules"] and m[1].rsplit(".", 1)[-1] in leaves, k
            mod = model.get_submodule(m[1])
            out_f, in_f = (mod.weight.shape[::-1] if cfg["fan_in_fan_out"] else mod.weight.shape)
            assert list(f.get_tensor(k).shape) == ([cfg["r"], in_f] if m[2] == "A" else [out_f, cfg["r"]]), k
    assert len(keys) == 2 * len(cfg["target_modules"])
    return cfg


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_merged_equals(merged, saved_sd: dict[str, torch.Tensor]) -> None:
    sd = merged.state_dict()
    assert set(saved_sd) <= set(sd)
    worst = max(rel(sd[k], v) for k, v in saved_sd.items())
    assert worst < 1e-6, worst


@pytest.mark.parametrize("name", ["memit", "rome-dense", "rome-gpt2-study"])
def test_lora_equals_the_edited_model(runs, name, tmp_path, capsys):
    run, saved_dir, spec = runs[name]
    lora = tmp_path / "lora"
    if name == "rome-gpt2-study":  # the Python API
        s = lora_from_run(run, lora)
        assert s["edits"] == 2 and s["fan_in_fan_out"]
    else:
        old = os.umask(0o027)
        try:
            code, out, err = run_cli(["export", str(run), "--lora", str(lora)], capsys)
        finally:
            os.umask(old)
        assert code == 0, err
        assert "LoRA rank" in out
    if name == "memit":  # written with the permissions of a plain mkdir/open (umask 027 here)
        assert mode(lora) == 0o750 and {mode(f) for f in lora.iterdir()} == {0o640}
    edited = {u.weight.removesuffix(".weight") for e in load_run(run)[1] for u in e.updates}
    base = load_model(spec).model
    cfg = check_vllm_loadable(lora, base)
    assert sorted(edited) == cfg["target_modules"]
    assert cfg["fan_in_fan_out"] == (name == "rome-gpt2-study")
    # MEMIT: two rank-one batches concatenated; ROME + norm anchor: a dense ΔW of full rank d_model
    assert cfg["r"] == {"memit": 2, "rome-dense": 64, "rome-gpt2-study": 2}[name]
    saved = load_model(saved_dir).model
    model = PeftModel.from_pretrained(base, str(lora))
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == edited  # peft wraps the edited layers only
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, saved(ids).logits, rtol=1e-5, atol=1e-5)
    assert_merged_equals(model.merge_and_unload(), saved.state_dict())
    card = (lora / "README.md").read_text()
    assert "library_name: peft" in card and "- knowledge-editing" in card


def test_export_the_first_k_edits(runs, tmp_path, capsys):
    run, _, spec = runs["memit"]
    code, _, err = run_cli(["export", str(run), "--lora", str(tmp_path / "k1"), "--to", "1", "--dtype", "float32"],
                           capsys)
    assert code == 0, err
    lm = load_model(spec)  # the independent path: the first batch applied by editfast
    for u in load_run(run)[1][0].updates:
        apply_update(lm, u)
    merged = PeftModel.from_pretrained(load_model(spec).model, str(tmp_path / "k1")).merge_and_unload()
    assert json.loads((tmp_path / "k1" / "adapter_config.json").read_text())["r"] == 1
    assert_merged_equals(merged, lm.model.state_dict())
    # --dtype bfloat16: the same products within bfloat16's rounding of the (balanced) factors
    for d in ("float32", "bfloat16"):
        assert run_cli(["export", str(run), "--lora", str(tmp_path / d), "--dtype", d], capsys)[0] == 0
    with safe_open(str(tmp_path / "float32" / "adapter_model.safetensors"), "pt") as f32, \
            safe_open(str(tmp_path / "bfloat16" / "adapter_model.safetensors"), "pt") as bf:
        for k in [k for k in f32.keys() if ".lora_A." in k]:
            kb = k.replace(".lora_A.", ".lora_B.")
            assert bf.get_tensor(k).dtype == torch.bfloat16
            want = f32.get_tensor(kb) @ f32.get_tensor(k)
            assert rel(bf.get_tensor(kb).float() @ bf.get_tensor(k).float(), want) < 1e-2


def test_bad_exports(runs, tmp_path, capsys):
    run, _, _ = runs["memit"]
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("model"))
    doc = json.loads((moved / "session.json").read_text())
    doc["config"]["model"] = str(tmp_path / "gone" / "tiny-llama")
    (moved / "session.json").write_text(json.dumps(doc))
    out = tmp_path / "lora"
    assert_refused(["export", str(moved), "--lora", str(out)], capsys, str(tmp_path / "gone" / "tiny-llama"),
                   "--model", absent=[out])
    assert_refused(["export", str(moved), "--lora", str(out), "--model", "random:tiny-gpt2"], capsys, "fingerprint",
                   absent=[out])
    assert_refused(["export", str(tmp_path), "--lora", str(out)], capsys, "not an edit run", absent=[out])
    assert_refused(["export", str(run), "--lora", str(out), "--to", "3"], capsys, "--to 3", "2 edits", absent=[out])
    assert_refused(["export", str(run), "--lora", str(out), "--to", "0"], capsys, "--to 0", absent=[out])
    assert_refused(["export", str(run), "--lora", str(run)], capsys, "would replace the run")
    assert (run / "session.json").is_file()
    code, _, err = run_cli(["export", str(moved), "--lora", str(out), "--model", "random:tiny-llama"], capsys)
    assert code == 0, err  # the same model given by hand
    assert_refused(["export", str(moved), "--lora", str(out), "--model", "random:tiny-llama"], capsys, "not empty")


def test_to_must_be_a_batch_boundary():
    entries = [Entry(0, 0, 2, []), Entry(1, 2, 4, [])]
    assert entries_up_to("r", entries, 2) == entries[:1] and entries_up_to("r", entries, None) == entries
    with pytest.raises(EditfastError, match="--to 3 is not a batch boundary .*batches end at 2, 4"):
        entries_up_to("r", entries, 3)


def test_rank_beyond_vllm_is_warned(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "VLLM_MAX_LORA_RANK", 32)
    run, _, _ = runs["rome-dense"]
    code, _, err = run_cli(["export", str(run), "--lora", str(tmp_path / "l")], capsys)
    assert code == 0 and "warning: rank 64 exceeds 32" in err and "vLLM" in err, err
    with pytest.warns(UserWarning, match="vLLM"):
        lora_from_run(run, tmp_path / "l2")


def test_factors_are_exact():
    g = torch.Generator().manual_seed(0)
    out, d_in = 12, 20
    lows = [LowRank("w", torch.randn(out, 2, generator=g), torch.randn(d_in, 2, generator=g)) for _ in range(7)]
    cols = torch.tensor([3, 7, 11])  # KN: one vector added to three neurons' columns, rank 1
    vec = torch.randn(out, generator=g)
    kn = Sparse("w", (out, d_in), (torch.arange(out)[:, None] * d_in + cols).flatten(),
                vec[:, None].expand(out, 3).flatten().clone())
    dense = Dense("w", torch.randn(out, d_in, generator=g))
    # concatenated; KN's neurons: rank 1; dense: full rank; rank 14 > min(out, in): refactorised to 12
    for ups, rank in ([lows[:3], 6], [[kn], 1], [[dense], out], [lows[:3] + [kn], 7], [lows, out]):
        B, A = module_factors(ups)
        want = sum(u.U.double() @ u.V.double().T if isinstance(u, LowRank) else u.dense().double() for u in ups)
        assert B.shape[1] == rank and rel(B @ A, want) < 1e-12


def test_saved_models_permissions_and_card(runs):
    memit_run, memit_model, _ = runs["memit"]
    assert mode(memit_model) == 0o755 and {mode(f) for f in memit_model.iterdir()} == {0o644}
    rome_model = runs["rome-dense"][1]  # saved under umask 027
    assert mode(rome_model) == 0o750 and {mode(f) for f in rome_model.iterdir()} == {0o640}
    undo_out = runs["rome-gpt2-study"][1].parent  # undo's output folder: staged by mkdtemp (0700), published 0755
    assert mode(undo_out) == 0o755 and mode(undo_out / "model") == 0o755
    assert {mode(f) for f in undo_out.rglob("*") if f.is_file()} == {0o644}  # the journal's safetensors too
    for run, model_dir, spec in runs.values():
        card = (model_dir / "README.md").read_text()
        front = card.split("---\n")[1]
        assert json.dumps(spec) in front and "- editfast\n- knowledge-editing\n" in front
        results = json.loads((run / "results.json").read_text())
        assert f"# {results['method']} edits" in card
        for key, value in results["hparams"].items():
            assert f"| {key} | {json.dumps(value)} |" in card, key
        for r in results["per_request"]:
            assert f"| {r['subject']} | {r['prompt'].replace('{}', r['subject'])} | {r['target_true']} -> " \
                   f"{r['target_new']} |" in card
    assert "| v_num_grad_steps | 3 |" in (memit_model / "README.md").read_text()


def test_api_refuses_an_unknown_dtype(runs, tmp_path):
    with pytest.raises(EditfastError, match="dtype"):
        lora_from_run(runs["memit"][0], tmp_path / "x", dtype="int8")


def test_auto_peft_loads_a_smollm2_adapter_offline(pristine, tmp_path, monkeypatch):
    """AutoPeftModelForCausalLM.from_pretrained(adapter) alone, offline: the adapter names SmolLM2's
    folder in Hugging Face layout (the cache's conversion), and the model it loads is the edited one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reqs = editfast.load_dataset("counterfact", n=1)
    editfast.edit(pristine, reqs, method="rome", seed=0, templates="fixed", evaluate=False, progress=False,
                  overrides={"v_num_grad_steps": 3, "mom2_adjustment": False}).save(tmp_path / "run")
    s = lora_from_run(tmp_path / "run", tmp_path / "lora")
    assert s["warnings"] == [] and Path(s["base_model"]).is_dir()
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == s["base_model"]
    assert f"base_model: {json.dumps(s['base_model'])}" in (tmp_path / "lora" / "README.md").read_text()
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "lora"))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pristine.model(ids).logits, rtol=1e-5, atol=1e-4)


def test_export_base_makes_a_random_base_loadable(runs, tmp_path, capsys):
    """A random: base has no Hugging Face folder: the export warns how to get one; export-base writes
    it, --base names it, and AutoPeftModelForCausalLM then loads the edited model; --base of another
    model or of no model folder is refused, nothing written."""
    run, saved_dir, spec = runs["memit"]
    code, _, err = run_cli(["export", str(run), "--lora", str(tmp_path / "plain")], capsys)
    assert code == 0 and "export-base random:tiny-llama DIR" in err, err
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] == spec
    code, out, err = run_cli(["export-base", spec, str(tmp_path / "base")], capsys)
    assert code == 0 and (tmp_path / "base" / "config.json").is_file(), err
    assert_refused(["export-base", spec, str(tmp_path / "base")], capsys, "not empty")
    assert_refused(["export-base", str(tmp_path / "base"), str(tmp_path / "base"), "--force"], capsys,
                   "the model's own folder")
    assert (tmp_path / "base" / "config.json").is_file()
    lora = tmp_path / "lora"
    code, out, err = run_cli(["export", str(run), "--lora", str(lora), "--base", str(tmp_path / "base")], capsys)
    assert code == 0 and err == "" and str((tmp_path / "base").resolve()) in out, err
    model = AutoPeftModelForCausalLM.from_pretrained(str(lora))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_model(saved_dir).model(ids).logits, rtol=1e-5, atol=1e-5)
    gpt2 = tmp_path / "gpt2"
    assert run_cli(["export-base", "random:tiny-gpt2", str(gpt2)], capsys)[0] == 0
    out = tmp_path / "bad"
    assert_refused(["export", str(run), "--lora", str(out), "--base", str(gpt2)], capsys, "another model",
                   absent=[out])
    assert_refused(["export", str(run), "--lora", str(out), "--base", str(tmp_path)], capsys, "no config.json",
                   absent=[out])
    assert_refused(["export-base", "gpt2", str(out)], capsys, "gpt2", absent=[out])
