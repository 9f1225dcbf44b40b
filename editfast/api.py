"""The edit job: statistics, sequential batches of edits, edit metrics before and after.

    lm = editfast.load_model("smollm2-135m")
    reqs = editfast.load_dataset("counterfact", n=10)
    result = editfast.edit(lm, reqs, method="memit", seed=0)
    print(result.summary["post"]["efficacy_success"])
    result.save("runs/memit-10")

The model is edited in place. If anything fails, every edited weight is restored bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import Request, validate_requests
from .errors import EditfastError, HParamsError
from .hparams import HParams, resolve_hparams
from .methods import METHODS
from .metrics import counterfact_metrics, summarize, zsre_metrics
from .paths import atomic_path, write_json
from .solve import Moment
from .stats import second_moments
from .templates import context_templates
from .update import LowRankUpdate, guard


@dataclass
class EditResult:
    method: str
    config: dict[str, Any]
    hparams: dict[str, Any]
    templates: list[list[str]]
    per_request: list[dict[str, Any]]
    summary: dict[str, Any]
    timings: dict[str, Any]
    journal: list[list[LowRankUpdate]] = field(default_factory=list)  # one list of updates per batch

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "hparams": self.hparams,
                "context_templates": self.templates, "summary": self.summary, "timings": self.timings,
                "per_request": self.per_request}

    def save(self, out_dir: str | Path) -> Path:
        """results.json and journal.safetensors (the update factors), each written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for b, ups in enumerate(self.journal):
            for u in ups:
                tensors[f"batch{b}.layer{u.layer}.U"] = u.U.detach().cpu().contiguous()
                tensors[f"batch{b}.layer{u.layer}.V"] = u.V.detach().cpu().contiguous()
        if tensors:
            with atomic_path(out / "journal.safetensors") as tmp:
                save_file(tensors, str(tmp), metadata={"method": self.method, "model": str(self.config.get("model"))})
        write_json(out / "results.json", self.to_json())
        return out


def edit_metrics(lm, requests: Sequence[Request], kind: str, batch_size: int = 32) -> list[dict]:
    fn = {"counterfact": counterfact_metrics, "zsre": zsre_metrics}[kind]
    return fn(lm.model, lm.tokenizer, list(requests), batch_size=batch_size)


def metric_kind(requests: Sequence[Request]) -> str:
    """CounterFact-style metrics need target_true on every request; otherwise zsRE-style accuracy."""
    return "counterfact" if all(r.target_true for r in requests) else "zsre"


def check_layers(lm, hp: HParams) -> None:
    n = lm.adapter.num_layers(lm.model)
    bad = [l for l in hp.layers if not 0 <= l < n]
    if bad:
        raise HParamsError(f"hparams: layers {bad} out of range for a model with {n} layers")
    if hp.v_loss_layer >= n:
        raise HParamsError(f"hparams: v_loss_layer {hp.v_loss_layer} out of range for a model with {n} layers")


def edit(lm, requests: Sequence[Request], method: str = "memit", *, hparams: HParams | None = None,
         hparams_file: str | Path | None = None, overrides: dict[str, Any] | None = None,
         batch_size: int | None = None, seed: int = 0, templates: str | list[list[str]] = "generated",
         evaluate: bool = True, eval_batch_size: int = 32, progress: bool = True,
         backend: str = "fast") -> EditResult:
    """Apply ``requests`` to ``lm`` (in place) with ``method`` and measure the edit metrics.

    ``backend="fast"`` (default) optimises all targets of a batch together and solves with the
    factorise-once fp32 path; ``"reference"`` runs the original algorithm step by step (one
    target at a time, float64 solve). Both give the same updates within float tolerance.
    """
    t_start = time.perf_counter()
    method = method.lower()
    if method not in METHODS:
        raise EditfastError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if backend not in ("fast", "reference"):
        raise EditfastError(f"backend must be 'fast' or 'reference', got {backend!r}")
    requests = list(requests)
    if not requests:
        raise EditfastError("no requests to apply")
    validate_requests(requests)
    hp = hparams or resolve_hparams(method, lm.spec, lm.model.config, overrides, hparams_file)
    hp.check_modules(lm.adapter)
    check_layers(lm, hp)
    if batch_size is None:
        batch_size = len(requests) if method == "memit" else 1
    if batch_size < 1:
        raise EditfastError(f"batch size must be >= 1, got {batch_size}")
    if method == "rome":
        batch_size = 1  # ROME applies one fact at a time

    torch.manual_seed(seed)
    timings: dict[str, Any] = {}
    t = time.perf_counter()
    groups = templates if isinstance(templates, list) else context_templates(lm, method, hp, seed, templates)
    timings["templates_s"] = time.perf_counter() - t

    t = time.perf_counter()
    need_stats = method == "memit" or hp.mom2_adjustment
    mom2s = {l: Moment(C) for l, C in second_moments(lm, hp.layers, hp, progress=progress).items()} if need_stats else {}
    timings["statistics_s"] = time.perf_counter() - t

    kind = metric_kind(requests)
    pre = post = None
    if evaluate:
        t = time.perf_counter()
        pre = edit_metrics(lm, requests, kind, eval_batch_size)
        timings["eval_pre_s"] = time.perf_counter() - t

    edit_fn = METHODS[method]
    journal: list[list[LowRankUpdate]] = []
    batch_seconds = []
    n_batches = math.ceil(len(requests) / batch_size)
    bar = tqdm(total=len(requests), unit="edit", desc=f"{method} edits", disable=not progress)
    t_edit = time.perf_counter()
    with guard(lm, hp.layers):
        for b in range(n_batches):
            chunk = requests[b * batch_size: (b + 1) * batch_size]
            t = time.perf_counter()
            trace: dict = {}
            ups = edit_fn(lm, chunk, hp, groups if method == "memit" else groups[0], mom2s, trace=trace, backend=backend,
                         progress=progress)
            journal.append(ups)
            batch_seconds.append({"seconds": time.perf_counter() - t, "targets_s": trace.get("targets_s"),
                                  "n": len(chunk)})
            bar.update(len(chunk))
    bar.close()
    timings["edit_s"] = time.perf_counter() - t_edit
    timings["edits_per_s"] = len(requests) / max(timings["edit_s"], 1e-9)
    timings["targets_s"] = sum(x["targets_s"] or 0.0 for x in batch_seconds)
    timings["batches"] = batch_seconds
    timings["solves"] = [r for m in mom2s.values() for r in m.reports]

    if evaluate:
        t = time.perf_counter()
        post = edit_metrics(lm, requests, kind, eval_batch_size)
        timings["eval_post_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    per_request = []
    for i, r in enumerate(requests):
        row: dict[str, Any] = {"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject,
                               "target_new": r.target_new, "target_true": r.target_true}
        if evaluate:
            row["pre"], row["post"] = pre[i], post[i]
        per_request.append(row)
    summary: dict[str, Any] = {"metric_kind": kind, "n": len(requests)}
    if evaluate:
        summary["pre"], summary["post"] = summarize(pre), summarize(post)
    config = {"model": lm.spec, "model_fingerprint": lm.fingerprint, "dtype": str(lm.dtype), "device": str(lm.device),
              "method": method, "n": len(requests), "batch_size": batch_size, "seed": seed, "backend": backend,
              "templates": templates if isinstance(templates, str) else "given"}
    return EditResult(method, config, hp.to_dict(), [list(g) for g in groups], per_request, summary, timings, journal)


def load_journal(run_dir: str | Path, lm=None) -> tuple[dict[str, Any], list[list[LowRankUpdate]]]:
    """The config and updates of an ``editfast edit`` run directory; checks it matches ``lm``."""
    import json

    from safetensors.torch import load_file

    run = Path(run_dir)
    res_file, j_file = run / "results.json", run / "journal.safetensors"
    if not res_file.is_file() or not j_file.is_file():
        raise EditfastError(f"{run} is not an edit run directory (needs results.json and journal.safetensors)")
    try:
        config = json.loads(res_file.read_text())["config"]
        tensors = load_file(str(j_file))
    except (ValueError, KeyError, OSError) as e:
        raise EditfastError(f"cannot read edit run {run}: {e}") from None
    if lm is not None and config.get("model_fingerprint") != lm.fingerprint:
        raise EditfastError(f"edit run {run} was made on model {config.get('model')!r} "
                            f"(fingerprint {str(config.get('model_fingerprint'))[:12]}), not on {lm.spec!r} "
                            f"(fingerprint {lm.fingerprint[:12]})")
    batches: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        b, layer, part = name.split(".")
        batches.setdefault(int(b[5:]), {}).setdefault(int(layer[5:]), {})[part] = t
    journal = [[LowRankUpdate(l, f["U"], f["V"]) for l, f in sorted(batches[b].items())] for b in sorted(batches)]
    return config, journal
