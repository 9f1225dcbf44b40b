"""Architectures outside the adapter table: edit sites found by structure, and the output quirks
(final logit soft-capping) that code computing logits from hidden states must reproduce.

A causal LM whose `config.model_type` has no entry in `models.ADAPTERS` gets an adapter built from
its module tree (on the meta device when only the config is at hand, so no weights are read):

- decoder layers: the `nn.ModuleList` whose length is the config's layer count (the one holding
  the most parameters if several do);
- MLP output projection (the rewrite weight): in layer 0, outside the attention block, the last
  `nn.Linear` / `Conv1D` whose input width is the intermediate size (`intermediate_size`,
  `ffn_dim`, `n_inner`, ... from the config; else any width above the hidden size) and whose
  output width is the hidden size. Its parent module is the MLP block (the projection itself when
  it sits directly in the layer, as OPT's `fc2`). A `Conv1D` stores `[in, out]`;
- MLP input projection (knowledge neurons): in the MLP block, the projection from the hidden size
  to the intermediate size, the one named `gate...` first; none for a fused gate/up projection
  (Phi-3's `gate_up_proj` is twice as wide: its first half is the gate, but KN's neurons are
  defined on a `d_mlp`-wide activation, so KN's `mlp_in` mode is refused there);
- attention block: the layer's first child named `*attn*` / `*attention*` (norms excluded);
- final norm: the last normalisation module of the base model outside the layers;
- embeddings and LM head: `get_input_embeddings()` / `get_output_embeddings()`;
- a norm applied to the MLP output before the residual add (Gemma-2/3's and OLMo-2's
  `post_feedforward_layernorm`): the layer's child named `post_feedforward*` / `post_mlp*` /
  `post_ff*`. See `Adapter.mlp_out_norm` for what it changes.

Mixture-of-experts MLPs (a config with `num_experts`, `num_local_experts`, `n_routed_experts`)
and encoders are refused with a one-line `ModelError`; evaluation needs no edit sites and works
on any causal LM (see `LoadedModel.adapter`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D

from editfast.core.errors import ModelError
from editfast.models.adapters import _BY_MODEL_TYPE, Adapter, supported_architectures
from editfast.models.hf import _hf_errors_only, _one_line

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
D_MLP_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "inner_hidden_size")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
POST_MLP_NORM = re.compile(r"^post_?(feedforward|feed_forward|ffn?|mlp)")
FOUND_BY_STRUCTURE = ("or any decoder-only causal LM whose decoder layers and dense MLP down projection "
                      "can be found by structure")


def unsupported(model_type: Any, reason: str) -> ModelError:
    return ModelError(f"unsupported architecture {model_type!r}: {reason}; supported model types: "
                      f"{', '.join(supported_architectures())}, {FOUND_BY_STRUCTURE}")


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def check_causal_lm(model_type: str, config: Any) -> None:
    """Raise unless transformers builds `model_type` as a decoder-only causal LM (no weights read)."""
    if _get(config, "is_encoder_decoder"):
        raise unsupported(model_type, "an encoder-decoder model, not a decoder-only causal LM")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise unsupported(model_type, "transformers has no causal LM of this type")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not _get(config, "is_decoder"):
        raise unsupported(model_type, "an encoder (its config is not is_decoder), not a decoder-only causal LM")


def meta_model(config: Any) -> nn.Module:
    """The causal LM of `config` with every tensor on the meta device (module names and shapes only)."""


    try:
        with _hf_errors_only(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, AssertionError) as e:
        raise unsupported(getattr(config, "model_type", None),
                          f"transformers cannot build it ({_one_line(e, 200)})") from None


def _widths(m: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, stored [in, out]) of a Linear or transformers' Conv1D; None for other modules."""
    if isinstance(m, Conv1D):
        return m.weight.shape[0], m.weight.shape[1], True
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, False
    return None


def _name_of(model: nn.Module, module: nn.Module | None, what: str, model_type: str) -> str:
    for name, m in model.named_modules():
        if m is module and name:
            return name
    raise unsupported(model_type, f"no {what} found")


def _under(name: str, prefix: str) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def find_adapter(model: nn.Module, model_type: str):
    """The `Adapter` of `model` (real or meta weights) found from its module tree (see the module doc)."""
    config = model.config
    moe = [(k, _get(config, k)) for k in MOE_KEYS if isinstance(_get(config, k), int) and _get(config, k) > 1]
    if moe:
        raise unsupported(model_type, f"a mixture-of-experts MLP ({moe[0][0]}={moe[0][1]}); editfast edits "
                                      "dense MLP projections only")
    n_attr = next((k for k in LAYER_KEYS if isinstance(_get(config, k), int)), None)
    if n_attr is None:
        raise unsupported(model_type, f"the config names no layer count ({', '.join(LAYER_KEYS)})")
    n = _get(config, n_attr)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n > 0]
    if not lists:
        raise unsupported(model_type, f"no module list of {n} decoder layers ({n_attr}={n})")
    layers, mods = max(lists, key=lambda x: sum(p.numel() for p in x[1].parameters()))
    layer0 = mods[0]

    def tmp(rel: str) -> str:
        return f"{layers}.{{}}.{rel}" if rel else f"{layers}.{{}}"

    attn = next((c for c, m in layer0.named_children()
                 if re.search("attn|attention", c, re.I) and "norm" not in c.lower()
                 and any(_widths(x) for x in m.modules())), None)
    if attn is None:
        raise unsupported(model_type, f"no attention block (a child named *attn* / *attention*) in {layers}.0")
    hidden = _get(config, "hidden_size") or model.get_input_embeddings().weight.shape[1]
    d_mlp = {v for k in D_MLP_KEYS if isinstance(v := _get(config, k), int) and v > 0} or {4 * hidden}
    projections = [(rel, *w) for rel, m in layer0.named_modules() if (w := _widths(m)) and not _under(rel, attn)]
    down = [p for p in projections if p[2] == hidden and p[1] in d_mlp] or \
           [p for p in projections if p[2] == hidden and p[1] > hidden]
    if not down:
        raise unsupported(model_type, f"no MLP down projection found in {layers}.0: no Linear or Conv1D outside "
                                      f"{attn!r} maps the intermediate size ({'/'.join(map(str, sorted(d_mlp)))}) "
                                      f"to the hidden size ({hidden})")
    rewrite, inner, _, in_out = down[-1]
    mlp = rewrite.rsplit(".", 1)[0] if "." in rewrite else rewrite
    ins = [p[0] for p in projections if p[1] == hidden and p[2] == inner and (mlp == rewrite or _under(p[0], mlp))]
    mlp_in = next((p for p in ins if "gate" in p.rsplit(".", 1)[-1]), ins[0] if ins else None)
    post = next((c for c, m in layer0.named_children()
                 if POST_MLP_NORM.match(c) and "norm" in type(m).__name__.lower()), None)

    base = model.base_model
    base_name = "" if base is model else _name_of(model, base, "base model", model_type)
    norms = [name for name, m in model.named_modules()
             if "norm" in type(m).__name__.lower() and (not base_name or _under(name, base_name))
             and not _under(name, layers)]
    if not norms:
        raise unsupported(model_type, "no final norm (a normalisation module after the decoder layers)")
    embed = _name_of(model, model.get_input_embeddings(), "input embedding", model_type)
    head = _name_of(model, model.get_output_embeddings(), "LM head (get_output_embeddings)", model_type)
    return Adapter(model_type, (model_type,), tmp(""), tmp(mlp), tmp(rewrite), tmp(attn), norms[-1], embed, head,
                   weight_in_out=in_out, n_layers_attr=n_attr, mlp_in_tmp=tmp(mlp_in) if mlp_in else "",
                   mlp_out_norm=tmp(post) if post else "")


# -----------------------------------------------------------------------------------------------
# logits from hidden states


def logit_softcap(config: Any) -> float | None:
    """The final-logit soft cap c of the model (Gemma-2: logits -> c·tanh(logits / c)), or None."""
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def output_logits(model: nn.Module):
    """`h -> logits` as the model's own forward computes them from final hidden states: the LM head,
    then the final-logit soft cap where the config has one."""
    head, cap = model.get_output_embeddings(), logit_softcap(model.config)
    if cap is None:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap


# -----------------------------------------------------------------------------------------------
# a residual-stream change through a post-MLP norm


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def through_post_norm(norm: nn.Module, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """MLP outputs m' [d, n] for columns m [d, n] such that `norm(m')` (what the layer adds to the
    residual stream) moves from `norm(m)` towards `norm(m) + delta` [d, n], for an RMS norm with
    gain g: norm(x) = g ⊙ x / rms(x). Such a norm only reaches outputs t with rms(t / g) = 1 and
    ignores the scale of its input, so m' = u · rms(m + delta) / rms(u) with u = (norm(m) + delta)
    / g: the direction asked for (exact where the target is reachable), at the scale the additive
    rule m + delta of the other families would give (a regularised solve reaches only part of the
    change; at that scale a small MLP output is overridden as the additive rule overrides it, a
    large one moved as little as needed). A norm that is not of this form (LayerNorm subtracts
    the mean) gets m + delta."""
    with torch.no_grad():
        x = m.T.float()
        y = norm(x).float()
        g = norm(torch.ones_like(x[:1])).float()[0] * math.sqrt(1 + _eps(norm))
        if not torch.allclose(y, g * x / _rms(x), rtol=1e-3, atol=1e-5 * float(y.abs().max())):
            return m + delta
        tiny = 1e-6 * float(g.abs().max())
        u = (y + delta.T.float()) / torch.where(g.abs() > tiny, g, torch.full_like(g, tiny))
        return (u * (_rms(x + delta.T.float()) / _rms(u).clamp_min(1e-30))).T.to(m.dtype)


def _eps(norm: nn.Module) -> float:
    for key in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, key, None)
        if isinstance(value, float):
            return value
    return 0.0


def adapter_for(model_or_config: Any) -> Adapter:
    """The adapter of a model or a config: the table's entry for `config.model_type`, else one
    found from the model's module tree (a config is built on the meta device: no weights are read
    or allocated). A `model_type` string is looked up in the table only. ModelError naming what
    was not found (layers, MLP down projection, ...) for a model without findable edit sites."""

    config = getattr(model_or_config, "config", model_or_config)
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if not isinstance(model_type, str) or isinstance(config, str):
        raise unsupported(model_type, "not in the adapter table (give a model or config to find it by structure)")
    check_causal_lm(model_type, config)
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_model(config)
    return find_adapter(model, model_type)
