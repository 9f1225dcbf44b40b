"""``editfast train-mend``: train MEND's editor network for a model, measure its success on held-out
facts (each edited alone), and save both into --out (the network as safetensors, its description and
results as JSON), for ``editfast edit --method mend --mend OUT``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import click
from tqdm.auto import tqdm

from editfast.cli.options import (
    device_option,
    force_option,
    hparams_option,
    model_option,
    out_option,
    quiet_option,
    seed_option,
    sets_option,
)
from editfast.cli.shared import preflight
from editfast.core.compat import versions
from editfast.data.requests import Request, load_dataset
from editfast.eval.edit_metrics import counterfact_metrics, summarize, zsre_metrics
from editfast.methods.hparams import parse_overrides
from editfast.methods.mend.net import MENDNet, edit_updates, save_net
from editfast.methods.mend.train import train_mend
from editfast.models.load import load_model
from editfast.models.update import apply_update, restore, snapshot
from editfast.session.outputs import OutputDir


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


@click.command("train-mend")
@model_option
@click.option("--data", default="counterfact-train", show_default=True,
              help="Training requests: counterfact-train (EasyEdit's train split without the 500 'counterfact' "
                   "evaluation records), another dataset name, or a JSON/JSONL file of requests.")
@out_option("Directory for mend.safetensors (the network) and mend.json (its description, held-out success).")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True,
              help="Training iterations (one batch of train_batch_size edits each).")
@seed_option
@click.option("--heldout", type=click.IntRange(0), default=50, show_default=True,
              help="The last HELDOUT requests of --data are not trained on: each is edited alone with the trained "
                   "network to measure efficacy, paraphrase and neighbourhood success.")
@hparams_option("YAML/JSON file of MEND hyper-parameters over the model's preset.")
@sets_option()
@device_option
@force_option
@quiet_option
def train_mend_cmd(model, data, out, steps, seed, heldout, hparams_file, sets, device, force, quiet):
    """Train MEND's editor network for a model (Mitchell et al., 2022) and save it for
    'editfast edit --method mend --mend OUT'."""
    overrides = parse_overrides(sets)
    if "mend_dir" in overrides:
        raise click.UsageError("mend_dir names a trained network to edit with; train-mend writes its network to --out")
    hp = preflight(model, "mend", hparams_file, overrides)
    requests = load_dataset(data)
    if len(requests) - heldout < hp.train_batch_size:
        raise click.UsageError(f"--data {data} has {len(requests)} requests: with --heldout {heldout}, fewer than the "
                               f"{hp.train_batch_size} a training step needs are left to train on")
    train, held = requests[: len(requests) - heldout], requests[len(requests) - heldout:]
    with OutputDir(out, staged=True, force=force) as od:
        lm = load_model(model, device=device)
        info = {"name": str(data), "n_train": len(train), "heldout": heldout,
                "heldout_case_ids": [r.case_id for r in held]}
        meta = train_and_save(lm, train, held, hp, steps, seed, od.path, info, progress=not quiet)
    t, h = meta["training"], meta["heldout"]
    click.echo(f"trained {steps} steps ({t['optimizer_steps']} optimiser steps) in {t['seconds']:.0f}s "
               f"({t['steps_per_s']:.2f} steps/s) on {len(train)} requests")
    if h.get("n"):
        keys = [k for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "rewrite_acc",
                            "paraphrase_acc", "neighborhood_acc") if h["post"].get(k) is not None]
        fmt = lambda x: "-" if x is None else f"{x:.3f}"
        click.echo(f"held-out edits ({h['n']}, each alone): " + ", ".join(
            f"{k.replace('_success', '')} {fmt(h['pre'].get(k))} -> {fmt(h['post'][k])}" for k in keys))
    click.echo(f"network: {out / 'mend.safetensors'}")
