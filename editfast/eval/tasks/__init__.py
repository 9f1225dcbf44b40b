"""The task registry: eight general-ability categories, plus WikiText-103 perplexity.

    TASKS["rte"]                    # a Task instance
    get_task("rte")                 # same, EditfastError listing the names if unknown
    resolve_tasks("all")            # the eight categories + wikitext, in registry order
    resolve_tasks("gsm8k,rte")      # or a list of names
"""

from __future__ import annotations

from typing import Iterable

from editfast.core.errors import EditfastError
from editfast.eval.base import Task
from editfast.eval.tasks.boolq import BoolQ
from editfast.eval.tasks.conll03 import CoNLL03
from editfast.eval.tasks.gsm8k import GSM8K
from editfast.eval.tasks.mutual import MuTual
from editfast.eval.tasks.nq import NQ
from editfast.eval.tasks.rte import RTE
from editfast.eval.tasks.samsum import SAMSum
from editfast.eval.tasks.sst2 import SST2
from editfast.eval.tasks.wikitext import WikiText

TASKS: dict[str, Task] = {t.name: t for t in (GSM8K(), RTE(), NQ(), BoolQ(), MuTual(), SAMSum(), CoNLL03(), SST2(), WikiText())}
ALL = [name for name in TASKS if name != "wikitext"]  # the eight categories


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise EditfastError(f"unknown task {name!r} (choose from {', '.join(TASKS)}, or 'all'); lm-eval's tasks run "
                            "on editfast's engine through lm-evaluation-harness: python -m editfast.harness run "
                            f"--model editfast --model_args pretrained=MODEL[,edits=RUN] --tasks {name} "
                            "(docs/interop.md)") from None


def resolve_tasks(spec: str | Iterable[str]) -> list[Task]:
    """Tasks named by "all", a comma-separated string or a list of names; duplicates dropped, order kept."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise EditfastError("no task given (choose from " + ", ".join(TASKS) + ", or 'all')")
    out: list[Task] = []
    for n in names:
        for t in (TASKS.values() if n == "all" else [get_task(n)]):
            if t not in out:
                out.append(t)
    return out
