"""The seam of routed methods (editfast.models.routing): a memory installed on a module routes every
forward, the batched engine (padding, KV cache) included; a saved routed model reloads with its memory;
plain transformers loads the base model."""

import json

import pytest
import torch

from editfast.core.errors import ModelError
from editfast.engine.engine import Engine
from editfast.engine.requests import Generate, LogLik
from editfast.models import routing
from editfast.models.load import load_model

SITE = "model.layers.1.mlp.down_proj"
PROMPTS = ["The capital of France is", "Danielle Darrieux's mother tongue is the language of", "Paris"]


def _inputs(lm, text: str) -> torch.Tensor:
    """The input of SITE at every token of ``text`` [T, d_in]."""
    seen = []
    h = lm.model.get_submodule(SITE).register_forward_hook(lambda m, a, o: seen.append(a[0][0].detach().clone()))
    try:
        with torch.no_grad():
            lm.model(**lm.tokenizer(text, return_tensors="pt", add_special_tokens=False))
    finally:
        h.remove()
    return seen[0]


def _codebook(lm) -> routing.Codebook:
    """One key: the SITE input at the last token of PROMPTS[0], a value far from the layer's output."""
    key = _inputs(lm, PROMPTS[0])[-1:]
    d_out = lm.model.get_submodule(SITE).weight.shape[0]
    value = torch.full((1, d_out), 10.0)
    return routing.Codebook(key.float(), value, torch.tensor([1e-3]))


def _scores(lm, batch_tokens=4096):
    eng = Engine(lm, batch_tokens=batch_tokens, progress=False)
    reqs = [LogLik(p, " Paris and Rome") for p in PROMPTS] + [LogLik(PROMPTS[0], " London")]
    return [r.logprob for r in eng.run(reqs)]


def test_codebook_lookup_float64():
    """Nearest key by Euclidean distance; within its own radius the value replaces the output."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 7, generator=g, dtype=torch.float64)
    values = torch.randn(5, 3, generator=g, dtype=torch.float64)
    eps = torch.tensor([0.5, 0.1, 2.0, 0.3, 0.0], dtype=torch.float64)
    cb = routing.Codebook(keys, values, eps)
    x = torch.cat([keys[[0]] + 0.4 / 7 ** 0.5, keys[[1]] + 0.2 / 7 ** 0.5, keys[[4]], torch.randn(2, 7, generator=g,
                                                                                                 dtype=torch.float64)])
    out = torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = cb.route(x[None], out[None], None)[0]
    for i in range(5):  # the reference, row by row
        d = ((keys - x[i]) ** 2).sum(1).sqrt()
        j = int(d.argmin())
        want = values[j] if d[j] <= eps[j] else out[i]
        assert torch.allclose(got[i], want, atol=1e-12), i
    assert torch.equal(got[0], values[0]) and torch.equal(got[1], out[1]) and torch.equal(got[2], values[4])
    real = torch.tensor([[1, 1, 0, 1, 1]])
    assert torch.equal(cb.route(x[None], out[None], real)[0, 2], out[2])  # padding is never routed


def test_engine_routes_each_token_as_alone(pristine_tiny):
    """Routed scores change only where the key's token is; mixed lengths in one padded batch, a
    context's KV cache and a one-row batch give the same scores."""
    lm = pristine_tiny
    plain = _scores(lm)
    routing.install(lm.model, SITE, _codebook(lm))
    try:
        batched, one_row = _scores(lm), _scores(lm, batch_tokens=1)
        assert routing.routes(lm.model)[SITE].size()["entries"] == 1
        with routing.bypassed(lm.model):
            assert _scores(lm) == pytest.approx(plain, abs=1e-5)
    finally:
        routing.uninstall(lm.model)
    assert not routing.routes(lm.model)
    assert batched == pytest.approx(one_row, abs=1e-4)
    assert abs(batched[0] - plain[0]) > 0.01 and abs(batched[3] - plain[3]) > 0.01  # the key's prompt, two targets
    assert batched[1:3] == pytest.approx(plain[1:3], abs=1e-4)  # other prompts untouched


def test_generation_routes_through_the_cache(pristine_tiny):
    lm = pristine_tiny
    reqs = [Generate(p, max_new_tokens=4, stop=[]) for p in PROMPTS]
    plain = Engine(lm, progress=False).run(reqs)
    routing.install(lm.model, SITE, _codebook(lm))
    try:
        routed = Engine(lm, progress=False).run(reqs)
        alone = [Engine(lm, progress=False).run([r])[0] for r in reqs]
    finally:
        routing.uninstall(lm.model)
    assert routed == alone and routed[1:] == plain[1:]


def test_saved_routed_model_reloads(pristine_tiny, tmp_path):
    """save_model_to writes the base weights plus routing.json/.safetensors; editfast's loader
    re-installs the memory (same logits), plain transformers loads the base model."""
    from transformers import AutoModelForCausalLM

    from editfast.cli.shared import save_model_to

    lm = pristine_tiny
    ids = lm.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = lm.model(ids).logits
    routing.install(lm.model, SITE, _codebook(lm))
    try:
        with torch.no_grad():
            routed_logits = lm.model(ids).logits
        save_model_to(lm, tmp_path)
    finally:
        routing.uninstall(lm.model)
    folder = tmp_path / "model"
    assert {"routing.json", "routing.safetensors"} <= {p.name for p in folder.iterdir()}
    again = load_model(folder)
    assert list(routing.routes(again.model)) == [SITE]
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, routed_logits)
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert torch.allclose(plain(ids).logits, base_logits, atol=1e-5)
    assert not torch.allclose(routed_logits, base_logits, atol=1e-2)
    (folder / "routing.json").write_text(json.dumps({"format": 1, "routes": {SITE: {"kind": "nope"}}}))
    with pytest.raises(ModelError, match="unknown memory kind 'nope'"):
        load_model(folder)
    (folder / "routing.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot read the routing memory"):
        load_model(folder)
