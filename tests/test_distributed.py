"""torchrun data parallelism with two gloo ranks on the CPU (tests/dist_worker.py is one rank):
statistics equal to one process, evaluation answers and metrics equal to one process, ranks that
disagree on the configuration refused before anything is written."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editfast.core import distributed as dist
from editfast.engine.engine import Engine
from editfast.eval.runner import EvalPlan
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.methods.registry import resolve_hparams
from editfast.models.load import load_model

HERE = Path(__file__).parent
N_SAMPLES, TASKS, LIMIT = 40, "sst2,rte,nq", 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(argvs, tmp_path, timeout=120):
    """Start one process per argv as ranks 0 and 1 of a gloo group; (exit code, stdout, stderr) of each."""
    port = free_port()
    (tmp_path / "tmp").mkdir(exist_ok=True)
    procs = []
    for r, argv in enumerate(argvs):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(len(argvs)),
               "LOCAL_WORLD_SIZE": str(len(argvs)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "EDITFAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp"),
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=tmp_path))
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, o, e))
    return outs


def test_shard_is_balanced_disjoint_and_complete():
    weights = [5, 1, 1, 9, 3, 3, 2, 8, 1, 1]
    parts = [dist.shard(weights, 3, r) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(weights)))
    loads = [sum(weights[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(weights)  # greedy largest-first: within one item
    assert dist.shard(weights) == list(range(len(weights)))  # one process: everything


def test_two_gloo_ranks_equal_one_process(tmp_path, monkeypatch):
    """Statistics within 1e-6 of one process; every request answered once, as one process answers
    it; the same task metrics; rank 0 alone wrote the statistics cache."""
    out = tmp_path / "out"
    out.mkdir()
    argv = [str(HERE / "dist_worker.py"), str(out), str(N_SAMPLES), TASKS, str(LIMIT)]
    results = two_ranks([argv, argv], tmp_path)
    assert all(code == 0 for code, _, _ in results), results

    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "one"))
    lm = load_model("random:tiny-llama")
    hp = resolve_hparams("memit", lm.spec, lm.model.config, {"mom2_n_samples": N_SAMPLES, "mom2_max_tokens": 64})
    one = second_moments(lm, [1, 3], hp, progress=False, use_cache=False)
    two = load_file(out / "stats.safetensors")
    for layer, c in one.items():
        d = two[f"layer{layer}"]
        assert d.dtype == c.dtype and d.shape == c.shape
        assert (d.double() - c.double()).abs().max() <= 1e-6 * c.double().abs().max()
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 2 and not any(n.startswith("partial") for n in cached)  # one file per layer

    doc = json.loads((out / "eval.json").read_text())
    plan = EvalPlan.build(TASKS, limit=LIMIT, seed=0)
    single = [a if isinstance(a, str) else list(dataclasses.astuple(a))
              for a in Engine(lm, progress=False).run(plan.pool)]
    (idx0, ans0), (idx1, ans1) = doc["shards"]
    assert idx0 and idx1 and not set(idx0) & set(idx1) and sorted(idx0 + idx1) == list(range(len(plan.pool)))
    for i, a in zip(idx0 + idx1, ans0 + ans1):
        if isinstance(a, str):
            assert a == single[i]
        else:  # (log-probability, tokens, greedy ...): the same, the sum to float rounding
            assert a[1:] == single[i][1:] and a[0] == pytest.approx(single[i][0], rel=1e-6, abs=1e-5)
    ref = plan.run(lm, Engine(lm, progress=False)).to_json()["tasks"]
    got = doc["result"]["tasks"]
    assert list(got) == list(ref)
    for t in ref:
        assert got[t]["n"] == ref[t]["n"] and got[t]["metrics"] == pytest.approx(ref[t]["metrics"], rel=1e-6)


def test_ranks_that_disagree_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "res"
    base = ["-m", "editfast.cli", "eval", "--model", "random:tiny-llama", "--tasks", "sst2", "--out", str(out),
            "--quiet"]
    results = two_ranks([base + ["--limit", "4"], base + ["--limit", "5"]], tmp_path)
    for code, stdout, err in results:
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and "disagree" in lines[0] and "limit" in lines[0] and "Traceback" not in err, err
        assert "rank 0=4" in lines[0] and "rank 1=5" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".res*"))


# ------------------------------------------------------------------------------------ device maps
# One CPU has one device, so layers cannot sit on two here. What can be run: accelerate's hooks
# with layers "offloaded" (their parameters on the meta device, their values in a weights map in
# CPU memory, copied in before each forward: what device_map="auto" does with the layers that do
# not fit the GPUs) and layers on disk.

OFFLOAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "keep",
           "model.layers.3": "disk", "model.norm": "keep", "model.rotary_emb": "keep", "lm_head": "keep"}


def offloaded(tmp_path):
    from accelerate import dispatch_model

    lm = load_model("random:tiny-llama")
    # main device torch.device("cpu") (not the string): accelerate offloads the "cpu" entries to a
    # weights map as it does beside a GPU, and executes everything on the CPU
    where = {k: "cpu" if v == "keep" else v for k, v in OFFLOAD.items()}
    lm.model = dispatch_model(lm.model, where, main_device=torch.device("cpu"), offload_dir=str(tmp_path / "off"))
    assert lm.model.model.layers[1].mlp.down_proj.weight.is_meta and lm.model.model.embed_tokens.weight.is_meta
    return lm


def test_offloaded_layers_give_the_plain_models_statistics_edit_and_evaluation(tmp_path, monkeypatch):
    from editfast import edit
    from editfast.data.requests import load_dataset
    from editfast.eval.runner import evaluate
    from editfast.models.update import snapshot

    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))
    plain, lm = load_model("random:tiny-llama"), offloaded(tmp_path)
    ov = {"mom2_n_samples": 20, "mom2_max_tokens": 32, "layers": [1, 2], "v_num_grad_steps": 4}
    hp = resolve_hparams("memit", lm.spec, lm.model.config, ov)
    for a, b in zip(second_moments(plain, [1, 2], hp, False, False).values(),
                    second_moments(lm, [1, 2], hp, False, False).values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)]
    before = snapshot(plain, names)
    reqs = load_dataset("counterfact", 2)
    runs = [edit(m, reqs, "memit", overrides=ov, templates="fixed", progress=False) for m in (plain, lm)]
    after_plain, after_lm = snapshot(plain, names), snapshot(lm, names)  # the offloaded copy is what was edited
    for n in names:
        assert not torch.equal(before[n], after_plain[n])
        assert torch.allclose(after_plain[n], after_lm[n], rtol=1e-5, atol=1e-6)
    assert runs[0].summary["post"] == pytest.approx(runs[1].summary["post"], rel=1e-4, abs=1e-6)
    evals = [evaluate(m, "sst2,nq", limit=3, progress=False).to_json()["tasks"] for m in (plain, lm)]
    for t in evals[0]:
        assert evals[0][t]["metrics"] == pytest.approx(evals[1][t]["metrics"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")
def test_layers_on_the_gpu_and_offloaded_to_the_cpu_edit_like_the_cpu(tmp_path, monkeypatch):
    """What --device auto gives a model larger than its GPU: some layers on cuda:0, the rest offloaded
    to CPU memory. A MEMIT edit across both (layer 1 offloaded, layer 2 on the GPU) equals the CPU's."""
    from accelerate import dispatch_model

    from editfast import edit
    from editfast.data.requests import load_dataset
    from editfast.models.update import snapshot

    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    plain, lm = load_model("random:tiny-llama"), load_model("random:tiny-llama")
    where = {k: "cpu" if k == "model.layers.1" else 0 for k in OFFLOAD}
    lm.model = dispatch_model(lm.model, where, main_device=0)
    ov = {"mom2_n_samples": 20, "mom2_max_tokens": 32, "layers": [1, 2], "v_num_grad_steps": 4}
    reqs = load_dataset("counterfact", 2)
    runs = [edit(m, reqs, "memit", overrides=ov, templates="fixed", progress=False) for m in (plain, lm)]
    names = [f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)]
    got, want = snapshot(lm, names), snapshot(plain, names)
    for n in names:
        assert torch.allclose(got[n].cpu(), want[n], rtol=1e-4, atol=1e-5), n
    assert runs[1].summary["post"] == pytest.approx(runs[0].summary["post"], rel=1e-3, abs=1e-4)


def test_a_weight_on_disk_is_refused_unchanged(tmp_path):
    from editfast.core.errors import EditfastError
    from editfast.models.update import LowRank, apply_update

    lm = offloaded(tmp_path)
    name = "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(EditfastError, match="offloaded to disk.*--max-memory"):
        apply_update(lm, LowRank(name, torch.ones(64, 1), torch.ones(256, 1)))


def test_device_auto_within_max_memory(tmp_path, monkeypatch, capsys):
    """--device auto: accelerate's device map (on a machine without GPUs it places everything on the
    CPU, whatever the budget: observed with accelerate 1.15), the answers unchanged."""
    from helpers import assert_refused, run_cli

    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))
    lm = load_model("random:tiny-llama", device="auto", max_memory="cpu=14MB")
    assert lm.model.hf_device_map and lm.device == torch.device("cpu")
    plain = load_model("random:tiny-llama")
    pool = EvalPlan.build("sst2", limit=4).pool
    got, ref = Engine(lm, progress=False).run(pool), Engine(plain, progress=False).run(pool)
    assert [r.logprob for r in got] == pytest.approx([r.logprob for r in ref], rel=1e-6)
    plain.model.save_pretrained(tmp_path / "hf")  # a directory: transformers' device_map="auto"
    plain.tokenizer.save_pretrained(tmp_path / "hf")
    ids = torch.tensor([[5, 6, 7, 8]])
    from_dir = load_model(tmp_path / "hf", device="auto", max_memory="cpu=1GiB")
    assert torch.equal(from_dir.model(ids).logits, plain.model(ids).logits)
    capsys.readouterr()  # (the save's and load's progress bars)
    assert_refused(["eval", "--model", "random:tiny-llama", "--max-memory", "cpu=1GiB", "--out", str(tmp_path / "o")],
                   capsys, "--device auto", absent=[tmp_path / "o"])
    assert_refused(["eval", "--model", "random:tiny-llama", "--device", "auto", "--max-memory", "gpu=1", "--out",
                    str(tmp_path / "o")], capsys, "max-memory", absent=[tmp_path / "o"])
    code, out, _ = run_cli(["eval", "--model", "random:tiny-llama", "--device", "auto", "--max-memory", "cpu=14MB",
                            "--tasks", "sst2", "--limit", "4", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0 and (tmp_path / "o" / "eval.json").is_file()


def test_vllm_engine_refused_with_a_clear_line(tmp_path, capsys):
    from helpers import assert_refused

    assert_refused(["eval", "--model", "random:tiny-llama", "--engine", "vllm", "--out", str(tmp_path / "o")], capsys,
                   "vllm", absent=[tmp_path / "o"])


def test_edit_under_two_ranks_writes_one_processs_journal_once(tmp_path, capsys, monkeypatch):
    """``editfast edit`` under two ranks: rank 0 alone writes --out, and its journal (statistics
    from both ranks' shards, an evaluation checkpoint sharded) is the one process's."""
    from helpers import run_cli

    args = ["edit", "--model", "random:tiny-llama", "--n", "2", "--set", "mom2_n_samples=30", "--set",
            "v_num_grad_steps=2", "--templates", "fixed", "--eval", "sst2", "--eval-limit", "3", "--quiet"]
    results = two_ranks([["-m", "editfast.cli", *args, "--out", str(tmp_path / "two")]] * 2, tmp_path)
    assert [code for code, _, _ in results] == [0, 0], results
    assert "results:" in results[0][1] and not results[1][1]  # rank 1 says nothing on stdout
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "one-cache"))
    code, _, err = run_cli([*args, "--out", str(tmp_path / "one")], capsys)
    assert code == 0, err
    one, two = (load_file(next((tmp_path / d / "journal").glob("*.safetensors"))) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6), k
    pts = [json.loads((tmp_path / d / "curve.json").read_text())["points"] for d in ("one", "two")]
    assert [p["tasks"]["sst2"]["metrics"] for p in pts[0]] == [p["tasks"]["sst2"]["metrics"] for p in pts[1]]
    assert not list((tmp_path / "tmp").glob("editfast-rank*"))  # rank 1's private --out, removed
