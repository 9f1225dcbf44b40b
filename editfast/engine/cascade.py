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
On CPU both parts run in PyTorch's fused (flash) attention kernel, which returns each part's
log-sum-exp, and the two are merged by their softmax weights without materialising the scores;
elsewhere the scores are materialised (``_explicit``).

It plugs into transformers' attention interface under the name ``"editfast_cascade"``; models
whose attention does not go through that interface (``supported`` is False; GPT-J before
transformers 5.24) keep the per-row cache.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch

NAME = "editfast_cascade"
_ACTIVE: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor]] | None] = {"prefix": None}


def supported(model) -> bool:
    """Whether the model's attention layers call transformers' attention interface, with neither an
    attention-score soft cap nor sliding-window layers (Gemma-2's; the prefix part applies neither)."""
    cfg = model.config
    if getattr(cfg, "attn_logit_softcapping", None) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in vars(sys.modules[type(model).__module__])


def cascade_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """Attention over [shared prefix | own keys]; same signature and result layout as transformers'
    ``sdpa_attention_forward`` ([B, q, heads, head_dim]), which it calls when no prefix is active."""
    prefix = _ACTIVE["prefix"]
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # internals: at first use

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    pk, pv = prefix[module.layer_idx]  # [1, kvh, P, hd]
    B, H, q, hd = query.shape
    kvh, T = key.shape[1], key.shape[2]
    g = H // kvh
    scale = hd ** -0.5 if scaling is None else scaling
    dt = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    qg = query.to(dt).reshape(B, kvh, g * q, hd)  # heads of one key/value head side by side
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
    parts = _fused if query.device.type == "cpu" else _explicit
    out = parts(qg, pk[0].to(dt), pv[0].to(dt), key.to(dt), value.to(dt), allowed, scale)
    return out.reshape(B, H, q, hd).transpose(1, 2).contiguous().to(query.dtype), None


def _explicit(qg, pk, pv, key, value, allowed, scale: float) -> torch.Tensor:
    """Both parts' scores materialised, one softmax over their concatenation. ``qg``: queries
    [B, kvh, g·q, hd]; ``pk``, ``pv``: [kvh, P, hd]; ``allowed``: [B, 1, g·q, T] or None."""
    B, kvh, gq, hd = qg.shape
    P = pk.shape[1]
    # prefix: one [kvh, B·g·q, hd] x [kvh, hd, P] product
    s_pre = torch.bmm(qg.transpose(0, 1).reshape(kvh, B * gq, hd), pk.transpose(1, 2))
    s_pre = s_pre.view(kvh, B, gq, P).transpose(0, 1)  # [B, kvh, g·q, P]
    s_own = torch.matmul(qg, key.transpose(2, 3))  # [B, kvh, g·q, T]
    if allowed is not None:
        s_own = s_own.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(torch.cat([s_pre, s_own], -1) * scale, -1)
    out = torch.matmul(p[..., P:], value)  # [B, kvh, g·q, hd]
    p_pre = p[..., :P].transpose(0, 1).reshape(kvh, B * gq, P)
    return out + torch.bmm(p_pre, pv).view(kvh, B, gq, hd).transpose(0, 1)


def _fused(qg, pk, pv, key, value, allowed, scale: float) -> torch.Tensor:
    """The same with PyTorch's fused CPU attention, which never materialises the scores: each
    part returns its output and log-sum-exp, and the two are merged by their softmax weights.
    ``_explicit`` reads and writes its [B, kvh, g·q, P + T] scores several times; the benchmark
    row "cascade attention (one layer)" in ``bench/run.py`` compares the two at a GSM8K prefill."""
    attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    B, kvh, gq, hd = qg.shape
    o_pre, l_pre = attend(qg.transpose(0, 1).reshape(1, kvh, B * gq, hd), pk[None], pv[None], scale=scale)
    o_pre = o_pre.reshape(kvh, B, gq, hd).transpose(0, 1)
    l_pre = l_pre.reshape(kvh, B, gq).transpose(0, 1)
    if allowed is None:
        o_own, l_own = attend(qg, key, value, scale=scale)
    else:  # the kernel takes an additive mask; a row with no own key to attend gets weight 0
        bias = torch.zeros(allowed.shape, dtype=qg.dtype, device=qg.device).masked_fill_(~allowed, float("-inf"))
        o_own, l_own = attend(qg, key, value, attn_mask=bias, scale=scale)
        l_own = l_own.masked_fill(~allowed.any(-1).expand_as(l_own), float("-inf"))
    top = torch.maximum(l_pre, l_own)
    w_pre, w_own = torch.exp(l_pre - top)[..., None], torch.exp(l_own - top)[..., None]
    return (o_pre * w_pre + o_own * w_own) / (w_pre + w_own)


def _register() -> None:
    from transformers import AttentionInterface  # transformers internals: only when cascade attention is on
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # (idem)

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
