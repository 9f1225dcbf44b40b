"""Routing: a model whose weights stay as they were but whose chosen modules route some inputs to a
memory (GRACE's codebook, WISE's side memory) installed beside them.

    install(model, "model.layers.27.mlp.down_proj", Codebook(keys, values, eps))
    routes(model)                  # {module name: memory} of the model's routed modules
    with tokens(model, mask):      # the forward's real tokens [B, T] (padding is not routed)
        model(...)
    with bypassed(model):          # the plain modules, e.g. while a method trains a memory's values
        model(...)
    save(model, folder) / load(model, folder)    # routing.json + routing.safetensors beside the weights

A route is a forward hook on the module: out = memory.route(x, out, real) with x the module's input.
Hooks change no parameter name and no ``state_dict``, so a routed model saves (``save_pretrained``)
as its base weights, and what plain transformers loads from such a folder is the base model without
the memory; ``load`` (called by ``editfast.models.load.load_model`` for a folder holding
``routing.json``) puts the memory back. The memory kinds live in this module (``KINDS``), so the
loader can rebuild any of them without importing the methods above it.

``route`` is a batched tensor operation over every token of the forward, no per-example loop: a
token's output depends only on that token's input (and whether it is real), so padding, batching,
a KV cache and one-token decoding steps give each token what it gets alone. ``tokens`` tells the
routes which positions are padding (the evaluation engine sets it around each forward); without it
every position is routed (plain ``model(...)``/``generate`` calls).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from editfast.core.errors import ModelError
from editfast.core.paths import atomic_path, write_json

ROUTING_FILE, MEMORY_FILE = "routing.json", "routing.safetensors"
FORMAT = 1


class Memory:
    """What a routed module consults: ``route`` maps (input, the module's output, real-token mask)
    to the output; ``tensors`` and ``config`` are what ``save`` writes and ``from_saved`` reads."""

    kind: ClassVar[str] = ""

    def route(self, x: torch.Tensor, out: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {}

    def size(self) -> dict[str, int]:
        """What the curve reports: entries and bytes held."""
        ts = self.tensors()
        return {"entries": len(next(iter(ts.values()))) if ts else 0,
                "bytes": sum(t.numel() * t.element_size() for t in ts.values())}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Memory:
        raise NotImplementedError


KINDS: dict[str, type[Memory]] = {}


def register(cls: type[Memory]) -> type[Memory]:
    KINDS[cls.kind] = cls
    return cls


@register
class Codebook(Memory):
    """GRACE's codebook (Hartvigsen et al., 2023): keys [K, d_in], values [K, d_out], deferral radii
    [K]. A token whose input x has its nearest key (Euclidean) within that key's radius gets the
    key's value as the module's output; every other token keeps the module's output."""

    kind = "codebook"

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, eps: torch.Tensor):
        if keys.ndim != 2 or values.ndim != 2 or eps.ndim != 1 or not len(keys) == len(values) == len(eps):
            raise ModelError(f"a codebook needs keys [K, d_in], values [K, d_out] and radii [K], got "
                             f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(eps.shape)}")
        self.keys, self.values, self.eps = keys, values, eps

    def lookup(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For queries [N, d_in]: the nearest key's index, its distance, and whether it is within its radius."""
        d = torch.cdist(q.to(self.keys.dtype), self.keys)
        dist, idx = d.min(1)
        return idx, dist, dist <= self.eps[idx]

    def route(self, x, out, real=None):
        if not len(self.keys):
            return out
        idx, _, hit = self.lookup(x.reshape(-1, x.shape[-1]))
        if real is not None:
            hit = hit & real.reshape(-1).bool()
        flat = out.reshape(-1, out.shape[-1])
        return torch.where(hit[:, None], self.values[idx].to(out.dtype), flat).view_as(out)

    def tensors(self):
        return {"keys": self.keys, "values": self.values, "eps": self.eps}

    @classmethod
    def from_saved(cls, tensors, config):
        missing = {"keys", "values", "eps"} - set(tensors)
        if missing:
            raise ModelError(f"a saved codebook lacks {', '.join(sorted(missing))}")
        return cls(tensors["keys"], tensors["values"], tensors["eps"])


class _Routing:
    """The routes of one model (a plain attribute of it: not a module, nothing in its state_dict)."""

    def __init__(self):
        self.routes: dict[str, tuple[Memory, Any]] = {}  # module name -> (memory, hook handle)
        self.real: torch.Tensor | None = None
        self.enabled = True


def _routing(model: nn.Module, create: bool = False) -> _Routing | None:
    r = model.__dict__.get("_editfast_routing")
    if r is None and create:
        r = model.__dict__["_editfast_routing"] = _Routing()
    return r


def install(model: nn.Module, name: str, memory: Memory) -> None:
    """Route module ``name`` of ``model`` through ``memory`` (replacing a memory it routed through)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"cannot route {name!r}: the model has no such module") from None
    r = _routing(model, create=True)
    uninstall(model, name)

    def hook(mod, args, out):
        if not r.enabled or not args:
            return out
        real = r.real if r.real is not None and r.real.shape == args[0].shape[:-1] else None
        return memory.route(args[0], out, real)

    r.routes[name] = (memory, module.register_forward_hook(hook))


def uninstall(model: nn.Module, name: str | None = None) -> None:
    """Remove the route of module ``name`` (every route with None)."""
    r = _routing(model)
    if r is None:
        return
    for key in [name] if name is not None else list(r.routes):
        if key in r.routes:
            r.routes.pop(key)[1].remove()


def routes(model: nn.Module) -> dict[str, Memory]:
    r = _routing(model)
    return {k: m for k, (m, _) in r.routes.items()} if r is not None else {}


@contextmanager
def tokens(model: nn.Module, real: torch.Tensor | None) -> Iterator[None]:
    """Within the block, forwards of ``model`` take ``real`` [B, T] (nonzero: a real token, zero:
    padding) for their inputs of that shape; padding is then left as the module computed it."""
    r = _routing(model)
    if r is None or not r.routes:
        yield
        return
    old, r.real = r.real, real
    try:
        yield
    finally:
        r.real = old


@contextmanager
def bypassed(model: nn.Module) -> Iterator[None]:
    """Within the block the model's routed modules compute as if nothing were installed."""
    r = _routing(model)
    if r is None:
        yield
        return
    old, r.enabled = r.enabled, False
    try:
        yield
    finally:
        r.enabled = old


# ---------------------------------------------------------------------------------------------- files


def save(model: nn.Module, folder: str | Path) -> bool:
    """Write the model's routes into ``folder`` (routing.json, routing.safetensors), each file
    atomically; nothing when the model routes nowhere. Returns whether it wrote them."""
    rs = routes(model)
    if not rs:
        return False
    folder = Path(folder)
    tensors = {f"{name}/{k}": t.detach().contiguous().cpu() for name, m in rs.items() for k, t in m.tensors().items()}
    with atomic_path(folder / MEMORY_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / ROUTING_FILE, {"format": FORMAT, "routes": {
        name: {"kind": m.kind, "config": m.config(), "tensors": sorted(m.tensors())} for name, m in rs.items()}})
    return True


def load(model: nn.Module, folder: str | Path) -> bool:
    """Install the routes saved in ``folder`` (if it holds routing.json); ModelError, one line, for
    files that are not a whole, well-formed memory of this model. Returns whether it installed any."""
    folder = Path(folder)
    doc_file = folder / ROUTING_FILE
    if not doc_file.is_file():
        return False
    where = f"the routing memory in {str(folder)!r} ({ROUTING_FILE}, {MEMORY_FILE})"
    try:
        doc = json.loads(doc_file.read_text())
        tensors = load_file(str(folder / MEMORY_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelError(f"cannot read {where}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("routes"), dict)):
        raise ModelError(f"cannot read {where}: {ROUTING_FILE} is not editfast's routing format {FORMAT}")
    built = {}
    for name, spec in doc["routes"].items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in KINDS:
            raise ModelError(f"{doc_file}: module {name!r} routes through an unknown memory kind {kind!r} "
                             f"(known: {', '.join(KINDS)})")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{doc_file}: the model has no module {name!r} to route") from None
        own = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + "/")}
        weight = getattr(module, "weight", None)
        dev = weight.device if weight is not None else torch.device("cpu")
        built[name] = KINDS[kind].from_saved({k: t.to(dev) for k, t in own.items()}, spec.get("config") or {})
    for name, memory in built.items():  # all read and built before any is installed
        install(model, name, memory)
    return True
