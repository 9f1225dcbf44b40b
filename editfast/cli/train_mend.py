"""``editfast train-mend``'s work: train MEND's network, measure its success on held-out facts, and
save both (the network as safetensors, its description and results as JSON).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from editfast.core.compat import versions
from editfast.data.requests import Request
from editfast.eval.edit_metrics import counterfact_metrics, summarize, zsre_metrics
from editfast.methods.mend.net import MENDNet, edit_updates, save_net
from editfast.methods.mend.train import train_mend
from editfast.models.update import apply_update, restore, snapshot


def heldout_success(lm, net: MENDNet, requests: Sequence[Request], progress: bool = False) -> dict[str, Any]:
    """Edit each request alone with ``net`` (from the unedited weights, restored after each) and
    measure the edit metrics of that request: {"n", "pre", "post"} (means over the requests)."""


    requests = list(requests)
    if not requests:
        return {"n": 0}
    fn = counterfact_metrics if all(r.target_true for r in requests) else zsre_metrics
    saved = snapshot(lm, [s.weight for s in net.sites])
    pre, post = fn(lm.model, lm.tokenizer, requests), []
    try:
        for r in tqdm(requests, desc="held-out edits", unit="edit", disable=not progress):
            for u in edit_updates(lm, net, [r]):
                apply_update(lm, u)
            post += fn(lm.model, lm.tokenizer, [r])
            restore(lm, saved)
    finally:
        restore(lm, saved)
    return {"n": len(requests), "pre": summarize(pre), "post": summarize(post)}


def train_and_save(lm, train: Sequence[Request], heldout: Sequence[Request], hp, steps: int, seed: int, out_dir: Path,
                   data: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train a network (``train_mend``), measure it on the held-out requests, write it to ``out_dir``;
    returns the description written to mend.json."""

    net, info = train_mend(lm, train, hp, steps, seed, progress)
    t = time.perf_counter()
    held = heldout_success(lm, net, heldout, progress)
    held["seconds"] = time.perf_counter() - t
    hparams = {k: v for k, v in hp.to_dict().items() if k != "mend_dir"}
    meta = {"model": lm.spec, "model_fingerprint": lm.fingerprint, "dtype": str(lm.dtype).replace("torch.", ""),
            "layers": list(hp.layers), "hparams": hparams, "data": data, "seed": seed, "steps": steps,
            "training": info, "heldout": held, "versions": versions(lm.device)}
    save_net(net, out_dir, meta)
    return meta
