"""Padding and the KV cache: right/left padding of token rows, a cache seeded from given keys and
values (shared prefixes), and a cache layer that grows in place instead of concatenating.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


def encode(tok, texts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask, no special tokens."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return right_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else 0, device)


def right_pad(rows: Sequence[Sequence[int]], pad: int, device=None,
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of token rows."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def left_pad(rows: Sequence[Sequence[int]], pad: int, device=None, width: int | None = None):
    """Left-padded ids, mask and position ids (positions count real tokens only)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(1) - 1).clamp_min(0)


def kv_cache(model, kv: Sequence[tuple[torch.Tensor, torch.Tensor] | None] = (), rows: torch.Tensor | None = None,
             batch: int | None = None, room: int | None = None):
    """A ``DynamicCache`` that starts from per-layer (keys, values) ``[B, heads, T, head_dim]``.

    ``rows`` selects batch rows (a copy); ``batch`` broadcasts one cached row to that many (no
    copy). Otherwise the tensors are used as they are: the cache never writes into them (each
    forward concatenates into new tensors), so one prefix can seed many caches. A layer given as
    ``None`` (one the forward skips) holds a placeholder of the right shape that takes no memory.

    ``room``: the cache will hold about this many positions (decoding); its full-attention layers
    then write into buffers of that size instead of concatenating (``_growing_layer_class``). With
    no ``kv`` the cache starts empty.
    """
    from transformers import DynamicCache  # transformers' cache classes: at first use (version-specific)
    from transformers.cache_utils import DynamicLayer  # the subclass is built at first use (version-specific)

    cache = DynamicCache(config=model.config)
    if room is not None:
        grow = _growing_layer_class()
        cache.layers = [grow(room) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if not kv:
        return cache
    ref = next(e for e in kv if e is not None)[0]
    if rows is not None:
        kv = [None if e is None else (e[0][rows], e[1][rows]) for e in kv]
    elif batch is not None:
        kv = [None if e is None else tuple(t.expand(batch, -1, -1, -1) for t in e) for e in kv]
    shape = (len(rows) if rows is not None else batch or ref.shape[0], *ref.shape[1:])
    empty = ref.new_zeros(()).expand(shape)
    for i, e in enumerate(kv):
        k, v = e if e is not None else (empty, empty)
        cache.update(k[..., :0, :], v[..., :0, :], i)  # initialises layer i
        layer = cache.layers[i]
        if getattr(layer, "is_sliding", False):  # (Gemma-2's) counts its positions, keeps the last window - 1
            layer.cumulative_length = k.shape[-2]
            k, v = k[..., -(layer.sliding_window - 1):, :], v[..., -(layer.sliding_window - 1):, :]
        layer.keys, layer.values = k, v
    return cache


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer  # the subclass is built at first use (version-specific)

    class GrowingLayer(DynamicLayer):
        """A decoding cache layer that writes each step's keys/values into a preallocated buffer and
        returns views of its filled part. ``DynamicLayer`` concatenates, which copies the whole
        cache at every step (on CPU that copy was 40% of a 32-row decoding step at 300 tokens).
        Full buffers grow by doubling; rows leaving the batch copy only the filled part; ``place``
        also stacks the rows of two caches (continuous batching)."""

        def __init__(self, room: int):
            super().__init__()
            self.room = room
            self._buf: tuple[torch.Tensor, torch.Tensor] | None = None

        def held(self) -> int:
            k = self.keys
            return 0 if k is None or k.dim() < 4 else k.shape[-2]

        def place(self, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], width: int, size: int) -> None:
            """New buffers of ``size`` positions holding the row blocks ``ks``/``vs`` one after
            another, each right-aligned at ``width`` (zeros to its left: finite keys under a mask)."""
            k0, v0 = ks[0], vs[0]
            rows = sum(k.shape[0] for k in ks)
            bk = k0.new_zeros(rows, k0.shape[1], size, k0.shape[-1])
            bv = v0.new_zeros(rows, v0.shape[1], size, v0.shape[-1])
            r = 0
            for k, v in zip(ks, vs):
                b, n = k.shape[0], k.shape[-2]
                bk[r:r + b, :, width - n:width], bv[r:r + b, :, width - n:width] = k, v
                r += b
            self._buf = (bk, bv)
            self.keys, self.values = bk[..., :width, :], bv[..., :width, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self.held(), key_states.shape[-2]
            if not t:
                return self.keys, self.values
            buf = self._buf
            own = (buf is not None and n and self.keys.data_ptr() == buf[0].data_ptr()
                   and self.keys.shape[0] == buf[0].shape[0])
            if not own or n + t > buf[0].shape[-2]:  # first write, a seeded prefix, or full
                if n == 0:
                    self.place([key_states], [value_states], t, max(self.room, t))
                    return self.keys, self.values
                self.place([self.keys], [self.values], n, max(self.room, 2 * (n + t)))
            bk, bv = self._buf
            bk[..., n:n + t, :], bv[..., n:n + t, :] = key_states, value_states
            self.keys, self.values = bk[..., :n + t, :], bv[..., :n + t, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if n := self.held():
                size = self._buf[0].shape[-2] if self._buf else self.room
                self.place([self.keys[indices]], [self.values[indices]], n, size)

        def reset(self) -> None:
            self._buf = None
            super().reset()

    return GrowingLayer


def growing(cache) -> bool:
    """Whether every layer of ``cache`` is a ``GrowingLayer`` (its rows can be stacked with another's)."""
    grow = _growing_layer_class()
    return all(isinstance(layer, grow) for layer in cache.layers)
