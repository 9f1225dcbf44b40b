"""Post-processes of a locate-then-edit update. RECT keeps the ``fraction`` of the update's entries
largest relative to the weight (the rest are zeroed); the norm anchor rescales the edited weight
so its Frobenius norm stays at the unedited weight's.
"""

from __future__ import annotations

import torch

from editfast.methods.base import State
from editfast.models.update import (
    Dense,
    Sparse,
    Update,
    weight_param,
)


def _logical_weight(lm, name: str) -> torch.Tensor:
    W, transposed = weight_param(lm.model, name)
    return W.detach().T if transposed else W.detach()


def rect(lm, update: Update, fraction: float) -> Sparse:
    """RECT: the ``fraction`` of ΔW's entries with the largest relative change |ΔW / W| (W as it is
    before this update), the rest zeroed. An entry of W that is 0 counts as an infinite change."""
    delta = update.dense()
    W = _logical_weight(lm, update.weight).to(delta.dtype)
    rel = (delta.abs() / W.abs()).nan_to_num(nan=0.0).flatten()  # 0/0: no change
    k = max(1, round(fraction * rel.numel()))
    index = torch.topk(rel, k, sorted=False).indices.sort().values
    return Sparse(update.weight, tuple(delta.shape), index, delta.flatten()[index])


def norm_anchor(lm, update: Update, state: State) -> Dense:
    """ΔW' = s(W + ΔW) − W with s = ‖W₀‖ / ‖W + ΔW‖: the edited matrix keeps the Frobenius norm ‖W₀‖
    it had before the session's first edit (kept in the state, journaled with that batch)."""
    W = _logical_weight(lm, update.weight).double()
    key = f"norm0.{update.weight}"
    if key not in state.tensors:
        state.set(key, W.norm().reshape(1).float())
    edited = W + update.dense().double()
    scale = state.tensors[key].double().to(W.device) / edited.norm()
    return Dense(update.weight, (scale * edited - W).to(torch.float32))
