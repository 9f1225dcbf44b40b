"""The method seam: what every editing method declares, and its neutral defaults.

    Method                      name, hparams class, presets per model family, batch sizes, traits
                                (``locate_then_edit``, ``trained_network``, ``easyedit_alg``),
                                templates(), sites(), prepare() -> State, edit() -> yields [Update]
    State                       what a method keeps across the batches of a session

A routed method (``routes = True``: GRACE, WISE) leaves the weights as they were: its memory is
``State.tensors`` (journaled per batch like any state), and ``install`` puts that memory on the
model as a route (``editfast.models.routing``) whenever the session's state changes (prepared,
after each batch, resumed, replayed, undone), so evaluation, a saved model and the next batch see
it. Its ``sites`` are the weights of the routed modules: the session snapshots them and reports
their (zero) drift.

The defaults are neutral: the bare prompt as the only template, no statistics, an empty state;
``sites`` and ``edit`` every method defines. The locate-then-edit pipeline (statistics, generated
context templates, the rewrite module's sites) is ``locate_then_edit.base.LocateThenEdit``.

``edit`` yields the batch's updates group by group and never writes a weight: the caller (the
session's batch step, ``session.session.edit_batch``) applies each group before asking for the
next, so a method's next step reads the model as edited so far. ``State.tensors`` that change
from batch to batch are journaled by the session, so undo and resume restore them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import torch

from editfast.data.requests import Request
from editfast.methods.hparams import HParams
from editfast.core.errors import EditfastError, HParamsError
from editfast.models.update import Update, weight_param


@dataclass
class State:
    """What a method keeps across batches. ``tensors`` are journaled when a batch changes them."""

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
        """Notes of the solves so far (a fallback taken, per layer); none here."""
        return []


class Method:
    """Base class of every editing method; one subclass per file in ``editfast/methods/``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, shown in the CLI's help
    hparams_class: ClassVar[type[HParams]] = HParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # model family -> hyper-parameter values
    default_batch_size: ClassVar[int | None] = None  # None: all requests in one batch
    max_batch_size: ClassVar[int | None] = None  # 1: one fact at a time (ROME, KN)
    locate_then_edit: ClassVar[bool] = False  # takes the post-processes RECT and the norm anchor
    trained_network: ClassVar[bool] = False  # edits with a trained editor network (hparam mend_dir)
    easyedit_alg: ClassVar[str | None] = None  # EasyEdit's alg_name where editfast.easyedit runs it
    routes: ClassVar[bool] = False  # weights untouched: the model routes through a memory (``install``)

    @property
    def batchable(self) -> bool:
        """Whether one batch may hold several requests."""
        return self.max_batch_size != 1

    def batch_size(self, requested: int | None, n: int) -> int:
        size = requested or self.default_batch_size or n
        return min(size, self.max_batch_size) if self.max_batch_size else size

    def templates(self, lm, hp, seed: int = 0, mode: str = "generated", progress: bool = False) -> list[list[str]]:
        """Context templates in groups; by default the bare prompt alone."""
        return [["{}"]]

    def claims(self, values: dict) -> bool:
        """Whether a hyper-parameter file with this method's ``easyedit_alg`` is this method's, where
        several methods share one alg_name (EasyEdit's "FT": FT-L or FT-M by its objective)."""
        return True

    def sites(self, lm, hp) -> list[str]:
        """Names of the weights this method writes (the session guards, snapshots and journals them)."""
        raise NotImplementedError

    def needs_statistics(self, hp) -> bool:
        """Whether ``prepare`` reads the statistics corpus (checked before the model loads)."""
        return False

    def prepare(self, lm, hp, progress: bool = True) -> State:
        """The state a session starts with; by default empty."""
        return State()

    def restore_state(self, state: State, journaled: dict[str, torch.Tensor]) -> None:
        """Take a journaled batch's state tensors back (resume, undo): by default they replace the
        current ones; a method whose journal holds increments (AlphaEdit's keys) accumulates them."""
        state.tensors.update(journaled)

    def install(self, lm, hp, state: State) -> None:
        """A routed method: make ``lm`` route as ``state`` says (its memory, possibly empty); the
        session calls it after ``prepare``, after every batch and after a replay (resume, undo)."""

    def memory_size(self, state: State) -> dict[str, int] | None:
        """A routed method: the size of its memory (entries, bytes), reported at checkpoints."""
        return None

    def edit(self, lm, requests: Sequence[Request], hp, state: State, templates: list[list[str]], *,
             targets: torch.Tensor | None = None, trace: dict | None = None, backend: str = "fast",
             progress: bool = False) -> Iterator[list[Update]]:
        """Yield one batch's updates, group by group; the caller applies each group before the next."""
        raise NotImplementedError


def module_name(lm, layer: int, module: str) -> str:
    """The module ``module`` ("rewrite": the model's MLP output projection, else a dotted name under the
    decoder layer) of decoder layer ``layer``, by its full name."""
    if module == "rewrite":
        return lm.adapter.rewrite_tmp.format(layer)
    return f"{lm.adapter.layer_tmp.format(layer)}.{module}"


def matrix_module(lm, layer: int, module: str, key: str) -> str:
    """``module_name``, checked to hold a weight matrix; HParamsError naming the hyper-parameter ``key``."""
    name = module_name(lm, layer, module)
    try:
        W, _ = weight_param(lm.model, f"{name}.weight")
    except EditfastError:
        raise HParamsError(f"hparams: {key}: the model has no weight {name}.weight") from None
    if W.dim() != 2:
        raise HParamsError(f"hparams: {key}: {name}.weight is not a matrix")
    return name

