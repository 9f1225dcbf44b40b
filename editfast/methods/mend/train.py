"""MEND's trainer: batches of an edit plus locality examples, one step of the edit loss and the
locality KL through the hypernetwork's low-rank update, and the training loop (Adam, seeded).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from editfast.core.errors import EditfastError
from editfast.data.requests import Request
from editfast.methods.mend.net import (
    Above,
    MENDNet,
    TokenBatch,
    added_lowrank,
    capture,
    edit_pairs,
    encode,
    kl_loc,
    mlp_sites,
    rows,
    scored_columns,
    target_nll,
)


def _choice(options: Sequence[str], gen: torch.Generator) -> str:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def training_batch(requests: Sequence[Request], pool: Sequence[Request], gen: torch.Generator):
    """edit_inner (prompt → target_new), edit_outer (a paraphrase → target_new; the prompt when
    there is none) and loc (a neighbourhood prompt → its true answer; another request's prompt and
    true target when there is none) pairs, one of each per request."""
    inner = edit_pairs(requests)
    outer = [(_choice(r.paraphrase_prompts, gen) if r.paraphrase_prompts else r.filled(), " " + r.target_new)
             for r in requests]
    loc = []
    for r in requests:
        if r.neighborhood_prompts:
            loc.append((_choice(r.neighborhood_prompts, gen), " " + (r.neighborhood_target or r.target_true or "")))
        else:
            o = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            loc.append((o.filled(), " " + (o.target_true or o.target_new)))
    return inner, outer, loc


def mend_step(lm, net: MENDNet, above: "Above", chosen: Sequence[Request], pool: Sequence[Request],
              gen: torch.Generator, hp, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One edit of the original's ``EditTrainer.edit_step``: the unedited pass gives u, δ of the edit
    loss on the prompt and the locality logits; the network's update is applied; the edited model's
    NLL of the target after a paraphrase and its KL from the unedited model on the locality prompt
    give the loss. Returns (edit NLL before, edit NLL after, locality KL, cedit·NLL + cloc·KL)."""
    inner, outer_pairs, loc_pairs = training_batch(chosen, pool, gen)
    n = len(chosen)
    batch = encode(lm.tokenizer, inner + outer_pairs + loc_pairs, lm.device)  # rows: inner | outer | loc
    h = above.hidden(batch)
    rest = slice(n, 3 * n)
    # unedited: u and δ of the edit loss on the inner rows, and the loc rows' logits (rows don't mix)
    edit_and_loc = TokenBatch(torch.cat([batch.input_ids[:n], batch.input_ids[2 * n:]]),
                              torch.cat([batch.attention_mask[:n], batch.attention_mask[2 * n:]]),
                              torch.cat([batch.labels[:n], torch.full_like(batch.labels[2 * n:], -100)]))
    h_el = None if h is None else torch.cat([h[:n], h[2 * n:]])
    # the locality KL: at every token of the locality rows (the original, decoder-only), or at the
    # positions that predict its answer (EasyEdit's CounterFact loader)
    every = hp.loc_kl_positions == "all"
    keep = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device) if every else scored_columns(batch)
    loc_mask = batch.attention_mask[2 * n:, keep].bool() if every else batch.labels[2 * n:, keep] != -100
    grads, pre_loss, pre_logits = capture(lm, net.sites, edit_and_loc, lambda b, k: above.logits(b, h_el, k), keep)
    grads = {w: (u[:n], d[:n]) for w, (u, d) in grads.items()}
    base = pre_logits[n:]
    labels = batch.labels[:, keep]
    with torch.set_grad_enabled(grad):
        fac = net.factors(grads)
        with added_lowrank(lm, net.sites, fac):
            post = above.logits(rows(batch, rest), None if h is None else h[rest], keep)
        l_edit = target_nll(post[:n], labels[n: 2 * n])
        l_loc = kl_loc(base, post[n:], loc_mask)
        total = hp.cedit * l_edit + hp.cloc * l_loc
    return pre_loss, l_edit, l_loc, total


def train_mend(lm, requests: Sequence[Request], hp, steps: int, seed: int = 0, progress: bool = True,
               log_every: int = 50, on_step=None) -> tuple[MENDNet, dict[str, Any]]:
    """Train a MEND network for ``lm`` on ``requests`` for ``steps`` iterations (one batch of
    ``hp.train_batch_size`` edits each), as the original's ``EditTrainer``: the last
    ``hp.val_steps`` requests are kept for validation, run at every ``hp.val_interval``-th iteration
    (and, here, the last), and the network of the best validation loss (cedit·NLL + cloc·KL) is the
    one returned (eval mode), with a training log. ``on_step(iteration, net)`` is called after each
    iteration (the network in training mode)."""

    if steps < 1:
        raise EditfastError(f"MEND training needs at least 1 step, got {steps}")
    requests = list(requests)
    n_val = hp.val_steps * hp.train_batch_size
    train, val = (requests[: len(requests) - n_val], requests[len(requests) - n_val:]) if n_val else (requests, [])
    if len(train) < hp.train_batch_size:
        raise EditfastError(f"MEND training needs more than val_steps x train_batch_size = {n_val} requests (plus "
                            f"{hp.train_batch_size} to train on), got {len(requests)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MENDNet(mlp_sites(lm, hp.layers), hp.to_dict(), hp.edit_lr).to(lm.device)
    net.train()
    outer = list(net.transforms.parameters()) + [net.edit_lrs]
    opt = torch.optim.Adam(outer, lr=hp.lr)
    lr_opt = torch.optim.Adam([net.edit_lrs], lr=hp.lr_lr)
    above = Above(lm, min(hp.layers))
    order: list[int] = []
    log: list[dict] = []
    vals: list[dict] = []
    best = None
    skipped = n_opt = 0
    t0 = time.perf_counter()

    def validate(it: int) -> None:
        nonlocal best
        net.eval()
        vgen = torch.Generator().manual_seed(seed + 1)  # the same paraphrase and locality prompts each time
        rows_ = [mend_step(lm, net, above, val[i: i + hp.train_batch_size], train, vgen, hp, grad=False)
                 for i in range(0, len(val), hp.train_batch_size)]
        net.train()
        mean = lambda j: sum(float(r[j]) for r in rows_) / len(rows_)
        v = {"step": it, "loss": mean(3), "edit_nll": mean(1), "loc_kl": mean(2)}
        vals.append(v)
        if best is None or v["loss"] < best[0]["loss"]:
            best = (v, {k: t.detach().clone() for k, t in net.state_dict().items()})

    bar = tqdm(range(steps), desc="train-mend", unit="step", disable=not progress)
    for it in bar:
        if len(order) < hp.train_batch_size:  # the original's sampler: a fresh permutation when exhausted
            order += torch.randperm(len(train), generator=gen).tolist()
        chosen = [train[order.pop(0)] for _ in range(hp.train_batch_size)]
        pre_loss, l_edit, l_loc, total = mend_step(lm, net, above, chosen, train, gen, hp, grad=True)
        g = torch.autograd.grad(total, outer, allow_unused=True)
        if all(x is None or torch.isfinite(x).all() for x in g):
            for p, x in zip(outer, g):
                if x is not None:
                    p.grad = x / hp.accumulate_bs if p.grad is None else p.grad + x / hp.accumulate_bs
        else:
            skipped += 1
        if it > 0 and it % hp.accumulate_bs == 0:
            torch.nn.utils.clip_grad_norm_(outer, hp.grad_clip)
            opt.step()
            opt.zero_grad()
            lr_opt.step()
            lr_opt.zero_grad()
            n_opt += 1
        log.append({"step": it + 1, "edit_nll_pre": float(pre_loss), "edit_nll_post": float(l_edit.detach()),
                    "loc_kl": float(l_loc.detach())})
        if val and (it % hp.val_interval == 0 or it == steps - 1):
            validate(it + 1)
        if on_step is not None:
            on_step(it + 1, net)
        if progress:
            recent = log[-log_every:]
            post = {"nll": f"{sum(r['edit_nll_post'] for r in recent) / len(recent):.2f}",
                    "kl": f"{sum(r['loc_kl'] for r in recent) / len(recent):.3f}",
                    "lr": f"{net.edit_lrs.mean().item():.2e}"}
            if vals:
                post["val"] = f"{vals[-1]['loss']:.3f}"
            bar.set_postfix(post)
    bar.close()
    if best is not None:
        net.load_state_dict(best[1])
    net.eval()
    seconds = time.perf_counter() - t0
    k = min(len(log), log_every)
    keys = ("edit_nll_pre", "edit_nll_post", "loc_kl")
    info = {"steps": steps, "optimizer_steps": n_opt, "skipped_nonfinite": skipped, "seconds": seconds,
            "steps_per_s": steps / max(seconds, 1e-9), "n_train": len(train), "n_val": len(val),
            "first": {key: sum(r[key] for r in log[:k]) / k for key in keys},
            "last": {key: sum(r[key] for r in log[-k:]) / k for key in keys},
            "validation": vals, "kept_step": best[0]["step"] if best else steps,
            "edit_lrs": [float(x) for x in net.edit_lrs.detach()]}
    return net, info
