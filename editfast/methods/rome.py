"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection per fact.

ΔW = v uᵀ with u = C⁻¹k / ‖C⁻¹k‖ (k averaged over the context templates) and
v = (v* − W k_bare) / (k_bareᵀ u), reproducing the original code's use of the bare prompt's key
in the right vector (golden README, quirk Q1). Requests are applied one after another.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..data import Request
from ..locate import word_activations
from ..solve import as_moment
from ..targets import optimize_targets
from ..update import LowRankUpdate, apply_update


def compute_rome(lm, request: Request, hp, templates: Sequence[str], mom2: torch.Tensor | None,
                 target: torch.Tensor | None = None, trace: dict | None = None, backend: str = "fast") -> LowRankUpdate:
    """The rank-one update for one request on the current model (not applied)."""
    adapter, model = lm.adapter, lm.model
    layer = hp.layers[0]
    rewrite = adapter.rewrite_tmp.format(layer)
    trace = {} if trace is None else trace

    keys = word_activations(lm, [t.replace("{}", request.prompt, 1) for t in templates],
                            [request.subject] * len(templates), inputs=[rewrite])[("in", rewrite)].float()
    k_avg = keys.mean(0)
    if hp.mom2_adjustment:
        inv = as_moment(mom2).inverse().to(keys.device)
        u_un = inv @ k_avg
        trace["inv_mom2"] = inv
    else:
        u_un = k_avg
    u = u_un / u_un.norm()

    if target is None:
        t0 = time.perf_counter()
        res = optimize_targets(lm, [request], hp, list(templates), adapter.mlp_tmp.format(layer), layer,
                               hp.loss_layer(adapter.num_layers(model)), backend=backend)[0]
        target = res.target
        trace["targets_s"] = trace.get("targets_s", 0.0) + time.perf_counter() - t0
        trace.update(target_init=res.target_init, delta=res.delta, losses=res.losses)
    bare = word_activations(lm, [request.prompt], [request.subject], inputs=[rewrite], outputs=[rewrite])
    k_bare, w_k_bare = bare[("in", rewrite)][0].float(), bare[("out", rewrite)][0].float()
    division = k_bare @ u
    v = (target - w_k_bare) / division
    trace.update(k_per_template=keys, k_avg=k_avg, u_unnormalized=u_un, u=u, target=target,
                 k_bare=k_bare, w_k_bare=w_k_bare, division_factor=division, v=v)
    return LowRankUpdate(layer, v[:, None], u[:, None])


def edit_rome(lm, requests: Sequence[Request], hp, templates: Sequence[str], mom2s: dict[int, torch.Tensor],
              targets: torch.Tensor | None = None, trace: dict | None = None,
              backend: str = "fast", progress: bool = False) -> list[LowRankUpdate]:
    """Edit the model in place, one request after another; returns the applied updates.
    (``progress`` is accepted for the common signature: one target at a time shows no bar.)"""
    updates = []
    for i, r in enumerate(requests):
        step: dict = {}
        up = compute_rome(lm, r, hp, templates, mom2s.get(hp.layers[0]),
                          None if targets is None else targets[:, i], step, backend)
        if trace is not None:
            seconds = trace.get("targets_s", 0.0) + step.get("targets_s", 0.0)
            trace.update(step if len(requests) == 1 else {})
            trace["targets_s"] = seconds
        apply_update(lm, up)
        updates.append(up)
    return updates
