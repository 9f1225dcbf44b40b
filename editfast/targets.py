"""Targets: optimise the vector z (v*) that, written at the subject's last token, makes the model
say the new object. Shared by every method; only the site differs (ROME adds δ to the MLP output
of the edited layer, MEMIT to the decoder-layer output of its last layer).

Loss, as in the original code: NLL of the target over the context templates (each prompt ends
with the target's tokens but the last, so every target token is predicted), plus
kl_factor · KL(current ‖ initial) of the next-token distribution at the subject token of
"{subject} is a", plus v_weight_decay · ‖δ‖ / ‖z_init‖². At most v_num_grad_steps forward passes
and one fewer Adam steps; stop early when the loss is < 0.05; clamp ‖δ‖ to clamp_norm_factor ·
‖z_init‖ after each step.

Unlike the original, logits are computed only at the positions the loss reads (the LM head is
applied to a few gathered hidden states, never to [B, T, V]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import Request
from .locate import encode, subject_last_index
from .trace import Trace

KL_PROMPT = "{} is a"
EARLY_STOP_LOSS = 5e-2


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
        self.nll_rows = torch.tensor(rows, device=device)
        self.nll_pos = torch.tensor(pos, device=device)
        self.nll_tgt = torch.tensor(tgt, device=device)


def optimize_target(lm, request: Request, hp, templates: list[str], site: str, loss_layer: int) -> TargetResult:
    """Optimise δ at the output of module ``site`` for one request (the reference algorithm)."""
    model, adapter = lm.model, lm.adapter
    b = _Batch(lm, request, templates)
    head = model.get_output_embeddings()
    n_layers = adapter.num_layers(model)
    loss_module = None if loss_layer >= n_layers - 1 else adapter.layer_tmp.format(loss_layer)
    final_norm = model.get_submodule(adapter.final_norm)
    rows_all = torch.arange(b.ids.shape[0], device=b.ids.device)
    kl_row = b.ids.shape[0] - 1

    delta = torch.zeros(adapter.d_model(model), device=b.ids.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict[str, torch.Tensor] = {}

    def add_delta(h: torch.Tensor) -> torch.Tensor:
        if "init" not in state:
            state["init"] = h[0, b.lookup[0]].detach().float().clone()
        return h.index_put((rows_all, b.lookup), delta.to(h.dtype).expand(len(rows_all), -1), accumulate=True)

    result = TargetResult(target_init=torch.empty(0), delta=torch.empty(0))
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        outs = [loss_module] if loss_module else []
        with Trace(model, outputs=outs, edit={site: add_delta}, detach=False) as tr:
            h_last = model.base_model(input_ids=b.ids, attention_mask=b.mask).last_hidden_state
        h_loss = final_norm(tr.outputs[loss_module]) if loss_module else h_last
        logits = head(h_loss[b.nll_rows, b.nll_pos]).float()
        token_lp = torch.log_softmax(logits, -1).gather(1, b.nll_tgt[:, None])[:, 0]
        per_row = torch.zeros(b.n_rewrite, device=logits.device).index_add(0, b.nll_rows, token_lp)
        nll_each = -per_row / len(b.target_ids)
        nll = nll_each.mean()
        kl_lp = torch.log_softmax(head(h_last[kl_row, b.lookup[kl_row]]).float(), -1)
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
