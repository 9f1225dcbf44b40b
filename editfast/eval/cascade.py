"""Cascade attention: one prompt prefix shared by every row of a batch, attended once.

Few-shot generation (GSM8K's eight exemplars, ~1,200 tokens) gives every row of a batch the same
long prefix. A per-row KV cache holds B copies of its keys/values and every decoding step reads
all of them again (and the cache's concatenation copies them), although they are identical. Here
the prefix's keys/values stay one ``[1, kv_heads, P, head_dim]`` tensor per layer; each row's
cache holds only its own tokens, and attention is computed in two parts that share one softmax:

    scores = [ q · K_prefixᵀ  |  q · K_ownᵀ (masked) ] · scale,   p = softmax(scores)
    out    =  p_prefix · V_prefix  +  p_own · V_own

The prefix part is one batched matrix product per key/value head for all rows, queries and
query heads of the group (GQA), so the prefix is read once per layer and step instead of B times.

It plugs into transformers' attention interface under the name ``"editfast_cascade"``; models whose
attention does not go through that interface (``supported`` is False, e.g. GPT-J) keep the
per-row cache.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch

NAME = "editfast_cascade"
_ACTIVE: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]] | None] = {"prefix": None}


def supported(model) -> bool:
    """Whether the model's attention layers call transformers' attention interface."""
    return "ALL_ATTENTION_FUNCTIONS" in vars(sys.modules[type(model).__module__])


def cascade_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """Attention over [shared prefix | own keys]; same signature and result layout as transformers'
    ``sdpa_attention_forward`` ([B, q, heads, head_dim]), which it calls when no prefix is active."""
    prefix = _ACTIVE["prefix"]
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    pk, pv = prefix[module.layer_idx]  # [1, kvh, P, hd]
    B, H, q, hd = query.shape
    kvh, T, P = key.shape[1], key.shape[2], pk.shape[2]
    g = H // kvh
    scale = hd ** -0.5 if scaling is None else scaling
    dt = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    qg = query.to(dt).reshape(B, kvh, g * q, hd)  # heads of one key/value head side by side
    # prefix: one [kvh, B·g·q, hd] x [kvh, hd, P] product
    s_pre = torch.bmm(qg.transpose(0, 1).reshape(kvh, B * g * q, hd), pk[0].to(dt).transpose(1, 2))
    s_pre = s_pre.view(kvh, B, g * q, P).transpose(0, 1)  # [B, kvh, g·q, P]
    s_own = torch.matmul(qg, key.to(dt).transpose(2, 3))  # [B, kvh, g·q, T]
    if attention_mask is None:  # no padding: causal within the own tokens when several queries run
        allowed = None
        if q > 1:
            allowed = torch.ones(q, T, dtype=torch.bool, device=query.device).tril(T - q)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, :, :, -T:]  # [B or 1, 1, q, T]
    else:
        allowed = attention_mask[:, :, :, -T:] == 0
    if allowed is not None:  # [.., q, T] -> [.., 1, g·q, T]: each query row repeated for its g heads
        allowed = allowed.expand(B, 1, q, T).unsqueeze(2).expand(B, 1, g, q, T).reshape(B, 1, g * q, T)
        s_own = s_own.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(torch.cat([s_pre, s_own], -1) * scale, -1)
    out = torch.matmul(p[..., P:], value.to(dt))  # [B, kvh, g·q, hd]
    p_pre = p[..., :P].transpose(0, 1).reshape(kvh, B * g * q, P)
    out = out + torch.bmm(p_pre, pv[0].to(dt)).view(kvh, B, g * q, hd).transpose(0, 1)
    return out.reshape(B, H, q, hd).transpose(1, 2).contiguous().to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cascade_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def shared_prefix(model, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Within the block, every forward of ``model`` attends to ``prefix_kv`` (per layer, keys and
    values ``[1, kv_heads, P, head_dim]``) before its own cache. Pass position ids that start at P
    and attention masks and caches for the own tokens only."""
    _register()
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = NAME
    _ACTIVE["prefix"] = prefix_kv
    try:
        yield
    finally:
        _ACTIVE["prefix"] = None
        config._attn_implementation = saved
