"""Editing a real model: MEMIT and ROME on SmolLM2-135M, and the API's guarantees."""

import pytest
import torch
from helpers import KNOWN

import editfast
from editfast.core.errors import RequestError
from editfast.data.requests import Request, load_dataset
from editfast.methods.registry import METHODS


def greedy(lm, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_memit_ten_known_facts(pristine):
    lm = pristine
    data = load_dataset("counterfact")
    reqs = [data[i] for i in KNOWN]
    for r in reqs:  # the model knows them
        true_first = lm.tokenizer(" " + r.target_true, add_special_tokens=False)["input_ids"][0]
        assert greedy(lm, r.filled(), 1) == [true_first], r.case_id
    res = editfast.edit(lm, reqs, method="memit", seed=0, progress=False)
    pre, post = res.summary["pre"], res.summary["post"]
    print("pre", pre, "\npost", post, "\ntimings", res.timings)
    assert post["efficacy_success"] >= 0.9
    assert post["paraphrase_success"] >= 0.5
    # "within 0.1" of the unedited model (measured: 0.80 -> 0.70, 10 of 100 prompts; float epsilon)
    assert abs(post["neighborhood_success"] - pre["neighborhood_success"]) <= 0.1 + 1e-9
    assert len(res.journal) == 1 and all(u.rank == 10 for u in res.journal[0])


@pytest.mark.slow
def test_rome_changes_greedy_completion(pristine):
    lm = pristine
    r = load_dataset("counterfact")[KNOWN[0]]
    target = lm.tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"]
    assert greedy(lm, r.filled(), len(target)) != target
    res = editfast.edit(lm, [r], method="rome", seed=0, progress=False)
    assert greedy(lm, r.filled(), len(target)) == target, lm.tokenizer.decode(greedy(lm, r.filled(), len(target)))
    assert res.summary["post"]["efficacy_success"] == 1.0


def rewrite_weights(lm):
    return {l: lm.adapter.rewrite_weight(lm.model, l).detach().clone() for l in range(lm.adapter.num_layers(lm.model))}


def test_failed_batch_leaves_the_last_good_batch(tiny, monkeypatch):
    before = rewrite_weights(tiny)
    calls = []

    memit = METHODS["memit"]
    original = memit.edit

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kw)

    monkeypatch.setattr(memit, "edit", flaky)
    reqs = load_dataset("counterfact", 4)
    with pytest.raises(RuntimeError, match="simulated"):
        editfast.edit(tiny, reqs, "memit", batch_size=2, templates="fixed", evaluate=False, progress=False)
    assert len(calls) == 2  # the first batch was applied before the failure
    after = rewrite_weights(tiny)  # the weights of the last good batch, bit for bit
    monkeypatch.undo()
    with torch.no_grad():
        for l, w in before.items():
            tiny.adapter.rewrite_weight(tiny.model, l).copy_(w)
    editfast.edit(tiny, reqs[:2], "memit", batch_size=2, templates="fixed", evaluate=False, progress=False)
    first = rewrite_weights(tiny)
    assert all(torch.equal(first[l], after[l]) for l in before)
    assert not all(torch.equal(before[l], after[l]) for l in before)
    with torch.no_grad():
        for l, w in before.items():
            tiny.adapter.rewrite_weight(tiny.model, l).copy_(w)


def test_bad_requests_rejected_before_any_change(tiny):
    before = rewrite_weights(tiny)
    bad = [Request(prompt="{} is in", subject="Paris", target_new="Rome", case_id=1),
           Request(prompt="{} is in", subject="Paris", target_new="Oslo", case_id=1)]
    with pytest.raises(RequestError):
        editfast.edit(tiny, bad, "memit", templates="fixed", progress=False)
    with pytest.raises(editfast.EditfastError, match="backend"):  # a targets-only backend is not an edit backend
        editfast.edit(tiny, bad[:1], "memit", templates="fixed", progress=False, backend="reference-lean")
    after = rewrite_weights(tiny)
    assert all(torch.equal(before[l], after[l]) for l in before)


def test_undo_through_journal(tiny):
    before = rewrite_weights(tiny)
    res = editfast.edit(tiny, load_dataset("counterfact", 3), "memit", templates="fixed", evaluate=False, progress=False)
    changed = rewrite_weights(tiny)
    assert not torch.equal(changed[1], before[1])
    for ups in reversed(res.journal):
        for u in ups:
            editfast.apply_update(tiny, u, alpha=-1.0)
    after = rewrite_weights(tiny)
    assert all(torch.allclose(before[l], after[l], atol=1e-6) for l in before)


def test_same_seed_same_result(tiny):
    saved = rewrite_weights(tiny)
    outs = []
    for _ in range(2):
        res = editfast.edit(tiny, load_dataset("counterfact", 2), "memit", seed=3, evaluate=False, progress=False)
        outs.append(res)
        with torch.no_grad():
            for l, w in saved.items():
                tiny.adapter.rewrite_weight(tiny.model, l).copy_(w)
    assert outs[0].templates == outs[1].templates
    assert all(torch.equal(a.U, b.U) and torch.equal(a.V, b.V) for a, b in zip(outs[0].journal[0], outs[1].journal[0]))
