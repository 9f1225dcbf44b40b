import math

import pytest
import torch
from helpers import GOLDEN
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from editfast.core.errors import RequestError
from editfast.data.requests import Request
from editfast.eval.edit_metrics import (
    counterfact_metrics,
    score_continuations,
    summarize,
    zsre_metrics,
)

TOKENIZER = GOLDEN / "models" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER.is_dir():
        pytest.skip(f"no tokenizer at {TOKENIZER} (set EDITFAST_GOLDEN_DIR)")
    t = AutoTokenizer.from_pretrained(TOKENIZER)
    assert t.pad_token_id == 2
    return t


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def reference(model, tok, context, continuation):
    """Unbatched, full log-softmax in float64: (token log-probs, argmax hits)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logp = logits.log_softmax(-1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return [logp[p, t].item() for p, t in zip(pos, cont)], [logits[p].argmax().item() == t for p, t in zip(pos, cont)]


def ref_prob(model, tok, context, continuation):
    lps, _ = reference(model, tok, context, continuation)
    return math.exp(sum(lps) / len(lps))


@torch.no_grad()
def greedy(model, tok, context, n=3):
    """A continuation the model predicts token by token (so every argmax hit is True)."""
    ids = tok(context, add_special_tokens=False)["input_ids"]
    for _ in range(n):
        ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
    text = tok.decode(ids[-n:])
    if tok(text, add_special_tokens=False)["input_ids"] != ids[-n:]:
        pytest.skip("greedy continuation does not re-tokenise to the same ids")
    return text


PAIRS = [
    ("Angola is located in", " Antarctica"),
    ("The mother tongue of Danielle Darrieux is", " French"),
    ("A", " very long continuation with several tokens in it, to mix lengths"),
    ("Toko Yasuda, the", " guitar"),
    ("nq question: john goodman's character in the big lebowski?", " Walter Sobchak"),
    ("Angola is located in", " Africa"),
    ("Angola is located in", " Antarctica"),  # duplicate pair
    ("In Paris, people speak the language of the country they live in, which is", " French"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_score_continuations_matches_float64_reference(model, tok, batch_size):
    scores = score_continuations(model, tok, PAIRS, batch_size=batch_size)
    assert len(scores) == len(PAIRS)
    for (ctx, cont), s in zip(PAIRS, scores):  # order preserved
        lps, hits = reference(model, tok, ctx, cont)
        assert s.n_tokens == len(lps) == len(tok(cont, add_special_tokens=False)["input_ids"])
        assert s.logprob_sum == pytest.approx(sum(lps), abs=1e-5)
        assert s.mean_nll == pytest.approx(-sum(lps) / len(lps), abs=1e-5)
        assert s.n_argmax == sum(hits)


def test_logits_never_materialised(model, tok):
    """The LM head module is never called: the fused kernel reads its weight for the needed rows."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        scores = score_continuations(model, tok, [("Angola is located in", " Antarctica"), ("A", " b c")], batch_size=2)
    finally:
        handle.remove()
    assert seen == [] and all(s.n_tokens > 0 for s in scores)


def test_argmax_correct_on_greedy_continuation(model, tok):
    cont = greedy(model, tok, "Angola is located in")
    (s,) = score_continuations(model, tok, [("Angola is located in", cont)])
    assert s.n_argmax == s.n_tokens == 3


def test_empty_inputs(model, tok):
    assert score_continuations(model, tok, []) == []
    with pytest.raises(RequestError):
        score_continuations(model, tok, [("Angola is located in", "")])


def test_counterfact_metrics(model, tok):
    reqs = [
        Request("{} is located in", "Angola", "Antarctica", "Africa", ("Angola is part of",),
                ("Ghana is in", "Chad is in"), "Africa", case_id=1),
        Request("The mother tongue of {} is", "Danielle Darrieux", "English", "French", case_id=2),
    ]
    out = counterfact_metrics(model, tok, reqs, batch_size=4)
    assert [m["case_id"] for m in out] == [1, 2]
    for r, m in zip(reqs, out):
        p_new = ref_prob(model, tok, r.filled(), " " + r.target_new)
        p_true = ref_prob(model, tok, r.filled(), " " + r.target_true)
        assert m["p_new"] == pytest.approx(p_new, abs=1e-6) and m["p_true"] == pytest.approx(p_true, abs=1e-6)
        assert m["efficacy_success"] is (p_new > p_true)
        assert m["efficacy_magnitude"] == pytest.approx(p_new - p_true, abs=1e-6)
    para = [(ref_prob(model, tok, "Angola is part of", " Antarctica"),
             ref_prob(model, tok, "Angola is part of", " Africa"))]
    nb = [(ref_prob(model, tok, p, " Antarctica"), ref_prob(model, tok, p, " Africa"))
          for p in ("Ghana is in", "Chad is in")]
    assert out[0]["paraphrase_success"] == float(para[0][0] > para[0][1])
    assert out[0]["paraphrase_magnitude"] == pytest.approx(para[0][0] - para[0][1], abs=1e-6)
    assert out[0]["neighborhood_success"] == sum(t > n for n, t in nb) / 2
    assert out[0]["neighborhood_magnitude"] == pytest.approx(sum(t - n for n, t in nb) / 2, abs=1e-6)
    assert out[1]["paraphrase_success"] is None and out[1]["neighborhood_magnitude"] is None

    s = summarize(out)
    assert s["n"] == 2 and "case_id" not in s
    assert s["efficacy_success"] == (out[0]["efficacy_success"] + out[1]["efficacy_success"]) / 2
    assert s["p_new"] == pytest.approx((out[0]["p_new"] + out[1]["p_new"]) / 2)
    assert s["paraphrase_success"] == out[0]["paraphrase_success"]  # None excluded from the mean

    with pytest.raises(RequestError, match="target_true"):
        counterfact_metrics(model, tok, [Request("{} is", "a", "b")])


def test_zsre_metrics(model, tok):
    prompt = "What is the product made by UniFirst?"
    hit = greedy(model, tok, prompt, n=2)
    reqs = [
        Request("What is the product made by {}?", "UniFirst", hit.lstrip(" "), None,
                ("What will be the product of UniFirst?", "Name UniFirst's product."),
                ("nq question: who wrote hamlet?",), "William Shakespeare", case_id=0),
        Request("{} is located in", "Angola", "Antarctica", case_id=1),
    ]
    if " " + reqs[0].target_new != hit:
        pytest.skip("greedy continuation does not start with a space")
    out = zsre_metrics(model, tok, reqs, batch_size=2)
    assert out[0]["rewrite_acc"] == 1.0
    paras = [h for p in reqs[0].paraphrase_prompts for h in reference(model, tok, p, hit)[1]]
    assert out[0]["paraphrase_acc"] == sum(paras) / len(paras)
    nb = reference(model, tok, "nq question: who wrote hamlet?", " William Shakespeare")[1]
    assert out[0]["neighborhood_acc"] == sum(nb) / len(nb)
    rw = reference(model, tok, "Angola is located in", " Antarctica")[1]
    assert out[1] == {"case_id": 1, "rewrite_acc": sum(rw) / len(rw), "paraphrase_acc": None, "neighborhood_acc": None}
    s = summarize(out)
    assert s == {"n": 2, "rewrite_acc": (out[0]["rewrite_acc"] + out[1]["rewrite_acc"]) / 2,
                 "paraphrase_acc": out[0]["paraphrase_acc"], "neighborhood_acc": out[0]["neighborhood_acc"]}
