"""MEMIT (Meng et al., 2023): many facts at once, the residual spread over several layers.

For each layer l (in order, on the model as edited so far): keys K at the subject's last token
(bare template weighted ½, the others share ½), residual R = (z − h_zlayer) / (layers left), and
ΔW_l = R Kᵀ (λC_l + K Kᵀ)⁻¹, kept as factors U = R, V = (λC_l + K Kᵀ)⁻¹ K
(see ``solve.Moment`` for the reference float64 solve and the fast factorise-once path).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..data import Request
from ..locate import LayerwiseReader, word_activations
from ..solve import as_moment
from ..targets import optimize_targets
from ..update import LowRankUpdate, apply_update


def group_mean_keys(keys: torch.Tensor, groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """[n, n_templates, d] -> [n, d]: mean within each template group, then mean of the groups."""
    out, start = [], 0
    for g in groups:
        out.append(keys[:, start: start + len(g)].mean(1))
        start += len(g)
    return torch.stack(out, 1).mean(1)


def edit_memit(lm, requests: Sequence[Request], hp, groups: Sequence[Sequence[str]], mom2s: dict[int, torch.Tensor],
               targets: torch.Tensor | None = None, trace: dict | None = None,
               backend: str = "fast", progress: bool = False) -> list[LowRankUpdate]:
    """Edit the model in place with one MEMIT batch; returns the applied per-layer updates."""
    adapter, model = lm.adapter, lm.model
    trace = {} if trace is None else trace
    flat = [t for g in groups for t in g]
    z_layer = hp.layers[-1]
    z_module = adapter.layer_tmp.format(z_layer)
    if targets is None:
        t0 = time.perf_counter()
        loss_layer = hp.loss_layer(adapter.num_layers(model))
        res = optimize_targets(lm, list(requests), hp, flat, z_module, z_layer, loss_layer, backend=backend,
                               progress=progress)
        trace["targets_s"] = time.perf_counter() - t0
        targets = torch.stack([x.target for x in res], 1)
        trace.update(target_init=torch.stack([x.target_init for x in res], 1),
                     z_delta=torch.stack([x.delta for x in res], 1), losses=[x.losses for x in res])
    trace["zs"] = targets
    n = len(requests)
    updates = []
    ctx = [t.replace("{}", r.prompt, 1) for r in requests for t in flat]
    ctx_subjects = [r.subject for r in requests for _ in flat]
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    if backend == "fast":  # each pass starts at the layer edited last (see LayerwiseReader)
        keys_reader, cur_reader = LayerwiseReader(lm, ctx, ctx_subjects), LayerwiseReader(lm, prompts, subjects)
    for i, layer in enumerate(hp.layers):
        rewrite = adapter.rewrite_tmp.format(layer)
        if backend == "fast":
            raw = keys_reader.read(layer, inputs=[rewrite])[("in", rewrite)]
            cur = cur_reader.read(layer, outputs=[z_module])[("out", z_module)]
        else:
            raw = word_activations(lm, ctx, ctx_subjects, inputs=[rewrite])[("in", rewrite)]
            cur = word_activations(lm, prompts, subjects, outputs=[z_module])[("out", z_module)]
        raw = raw.float().reshape(n, len(flat), -1)
        K = group_mean_keys(raw, groups).T  # [d_mlp, n]
        cur = cur.float().T  # [d_model, n]
        tgt = targets.to(cur.device) - cur
        adj_k = as_moment(mom2s[layer]).adj_keys(K, hp.mom2_update_weight, backend)
        resid = tgt.to(adj_k.dtype) / (len(hp.layers) - i)
        up = LowRankUpdate(layer, resid, adj_k)
        apply_update(lm, up)
        updates.append(up)
        trace.update({f"K_per_template.layer{layer}": raw, f"K.layer{layer}": K, f"cur_zs.layer{layer}": cur,
                      f"targets.layer{layer}": tgt, f"adj_k.layer{layer}": adj_k, f"resid.layer{layer}": resid})
    return updates
