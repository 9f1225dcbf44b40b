"""Small context managers to read and edit module activations (in the spirit of ROME's nethook).

``Trace`` records the input and/or output of named modules during a forward pass, can add to a
module's output, and stops the forward pass as soon as every recorded module has fired, so that
reading keys at layer 5 of a 30-layer model costs 6 layers, not 30.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by ``Trace``."""


def _main(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class Trace:
    """Record module inputs/outputs and optionally edit outputs.

    inputs / outputs: module names whose first positional input / (main) output to keep.
    edit: module name -> fn(tensor) -> tensor, applied to that module's main output.
    stop: end the forward once every recorded module has fired (outputs of the model are then
    unavailable; use it only when the recorded activations are all you need).
    """

    def __init__(self, model: nn.Module, *, inputs=(), outputs=(), edit: dict[str, Callable] | None = None,
                 stop: bool = False, detach: bool = True):
        self.model, self.stop, self.detach = model, stop, detach
        self.want_in, self.want_out = list(dict.fromkeys(inputs)), list(dict.fromkeys(outputs))
        self.edit = dict(edit or {})
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def _maybe_stop(self) -> None:
        if self.stop and len(self.inputs) == len(self.want_in) and len(self.outputs) == len(self.want_out):
            raise StopForward

    def __enter__(self) -> "Trace":
        for name in self.want_in:
            def pre(mod, args, kwargs, name=name):
                x = args[0] if args else next(iter(kwargs.values()))
                self.inputs[name] = self._keep(x)
                self._maybe_stop()
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True))
        for name in set(self.want_out) | set(self.edit):
            def post(mod, args, out, name=name):
                if name in self.edit:
                    new = self.edit[name](_main(out))
                    out = (new, *out[1:]) if isinstance(out, tuple) else new
                if name in self.want_out:
                    self.outputs[name] = self._keep(_main(out))
                    self._maybe_stop()
                return out
            self._handles.append(self.model.get_submodule(name).register_forward_hook(post))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return exc_type is StopForward


class LayerRest:
    """Records, at its module's next forward, what a decoder layer returns beside its hidden
    states (``SkipBelow``'s ``rest``: None for a bare tensor). ``known`` once seen."""

    def __init__(self, module):
        self.known, self.rest = False, None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        if not self.known:
            self.rest, self.known = (tuple(out[1:]) if isinstance(out, tuple) else None), True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


class SkipBelow:
    """Replace the forward of layers 0..l: they pass their input through, and layer l returns
    ``self.h`` (set before each forward), keeping the layer's output structure."""

    def __init__(self, model, adapter, layer: int, rest: tuple):
        self.mods = [model.get_submodule(adapter.layer_tmp.format(i)) for i in range(layer + 1)]
        self.rest, self.h = rest, None

    def _wrap(self, h):
        return (h, *self.rest) if self.rest is not None else h

    def __enter__(self):
        def passthrough(*args, **kw):
            return self._wrap(args[0] if args else kw["hidden_states"])

        for m in self.mods[:-1]:
            m.forward = passthrough
        self.mods[-1].forward = lambda *a, **kw: self._wrap(self.h)
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            del m.forward
        return False
