"""Data parallelism under ``torchrun``: each rank a shard of the work, results combined.

    torchrun --nproc-per-node 8 -m editfast.cli -- eval --model DIR --device cuda --out OUT

Under torchrun (WORLD_SIZE > 1 in the environment) ``init`` joins the process group: NCCL when
the rank runs on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. Without torchrun every
function here is the one-process identity (``shard`` keeps everything, ``all_reduce_sum`` and
``barrier`` do nothing, ``gather_objects`` returns ``[obj]``), so callers need no branch.

- ``shard(weights)``: this rank's indices of a list of items of the given costs, balanced by cost
  (largest first, to the least loaded rank) and the same on every rank;
- ``all_reduce_sum``: sums of a tensor over the ranks, in float64 (statistics' running sums);
- ``gather_objects``: every rank's object, in rank order, on every rank;
- ``sharded_map``: a function over a list run as shards, its results back in the list's order on
  every rank (the evaluation engine's requests);
- ``agree``: every rank resolved the same configuration, else one line naming what differs
  (``ConfigMismatch``, exit code 2, before anything is written);
- ``is_main``: rank 0, the one that writes outputs and caches.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from editfast.core.errors import EditfastError

T = TypeVar("T")


class ConfigMismatch(EditfastError):
    """Ranks of one torchrun job that resolved different configurations."""


def launched() -> bool:
    """Whether this process is one rank of several (torchrun set WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """The device a rank runs on: ``cuda`` (or ``cuda:0``) becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if launched() and device in ("cuda", "cuda:0"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init(device: str = "cpu") -> bool:
    """Join torchrun's process group (once): NCCL for a CUDA device, else gloo. Returns whether
    this process is one of several ranks."""

    if not launched():
        return False
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except (ValueError, RuntimeError) as e:  # no MASTER_ADDR, an unreachable master ...
            raise EditfastError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but this rank cannot join the process "
                                f"group (start it with torchrun): {' '.join(str(e).split())[:200]}") from None
    return True


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(weights: Sequence[float], n_ranks: int | None = None, which: int | None = None) -> list[int]:
    """This rank's indices (ascending) of items with costs ``weights``: the largest item first, each
    to the rank with the least cost so far (the lowest rank on ties), the same on every rank."""
    n_ranks = world_size() if n_ranks is None else n_ranks
    which = rank() if which is None else which
    if n_ranks == 1:
        return list(range(len(weights)))
    loads = [(0.0, r) for r in range(n_ranks)]
    mine = []
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(loads)
        if r == which:
            mine.append(i)
        heapq.heappush(loads, (load + weights[i], r))
    return sorted(mine)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks, in float64 for floating point, in ``t``'s dtype and device."""
    if not active():
        return t

    x = t.to(device=_comm_device(), dtype=torch.float64 if t.is_floating_point() else torch.int64)
    dist.all_reduce(x)
    return x.to(device=t.device, dtype=t.dtype)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; only ever exchanged between this job's ranks), in rank order."""
    if not active():
        return [obj]

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():

        dist.barrier()


def sharded_map(fn: Callable[[list[T]], list[Any]], items: Sequence[T], groups: Sequence[Sequence[int]] | None = None,
                cost: Callable[[T], float] = lambda x: 1.0) -> list[Any]:
    """``fn(items)``, run as one shard per rank: the ``groups`` of item indices (each kept on one
    rank; default: one item each) are balanced by their items' ``cost``; every rank returns all
    results, in the order of ``items``."""
    if not active():
        return fn(list(items))
    groups = [[i] for i in range(len(items))] if groups is None else groups
    mine = [i for g in shard([sum(cost(items[i]) for i in g) for g in groups]) for i in groups[g]]
    local = fn([items[i] for i in mine]) if mine else []
    out: list[Any] = [None] * len(items)
    for idx, res in gather_objects((mine, list(local))):
        for i, r in zip(idx, res):
            out[i] = r
    return out


def _flat(config: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(config, dict):
        out: dict[str, str] = {}
        for k, v in config.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(config, sort_keys=True, default=str)}


def agree(config: dict[str, Any]) -> None:
    """Raise ``ConfigMismatch`` (on every rank) unless every rank passed the same ``config`` (its
    hash is compared; on a difference the one line names the keys and each rank's value)."""
    if not active():
        return
    flat = _flat(config)
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
    views = gather_objects((digest, flat))
    if len({d for d, _ in views}) == 1:
        return
    keys = sorted({k for _, f in views for k in f if len({v.get(k) for _, v in views}) > 1})
    shown = "; ".join(f"{k}: " + ", ".join(f"rank {r}={f.get(k, '(unset)')}" for r, (_, f) in enumerate(views))
                      for k in keys[:3])
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    raise ConfigMismatch(f"the torchrun ranks disagree on the configuration: {shown}{more}; "
                         "start every rank with the same options, hyper-parameters and model")


def leave() -> None:
    """Leave the process group (at exit, on success or error): a gloo group still open when the
    interpreter exits can abort the process (its threads outlive it) instead of exiting 2."""

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def rank_out(out: Path, resume: bool = False) -> Iterator[Path]:
    """Where this rank writes: OUT on rank 0; on the others a private temporary folder (a copy of
    OUT's run when resuming), removed afterwards, so that only rank 0's files remain."""
    if is_main():
        yield out
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"editfast-rank{rank()}-"))
    try:
        if resume and out.is_dir():
            shutil.copytree(out, tmp / out.name)
        yield tmp / out.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
