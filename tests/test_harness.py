"""lm-evaluation-harness interoperability: editfast's model inside lm-eval equals lm-eval's HF backend;
eval.json in lm-eval's results layout (its own table printer reads it); standard errors by lm-eval's
own formulas; --log-samples records in lm-eval's sample format."""

import json
import math
import random

import pytest

from editfast.core.errors import EditfastError

lm_eval = pytest.importorskip("lm_eval")

MC_YAML = """task: ef_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
PPL_YAML = """task: ef_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""
GEN_YAML = """task: ef_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
TASKS = ["ef_mc", "ef_ppl", "ef_gen"]
WORDS = "the a river city red blue cat dog runs sleeps under over quickly seven green old".split()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three local tasks over JSONL files: 20 multiple-choice docs, 4 perplexity texts, 6 questions."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    mc = [{"question": words(rng.randint(3, 9)), "choices": [words(rng.randint(1, 4)) for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(20)]
    ppl = [{"text": ". ".join(words(rng.randint(5, 30)) for _ in range(rng.randint(1, 12)))} for _ in range(4)]
    ppl.append({"text": " ".join(words(8) for _ in range(36))})  # longer than the 256-token window
    gen = [{"question": words(rng.randint(2, 6)), "answer": rng.choice(WORDS)} for _ in range(6)]
    for name, rows, yaml in (("mc", mc, MC_YAML), ("ppl", ppl, PPL_YAML), ("gen", gen, GEN_YAML)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"ef_{name}.yaml").write_text(yaml.format(data=d / f"{name}.jsonl"))
    return d


def run_lmeval(model, task_dir):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, bootstrap_iters=0, verbosity="ERROR")


def responses(res):
    """Per task and doc: the filtered responses (log-likelihoods, rolling log-likelihood, generation)."""
    return {t: [s["filtered_resps"] for s in sorted(res["samples"][t], key=lambda s: s["doc_id"])] for t in TASKS}


def assert_same(ours, ref):
    """Accuracies and generations equal; log-likelihoods and perplexities within fp32 tolerance."""
    for t in TASKS:
        for k, v in ref["results"][t].items():
            if isinstance(v, float) and "stderr" not in k:
                tol = 1e-9 if k.startswith(("acc", "exact_match")) else 1e-4 * abs(v)
                assert abs(ours["results"][t][k] - v) <= tol, (t, k, ours["results"][t][k], v)
    a, b = responses(ours), responses(ref)
    for doc_a, doc_b in zip(a["ef_mc"], b["ef_mc"], strict=True):
        for (lp_a, g_a), (lp_b, g_b) in zip(doc_a, doc_b, strict=True):
            assert abs(lp_a - lp_b) <= 1e-4 and g_a == g_b
    for doc_a, doc_b in zip(a["ef_ppl"], b["ef_ppl"], strict=True):
        assert abs(doc_a[0] - doc_b[0]) <= 1e-4 * abs(doc_b[0])
    assert a["ef_gen"] == b["ef_gen"]


@pytest.fixture(scope="module")
def base_results(tiny, task_dir):
    from editfast.harness import EditfastLM

    return run_lmeval(EditfastLM(lm=tiny), task_dir)


def test_editfast_lm_equals_hf_backend(tiny, task_dir, base_results):
    from lm_eval.models.huggingface import HFLM

    ref = run_lmeval(HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, device="cpu", batch_size=4), task_dir)
    assert_same(base_results, ref)
    assert base_results["n-samples"]["ef_mc"] == {"original": 20, "effective": 20}
    assert any(g for doc in responses(base_results)["ef_gen"] for g in doc)  # something was generated


def test_editfast_lm_with_edits_equals_hf_on_saved_model(tmp_path, capsys, task_dir, base_results, monkeypatch):
    from helpers import run_cli
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    run = tmp_path / "run"
    code, _, err = run_cli(["edit", "--model", "random:tiny-llama", "--n", "2", "--templates", "fixed", "--quiet",
                            "--no-eval", "--save-model", "--out", str(run)], capsys)
    assert code == 0, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # as lm-eval's command line builds it: its --device and --batch_size beside model_args' own device
    edited = get_model("editfast").create_from_arg_string(f"model=random:tiny-llama,device=cpu,edits={run}",
                                                          {"batch_size": 1, "device": "cpu"})
    ours = run_lmeval(edited, task_dir)
    assert_same(ours, run_lmeval(HFLM(pretrained=str(run / "model"), device="cpu", batch_size=4), task_dir))
    moved = max(abs(a[0][0] - b[0][0]) for a, b in zip(responses(ours)["ef_mc"], responses(base_results)["ef_mc"]))
    assert moved > 1e-4  # the edits are applied


def test_python_m_entry_point_registers(monkeypatch, capsys):
    """`python -m editfast.harness ls ...` is lm-eval's own command line, with the model registered."""
    from lm_eval.api.registry import get_model

    import editfast.harness as h

    assert get_model("editfast") is h.EditfastLM and get_model("hf").__name__ == "HFLM"
    with pytest.raises(SystemExit) as e:
        h.main(["run", "--help"])
    assert e.value.code == 0 and "--model_args" in capsys.readouterr().out


def test_bad_edits_dir_is_one_line(tmp_path, capsys, task_dir):
    """A run directory that is not one: one line, exit 2, before any model loads."""
    import editfast.harness as h

    with pytest.raises(SystemExit) as e:
        h.main(["run", "--model", "editfast", "--model_args", f"model=random:tiny-llama,edits={tmp_path}",
                "--tasks", "ef_mc", "--include_path", str(task_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "editfast: error:" in err and "not an edit run directory" in err


# ---- eval.json in lm-eval's layout, its standard errors, --log-samples --------------------------------

SAMPLE_FIELDS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
                 "prompt_hash", "target_hash"}


def test_eval_json_is_lm_eval_layout_with_its_stderrs_and_samples(tmp_path, capsys, monkeypatch):
    from helpers import run_cli
    from lm_eval.api import metrics as M
    from lm_eval.utils import get_file_task_name, hash_string, make_table


    out = tmp_path / "eval"
    code, _, err = run_cli(["eval", "--model", "random:tiny-llama", "--tasks", "rte,sst2", "--limit", "5",
                            "--log-samples", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    doc = json.loads((out / "eval.json").read_text())
    table = make_table(doc)  # lm-eval's own printer
    assert "|rte " in table and "|sst2" in table and "|acc " in table and "±" in table
    assert doc["n-samples"]["rte"] == {"original": 277, "effective": 5} and doc["n-shot"]["rte"] == 0
    assert doc["configs"]["rte"]["output_type"] == "multiple_choice" and doc["versions"]["rte"] == 1.0
    files = {get_file_task_name(p.name): p for p in out.glob("samples_*.jsonl")}
    assert set(files) == {"rte", "sst2"}
    samples = {t: [json.loads(l) for l in p.read_text().splitlines()] for t, p in files.items()}
    for t, recs in samples.items():
        assert len(recs) == 5 and all(SAMPLE_FIELDS <= set(r) for r in recs)
        for r in recs:
            assert r["doc_hash"] == hash_string(json.dumps(r["doc"], indent=2, ensure_ascii=False))
            assert r["prompt_hash"] == hash_string(r["arguments"]["gen_args_0"]["arg_0"])
    rte = samples["rte"]
    assert [len(r["arguments"]) for r in rte] == [2] * 5 and rte[0]["arguments"]["gen_args_1"]["arg_1"] == " False"
    lps = [[float(lp) for lp, _ in r["filtered_resps"]] for r in rte]  # the prediction: argmax of the two
    assert [r["acc"] for r in rte] == [float(lp.index(max(lp)) == int(r["target"])) for lp, r in zip(lps, rte)]
    res = doc["results"]
    # means: lm-eval's mean and mean_stderr of the logged per-sample values
    for t in ("rte", "sst2"):  # a mean: lm-eval's mean and mean_stderr of the logged per-sample values
        vals = [r["acc"] for r in samples[t]]
        assert res[t]["acc,none"] == pytest.approx(M.mean(vals), abs=1e-12)
        se = res[t]["acc_stderr,none"]
        assert se == pytest.approx(M.mean_stderr(vals), abs=1e-12) if len(set(vals)) > 1 else se == 0.0


def test_corpus_metric_stderr_is_lm_evals_bootstrap(monkeypatch):
    """A corpus aggregate (WikiText from summed log-likelihoods, CoNLL-03's micro F1): the stderr is
    lm-eval's bootstrap_stderr of the aggregate over the same per-example values."""
    from lm_eval.api import metrics as M

    from editfast.eval.runner import stderrs
    from editfast.eval.tasks import TASKS

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    rng = random.Random(0)
    wiki = [{"logprob": -rng.uniform(200, 400), "n_tokens": rng.randint(50, 150), "n_words": 80.0, "n_bytes": 400.0}
            for _ in range(30)]
    ner = [{f"{k}_{t}": float(rng.randint(0, 3)) for k in ("tp", "fp", "fn") for t in ("PER", "ORG", "LOC", "MISC")}
           for _ in range(30)]
    for task, per in ((TASKS["wikitext"], wiki), (TASKS["conll03"], ner)):
        got = stderrs(task, per, "standard")
        for k in ("bits_per_byte", "perplexity") if task.name == "wikitext" else ("f1", "recall", "f1_ORG"):
            f = lambda xs, k=k: task.aggregate(xs, "standard")[k]
            assert got[k] == pytest.approx(M.bootstrap_stderr(f, per, 1000), rel=1e-9) and got[k] > 0


def test_lm_eval_names_few_shot_and_counts():
    """GSM8K's accuracy is lm-eval's exact_match with 8 shots; a stderr that is not finite is "N/A"."""
    from lm_eval.utils import make_table

    from editfast.eval.lmeval import results_doc
    from editfast.eval.runner import EvalResult, TaskResult

    r = EvalResult("random:tiny-llama", "standard", 0, 6, [
        TaskResult("gsm8k", "reasoning", "standard", {"accuracy": 0.5}, "accuracy", True, 6, 1.0, 6,
                   {"accuracy": 0.2}, 1311, "generate_until"),
        TaskResult("conll03", "NER", "standard", {"f1": 0.25, "precision": 0.5}, "f1", True, 1, 1.0, 1,
                   {"f1": math.nan, "precision": 0.1}, 3453, "generate_until")])
    doc = json.loads(json.dumps(results_doc(r)))
    assert doc["results"]["gsm8k"] == {"alias": "gsm8k", "exact_match,none": 0.5, "exact_match_stderr,none": 0.2}
    assert doc["n-shot"] == {"gsm8k": 8, "conll03": 0} and doc["n-samples"]["gsm8k"] == {"original": 1311, "effective": 6}
    assert doc["results"]["conll03"]["f1_stderr,none"] == "N/A"
    assert doc["configs"]["conll03"]["metric_list"][0]["aggregation"] != "mean"  # a corpus F1, bootstrapped
    table = make_table(doc)
    assert "|gsm8k  |" in table and "exact_match" in table and "N/A" in table


@pytest.mark.parametrize("agg,iters", [("f1_score", 100), ("matthews_corrcoef", 100), ("mean", 2500)])
def test_bootstrap_stderr_equals_lm_evals(agg, iters, monkeypatch):
    """The bootstrap draws are lm-eval's (chunks of <= 1000 from Random(chunk)): same items, same stderr."""
    from lm_eval.api import metrics as M

    from editfast.eval.lmeval import bootstrap_stderr

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    rng = random.Random(1)
    items = [(rng.randrange(2), rng.randrange(2)) for _ in range(60)] if agg != "mean" else \
        [rng.gauss(0, 1) for _ in range(40)]
    f = getattr(M, agg)
    assert bootstrap_stderr(f, items, iters) == pytest.approx(M.bootstrap_stderr(f, items, iters), rel=1e-12)


def test_change_plot_has_error_bars(tmp_path, tiny):
    """change.png draws ± the change's standard error: the same results without standard errors differ."""
    import dataclasses

    from editfast.eval.runner import change_plot, evaluate

    before = evaluate(tiny, "sst2", limit=8, progress=False)
    after = dataclasses.replace(before, tasks=[dataclasses.replace(t, metrics={k: v * 0.5 for k, v in t.metrics.items()})
                                               for t in before.tasks])
    assert math.isfinite(before.tasks[0].stderr["accuracy"]) and before.tasks[0].stderr["accuracy"] > 0
    change_plot(before, after, tmp_path / "a.png")
    bare = lambda r: dataclasses.replace(r, tasks=[dataclasses.replace(t, stderr={}) for t in r.tasks])
    change_plot(bare(before), bare(after), tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


# ---- the bridge as lm-eval users call it: pretrained=, editfast's own tasks offline, early errors ----------

def test_bundled_task_equals_editfast_eval(tiny):
    """`editfast_rte` (lm-eval YAML over the bundled data, offline) with `pretrained=` gives
    `editfast eval`'s RTE accuracy on the same model, every one of the 277 pairs."""
    import editfast.harness as h
    from editfast.eval.runner import evaluate

    tm = h.task_manager(include_defaults=False)  # editfast's task files alone: no index of lm-eval's
    assert {"editfast_rte", "editfast_sst2"} <= set(tm.all_tasks)
    res = lm_eval.simple_evaluate(model="editfast", model_args="pretrained=random:tiny-llama", tasks=["editfast_rte"],
                                  task_manager=tm, bootstrap_iters=0, verbosity="ERROR")
    assert res["n-samples"]["editfast_rte"] == {"original": 277, "effective": 277}
    ours = evaluate(tiny, "rte", progress=False).tasks[0]
    assert res["results"]["editfast_rte"]["acc,none"] == ours.metrics["accuracy"]


@pytest.mark.parametrize("model_args, words", [
    ("pretrained=random:tiny-llama,bogus=1", ["unknown model_args bogus", "pretrained"]),
    ("pretrained=random:tiny-llama,model=random:tiny-gpt2", ["two models"]),
    ("pretrained=gpt2", ["unknown model 'gpt2'", "Hub id", "local Hugging Face cache"]),
    ("pretrained=random:tiny-llama,dtype=int8", ["dtype=int8"]),
    ("pretrained=random:tiny-llama,batch_tokens=lots", ["batch_tokens=lots"]),
    ("pretrained=random:tiny-llama,edits=/no/such/run", ["/no/such/run"]),
    ("pretrained", ["'pretrained' is not key=value"]),
])
def test_bad_model_args_fail_before_lm_eval_starts(model_args, words, monkeypatch, capsys):
    """One line, exit 2, before lm-eval's command line (its task index) runs at all."""
    import lm_eval.__main__

    import editfast.harness as h

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: pytest.fail("lm-eval started"))
    with pytest.raises(SystemExit) as e:
        h.main(["run", "--model", "editfast", "--model_args", model_args, "--tasks", "editfast_rte"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("editfast: error:"), lines
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_python_callers_get_the_same_checks():
    from editfast.harness import EditfastLM

    with pytest.raises(EditfastError, match="unknown model_args bogus"):
        EditfastLM(pretrained="random:tiny-llama", bogus=1)
    with pytest.raises(EditfastError, match="unknown model 'gpt2'.*Hub id"):
        EditfastLM(pretrained="gpt2")


def test_main_adds_editfast_tasks_to_the_include_path():
    import editfast.harness as h

    argv = ["run", "--model", "editfast", "--model_args", "pretrained=random:tiny-llama", "--tasks", "editfast_rte"]
    assert h.precheck(argv) == [*argv, "--include_path", str(h.TASKS_DIR)]
    assert h.precheck([*argv, "--include_path", "mine"]) == [*argv, "--include_path", "mine"]
    assert h.precheck(["ls", "tasks"]) == ["ls", "tasks"]


def test_an_lm_eval_task_in_editfast_eval_points_at_the_harness(capsys, tmp_path):
    from helpers import assert_refused

    out = tmp_path / "out"
    line = assert_refused(["eval", "--model", "random:tiny-llama", "--tasks", "hellaswag", "--out", str(out)], capsys,
                          "hellaswag", absent=[out])
    assert "python -m editfast.harness run --model editfast" in line and "--tasks hellaswag" in line
