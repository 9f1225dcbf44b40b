"""Weight updates: each names the weight it changes and says how ΔW is stored.

    LowRank(weight, U, V)       ΔW = U Vᵀ                (through the low-rank kernel)
    Dense(weight, delta)        ΔW = delta
    Sparse(weight, index, values)  ΔW.flatten()[index] = values, zero elsewhere

``weight`` is a parameter's full name ("model.layers.5.mlp.down_proj.weight"), and ΔW is always
in the logical [out, in] layout of the module; GPT-2's Conv1D stores its weight [in, out], which
``apply_update`` handles. A MEMIT batch of n facts has rank ≤ n and ROME's update rank 1, so
they stay factors until applied; a RECT-sparsified update is Sparse. Every kind is applied,
journaled (``to_tensors``/``from_tensors``) and undone (by replay from the base weights) the
same way. ``guard`` snapshots the weights a block may write so a failed edit leaves them exactly
as they were.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch

from editfast.errors import EditfastError
from editfast.kernels.lowrank_update import lowrank_update_


@dataclass
class LowRank:
    weight: str
    U: torch.Tensor  # [out, r]
    V: torch.Tensor  # [in, r]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def dense(self) -> torch.Tensor:
        """ΔW in [out, in] layout, in the factors' dtype."""
        return self.U @ self.V.T

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "V": self.V}


@dataclass
class Dense:
    weight: str
    delta: torch.Tensor  # [out, in]

    def dense(self) -> torch.Tensor:
        return self.delta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}


@dataclass
class Sparse:
    weight: str
    shape: tuple[int, int]  # [out, in]
    index: torch.Tensor  # int64 [k], flat index into the [out, in] matrix
    values: torch.Tensor  # [k]

    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=self.values.dtype, device=self.values.device)
        out[self.index] = self.values
        return out.view(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"index": self.index, "values": self.values, "shape": torch.tensor(self.shape)}


Update = Union[LowRank, Dense, Sparse]
KINDS = {"lowrank": LowRank, "dense": Dense, "sparse": Sparse}
_KIND_OF = {v: k for k, v in KINDS.items()}


def weight_param(model: torch.nn.Module, name: str) -> tuple[torch.nn.Parameter, bool]:
    """The parameter ``name`` and whether it is stored [in, out] (GPT-2's Conv1D)."""
    try:
        param = model.get_parameter(name)
    except AttributeError:
        raise EditfastError(f"the model has no weight {name!r}") from None
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return param, type(owner).__name__ == "Conv1D"


@torch.no_grad()
def apply_update(lm, update: Update, alpha: float = 1.0) -> None:
    """W += alpha · ΔW in the weight's own layout. Low-rank: the kernel (fp32 math, one rounding)."""
    W, transposed = weight_param(lm.model, update.weight)
    W = W.data
    W_oi = W.T if transposed else W  # a view of W in [out, in]
    if isinstance(update, LowRank):
        lowrank_update_(W_oi, update.U.to(W.device), update.V.to(W.device), alpha)
    else:
        d = update.dense().to(device=W.device, dtype=torch.float32)
        W_oi.copy_((W_oi.float() + alpha * d).to(W.dtype))


def weight_delta(lm, update: Update) -> torch.Tensor:
    """ΔW in the weight's own layout (fp32), as the golden vectors store it."""
    _, transposed = weight_param(lm.model, update.weight)
    d = update.dense().float()
    return d.T if transposed else d


def check_finite(updates: Sequence[Update]) -> None:
    """Raise if any update holds NaN or Inf (nothing non-finite reaches the weights)."""
    for u in updates:
        for part, t in u.tensors().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise EditfastError(f"the update of {u.weight} has non-finite values in {part} "
                                    "(NaN/Inf): refused, weights restored to the last good batch")


def to_tensors(updates: Sequence[Update], prefix: str = "") -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flat tensors and a JSON-able index for a journal entry."""
    tensors, index = {}, []
    for j, u in enumerate(updates):
        names = {}
        for part, t in u.tensors().items():
            names[part] = f"{prefix}u{j}.{part}"
            tensors[names[part]] = t.detach().cpu().contiguous()
        index.append({"kind": _KIND_OF[type(u)], "weight": u.weight, "tensors": names})
    return tensors, index


def from_tensors(tensors: dict[str, torch.Tensor], index: list[dict]) -> list[Update]:
    """Inverse of ``to_tensors``."""
    out = []
    for e in index:
        t = {part: tensors[name] for part, name in e["tensors"].items()}
        kind = e["kind"]
        if kind == "lowrank":
            out.append(LowRank(e["weight"], t["U"], t["V"]))
        elif kind == "dense":
            out.append(Dense(e["weight"], t["delta"]))
        elif kind == "sparse":
            out.append(Sparse(e["weight"], tuple(int(x) for x in t["shape"]), t["index"], t["values"]))
        else:
            raise EditfastError(f"unknown update kind {kind!r} in journal")
    return out


def dumps_index(index: list[dict]) -> str:
    return json.dumps(index, separators=(",", ":"))


@contextmanager
def guard(lm, weights: Sequence[str]) -> Iterator[None]:
    """Restore ``weights`` (parameter names) bit for bit if the block raises."""
    saved = snapshot(lm, weights)
    try:
        yield
    except BaseException:
        restore(lm, saved)
        raise


@torch.no_grad()
def restore(lm, saved: dict[str, torch.Tensor]) -> None:
    for w, t in saved.items():
        weight_param(lm.model, w)[0].copy_(t)


def snapshot(lm, weights: Sequence[str]) -> dict[str, torch.Tensor]:
    return {w: weight_param(lm.model, w)[0].detach().clone() for w in dict.fromkeys(weights)}
