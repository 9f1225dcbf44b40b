"""Targets: optimise the vector z (v*) that, written at the subject's last token, makes the model
say the new object. Shared by every method; only the site differs (ROME adds δ to the MLP output
of the edited layer, MEMIT to the decoder-layer output of its last layer).

Loss, as in the original code: NLL of the target over the context templates (each prompt ends
with the target's tokens but the last, so every target token is predicted), plus
kl_factor · KL(current ‖ initial) of the next-token distribution at the subject token of
"{subject} is a", plus v_weight_decay · ‖δ‖ / ‖z_init‖². At most v_num_grad_steps forward passes
and one fewer Adam steps; stop early when the loss is < 0.05; clamp ‖δ‖ to clamp_norm_factor ·
‖z_init‖ after each step.

The reference path (``optimize_target``) computes logits as the original does, on every position
([B, T, V]); the fast path applies the LM head only to the positions the loss reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .compat import cache_kwargs, output_cache
from .data import Request
from .locate import encode, kv_cache, left_pad, right_pad, subject_last_index
from .trace import LayerRest, SkipBelow, Trace

KL_PROMPT = "{} is a"
EARLY_STOP_LOSS = 5e-2


def compute_dtype(model) -> torch.dtype:
    """δ and the loss are fp32, or fp64 for a float64 model (used to test the paths exactly)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def target_text(target_new: str) -> str:
    """The original algorithms put a leading space in front of the new target."""
    return target_new if target_new.startswith(" ") else " " + target_new


@dataclass
class TargetResult:
    target_init: torch.Tensor  # [d_model] activation at the site before optimisation
    delta: torch.Tensor  # [d_model] optimised δ
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
        device = next(lm.model.parameters()).device
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


def optimize_target(lm, request: Request, hp, templates: list[str], site: str, loss_layer: int,
                    full_logits: bool = True) -> TargetResult:
    """Optimise δ at the output of module ``site`` for one request (the reference algorithm).

    ``full_logits`` (default): as the original code, the LM head runs on every position of every
    prompt and log-softmax over [B, T, V]; False: only at the positions the loss reads (the same
    values; used by the benchmark to separate batching from the lean head)."""
    model, adapter = lm.model, lm.adapter
    b = _Batch(lm, request, templates)
    head = model.get_output_embeddings()
    n_layers = adapter.num_layers(model)
    loss_module = None if loss_layer >= n_layers - 1 else adapter.layer_tmp.format(loss_layer)
    final_norm = model.get_submodule(adapter.final_norm)
    rows_all = torch.arange(b.ids.shape[0], device=b.ids.device)
    kl_row = b.ids.shape[0] - 1

    acc = compute_dtype(model)
    delta = torch.zeros(adapter.d_model(model), device=b.ids.device, dtype=acc, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict[str, torch.Tensor] = {}

    def add_delta(h: torch.Tensor) -> torch.Tensor:
        if "init" not in state:
            state["init"] = h[0, b.lookup[0]].detach().to(acc).clone()
        return h.index_put((rows_all, b.lookup), delta.to(h.dtype).expand(len(rows_all), -1), accumulate=True)

    result = TargetResult(target_init=torch.empty(0), delta=torch.empty(0))
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        outs = [loss_module] if loss_module else []
        with Trace(model, outputs=outs, edit={site: add_delta}, detach=False) as tr:
            h_last = model.base_model(input_ids=b.ids, attention_mask=b.mask).last_hidden_state
        h_loss = final_norm(tr.outputs[loss_module]) if loss_module else h_last
        if full_logits:
            all_logits = head(h_last).to(acc)
            loss_logits = head(h_loss[: b.n_rewrite]).to(acc) if loss_module else all_logits[: b.n_rewrite]
            token_lp = torch.log_softmax(loss_logits, -1)[b.nll_rows, b.nll_pos, b.nll_tgt]
            kl_logits = all_logits[kl_row, b.lookup[kl_row]]
        else:
            logits = head(h_loss[b.nll_rows, b.nll_pos]).to(acc)
            token_lp = torch.log_softmax(logits, -1).gather(1, b.nll_tgt[:, None])[:, 0]
            kl_logits = head(h_last[kl_row, b.lookup[kl_row]]).to(acc)
        per_row = torch.zeros(b.n_rewrite, device=token_lp.device, dtype=acc).index_add(0, b.nll_rows, token_lp)
        nll_each = -per_row / len(b.target_ids)
        nll = nll_each.mean()
        kl_lp = torch.log_softmax(kl_logits, -1)
        if "kl_init" not in state:
            state["kl_init"] = kl_lp.detach().clone()
        kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - state["kl_init"])).sum()
        init = state["init"]
        wd = hp.v_weight_decay * (delta.norm() / init.norm() ** 2)
        loss = nll + kl + wd
        result.losses.append({"loss": loss.item(), "nll": nll.item(), "kl": kl.item(), "wd": wd.item(),
                              "avg_prob": torch.exp(-nll_each).mean().item()})
        if loss.item() < EARLY_STOP_LOSS or it == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        max_norm = hp.clamp_norm_factor * init.norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta.mul_(max_norm / delta.norm())
    result.target_init = state["init"]
    result.delta = delta.detach().clone()
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
#   output (ROME) equals adding it to the decoder layer's output, since every supported block
#   adds its MLP output to the residual stream.
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


def optimize_targets(lm, requests: list[Request], hp, templates: list[str], site: str, layer: int, loss_layer: int,
                     backend: str = "fast", max_tokens: int | None = None, progress: bool = False) -> list[TargetResult]:
    """Optimise the targets of all ``requests``. ``backend``: "fast" (batched), "reference" (one at
    a time, as the original), "reference-lean" (one at a time, LM head at the scored positions
    only). ``progress``: a bar of finished targets (shown for more than one request)."""
    if backend not in ("fast", "reference", "reference-lean"):
        raise ValueError(f"backend must be 'fast', 'reference' or 'reference-lean', got {backend!r}")
    bar = tqdm(total=len(requests), unit="z", desc="targets", leave=False, disable=not progress or len(requests) < 2)
    with bar:
        if backend != "fast":
            out = []
            for r in requests:
                out.append(optimize_target(lm, r, hp, templates, site, loss_layer, backend == "reference"))
                bar.update(1)
            return out
        batches = [_Batch(lm, r, templates) for r in requests]
        model, adapter = lm.model, lm.adapter
        device = next(model.parameters()).device
        max_tokens = max_tokens or default_max_tokens(device, adapter.d_model(model), adapter.num_layers(model))
        out = [None] * len(requests)
        for chunk in plan_chunks(batches, max_tokens):
            for i, res in zip(chunk, _optimize_chunk(lm, [batches[i] for i in chunk], hp, site, layer, loss_layer, bar)):
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


def _optimize_chunk(lm, bs: list[_Batch], hp, site: str, layer: int, loss_layer: int, bar=None) -> list[TargetResult]:
    """Batched optimisation of one chunk of requests.

    Layout: every prompt row is split at its subject's last token (where δ is added). The part
    before it never sees δ: it is left-padded to a common width, run once, and its keys/values
    are cached. Each step runs only the suffixes (subject's last token onwards, right-padded),
    through the layers above ``layer`` only.
    """
    model, adapter = lm.model, lm.adapter
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
    n_layers = adapter.num_layers(model)
    loss_module = None if loss_layer >= n_layers - 1 else adapter.layer_tmp.format(loss_layer)
    final_norm = model.get_submodule(adapter.final_norm)
    head = model.get_output_embeddings()

    # Constants: prefix keys/values (all layers), and the suffixes' layer-l output without δ.
    with torch.no_grad():
        if Wp:
            out = model.base_model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, use_cache=True)
            kv = [(lay.keys, lay.values) for lay in output_cache(out).layers]
        else:
            kv = None
        with LayerRest(model.get_submodule(layer_mod)) as layer_rest, \
                Trace(model, outputs=[site, layer_mod], stop=True) as tr:
            model.base_model(input_ids=suf_ids, attention_mask=full_mask, position_ids=suf_pos, use_cache=kv is not None,
                             **cache_kwargs(model.base_model, kv_cache(model, kv) if kv else None))
    h_cache = tr.outputs[layer_mod]
    init = tr.outputs[site][first_rows, 0].to(acc)

    delta = torch.zeros(n, init.shape[1], device=device, dtype=acc)
    m_buf, v_buf = torch.zeros_like(delta), torch.zeros_like(delta)
    results = [TargetResult(target_init=init[i].clone(), delta=torch.empty(0)) for i in range(n)]
    active = torch.ones(n, dtype=torch.bool, device=device)
    kl_init = None
    max_norm = hp.clamp_norm_factor * init.norm(dim=1)
    # Rows are run in a few groups of similar suffix length (fewer padded tokens, few calls).
    suf_len = suf_mask.sum(1).tolist()
    groups = [torch.tensor(g, device=device) for g in
              plan_groups(suf_len, CALL_COST_TOKENS.get(device.type, CALL_COST_TOKENS["cpu"]))]
    widths = [max(suf_len[r] for r in g.tolist()) for g in groups]
    is_kl = torch.zeros(R, dtype=torch.bool, device=device)
    is_kl[kl_rows] = True
    group_kv: dict[int, tuple[torch.Tensor, int, object]] = {}

    def step_cache(gi: int, rows: torch.Tensor):
        """Prefix keys/values of ``rows`` for the layers above ``layer`` (the skipped layers hold
        placeholders), trimmed to the longest prefix among them; re-selected only when the rows
        change (a request stopped). Returns (cache, prefix width)."""
        held = group_kv.get(gi)
        if held is None or not torch.equal(held[0], rows):
            wg = max(1, int(lk[rows].max()))
            sel = [None] * (layer + 1) + [(k[rows, :, Wp - wg:], v[rows, :, Wp - wg:]) for k, v in kv[layer + 1:]]
            held = group_kv[gi] = (rows, wg, sel)
        return kv_cache(model, held[2]), held[1]
    with SkipBelow(model, adapter, layer, layer_rest.rest) as skip:
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
                h = h_cache[rows, :w]
                h0 = h[:, 0] + d_act[local_req[req_of_row[rows]]].to(h.dtype)
                skip.h = torch.cat([h0[:, None], h[:, 1:]], 1)
                with Trace(model, outputs=[loss_module] if loss_module else [], detach=False) as tr2:
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
            token_lp = torch.log_softmax(logits[:n_nll], -1).gather(1, torch.cat(tgts)[:, None])[:, 0]
            nll_sum = torch.zeros(len(act) * (P - 1), device=device, dtype=acc).index_add(0, torch.cat(slots), token_lp)
            nll_each = -nll_sum.view(len(act), P - 1) / n_tgt[act][:, None]
            nll = nll_each.mean(1)
            kl_lp = torch.log_softmax(logits[n_nll:], -1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - kl_init[act])).sum(1)
            wd = hp.v_weight_decay * (d_act.norm(dim=1) / init[act].norm(dim=1) ** 2)
            loss = nll + kl + wd
            avg_prob = torch.exp(-nll_each).mean(1)
            for j, i in enumerate(act.tolist()):
                results[i].losses.append({"loss": loss[j].item(), "nll": nll[j].item(), "kl": kl[j].item(),
                                          "wd": wd[j].item(), "avg_prob": avg_prob[j].item()})
            done = (loss.detach() < EARLY_STOP_LOSS) | (it == hp.v_num_grad_steps - 1)
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
                over = delta[step_rows].norm(dim=1) > max_norm[step_rows]
                if over.any():
                    r = step_rows[over]
                    delta[r] = delta[r] * (max_norm[r] / delta[r].norm(dim=1))[:, None]
            active[act[done]] = False
    for i in range(n):
        results[i].delta = delta[i].clone()
    return results
