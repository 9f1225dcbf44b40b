"""Targets: optimise the vector z (v*) that, written at the subject's last token, makes the model
say the new object. Shared by every method; only the site differs (ROME adds δ to the MLP output
of the edited layer, MEMIT to the decoder-layer output of its last layer, PMET one δ to the
attention output and one to the MLP output of its last layer, optimised together).

Loss, as in the original code: NLL of the target over the context templates (each prompt ends
with the target's tokens but the last, so every target token is predicted), plus
kl_factor · KL(current ‖ initial) of the next-token distribution at the subject token of
"{subject} is a", plus v_weight_decay · Σ_sites ‖δ‖ / ‖z_init‖². At most v_num_grad_steps forward
passes and one fewer Adam steps; stop early when the loss is < 0.05; clamp each ‖δ‖ to
clamp_norm_factor · its ‖z_init‖ after each step. An ``Objective`` adds what a method changes in
this loss (PMET: a weight on the NLL term and its "top" schedule).

The reference path (``optimize_target``) computes logits as the original does, on every position
([B, T, V]); the fast path applies the LM head only to the positions the loss reads.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from editfast.core.compat import cache_kwargs, output_cache
from editfast.data.requests import Request
from editfast.engine.kv import encode, kv_cache, left_pad, right_pad
from editfast.methods.locate_then_edit.locate import subject_last_index
from editfast.models.archs import output_logits
from editfast.models.placement import input_device
from editfast.models.trace import LayerRest, SkipBelow, Trace

KL_PROMPT = "{} is a"
EARLY_STOP_LOSS = 5e-2


def compute_dtype(model) -> torch.dtype:
    """δ and the loss are fp32, or fp64 for a float64 model (used to test the paths exactly)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def target_text(target_new: str) -> str:
    """The original algorithms put a leading space in front of the new target."""
    return target_new if target_new.startswith(" ") else " " + target_new


@dataclass(frozen=True)
class Objective:
    """What a method changes in the target loss; the defaults are ROME's and MEMIT's.

    nll_factor      weight of the NLL term (PMET's ``nll_loss_factor``).
    top_nll_factor  PMET's schedule, None for none: after a step at which every target token is
                    the top prediction at its position in every rewriting prompt, the next step
                    weighs the NLL by ``top_nll_factor`` instead of ``nll_factor`` (PMET: 0.1 ·
                    nll_loss_factor), and the optimisation stops there if the (weighted) KL term
                    is ≤ ``top_kl_stop`` (PMET: 0.01).
    """

    nll_factor: float = 1.0
    top_nll_factor: float | None = None
    top_kl_stop: float = 0.0


DEFAULT_OBJECTIVE = Objective()


def _sites(site: str | Sequence[str]) -> list[str]:
    sites = [site] if isinstance(site, str) else list(site)
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"target sites must be distinct module names, got {sites}")
    return sites


@dataclass
class TargetResult:
    target_init: torch.Tensor  # [d_model] activation at the site before optimisation ([n_sites, d_model] for several)
    delta: torch.Tensor  # [d_model] optimised δ ([n_sites, d_model] for several sites)
    losses: list[dict] = field(default_factory=list)

    @property
    def target(self) -> torch.Tensor:
        return self.target_init + self.delta


class _Batch:
    """Token ids and the index bookkeeping of one request's optimisation prompts."""

    def __init__(self, lm, request: Request, templates: list[str]):
        tok = lm.tokenizer
        self.target_ids = tok(target_text(request.target_new), add_special_tokens=False)["input_ids"]
        stem = tok.decode(self.target_ids[:-1])
        prompts = [t.replace("{}", request.prompt, 1) + stem for t in templates] + [KL_PROMPT]
        device = input_device(lm.model)
        self.ids, self.mask = encode(tok, [p.replace("{}", request.subject, 1) for p in prompts], device)
        self.lookup = torch.tensor([subject_last_index(tok, p, request.subject) for p in prompts], device=device)
        self.n_rewrite = len(templates)
        T = len(self.target_ids)
        lengths = self.mask.sum(1).tolist()
        rows, pos, tgt = [], [], []
        for i in range(self.n_rewrite):
            for j, t in enumerate(self.target_ids):
                # Logits at position p predict token p + 1, so positions n_i - T .. n_i - 1 (the
                # last prompt token, then the target's stem) predict the T target tokens.
                rows.append(i)
                pos.append(lengths[i] - T + j)
                tgt.append(t)
        look = self.lookup.tolist()
        # memory of the batched path: suffixes (subject's last token on; the KL row stops there)
        # run with gradients, the prefixes only as cached keys/values
        self.suffix_tokens = sum(n - k for n, k in zip(lengths[:-1], look[:-1])) + 1
        self.prefix_width = max(look)
        self.nll_rows = torch.tensor(rows, device=device)
        self.nll_pos = torch.tensor(pos, device=device)
        self.nll_tgt = torch.tensor(tgt, device=device)


def optimize_target(lm, request: Request, hp, templates: list[str], site: str | Sequence[str], loss_layer: int,
                    full_logits: bool = True, objective: Objective = DEFAULT_OBJECTIVE) -> TargetResult:
    """Optimise δ at the output of module ``site`` for one request (the reference algorithm).

    ``site``: one module name, or several (one δ each, optimised together by one Adam, as PMET's
    attention and MLP outputs; the result then holds [n_sites, d] tensors).
    ``full_logits`` (default): as the original code, the LM head runs on every position of every
    prompt and log-softmax over [B, T, V]; False: only at the positions the loss reads (the same
    values; used by the benchmark to separate batching from the lean head)."""
    model, adapter = lm.model, lm.adapter
    sites = _sites(site)
    b = _Batch(lm, request, templates)
    head = output_logits(model)  # the LM head, and Gemma-2's final soft cap
    n_layers = adapter.num_layers(model)
    loss_module = None if loss_layer >= n_layers - 1 else adapter.layer_tmp.format(loss_layer)
    final_norm = model.get_submodule(adapter.final_norm)
    rows_all = torch.arange(b.ids.shape[0], device=b.ids.device)
    kl_row = b.ids.shape[0] - 1

    acc = compute_dtype(model)
    deltas = [torch.zeros(adapter.d_model(model), device=b.ids.device, dtype=acc, requires_grad=True) for _ in sites]
    opt = torch.optim.Adam(deltas, lr=hp.v_lr)
    state: dict = {}
    top_rule = objective.top_nll_factor is not None
    nll_factor = objective.nll_factor

    def adder(j: int):
        def add_delta(h: torch.Tensor) -> torch.Tensor:  # (a device map: h on its layer's device)
            rows, look = rows_all.to(h.device), b.lookup.to(h.device)
            if ("init", j) not in state:
                state[("init", j)] = h[0, look[0]].detach().to(device=deltas[j].device, dtype=acc).clone()
            return h.index_put((rows, look), deltas[j].to(device=h.device, dtype=h.dtype).expand(len(rows), -1),
                               accumulate=True)
        return add_delta

    result = TargetResult(target_init=torch.empty(0), delta=torch.empty(0))
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        outs = [loss_module] if loss_module else []
        with Trace(model, outputs=outs, edit={s: adder(j) for j, s in enumerate(sites)}, detach=False) as tr:
            h_last = model.base_model(input_ids=b.ids, attention_mask=b.mask).last_hidden_state
        h_loss = final_norm(tr.outputs[loss_module]) if loss_module else h_last
        if full_logits:
            all_logits = head(h_last).to(acc)
            loss_logits = head(h_loss[: b.n_rewrite]).to(acc) if loss_module else all_logits[: b.n_rewrite]
            lp = torch.log_softmax(loss_logits, -1)
            token_lp = lp[b.nll_rows, b.nll_pos, b.nll_tgt]
            top_lp = lp[b.nll_rows, b.nll_pos].max(-1).values if top_rule else None
            kl_logits = all_logits[kl_row, b.lookup[kl_row]]
        else:
            logits = head(h_loss[b.nll_rows, b.nll_pos]).to(acc)
            lp = torch.log_softmax(logits, -1)
            token_lp = lp.gather(1, b.nll_tgt[:, None])[:, 0]
            top_lp = lp.max(-1).values if top_rule else None
            kl_logits = head(h_last[kl_row, b.lookup[kl_row]]).to(acc)
        per_row = torch.zeros(b.n_rewrite, device=token_lp.device, dtype=acc).index_add(0, b.nll_rows, token_lp)
        nll_each = -per_row / len(b.target_ids)
        nll = nll_each.mean()
        kl_lp = torch.log_softmax(kl_logits, -1)
        if "kl_init" not in state:
            state["kl_init"] = kl_lp.detach().clone()
        kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - state["kl_init"])).sum()
        inits = [state[("init", j)] for j in range(len(sites))]
        decay = deltas[0].norm() / inits[0].norm() ** 2
        for d, z0 in zip(deltas[1:], inits[1:]):
            decay = decay + d.norm() / z0.norm() ** 2
        wd = hp.v_weight_decay * decay
        loss = nll_factor * nll + kl + wd.to(nll.device)
        record = {"loss": loss.item(), "nll": nll.item(), "kl": kl.item(), "wd": wd.item(),
                  "avg_prob": torch.exp(-nll_each).mean().item()}
        stop = loss.item() < EARLY_STOP_LOSS or it == hp.v_num_grad_steps - 1
        if top_rule:
            # PMET: every target token the top prediction -> a lighter NLL next step, or stop
            # if the KL term is small too (the original compares the mean probability of the
            # top tokens with that of the targets, equal exactly when each token is the top one)
            top = bool((token_lp == top_lp).all())
            record.update(nll_factor=nll_factor, top=top)
            stop = stop or (top and bool(kl <= objective.top_kl_stop))
            nll_factor = objective.top_nll_factor if top else objective.nll_factor
        result.losses.append(record)
        if stop:
            break
        loss.backward()
        opt.step()
        for d, z0 in zip(deltas, inits):
            max_norm = hp.clamp_norm_factor * z0.norm()
            if d.norm() > max_norm:
                with torch.no_grad():
                    d.mul_(max_norm / d.norm())
    inits = [state[("init", j)] for j in range(len(sites))]
    if isinstance(site, str):
        result.target_init, result.delta = inits[0], deltas[0].detach().clone()
    else:
        result.target_init, result.delta = torch.stack(inits), torch.stack([d.detach() for d in deltas])
    return result


# --------------------------------------------------------------------------------------------
# The fast path: all requests of a batch optimised together.
#
# - One forward batch holds every request's prompts; each request has its own δ row, its own
#   Adam state (the update is elementwise, so one [n, d] Adam equals n separate ones) and its own
#   early stop: a finished request keeps its δ and leaves the batch.
# - Hidden states up to the edit layer do not depend on δ: they are computed once without
#   gradients. Every step replaces the forward of layers 0..l by "return the cached output of
#   layer l, plus δ at the subject tokens", so only the layers above l run. Adding δ to the MLP
#   output (ROME) equals adding it to the decoder layer's output where the block adds its MLP
#   output to the residual stream as it is; a norm in between (Gemma-2's and OLMo-2's
#   post_feedforward_layernorm, ``Adapter.mlp_out_norm``) makes the MLP output a site inside the
#   layer. Sites inside layer l (PMET's attention and MLP outputs, each with its own δ) need layer
#   l itself: the cache then holds the output of layer l − 1, and layer l runs every step with
#   the δs added by hooks.
# - Tokens before the subject's last token never see δ: their keys/values are computed once and
#   cached; each step runs only the suffix from the subject's last token on.

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def _adam_rows_(p, g, m, v, step: int, lr: float, rows: torch.Tensor) -> None:
    """torch.optim.Adam's update (no weight decay, no amsgrad) applied to ``rows`` only."""
    b1, b2 = ADAM_BETAS
    m[rows] = m[rows] * b1 + g[rows] * (1 - b1)
    v[rows] = v[rows] * b2 + g[rows] * g[rows] * (1 - b2)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    denom = v[rows].sqrt() / math.sqrt(bc2) + ADAM_EPS
    p[rows] = p[rows] - (lr / bc1) * m[rows] / denom


KV_TOKEN_SHARE = 8  # a cached prefix token's keys/values weigh at most 1/8 of a token's activations


def plan_chunks(batches: list[_Batch], max_tokens: int) -> list[list[int]]:
    """Group requests (in order) so that each chunk's memory stays under ``max_tokens``
    token-equivalents: the suffix tokens that run with gradients, plus the cached prefix
    keys/values (rows × the widest prefix, at 1/``KV_TOKEN_SHARE`` of a token each)."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    suf = rows = width = 0
    for i, b in enumerate(batches):
        s, r, w = suf + b.suffix_tokens, rows + b.ids.shape[0], max(width, b.prefix_width)
        if cur and s + r * w / KV_TOKEN_SHARE > max_tokens:
            chunks.append(cur)
            cur, s, r, w = [], b.suffix_tokens, b.ids.shape[0], b.prefix_width
        cur.append(i)
        suf, rows, width = s, r, w
    return chunks + ([cur] if cur else [])


def default_max_tokens(device: torch.device, d_model: int, n_layers: int) -> int:
    """Tokens per optimisation chunk: activations for backward of about 24·d bytes per token and layer."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * 0.5
    else:
        budget = 4 * 2**30
    return max(256, int(budget / (24 * d_model * n_layers * 4)))


def optimize_targets(lm, requests: list[Request], hp, templates: list[str], site: str | Sequence[str], layer: int,
                     loss_layer: int, backend: str = "fast", max_tokens: int | None = None, progress: bool = False,
                     objective: Objective = DEFAULT_OBJECTIVE) -> list[TargetResult]:
    """Optimise the targets of all ``requests``. ``backend``: "fast" (batched), "reference" (one at
    a time, as the original), "reference-lean" (one at a time, LM head at the scored positions
    only). ``progress``: a bar of finished targets (shown for more than one request).

    ``site``: the module of layer ``layer`` whose output gets δ, or a list of such modules (one δ
    each, optimised together; each result then holds [n_sites, d] tensors in that order).
    ``objective``: what the method changes in the loss (see ``Objective``)."""
    if backend not in ("fast", "reference", "reference-lean"):
        raise ValueError(f"backend must be 'fast', 'reference' or 'reference-lean', got {backend!r}")
    _sites(site)
    bar = tqdm(total=len(requests), unit="z", desc="targets", leave=False, disable=not progress or len(requests) < 2)
    with bar:
        if backend != "fast":
            out = []
            for r in requests:
                out.append(optimize_target(lm, r, hp, templates, site, loss_layer, backend == "reference", objective))
                bar.update(1)
            return out
        batches = [_Batch(lm, r, templates) for r in requests]
        model, adapter = lm.model, lm.adapter
        device = input_device(model)
        max_tokens = max_tokens or default_max_tokens(device, adapter.d_model(model), adapter.num_layers(model))
        out = [None] * len(requests)
        for chunk in plan_chunks(batches, max_tokens):
            for i, res in zip(chunk, _optimize_chunk(lm, [batches[i] for i in chunk], hp, site, layer, loss_layer, bar,
                                                     objective)):
                out[i] = res
        return out


def plan_groups(lengths: list[int], call_cost: int) -> list[list[int]]:
    """Split rows into groups run as separate forwards, minimising Σ (call_cost + rows × width).

    ``lengths``: suffix length per row; ``call_cost``: the fixed cost of one forward call in
    tokens (on a 2-core CPU, forward + backward of SmolLM2-135M above layer 8: best between 64
    and 200; 128 is used). Groups are contiguous in sorted length order
    (a small dynamic programme over the distinct lengths). Returns row indices per group.
    """
    widths = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == w) for w in widths]
    best = [0.0] + [float("inf")] * len(widths)
    cut = [0] * (len(widths) + 1)
    for j in range(1, len(widths) + 1):
        for i in range(j):
            c = best[i] + call_cost + sum(count[i:j]) * widths[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], len(widths)
    while j:
        bounds.append((widths[cut[j]], widths[j - 1]))
        j = cut[j]
    return [[r for r, x in enumerate(lengths) if lo <= x <= hi] for lo, hi in reversed(bounds)]


CALL_COST_TOKENS = {"cpu": 128, "cuda": 2048}


def _add_at_first(d: torch.Tensor):
    """An output edit adding d [rows, dim] at column 0 of a [rows, width, dim] output."""
    return lambda h: torch.cat([(h[:, 0] + d.to(h.dtype))[:, None], h[:, 1:]], 1)


def _optimize_chunk(lm, bs: list[_Batch], hp, site: str | Sequence[str], layer: int, loss_layer: int, bar=None,
                    objective: Objective = DEFAULT_OBJECTIVE) -> list[TargetResult]:
    """Batched optimisation of one chunk of requests.

    Layout: every prompt row is split at its subject's last token (where δ is added). The part
    before it never sees δ: it is left-padded to a common width, run once, and its keys/values
    are cached. Each step runs only the suffixes (subject's last token onwards, right-padded),
    through the layers above ``layer`` only, or, for sites inside layer ``layer`` (several sites,
    or one that is not the layer's output or its MLP's added to it as it is), through layer ``layer`` and above.
    """
    model, adapter = lm.model, lm.adapter
    sites = _sites(site)
    device = bs[0].ids.device
    n, P = len(bs), bs[0].ids.shape[0]
    acc = compute_dtype(model)
    pad = lm.tokenizer.pad_token_id or 0
    toks = [b.ids[i, : int(b.mask[i].sum())].tolist() for b in bs for i in range(P)]
    lookup = torch.cat([b.lookup for b in bs]).tolist()
    for r in range(P - 1, len(toks), P):  # the KL row is read at the subject token only (causal)
        toks[r] = toks[r][: lookup[r] + 1]
    R = len(toks)
    Wp = max(lookup)
    S = max(len(t) - k for t, k in zip(toks, lookup))
    pre_ids, pre_mask, pre_pos = left_pad([t[:k] for t, k in zip(toks, lookup)], pad, device, Wp)
    suf_ids, suf_mask = right_pad([t[k:] for t, k in zip(toks, lookup)], pad, device, S)
    lk = torch.tensor(lookup, device=device)
    suf_pos = lk[:, None] + torch.arange(S, device=device)[None]
    full_mask = torch.cat([pre_mask, suf_mask], 1)

    # NLL entries (row, suffix column, target token); orig position p sits at column p - lookup.
    req_of_row = torch.arange(n, device=device).repeat_interleave(P)
    nll_rows = torch.cat([b.nll_rows + i * P for i, b in enumerate(bs)])
    nll_col = torch.cat([b.nll_pos for b in bs]) - lk[nll_rows]
    nll_tgt = torch.cat([b.nll_tgt for b in bs])
    n_tgt = torch.tensor([len(b.target_ids) for b in bs], device=device, dtype=acc)
    kl_rows = torch.arange(n, device=device) * P + P - 1
    first_rows = torch.arange(n, device=device) * P
    layer_mod = adapter.layer_tmp.format(layer)
    # δ on the layer's output (one site: the layer or its MLP) -> the cache replaces layers 0..l;
    # sites inside layer l -> it replaces layers 0..l-1 (none for l = 0) and layer l runs
    outputs = (layer_mod,) if adapter.mlp_out_norm else (layer_mod, adapter.mlp_tmp.format(layer))
    through = len(sites) == 1 and sites[0] in outputs
    skip_layer = layer if through else layer - 1
    skip_mod = adapter.layer_tmp.format(skip_layer) if skip_layer >= 0 else None
    n_layers = adapter.num_layers(model)
    loss_module = None if loss_layer >= n_layers - 1 else adapter.layer_tmp.format(loss_layer)
    final_norm = model.get_submodule(adapter.final_norm)
    head = output_logits(model)  # the LM head, and Gemma-2's final soft cap

    # Constants: prefix keys/values (all layers), the suffixes' output of the last skipped layer
    # and the sites' outputs, without δ.
    with torch.no_grad():
        if Wp:
            out = model.base_model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, use_cache=True)
            kv = [(lay.keys, lay.values) for lay in output_cache(out).layers]
        else:
            kv = None
        with (LayerRest(model.get_submodule(skip_mod)) if skip_mod else nullcontext()) as layer_rest, \
                Trace(model, outputs=[*sites, *([skip_mod] if skip_mod else [])], stop=True) as tr:
            model.base_model(input_ids=suf_ids, attention_mask=full_mask, position_ids=suf_pos, use_cache=kv is not None,
                             **cache_kwargs(model.base_model, kv_cache(model, kv) if kv else None))
    h_cache = tr.outputs[skip_mod] if skip_mod else None
    init = torch.stack([tr.outputs[s][first_rows, 0] for s in sites], 1).to(acc)  # [n, sites, d]

    delta = torch.zeros_like(init)
    m_buf, v_buf = torch.zeros_like(delta), torch.zeros_like(delta)
    several = not isinstance(site, str)
    results = [TargetResult(target_init=(init[i] if several else init[i, 0]).clone(), delta=torch.empty(0))
               for i in range(n)]
    active = torch.ones(n, dtype=torch.bool, device=device)
    kl_init = None
    max_norm = hp.clamp_norm_factor * init.norm(dim=-1)  # [n, sites]
    top_rule = objective.top_nll_factor is not None
    nll_factor = torch.full((n,), objective.nll_factor, device=device, dtype=acc)
    # Rows are run in a few groups of similar suffix length (fewer padded tokens, few calls).
    suf_len = suf_mask.sum(1).tolist()
    groups = [torch.tensor(g, device=device) for g in
              plan_groups(suf_len, CALL_COST_TOKENS.get(device.type, CALL_COST_TOKENS["cpu"]))]
    widths = [max(suf_len[r] for r in g.tolist()) for g in groups]
    is_kl = torch.zeros(R, dtype=torch.bool, device=device)
    is_kl[kl_rows] = True
    group_kv: dict[int, tuple[torch.Tensor, int, object]] = {}

    def step_cache(gi: int, rows: torch.Tensor):
        """Prefix keys/values of ``rows`` for the layers that run (the skipped layers hold
        placeholders), trimmed to the longest prefix among them; re-selected only when the rows
        change (a request stopped). Returns (cache, prefix width)."""
        held = group_kv.get(gi)
        if held is None or not torch.equal(held[0], rows):
            wg = max(1, int(lk[rows].max()))
            sel = [None] * (skip_layer + 1) + [(k[rows, :, Wp - wg:], v[rows, :, Wp - wg:])
                                               for k, v in kv[skip_layer + 1:]]
            held = group_kv[gi] = (rows, wg, sel)
        return kv_cache(model, held[2]), held[1]
    with (SkipBelow(model, adapter, skip_layer, layer_rest.rest) if skip_mod else nullcontext()) as skip:
        for it in range(hp.v_num_grad_steps):
            act = active.nonzero()[:, 0]
            local_req = torch.full((n,), -1, device=device, dtype=torch.long)
            local_req[act] = torch.arange(len(act), device=device)
            d_act = delta[act].clone().requires_grad_(True)
            head_in, slots, tgts, kl_parts, kl_req = [], [], [], [], []
            for gi, (w, g_rows) in enumerate(zip(widths, groups)):
                rows = g_rows[local_req[req_of_row[g_rows]] >= 0]
                if not len(rows):
                    continue
                cache, wg = step_cache(gi, rows) if kv else (None, 0)
                d_rows = d_act[local_req[req_of_row[rows]]]
                edits = {}
                if through:
                    h = h_cache[rows, :w]
                    h0 = h[:, 0] + d_rows[:, 0].to(h.dtype)
                    skip.h = torch.cat([h0[:, None], h[:, 1:]], 1)
                else:
                    if skip is not None:
                        skip.h = h_cache[rows, :w]
                    edits = {s: _add_at_first(d_rows[:, j]) for j, s in enumerate(sites)}
                with Trace(model, outputs=[loss_module] if loss_module else [], edit=edits, detach=False) as tr2:
                    h_last = model.base_model(
                        input_ids=suf_ids[rows, :w], attention_mask=full_mask[rows, Wp - wg: Wp + w],
                        position_ids=suf_pos[rows, :w], use_cache=kv is not None,
                        **cache_kwargs(model.base_model, cache)).last_hidden_state
                h_src = final_norm(tr2.outputs[loss_module]) if loss_module else h_last
                local_row = torch.full((R,), -1, device=device, dtype=torch.long)
                local_row[rows] = torch.arange(len(rows), device=device)
                e = (local_row[nll_rows] >= 0).nonzero()[:, 0]
                if len(e):
                    head_in.append(h_src[local_row[nll_rows[e]], nll_col[e]])
                    slots.append(local_req[req_of_row[nll_rows[e]]] * (P - 1) + nll_rows[e] % P)
                    tgts.append(nll_tgt[e])
                k = is_kl[rows]
                if k.any():
                    kl_parts.append(h_last[k, 0])
                    kl_req.append(local_req[req_of_row[rows[k]]])
            # One LM-head product per step for every scored position (the head's weights are read
            # once, not once per group): the target tokens, then the KL rows in request order.
            n_nll = sum(len(t) for t in tgts)
            logits = head(torch.cat(head_in + [torch.cat(kl_parts)[torch.cat(kl_req).argsort()]])).to(acc)
            lp = torch.log_softmax(logits[:n_nll], -1)
            token_lp = lp.gather(1, torch.cat(tgts)[:, None])[:, 0]
            slot = torch.cat(slots)
            nll_sum = torch.zeros(len(act) * (P - 1), device=device, dtype=acc).index_add(0, slot, token_lp)
            nll_each = -nll_sum.view(len(act), P - 1) / n_tgt[act][:, None]
            nll = nll_each.mean(1)
            kl_lp = torch.log_softmax(logits[n_nll:], -1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - kl_init[act])).sum(1)
            wd = hp.v_weight_decay * (d_act.norm(dim=-1) / init[act].norm(dim=-1) ** 2).sum(-1)
            loss = nll_factor[act] * nll + kl + wd
            avg_prob = torch.exp(-nll_each).mean(1)
            done = (loss.detach() < EARLY_STOP_LOSS) | (it == hp.v_num_grad_steps - 1)
            if top_rule:  # PMET's schedule (see Objective and optimize_target)
                with torch.no_grad():
                    miss = (token_lp != lp.max(-1).values).to(acc)
                    top = torch.zeros(len(act), device=device, dtype=acc).index_add(0, slot // (P - 1), miss) == 0
                    done |= top & (kl <= objective.top_kl_stop)
            for j, i in enumerate(act.tolist()):
                record = {"loss": loss[j].item(), "nll": nll[j].item(), "kl": kl[j].item(), "wd": wd[j].item(),
                          "avg_prob": avg_prob[j].item()}
                if top_rule:
                    record.update(nll_factor=nll_factor[i].item(), top=bool(top[j]))
                results[i].losses.append(record)
            if top_rule:
                nll_factor[act[top]], nll_factor[act[~top]] = objective.top_nll_factor, objective.nll_factor
            if bar is not None:
                bar.set_postfix_str(f"step {it + 1}/{hp.v_num_grad_steps}, {len(act)} active", refresh=False)
                bar.update(int(done.sum()))
            if bool(done.all()):
                break
            loss[~done].sum().backward()
            with torch.no_grad():
                step_rows = act[~done]
                grad = torch.zeros_like(delta)
                grad[act] = d_act.grad
                _adam_rows_(delta, grad, m_buf, v_buf, it + 1, hp.v_lr, step_rows)
                over = delta[step_rows].norm(dim=-1) > max_norm[step_rows]  # [rows, sites]
                if over.any():
                    ri, si = over.nonzero(as_tuple=True)
                    r = step_rows[ri]
                    delta[r, si] = delta[r, si] * (max_norm[r, si] / delta[r, si].norm(dim=-1))[:, None]
            active[act[done]] = False
    for i in range(n):
        results[i].delta = (delta[i] if several else delta[i, 0]).clone()
    return results
