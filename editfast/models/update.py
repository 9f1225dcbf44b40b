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

Every write keeps the model's weights identity (``LoadedModel.weights_fingerprint``): ``apply_update``
appends the update's digest (``update_digest``) to the chain of the weight it changes, ``restore``
puts back the chains a ``snapshot`` took with the weights, so caches and run folders are keyed by
the weights they measured; a weight whose content is its loaded content again counts as unchanged
(``LoadedModel.weights_fingerprint``).

Nothing malformed or non-finite reaches the weights: ``from_tensors`` refuses a journal index or
tensors that are not a well-formed update (``check_update``), ``validate_updates`` checks a whole
journal against a model before any of it is applied, and ``apply_update`` refuses non-finite
factors and an update that would make its weight non-finite (overflow), leaving the weight as it
was. Every refusal is an ``EditfastError`` naming the update and the weight.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch

from editfast.core.errors import EditfastError
from editfast.kernels.lowrank_update import lowrank_update_
from editfast.models.load import tensor_digest
from editfast.models.placement import param_tensor


@dataclass
class LowRank:
    weight: str
    U: torch.Tensor  # [out, r]
    V: torch.Tensor  # [in, r]

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[0]

    def dense(self) -> torch.Tensor:
        """ΔW in [out, in] layout, in the factors' dtype."""
        return self.U @ self.V.T

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "V": self.V}


@dataclass
class Dense:
    weight: str
    delta: torch.Tensor  # [out, in]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.delta.shape)

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
PARTS = {"lowrank": ("U", "V"), "dense": ("delta",), "sparse": ("index", "values", "shape")}
_KIND_OF = {v: k for k, v in KINDS.items()}


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: its min and max (which propagate NaN) are finite. One reduction,
    several times cheaper on the CPU than ``isfinite(t).all()``."""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def _integral(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_update(u: Update, where: str | None = None) -> None:
    """Raise unless ``u`` is well formed: a weight name, floating-point parts of consistent shapes
    (LowRank U [out, r] and V [in, r] with the same r, Dense delta [out, in], Sparse values [k] at
    k flat indices inside ``shape``)."""
    if type(u) not in _KIND_OF:
        raise EditfastError(f"{where or 'update'}: not a weight update ({type(u).__name__})")
    kind = _KIND_OF[type(u)]
    where = where or f"the {kind} update of {u.weight!r}"
    if not isinstance(u.weight, str) or not u.weight:
        raise EditfastError(f"{where}: the weight name must be a non-empty string, got {u.weight!r}")
    for p in PARTS[kind]:
        t = getattr(u, p)
        if p != "shape" and not isinstance(t, torch.Tensor):
            raise EditfastError(f"{where}: {p} is not a tensor ({type(t).__name__})")
        if p not in ("shape", "index") and not t.is_floating_point():
            raise EditfastError(f"{where}: {p} must be floating point, got {t.dtype}")
    if isinstance(u, LowRank) and (u.U.dim() != 2 or u.V.dim() != 2 or u.U.shape[1] != u.V.shape[1]):
        raise EditfastError(f"{where}: U {list(u.U.shape)} and V {list(u.V.shape)} are not [out, r] and [in, r] "
                            "with the same r")
    if isinstance(u, Dense) and u.delta.dim() != 2:
        raise EditfastError(f"{where}: delta {list(u.delta.shape)} is not a matrix [out, in]")
    if isinstance(u, Sparse):
        if (not isinstance(u.shape, (tuple, list)) or len(u.shape) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in u.shape)):
            raise EditfastError(f"{where}: shape {u.shape!r} is not [out, in]")
        if not _integral(u.index):
            raise EditfastError(f"{where}: index must be integers, got {u.index.dtype}")
        if u.index.dim() != 1 or u.values.dim() != 1 or len(u.index) != len(u.values):
            raise EditfastError(f"{where}: index {list(u.index.shape)} and values {list(u.values.shape)} are not "
                                "two vectors of one length")
        if len(u.index) and (int(u.index.min()) < 0 or int(u.index.max()) >= u.shape[0] * u.shape[1]):
            raise EditfastError(f"{where}: index out of bounds of its shape {list(u.shape)} (flat indices "
                                f"{int(u.index.min())}..{int(u.index.max())})")


def _fits(u: Update, W: torch.Tensor, transposed: bool) -> None:
    """Raise unless ``u``'s ΔW fits the parameter ``W`` (a floating-point matrix of its [out, in] shape)."""
    if W.dim() != 2 or not W.is_floating_point():
        raise EditfastError(f"{u.weight} is not a floating-point matrix ({list(W.shape)}, {W.dtype}): it cannot "
                            "take an update")
    want = tuple(W.shape[::-1] if transposed else W.shape)
    if tuple(u.shape) != want:
        raise EditfastError(f"the update of {u.weight} has shape {list(u.shape)} but the weight's is {list(want)} "
                            "([out, in]): made for another model?")


def validate_updates(lm, updates: Sequence[Update]) -> None:
    """Refuse (EditfastError) updates that cannot go into ``lm``: malformed, a weight the model does
    not have, another [out, in] shape, a weight that is not a floating-point matrix, NaN or Inf."""
    for u in updates:
        check_update(u)
        _fits(u, *weight_param(lm.model, u.weight))
    check_finite(updates, "refused")


def weight_param(model: torch.nn.Module, name: str) -> tuple[torch.nn.Parameter, bool]:
    """The parameter ``name`` and whether it is stored [in, out] (GPT-2's Conv1D)."""

    try:
        param = param_tensor(model, name)  # a layer offloaded by a device map: its copy in memory
    except AttributeError:
        raise EditfastError(f"the model has no weight {name!r}") from None
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return param, type(owner).__name__ == "Conv1D"


@torch.no_grad()
def apply_update(lm, update: Update, alpha: float = 1.0) -> None:
    """W += alpha · ΔW in the weight's own layout. Low-rank: the kernel (fp32 math, one rounding).

    Refuses (EditfastError, the weight unchanged) a malformed update, one that does not fit the
    weight, non-finite factors or values, and an update whose result would not be finite (an
    overflow of fp16/bf16): then the weight is left bit for bit as it was.

    ``alpha=-1`` is not an exact undo: W + ΔW - ΔW rounds twice, so some elements end one rounding
    step off (about 2% of a SmolLM2 MLP matrix). To go back exactly, keep the weights and restore
    them: ``saved = snapshot(lm, [weight names])`` before, ``restore(lm, saved)`` after; or run an
    ``EditSession`` and call ``session.undo(k)``, which replays batches 1..k from the base weights.
    """
    W, transposed = weight_param(lm.model, update.weight)
    check_update(update)
    _fits(update, W, transposed)
    check_finite([update], "refused, the weight is unchanged")
    lm.note_base(update.weight, W)
    W = W.data
    W_oi = W.T if transposed else W  # a view of W in [out, in]
    if isinstance(update, LowRank):
        U, V = update.U.to(W.device), update.V.to(W.device)
        saved = None if _cannot_overflow(W, U, V, alpha) else W.clone()  # only a huge update pays a copy
        lowrank_update_(W_oi, U, V, alpha)
        if saved is not None and not _all_finite(W):
            W.copy_(saved)
            _overflow(update, W)
    else:
        new = (W_oi.float() + alpha * update.dense().to(device=W.device, dtype=torch.float32)).to(W.dtype)
        if not _all_finite(new):
            _overflow(update, W)
        W_oi.copy_(new)
    lm.advance(update.weight, update_digest(update, alpha))


def update_digest(u: Update, alpha: float = 1.0) -> str:
    """sha256 of an update's kind, weight, scale and tensors: the content of one change of a weight."""
    h = hashlib.sha256(json.dumps([_KIND_OF[type(u)], u.weight, float(alpha)]).encode())
    for part, t in u.tensors().items():
        h.update(part.encode())
        tensor_digest(h, t)
    return h.hexdigest()


def _cannot_overflow(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, alpha: float) -> bool:
    """Whether W + αUVᵀ is surely finite for a finite W, without a pass over W: every
    |ΔWᵢⱼ| ≤ |α|·‖Uᵢ‖·‖Vⱼ‖ (Cauchy-Schwarz) stays below a quarter of a unit in the last place of
    the dtype's largest value, so no rounding can pass it (fp16: |ΔW| < 8; fp32, bf16: < 1e30)."""
    if 0 in U.shape or V.shape[0] == 0:
        return True
    norms = [float(torch.linalg.vector_norm(t.float(), dim=1).max()) for t in (U, V)]
    f = torch.finfo(W.dtype)
    return abs(alpha) * norms[0] * norms[1] < f.max * f.eps / 8  # False for Inf and NaN


def _overflow(u: Update, W: torch.Tensor) -> None:
    raise EditfastError(f"applying the update of {u.weight} would make the weight non-finite (overflow in "
                        f"{str(W.dtype).replace('torch.', '')}): refused, the weight is unchanged")


def weight_delta(lm, update: Update) -> torch.Tensor:
    """ΔW in the weight's own layout (fp32), as the golden vectors store it."""
    _, transposed = weight_param(lm.model, update.weight)
    d = update.dense().float()
    return d.T if transposed else d


def check_finite(updates: Sequence[Update], then: str = "refused, weights restored to the last good batch") -> None:
    """Raise if any update holds NaN or Inf (nothing non-finite reaches the weights)."""
    for u in updates:
        for part, t in u.tensors().items():
            if t.is_floating_point() and not _all_finite(t):
                raise EditfastError(f"the update of {u.weight} has non-finite values in {part} (NaN/Inf): {then}")


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
    """Inverse of ``to_tensors``. ``tensors`` must be exactly the updates' tensors: a malformed index,
    a missing part, a tensor the index does not name or a malformed update is refused
    (EditfastError naming the update)."""
    if not isinstance(index, list):
        raise EditfastError(f"the update index is not a JSON list (got {type(index).__name__})")
    out, used = [], set()
    for j, e in enumerate(index):
        if not (isinstance(e, dict) and isinstance(e.get("weight"), str) and isinstance(e.get("tensors"), dict)
                and all(isinstance(n, str) for n in e["tensors"].values())):
            raise EditfastError(f"update {j}: not an object with 'kind', 'weight' and 'tensors' ({str(e)[:80]})")
        kind, names = e.get("kind"), e["tensors"]
        if kind not in KINDS:
            raise EditfastError(f"update {j}: unknown update kind {kind!r} (known: {', '.join(KINDS)})")
        where = f"update {j} ({kind}, {e['weight']})"
        missing, extra = [p for p in PARTS[kind] if p not in names], sorted(set(names) - set(PARTS[kind]))
        if missing or extra:
            raise EditfastError(f"{where} has parts {', '.join(names) or 'none'}; a {kind} update needs "
                                f"{' and '.join(PARTS[kind])}")
        absent = [n for n in names.values() if n not in tensors]
        if absent:
            raise EditfastError(f"{where}: tensor {absent[0]!r} is missing")
        used.update(names.values())
        t = {part: tensors[name] for part, name in names.items()}
        if kind == "lowrank":
            u = LowRank(e["weight"], t["U"], t["V"])
        elif kind == "dense":
            u = Dense(e["weight"], t["delta"])
        else:
            shape = t["shape"]
            if not _integral(shape) or shape.shape != (2,):
                raise EditfastError(f"{where}: shape {shape.tolist()} is not two integers [out, in]")
            u = Sparse(e["weight"], tuple(int(x) for x in shape), t["index"], t["values"])
        check_update(u, where)
        out.append(u)
    foreign = sorted(set(tensors) - used)
    if foreign:
        raise EditfastError(f"tensors the update index does not name: {', '.join(foreign[:3])}"
                            f"{' ...' if len(foreign) > 3 else ''}")
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


class Snapshot(dict):
    """Copies of weights by name, and each weight's chain of changes when it was taken (``changes``)."""
    changes: dict[str, tuple[str, ...]]


@torch.no_grad()
def restore(lm, saved: dict[str, torch.Tensor]) -> None:
    """Put back the weights of a ``snapshot`` bit for bit (the exact undo of any updates since), and
    their identity with them. Tensors from elsewhere (a plain dict) are a change of their own: each
    weight's chain takes the digest of what was written."""
    for w, t in saved.items():
        param = weight_param(lm.model, w)[0]
        if not isinstance(saved, Snapshot):
            lm.note_base(w, param)
        param.copy_(t)
        if isinstance(saved, Snapshot):
            if saved.changes.get(w):
                lm.changes[w] = saved.changes[w]
            else:
                lm.changes.pop(w, None)
        else:
            h = hashlib.sha256(b"restore|")
            tensor_digest(h, t)
            lm.advance(w, h.hexdigest())


def snapshot(lm, weights: Sequence[str | Update]) -> Snapshot:
    """Copies of ``weights`` (parameter names, or updates standing for the weight each changes)."""
    names = (w if isinstance(w, str) else w.weight for w in weights)
    saved = Snapshot({w: weight_param(lm.model, w)[0].detach().clone() for w in dict.fromkeys(names)})
    saved.changes = {w: lm.changes.get(w, ()) for w in saved}
    return saved
