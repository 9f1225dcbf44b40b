"""Any HF causal LM: the adapter table's Qwen3, Gemma-2, Phi-3 and OLMo-2 edited and evaluated,
adapters found by structure, models without edit sites evaluated, Hub ids from the local cache."""

import dataclasses
import hashlib
import math
import socket

import pytest
import torch
from helpers import assert_refused, run_cli
from transformers import AutoConfig, AutoModelForCausalLM

import editfast
from editfast.core.errors import ModelError
from editfast.data.requests import load_dataset
from editfast.engine.engine import Engine
from editfast.engine.requests import Generate, LogLik
from editfast.models.archs import adapter_for, find_adapter, meta_model
from editfast.models.load import load_model, model_config

NEW = ["qwen3", "gemma2", "phi3", "olmo2"]
TINY_CONFIG = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)


def o1_weights(lm, head_scale=5.0, seed=0):
    """Re-draw a random model's weights at O(1) activation scale (every Linear variance-preserving,
    small input embeddings, a separate LM head of logit std ~head_scale): at the presets' 0.02
    init a token's information barely reaches later positions and no token can be likely, so no
    edit could show. Returns the model."""
    torch.manual_seed(seed)
    model = lm.model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 1 / math.sqrt(m.in_features))
        E = model.get_input_embeddings().weight
        E.normal_(0, 1 / E.shape[1])
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.randn_like(E) * head_scale / math.sqrt(E.shape[1]), requires_grad=False)
    lm.fingerprint = hashlib.sha256(f"{lm.fingerprint} o1 {head_scale} {seed}".encode()).hexdigest()  # own statistics
    return lm


def one_token_requests(tok, n=2):
    """CounterFact requests with one-token targets, the prompt cut after the subject (the answer
    is predicted at the edited token: in a random model attention carries little to later tokens)."""
    one = [r for r in load_dataset("counterfact", 40)
           if all(len(tok(" " + t, add_special_tokens=False)["input_ids"]) == 1 for t in (r.target_new, r.target_true))]
    return [dataclasses.replace(r, prompt=r.prompt[: r.prompt.index("{}") + 2]) for r in one[:n]]


# -- adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2", "gptj", "neox", "llama", *NEW])
def test_structure_finds_the_tables_adapter(preset):
    """On every family of the table, structure detection (from the config alone, meta weights) names
    the same modules, orientation and layer count as the hand-written entry."""
    config = model_config(f"random:tiny-{preset}")
    found, table = find_adapter(meta_model(config), config.model_type), adapter_for(config)
    same = ("layer_tmp", "mlp_tmp", "rewrite_tmp", "attn_tmp", "final_norm", "embed", "lm_head", "weight_in_out",
            "mlp_in_tmp", "mlp_out_norm")
    assert {k: getattr(found, k) for k in same} == {k: getattr(table, k) for k in same}
    assert getattr(config, found.n_layers_attr) == getattr(config, table.n_layers_attr) == 4
    assert next(meta_model(config).parameters()).is_meta


def test_structure_on_families_outside_the_table():
    opt = find_adapter(meta_model(AutoConfig.for_model("opt", num_hidden_layers=2, hidden_size=32, ffn_dim=128,
                                                       num_attention_heads=2, vocab_size=100,
                                                       word_embed_proj_dim=32)), "opt")
    # OPT's MLP projections sit directly in the layer: the MLP output is fc2's
    assert (opt.rewrite_tmp, opt.mlp_tmp, opt.mlp_in_tmp, opt.attn_tmp, opt.final_norm) == (
        "model.decoder.layers.{}.fc2", "model.decoder.layers.{}.fc2", "model.decoder.layers.{}.fc1",
        "model.decoder.layers.{}.self_attn", "model.decoder.final_layer_norm")
    with pytest.raises(ModelError, match=r"unsupported architecture 'mixtral': a mixture-of-experts MLP"):
        adapter_for(AutoConfig.for_model("mixtral", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=100))
    with pytest.raises(ModelError, match=r"unsupported architecture 't5'"):
        adapter_for(AutoConfig.for_model("t5"))


def test_no_mlp_down_projection_is_named():
    lm = load_model("random:tiny-llama")
    for layer in lm.model.model.layers:  # an MLP whose output projection is not a Linear
        layer.mlp.down_proj = torch.nn.Identity()
    with pytest.raises(ModelError, match=r"no MLP down projection found in model\.layers\.0.*256.*hidden size \(64\)"):
        find_adapter(lm.model, "custom")


def test_phi3_has_no_mlp_input_for_knowledge_neurons():
    lm = load_model("random:tiny-phi3")
    assert lm.adapter.mlp_in_tmp == ""  # fused gate_up_proj: 2 x d_mlp wide
    with pytest.raises(ModelError, match="names no MLP input projection"):
        editfast.edit(lm, load_dataset("counterfact", 1), "kn", overrides={"activation": "mlp_in"},
                      templates="fixed", evaluate=False, progress=False)


# -- edited ------------------------------------------------------------------------------------


def _tiny_structure_only(tmp_path):
    """A dense family outside the table (Starcoder2: mlp.c_fc / mlp.c_proj with biases), saved."""
    config = AutoConfig.for_model("starcoder2", **{k: v for k, v in TINY_CONFIG.items() if k != "head_dim"},
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "sc2")
    return str(tmp_path / "sc2")


@pytest.mark.parametrize("method", ["memit", "rome"])
@pytest.mark.parametrize("arch", [*NEW, "structure"])
def test_edit_raises_the_target(arch, method, tmp_path):
    spec = _tiny_structure_only(tmp_path) if arch == "structure" else f"random:tiny-{arch}"
    lm = o1_weights(load_model(spec))
    assert lm.adapter.family == lm.model.config.model_type or arch == "qwen3"
    reqs = one_token_requests(lm.tokenizer)
    # λ: the tiny preset's is gpt2-xl's 20,000, at which these random keys barely move Gemma-2
    overrides = {"mom2_update_weight": 100.0} if method == "memit" else {}
    res = editfast.edit(lm, reqs, method, templates="fixed", progress=False, overrides=overrides)
    pre, post = res.summary["pre"], res.summary["post"]
    assert post["efficacy_success"] == 1.0
    # the new object's probability rises by orders of magnitude; the post-MLP norm of Gemma-2 and
    # OLMo-2 bounds what one MLP adds to the residual stream, so less there than elsewhere
    assert post["p_new"] > 1000 * pre["p_new"]
    assert post["p_new"] > (1e-3 if lm.adapter.mlp_out_norm else 0.2)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_post_norm_fast_targets_equal_the_reference(arch):
    """ROME's target sits at the MLP output, before the post-MLP norm: the batched path (which
    skips the layers below) must run the edited layer itself there, as the reference does."""
    lm = o1_weights(load_model(f"random:tiny-{arch}", dtype="float32"))
    reqs = one_token_requests(lm.tokenizer)
    rome = editfast.methods.registry.METHODS["rome"]
    hp = rome.hparams_class(**{**rome.presets["tiny"], "v_num_grad_steps": 5})
    templates = rome.templates(lm, hp, 0, "fixed")
    fast = rome.optimize(lm, reqs[:1], hp, templates, backend="fast")
    ref = rome.optimize(lm, reqs[:1], hp, templates, backend="reference")
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


# -- evaluated ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", NEW)
def test_engine_log_likelihoods_equal_the_models_forward(arch):
    """The engine's fused LM-head log-probabilities (and Gemma-2's final soft cap, at logits large
    enough for it to matter) equal log_softmax of the model's own forward."""
    lm = o1_weights(load_model(f"random:tiny-{arch}"), head_scale=8.0)
    tok = lm.tokenizer
    pairs = [("The capital of France is", " Paris"), ("Danielle Darrieux's mother tongue is", " French English")]
    got = Engine(lm, progress=False).loglikelihood([LogLik(c, x) for c, x in pairs])
    for (ctx, cont), res in zip(pairs, got):
        c, x = tok(ctx, add_special_tokens=False)["input_ids"], tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([c + x])).logits[0].double()
        lp = torch.log_softmax(logits[len(c) - 1: -1], -1).gather(1, torch.tensor(x)[:, None]).sum().item()
        assert res.logprob == pytest.approx(lp, abs=2e-3 * max(1.0, abs(lp)))
    if arch == "gemma2":  # the soft cap matters at this scale: without it the values differ
        cap = lm.model.config.final_logit_softcapping
        lm.model.config.final_logit_softcapping = None
        uncapped = Engine(lm, progress=False).loglikelihood([LogLik(*pairs[0])])[0].logprob
        lm.model.config.final_logit_softcapping = cap
        assert abs(uncapped - got[0].logprob) > 0.1


@pytest.mark.parametrize("arch", NEW)
def test_engine_generation_equals_the_models_greedy_generate(arch):
    lm = o1_weights(load_model(f"random:tiny-{arch}"), head_scale=3.0)
    prompts = ["The capital of France is", "Danielle Darrieux's mother tongue is a language that"]
    got = Engine(lm, progress=False).generate([Generate(p, max_new_tokens=8) for p in prompts])
    for p, text in zip(prompts, got):
        ids = lm.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert text == lm.tokenizer.decode(out[0, ids.shape[1]:])


def _save_moe(path):
    """A tiny Mixtral (mixture of experts): no dense MLP down projection to edit."""
    config = AutoConfig.for_model("mixtral", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  vocab_size=49152, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_eval_runs_on_a_model_without_edit_sites(tmp_path, capsys):
    model = _save_moe(tmp_path / "moe")
    out = tmp_path / "eval"
    code, _, err = run_cli(["eval", "--model", str(model), "--tasks", "sst2", "--limit", "2", "--out", str(out),
                            "--quiet"], capsys)
    assert code == 0, err
    assert "sst2" in (out / "eval.json").read_text()
    # editing needs the sites: refused before the weights load, naming why, nothing written
    assert_refused(["edit", "--model", str(model), "--n", "1", "--no-eval", "--out", str(tmp_path / "e")], capsys,
                   "mixtral", "mixture-of-experts", absent=[tmp_path / "e"])
    lm = load_model(model)  # loads for evaluation; asking it for edit sites says why there are none
    with pytest.raises(ModelError, match="mixture-of-experts"):
        lm.adapter


# -- Hub ids from the local cache ----------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch, capsys, no_network):
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-qwen3"
    src = load_model("random:tiny-qwen3")
    src.model.save_pretrained(repo / "snapshots" / commit)
    src.tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-qwen3" is no local path here

    assert model_config("tiny-org/tiny-qwen3").model_type == "qwen3"
    lm = load_model("tiny-org/tiny-qwen3")
    for (name, a), b in zip(lm.model.state_dict().items(), src.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert lm.adapter.family == "llama" and len(lm.tokenizer) == len(src.tokenizer)
    assert load_model(f"tiny-org/tiny-qwen3@{commit}").fingerprint == lm.fingerprint

    with pytest.raises(ModelError, match=rf"'tiny-org/absent'.*in the local Hugging Face cache '{cache}'.*hf download"):
        load_model("tiny-org/absent")
    capsys.readouterr()  # the loads' progress bars
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    line = assert_refused(["eval", "--model", "tiny-org/tiny-qwen3", "--tasks", "sst2", "--limit", "1",
                           "--out", str(tmp_path / "o")], capsys,
                          "tiny-org/tiny-qwen3", str(tmp_path / "home" / "hub"), absent=[tmp_path / "o"])
    assert "hf download" in line
