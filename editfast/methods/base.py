"""The method seam: what every editing method declares, and the shared locate-then-edit pipeline.

    Method                      name, hparams class, presets per model family, default batch size,
                                template shape, sites(), prepare() -> State, edit() -> [Update]
    LocateThenEdit(Method)      targets z (batched) -> keys per layer -> solve -> post-process -> apply
                                MEMIT, ROME, r-ROME, EMMET, AlphaEdit override ``solve`` (and
                                ``trace_targets``; AlphaEdit its state after a batch); PMET
                                ``optimize`` too (two sites optimised together).
    LocateHParams               their hyper-parameters, with the post-processes every locate-then-edit
                                method offers: RECT (``rect``) and the norm anchor (``norm_anchor``).

A method's ``State`` carries what it needs across the batches of a session: the statistics (C per
layer, factorised once) and any tensors that change from batch to batch (``State.tensors``; the
session journals the ones a batch changed, so undo and resume restore them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from editfast.data.requests import Request
from editfast.methods.hparams import HParams
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.methods.locate_then_edit.templates import context_templates
from editfast.models.update import (
    Update,
)


@dataclass
class State:
    """What a method keeps across batches. ``tensors`` are journaled when a batch changes them."""

    moments: dict[int, Moment] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    statistics: dict[int, dict] = field(default_factory=dict)  # per layer: corpus, texts and tokens used

    def set(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value
        self.changed.add(name)

    def take_changed(self) -> dict[str, torch.Tensor]:
        out = {k: self.tensors[k] for k in sorted(self.changed)}
        self.changed.clear()
        return out

    def solve_reports(self) -> list[dict]:
        return [r for m in self.moments.values() for r in m.reports]


class Method:
    """Base class of every editing method; one subclass per file in ``editfast/methods/``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, shown in the CLI's help
    hparams_class: ClassVar[type[HParams]] = HParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # model family -> hyper-parameter values
    default_batch_size: ClassVar[int | None] = None  # None: all requests in one batch
    max_batch_size: ClassVar[int | None] = None  # ROME: 1 (one fact at a time)
    template_shape: ClassVar[str] = "groups"  # see templates.context_templates

    def batch_size(self, requested: int | None, n: int) -> int:
        size = requested or self.default_batch_size or n
        return min(size, self.max_batch_size) if self.max_batch_size else size

    def templates(self, lm, hp, seed: int = 0, mode: str = "generated", progress: bool = False) -> list[list[str]]:
        return context_templates(lm, self.template_shape, hp, seed, mode, progress)

    def sites(self, lm, hp) -> list[str]:
        """Names of the weights this method writes."""
        return [f"{lm.adapter.rewrite_tmp.format(l)}.weight" for l in hp.layers]

    def needs_statistics(self, hp) -> bool:
        return True

    def prepare(self, lm, hp, progress: bool = True) -> State:
        info: dict[int, dict] = {}
        stats = second_moments(lm, hp.layers, hp, progress=progress, info=info) if self.needs_statistics(hp) else {}
        return State(moments={l: Moment(C) for l, C in stats.items()}, statistics=info)

    def restore_state(self, state: State, journaled: dict[str, torch.Tensor]) -> None:
        """Take a journaled batch's state tensors back (resume, undo): by default they replace the
        current ones; a method whose journal holds increments (AlphaEdit's keys) accumulates them."""
        state.tensors.update(journaled)

    def edit(self, lm, requests: Sequence[Request], hp, state: State, templates: list[list[str]], *,
             targets: torch.Tensor | None = None, trace: dict | None = None, backend: str = "fast",
             progress: bool = False) -> list[Update]:
        """Edit ``lm`` in place with one batch; returns the applied updates."""
        raise NotImplementedError
