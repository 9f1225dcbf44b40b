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
every position is routed (plain ``model(...)``/``generate`` calls). WISE's ``SideMemory`` decides
per sequence (``per_token`` False), from the real tokens of the forward: a batch gives each row what
it gets alone, and the engine scores a model routed so as whole sequences (``sequence_level``), not a
shared context's cache and then its continuations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
    # whether a token's output depends on that token alone (GRACE); False (WISE): on its whole
    # sequence, which the evaluation engine then scores one whole sequence per row (``sequence_level``)
    per_token: ClassVar[bool] = True

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


def digest(model: nn.Module) -> str | None:
    """The sha256 of every route of ``model`` (module, kind, config, tensors' dtype, shape and
    bytes); None when it routes nowhere. Part of the model's weights identity."""
    rs = routes(model)
    if not rs:
        return None
    h = hashlib.sha256()
    for name in sorted(rs):
        m = rs[name]
        h.update(json.dumps([name, m.kind, m.config()], sort_keys=True, default=str).encode())
        for k, t in sorted(m.tensors().items()):
            t = t.detach().contiguous().cpu()
            h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sequence_level(model: nn.Module) -> bool:
    """Whether a memory routed on this model decides per sequence (not ``per_token``)."""
    return any(not m.per_token for m in routes(model).values())


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


# ---------------------------------------------------------------------------------------------- WISE
# the model's hidden activation (config.hidden_act / activation_function), as transformers' ACT2FN
ACTS: dict[str, Any] = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
LONG_ROW = 100  # a sequence longer than this is scored by its largest token distance (WISE's inference rule)


def token_distance(y0: torch.Tensor, y: torch.Tensor, act) -> torch.Tensor:
    """‖act(y) − act(y0)‖₂ over the last dimension: [..., T, d] -> [..., T]."""
    return torch.linalg.vector_norm(act(y) - act(y0), dim=-1)


def row_score(dist: torch.Tensor, mask: torch.Tensor, infer: bool = False) -> torch.Tensor:
    """Each row's activation score Δ: the mean of its real tokens' distances; at inference the max for
    a row longer than ``LONG_ROW`` tokens. dist [B, T], mask [B, T] (nonzero: a real token)."""
    m = mask.to(dist.dtype)
    n = m.sum(1)
    mean = (dist * m).sum(1) / n.clamp_min(1)
    if not infer:
        return mean
    top = dist.masked_fill(m == 0, float("-inf")).amax(1)
    return torch.where(n > LONG_ROW, top, mean)


def choose(d_side: torch.Tensor, thr_side: float, d_mem, thr_mem, d_merged: torch.Tensor | None = None) -> torch.Tensor:
    """Which weight answers each row: 0 the base, 1 the working side memory W', 2 + i memory i
    (WISE-Retrieve: W' if its Δ reaches its threshold, then a memory whose Δ exceeds the best so far
    and its own threshold), or with ``d_merged`` (WISE-Merge) -1 the merged weight (the base if both
    Δ are below W''s threshold, else the larger; W' on a tie)."""
    if d_merged is not None:
        pick = torch.where(d_merged > d_side, -1, 1)
        return torch.where((d_merged < thr_side) & (d_side < thr_side), 0, pick)
    pick = torch.where(d_side < thr_side, 0, 1)
    best = d_side
    for i, (d, thr) in enumerate(zip(d_mem, thr_mem)):
        take = (d > best) & (d > thr)
        pick = torch.where(take, 2 + i, pick)
        best = torch.where(take, d, best)
    return pick


def linear_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> torch.Tensor:
    """A linear module's output with ``weight`` ([out, in]; GPT-2's Conv1D [in, out]) and its bias."""
    if conv1d:
        y = x.reshape(-1, x.shape[-1]) @ weight
        return (y if bias is None else y + bias).view(*x.shape[:-1], weight.shape[-1])
    return F.linear(x, weight, bias)


@register
class SideMemory(Memory):
    """WISE's memories of one weight (Wang et al., 2024): ``weights`` [M, *W.shape] — the working side
    memory W', then the shards' memories (WISE-Retrieve) or the merged weight (WISE-Merge,
    ``merged``) — and ``mins`` [M], the smallest activation each one's edits reached. A sequence's
    output at the module is the module's own unless a memory's Δ (``row_score`` of ``token_distance``
    between its output and the module's) clears act_ratio × its min; then the top-1 memory's
    (``choose``). The decision is per sequence, from the tokens of the forward (``per_token`` False:
    the evaluation engine scores such a model one whole sequence per row, as the original evaluates);
    padding keeps the module's output."""

    kind = "wise"
    per_token = False

    def __init__(self, weights: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None = None, *, act: str,
                 act_ratio: float, merged: bool = False, conv1d: bool = False):
        if act not in ACTS:
            raise ModelError(f"a WISE memory needs one of the activations {', '.join(ACTS)}, got {act!r}")
        if weights.ndim != 3 or mins.shape != weights.shape[:1] or (merged and len(weights) != 2):
            raise ModelError(f"a WISE memory needs weights [M, out, in] and mins [M], got {tuple(weights.shape)}, "
                             f"{tuple(mins.shape)}")
        self.weights, self.mins, self.bias = weights, mins, bias
        self.act, self.act_ratio, self.merged, self.conv1d = act, float(act_ratio), merged, conv1d

    def route(self, x, out, real=None):
        thr = (self.mins * self.act_ratio).tolist()
        if not self.merged and all(t >= 1e8 for t in thr):  # nothing edited yet: no threshold is reached
            return out
        flat = out.ndim == 2  # [T, d]: one sequence
        x3, o3 = (x[None], out[None]) if flat else (x, out)
        mask = torch.ones(o3.shape[:2], device=o3.device) if real is None else real.reshape(o3.shape[:2])
        act = ACTS[self.act]
        ys = [linear_out(x3, w, self.bias, self.conv1d).to(o3.dtype) for w in self.weights]
        ds = [row_score(token_distance(o3, y, act), mask, infer=True) for y in ys]
        if self.merged:
            pick = choose(ds[0], thr[0], [], [], d_merged=ds[1])
            keys = {1: ys[0], -1: ys[1]}
        else:
            pick = choose(ds[0], thr[0], ds[1:], thr[1:])
            keys = {1 + i: y for i, y in enumerate(ys)}
        res = o3
        real_tok = mask.bool()[..., None]
        for k, y in keys.items():
            res = torch.where((pick == k).view(-1, 1, 1) & real_tok, y, res)
        return res.view_as(out)

    def tensors(self):
        out = {"weights": self.weights, "mins": self.mins}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def config(self):
        return {"act": self.act, "act_ratio": self.act_ratio, "merged": self.merged, "conv1d": self.conv1d}

    def size(self):
        return {"entries": len(self.weights), "bytes": sum(t.numel() * t.element_size() for t in self.tensors().values())}

    @classmethod
    def from_saved(cls, tensors, config):
        if not {"weights", "mins"} <= set(tensors):
            raise ModelError(f"a saved WISE memory lacks {', '.join(sorted({'weights', 'mins'} - set(tensors)))}")
        try:
            return cls(tensors["weights"], tensors["mins"], tensors.get("bias"), act=config["act"],
                       act_ratio=float(config["act_ratio"]), merged=bool(config.get("merged", False)),
                       conv1d=bool(config.get("conv1d", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"a saved WISE memory has a malformed config: {e}") from None


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
