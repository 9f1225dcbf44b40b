"""Weight updates kept as low-rank factors until applied: ΔW (in [out=d_model, in=d_mlp]) = U Vᵀ.

A MEMIT batch of n facts has rank ≤ n; ROME's update has rank 1. The journal stores factors, so
undo and redo are cheap; ``guard`` snapshots the edited weights so a failed edit leaves them
exactly as they were.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from editfast.kernels.lowrank_update import lowrank_update_


@dataclass
class LowRankUpdate:
    layer: int
    U: torch.Tensor  # [d_model, r]
    V: torch.Tensor  # [d_mlp, r]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def dense(self) -> torch.Tensor:
        """ΔW in [out, in] layout, in the factors' dtype."""
        return self.U @ self.V.T


@torch.no_grad()
def apply_update(lm, update: LowRankUpdate, alpha: float = 1.0) -> None:
    """W += alpha · U Vᵀ through the low-rank kernel (fp32 math, one rounding), in the weight's layout."""
    W = lm.adapter.rewrite_weight(lm.model, update.layer).data
    lowrank_update_(W.T if lm.adapter.weight_in_out else W, update.U.to(W.device), update.V.to(W.device), alpha)


def weight_delta(lm, update: LowRankUpdate) -> torch.Tensor:
    """ΔW in the weight's own layout (fp32), as the golden vectors store it."""
    return lm.adapter.to_weight_layout(update.dense().float())


@contextmanager
def guard(lm, layers: Sequence[int]) -> Iterator[None]:
    """Restore the rewrite weights of ``layers`` bit for bit if the block raises."""
    saved = {l: lm.adapter.rewrite_weight(lm.model, l).detach().clone() for l in set(layers)}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for l, w in saved.items():
                lm.adapter.rewrite_weight(lm.model, l).copy_(w)
        raise
