"""The evaluation engine against brute force and against lm-evaluation-harness; `editfast eval`."""

import json

import pytest
import torch
from helpers import run_cli as run

from editfast.engine import cascade
from editfast.engine.engine import (
    SHARE_MIN_TOKENS,
    Engine,
    prefix_groups,
    similar_lengths,
)
from editfast.engine.requests import Generate, LogLik, Rolling
from editfast.models.load import load_model

ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-gptj", "tiny-neox"]
PAIRS = [("The capital of France is", " Paris"), ("The capital of France is", " Rome and more"),
         ("Hello", " world"), ("A longer context sentence here, with commas,", " yes"),
         ("A longer context sentence here, with commas,", " no"), ("Q: ", "answer is 5"), ("", "Start of text")]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return load_model(f"random:{request.param}")


def brute_force(lm, eng, context, continuation):
    ctx, cont = eng.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
    rows = lp[len(ctx) - 1: len(ctx) - 1 + len(cont)]
    return sum(rows[j, t].item() for j, t in enumerate(cont)), all(rows[j].argmax().item() == t for j, t in enumerate(cont))


@pytest.mark.parametrize("batch_tokens", [8, 4096])
def test_loglikelihood_equals_full_forward(tiny, batch_tokens):
    eng = Engine(tiny, batch_tokens=batch_tokens, progress=False)
    got = eng.loglikelihood([LogLik(*p) for p in PAIRS])
    for p, g in zip(PAIRS, got):
        lp, greedy = brute_force(tiny, eng, *p)
        assert abs(g.logprob - lp) < 1e-4, p
        assert g.is_greedy == greedy
    assert eng.stats["loglikelihood_requests"] == len(PAIRS)


def test_truncation_keeps_the_end(tiny):
    eng = Engine(tiny, max_length=16, progress=False)
    long_ctx = " ".join(["word"] * 40)
    got = eng.loglikelihood([LogLik(long_ctx, " end")])[0]
    ctx, cont = eng.encode_pair(long_ctx, " end")
    ids = torch.tensor([(ctx + cont)[-17:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(tiny.model(input_ids=ids).logits[0, -1].double(), -1)[cont[-1]].item()
    assert abs(got.logprob - lp) < 1e-4


def test_generation_equals_hf_greedy(tiny):
    eng = Engine(tiny, batch_tokens=40, progress=False)
    reqs = [Generate("Once upon a time", 8), Generate("The", 5), Generate("In a galaxy far far away there", 12)]
    outs = eng.generate(reqs)
    for r, o in zip(reqs, outs):
        ids = torch.tensor([tiny.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]])
        ref = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new_tokens,
                                  do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id, eos_token_id=None)
        text = tiny.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert text == o, (o, text)
    # a stop string cuts the output and the request leaves the batch early
    full = outs[0]
    stop = full.strip().split()[1] if len(full.split()) > 1 else full.strip()[:2]
    cut = eng.generate([Generate("Once upon a time", 8, (stop,)), Generate("The", 5)])
    assert cut[0] == full[: full.find(stop)] and cut[1] == outs[1]


def hf_greedy(lm, prompt, n):
    ids = torch.tensor([lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    ref = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=None)
    return lm.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


SHOTS = "".join(f"Question: what is {a} plus {a}? Answer: {2 * a}.\n" for a in range(1, 9))
SHARED = [SHOTS + q for q in ("Question: what is 9 plus 9? Answer:", "Question: and ten? Answer:",
                              "Question: what is the sum of eleven and eleven, please? Answer:")]


def test_shared_prefix_generation_equals_hf_greedy(tiny):
    prompts = SHARED
    eng = Engine(tiny, batch_tokens=60, progress=False)
    enc = [tiny.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    [(n_prefix, members)] = prefix_groups(enc)
    assert members == [0, 1, 2] and n_prefix >= len(tiny.tokenizer(SHOTS)["input_ids"]) - 1
    reqs = [Generate(p, 6) for p in prompts] + [Generate("Unrelated", 4)]
    want = [hf_greedy(tiny, p, 6) for p in prompts] + [hf_greedy(tiny, "Unrelated", 4)]
    assert eng.generate(reqs) == want
    # the per-row prefix copies (what models without the attention interface use) give the same
    copies = Engine(tiny, batch_tokens=60, progress=False, cascade_attention=False)
    assert copies.generate(reqs) == want
    assert eng.stats["prefill_splits"] >= 1 and copies.stats["prefill_splits"] >= 1  # own parts of unlike lengths


def test_continuous_batching_equals_hf_greedy(tiny):
    """Rows of different prompt lengths and answer lengths: finished rows leave, waiting prompts
    join the running batch (its cache stacked with theirs, right-aligned), and every answer is
    still the one HF's greedy search gives that prompt alone."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    prompts = [" ".join(words[: 1 + (3 * k) % len(words)]) for k in range(9)]
    reqs = [Generate(p, n) for p, n in zip(prompts, [2, 9, 4, 12, 1, 7, 3, 10, 5])]
    want = [hf_greedy(tiny, r.prompt, r.max_new_tokens) for r in reqs]
    eng = Engine(tiny, batch_tokens=64, progress=False)
    assert eng.generate(reqs) == want
    assert eng.stats["generate_joins"] >= 2  # the budget holds a few rows: most prompts joined later
    assert eng.stats["prefill_splits"] >= 1  # prompts of unlike lengths were prefilled apart, then stacked
    static = Engine(tiny, batch_tokens=64, progress=False, continuous_batching=False)
    assert static.generate(reqs) == want and not static.stats["generate_joins"]


def test_similar_lengths():
    assert similar_lengths([]) == []
    assert similar_lengths([8]) == [(0, 1)]
    assert similar_lengths([100, 80, 75, 74, 40, 30, 29, 3]) == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 8)]
    lens = [439, 220, 216, 191, 146, 123, 92, 54]
    runs = similar_lengths(lens)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(lens)))  # a partition, in order
    assert all(4 * n >= 3 * lens[a] for a, b in runs for n in lens[a:b])  # padding within a run <= 1/4
    # with costs: a run also ends where its costs would pass the budget; one item over it runs alone
    assert similar_lengths([5, 5, 5, 5, 5], [4, 4, 4, 4, 4], 8) == [(0, 2), (2, 4), (4, 5)]
    assert similar_lengths([9, 9], [20, 1], 10) == [(0, 1), (1, 2)]


def test_growing_cache_layer_equals_concatenation():
    """The decoding cache layer writes into a buffer (growing it when full), drops rows, and
    stacks two caches' rows right-aligned with zeros to the left."""
    from editfast.engine.kv import kv_cache

    model = load_model("random:tiny-llama").model
    torch.manual_seed(0)
    layer = kv_cache(model, room=3).layers[0]
    ref_k = torch.empty(2, 2, 0, 4)
    for t in (2, 1, 3, 1):  # 2 fits, 3 fits the room, then 6 and 7 need more
        k = torch.randn(2, 2, t, 4)
        got_k, got_v = layer.update(k, -k)
        ref_k = torch.cat([ref_k, k], 2)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, -ref_k)
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, ref_k[1:]) and layer.get_seq_length() == 7
    other = torch.randn(3, 2, 4, 4)
    layer.place([layer.keys, other], [layer.values, -other], 7, 9)
    assert layer.keys.shape == (4, 2, 7, 4)
    assert torch.equal(layer.keys[:1], ref_k[1:]) and torch.equal(layer.keys[1:, :, 3:], other)
    assert not layer.keys[1:, :, :3].any()
    more = torch.randn(4, 2, 1, 4)
    assert torch.equal(layer.update(more, more)[0][:, :, -1:], more)


@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("parts", ["_fused", "_explicit"])
def test_cascade_attention_equals_sdpa_over_the_concatenation(q, groups, parts, monkeypatch):
    """[shared prefix | own keys] in two parts with one softmax = SDPA over per-row copies, with
    the fused kernel (the CPU path) and with materialised scores (the path elsewhere)."""
    monkeypatch.setattr(cascade, "_fused" if parts == "_explicit" else "_explicit", getattr(cascade, parts))
    torch.manual_seed(0)
    B, kvh, P, T, hd = 3, 2, 7, 6, 8
    H = kvh * groups
    query = torch.randn(B, H, q, hd, dtype=torch.float64)
    pk, pv = torch.randn(2, 1, kvh, P, hd, dtype=torch.float64)
    key, value = torch.randn(2, B, kvh, T, hd, dtype=torch.float64)
    own = torch.ones(B, T, dtype=torch.bool)
    own[1, :2] = False  # left padding of row 1
    causal = torch.ones(q, T, dtype=torch.bool).tril(T - q)
    mask = own[:, None, None, :] & causal[None, None]  # [B, 1, q, T], True = attend
    module = type("Attn", (), {"layer_idx": 0})()
    for m in (mask, None):  # padded rows; no padding (causal only)
        cascade._ACTIVE["prefix"] = [(pk, pv)]
        try:
            got, _ = cascade.cascade_attention(module, query, key, value, m, scaling=0.3)
        finally:
            cascade._ACTIVE["prefix"] = None
        full_m = torch.cat([torch.ones(B, 1, q, P, dtype=torch.bool),
                            (m if m is not None else causal[None, None].expand(B, 1, q, T))], -1)
        k_all = torch.cat([pk.expand(B, -1, -1, -1), key], 2).repeat_interleave(groups, 1)
        v_all = torch.cat([pv.expand(B, -1, -1, -1), value], 2).repeat_interleave(groups, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(query, k_all, v_all, attn_mask=full_m, scale=0.3)
        assert got.shape == (B, q, H, hd)
        assert torch.allclose(got, ref.transpose(1, 2), atol=1e-12)


# Architectures whose attention has gone through transformers' attention interface in every
# transformers version editfast supports. Others may or may not, depending on the installed version
# (GPT-J: not in transformers 5.0, yes in 5.24); the engine must then decide from the model itself.
ATTENTION_INTERFACE = {"random:tiny-llama", "random:tiny-gpt2", "random:tiny-neox"}


def test_cascade_used_where_attention_interface_exists(tiny, monkeypatch):
    """The engine turns cascade attention on exactly where the model's attention can be swapped
    (``cascade.supported``, read from the model, not from a list of architectures), never when
    asked not to; and where it is on, rows sharing a prefix really attend to it through cascade
    attention, in every layer. That the answers then equal HF's greedy search and the per-row
    copies' is test_shared_prefix_generation_equals_hf_greedy (every tiny model, both paths)."""
    eng = Engine(tiny, batch_tokens=60, progress=False)
    assert eng.cascade == cascade.supported(tiny.model)
    assert not Engine(tiny, progress=False, cascade_attention=False).cascade
    if tiny.spec in ATTENTION_INTERFACE:
        assert eng.cascade

    calls = []  # (layer, whether a shared prefix was attended) per attention call
    real = cascade.cascade_attention

    def spy(module, *args, **kwargs):
        calls.append((module.layer_idx, cascade._ACTIVE["prefix"] is not None))
        return real(module, *args, **kwargs)

    monkeypatch.setattr(cascade, "cascade_attention", spy)
    eng.generate([Generate(p, 3) for p in SHARED])
    if eng.cascade:  # each prefill and decoding step of the group, in every layer, against the prefix
        assert {layer for layer, with_prefix in calls if with_prefix} == set(range(tiny.adapter.num_layers(tiny.model)))
    else:
        assert not calls


def test_prefix_groups():
    head = list(range(100, 100 + SHARE_MIN_TOKENS))
    a, b, c = head + [1, 2, 3], head + [1, 2, 4, 5], head + [1]
    short, other = [7, 8], [9] * (SHARE_MIN_TOKENS + 5)
    groups = dict((tuple(m), n) for n, m in prefix_groups([a, b, short, c, other]))
    # the common prefix leaves at least one own token to the shortest member
    assert groups == {(0, 1, 3): SHARE_MIN_TOKENS, (2, 4): 0}
    assert dict((tuple(m), n) for n, m in prefix_groups([a, b])) == {(0, 1): SHARE_MIN_TOKENS + 2}


def test_stop_strings_after_leading_whitespace():
    from editfast.engine.engine import stop_index

    assert stop_index("\n\nA summary.\n\nMore", ["\n\n"]) == 12
    assert stop_index("answer\nQ: next", ["\n", "Q:"]) == 6
    assert stop_index("no stop here", ["\n"]) is None
    assert stop_index("   ", ["\n"]) is None and stop_index("x", []) is None


def test_rolling_counts_every_token(tiny):
    eng = Engine(tiny, max_length=16, progress=False)
    text = "Some text to score for perplexity, a few windows long. " * 3
    res = eng.rolling([Rolling(text)])[0]
    n = len(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert res.n_tokens == n and res.logprob < 0 and res.n_bytes == len(text.encode())


def test_rolling_equals_lm_eval(tiny):
    """Perplexity windows as lm-evaluation-harness's ``loglikelihood_rolling``: the prefix token
    before the first window, one token of context before each full window, and a short last
    window given the tokens before it up to the window length; short texts batched together."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = ["Some text to score for perplexity, a few windows long. " * 3, "A shorter text, one window and a bit.",
             "Short one here, also a bit."]
    hf = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, max_length=16, batch_size=4, device="cpu")
    ref = hf.loglikelihood_rolling([Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                                    for i, t in enumerate(texts)], disable_tqdm=True)
    got = Engine(tiny, max_length=16, progress=False).rolling([Rolling(t) for t in texts])
    assert len(tiny.tokenizer(texts[0], add_special_tokens=False)["input_ids"]) % 16  # a short last window
    for g, lp in zip(got, ref):
        assert abs(g.logprob - lp) < 1e-3, (g.logprob, lp)


def test_no_lm_head_is_an_error():
    from transformers import LlamaConfig, LlamaModel

    from editfast.core.errors import ModelError
    from editfast.models.archs import adapter_for
    from editfast.models.load import LoadedModel

    lm = load_model("random:tiny-llama")
    base = LlamaModel(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=100))
    bare = LoadedModel(base, lm.tokenizer, adapter_for(base.config), "bare", "0", torch.float32, torch.device("cpu"))
    with pytest.raises(ModelError, match="LM head"):
        Engine(bare)


# ---- a real peer: lm-evaluation-harness's Hugging Face model, same pairs, same tokens ----------

@pytest.mark.slow
def test_loglikelihood_matches_lm_eval(smol):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from editfast.eval.runner import select
    from editfast.eval.tasks import resolve_tasks

    reqs = []
    for task in resolve_tasks("rte,boolq,sst2,mutual"):
        for ex in select(task, 3, seed=0):
            reqs += [r for r in task.requests(ex, "standard") if isinstance(r, LogLik)]
    reqs += [LogLik(*p) for p in PAIRS]  # the last has an empty context: the prefix token is lm-eval's
    assert len(reqs) > 20
    hf = HFLM(pretrained=smol.model, tokenizer=smol.tokenizer, batch_size=8, device="cpu")
    ref = hf.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(r.context, r.continuation), idx=i)
                            for i, r in enumerate(reqs)], disable_tqdm=True)
    got = Engine(smol, progress=False).loglikelihood(reqs)
    for r, (lp, greedy), g in zip(reqs, ref, got):
        assert abs(lp - g.logprob) <= 1e-3, (r, lp, g.logprob)
        assert greedy == g.is_greedy


# ---- runner and CLI ---------------------------------------------------------------------------

def test_eval_cli_before_after(tmp_path, capsys):
    edit_dir = tmp_path / "edit"
    code, _, err = run(["edit", "--model", "random:tiny-llama", "--n", "2", "--templates", "fixed", "--quiet",
                        "--out", str(edit_dir)], capsys)
    assert code == 0, err
    out = tmp_path / "eval"
    code, stdout, err = run(["eval", "--model", "random:tiny-llama", "--edits", str(edit_dir), "--tasks",
                             "rte,sst2,nq,wikitext", "--limit", "3", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert "| rte |" in stdout
    doc = json.loads((out / "eval.json").read_text())
    # lm-evaluation-harness's layout: the edited model's results, the unedited one's under "before"
    assert {"results", "n-samples", "configs", "versions", "before", "change", "editfast"} <= set(doc)
    assert set(doc["results"]) == set(doc["before"]["results"]) == {"rte", "sst2", "nq", "wikitext"}
    assert doc["before"]["n-samples"]["rte"] == {"original": 277, "effective": 3}
    assert doc["change"]["rte"]["acc,none"] == doc["results"]["rte"]["acc,none"] - doc["before"]["results"]["rte"]["acc,none"]
    assert set(doc["before"]["editfast"]["tasks"]) == {"rte", "sst2", "nq", "wikitext"}
    rte = json.loads((out / "tasks" / "rte.json").read_text())
    assert rte["before"]["n"] == 3 and rte["before"]["protocol"] == "standard" and "accuracy" in rte["after"]["metrics"]
    assert (out / "change.png").stat().st_size > 1000 and "| rte |" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv,word", [
    (["--tasks", "nosuch"], "nosuch"),
    (["--protocol", "zero"], "zero"),
    (["--limit", "0"], "--limit"),
    (["--edits", "/nonexistent/run"], "edit run"),
])
def test_eval_bad_input(tmp_path, capsys, argv, word):
    code, _, err = run(["eval", "--model", "random:tiny-llama", "--out", str(tmp_path / "o"), "--quiet", *argv], capsys)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_eval_edits_of_another_model(tmp_path, capsys):
    edit_dir = tmp_path / "edit"
    assert run(["edit", "--model", "random:tiny-gpt2", "--n", "1", "--templates", "fixed", "--quiet", "--no-eval",
                "--out", str(edit_dir)], capsys)[0] == 0
    code, _, err = run(["eval", "--model", "random:tiny-llama", "--edits", str(edit_dir), "--tasks", "rte",
                        "--limit", "1", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 2 and "was made on model" in err


def test_subsampling_is_deterministic():
    from editfast.eval.runner import select
    from editfast.eval.tasks import resolve_tasks

    task = resolve_tasks("boolq")[0]
    a, b, c = select(task, 5, 1), select(task, 5, 1), select(task, 5, 2)
    assert a == b and a != c and len(a) == 5


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["standard", "paper"])
def test_all_tasks_both_protocols_on_smollm2(smol, protocol):
    import math

    from editfast.eval.runner import EvalPlan, evaluate

    eight = ["gsm8k", "rte", "nq", "boolq", "mutual", "samsum", "conll03", "sst2"]
    if protocol == "paper":  # WikiText's requests do not depend on the protocol: scored once, under "standard"
        plans = [EvalPlan.build("wikitext", p, limit=2, seed=0) for p in ("standard", "paper")]
        assert plans[0].pool == plans[1].pool
    res = evaluate(smol, "all" if protocol == "standard" else ",".join(eight), protocol, limit=2, seed=0,
                   progress=False)
    assert [t.task for t in res.tasks] == eight + (["wikitext"] if protocol == "standard" else [])
    for t in res.tasks:
        assert t.n == 2 and t.primary in t.metrics and t.requests > 0
        assert all(math.isfinite(v) for v in t.metrics.values()), (t.task, t.metrics)
    if protocol == "standard":
        ppl = next(t for t in res.tasks if t.task == "wikitext").metrics["perplexity"]
        assert 5 < ppl < 100, ppl  # a trained 135M model on Wikipedia text; a random one is ~50,000


def test_wikitext_is_scored_once_under_several_protocols():
    from editfast.eval.evaluator import Evaluator
    from editfast.models.load import load_model

    tiny = load_model("random:tiny-llama")
    both = Evaluator(tiny, "sst2,wikitext", ["standard", "paper"], 2, 0, progress=False, limits={"wikitext": 1})
    res = both.run()
    assert list(res) == ["sst2:standard", "wikitext:standard", "sst2:paper", "wikitext:paper"]
    assert sum(t.name == "wikitext" for _, _, plan in both.plans for t, _, _ in plan.entries) == 1
    alone = Evaluator(tiny, "wikitext", "paper", 2, 0, progress=False, limits={"wikitext": 1}).run()["wikitext"]
    shared = res["wikitext:paper"]
    assert shared["protocol"] == "paper" and shared["metrics"] == alone["metrics"] == res["wikitext:standard"]["metrics"]
    assert shared["seconds"] == 0 and shared["scored_under"] == "standard"  # its time is counted once
    assert res["sst2:paper"]["protocol"] == "paper" and res["sst2:paper"]["seconds"] > 0
