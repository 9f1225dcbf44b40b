"""FT-L (constrained fine-tuning, ROME's baseline; Meng et al., 2022) and the fine-tuning loop FT-M shares.

The edited layers' MLP output projections are trained directly on the new facts with Adam, every
other weight frozen; after every optimiser step each trained matrix is projected back into the L∞
ball around its value before the edit (``norm_constraint`` ε: W ← clamp(W, W₀ − ε, W₀ + ε)); the
update is ΔW = W − W₀, journaled as ``Dense`` (the weights are put back before it is returned).

The two objectives (EasyEdit's ``objective_optimization``), each the mean over the batch of a
request's mean negative log-likelihood over its target tokens t₁..t_T:

    prompt_last (FT-L)   −(1/T) Σⱼ log p(tⱼ | prompt): every target token scored at the prompt's
                         last position (the original's loss; a one-token target is the usual NLL)
    target_new (FT-M)    −(1/T) Σⱼ log p(tⱼ | prompt, t<ⱼ): teacher-forced on prompt + target, the
                         prompt masked out of the loss (``ft_m.py``)

What the originals do (github.com/kmeng01/rome ``baselines/ft/ft_main.py`` and ``hparams/FT``;
github.com/zjunlp/EasyEdit ``easyeditor/models/ft/ft_main.py`` and ``hparams/FT``), kept here:

- Q1 the target gets a leading space unless it has one (ROME; EasyEdit adds one even then);
- Q2 requests are cut into mini-batches of ``batch_size`` in their order; each mini-batch is one
  Adam step (``torch.optim.Adam``, ``lr``, ``weight_decay``), taken only when its loss is ≥ 1e-2;
  the clamp follows every mini-batch, stepped or not; ``num_steps`` passes ("epochs") over the
  batch, stopping early after a pass whose mean loss (weighted by mini-batch size) is < 1e-2;
- Q3 ``norm_constraint: false`` (the originals' "unconstr" files) trains without the clamp;
- Q4 ``kl_factor`` is declared by both originals and read by neither: only 0 is accepted here, so a
  value never silently does nothing.

Deviations (and why):

- D1 only the weight *matrix* is trained. The originals train every parameter whose name contains
  ``rewrite_module_tmp`` — on GPT-2 and GPT-J also the projection's bias; editfast's updates are
  matrices, so a GPT-2/GPT-J bias stays as it is. Llama-family models (SmolLM2) have no bias: the
  same parameters as the originals.
- D2 each row is padded on the right and read at its own positions; EasyEdit pads FT's batches on
  the left yet reads ``attention_mask.sum() − 1`` as the last position (``prompt_last``) and counts
  padding into its ``target_new`` mask, which is wrong for mini-batches of unequal lengths (both
  agree with this at a mini-batch of one, EasyEdit's default).
- D3 the target is tokenised on its own without special tokens and appended to the prompt's
  tokens; EasyEdit's ``target_new`` tokenises prompt + target as one text (the same tokens where
  the tokenizer splits at the target's leading space, as GPT-2's and SmolLM2's do) and on Llama
  adds a BOS to FT-L's target ids, which it then scores.
- D4 logits are computed (in float32) only at the positions the loss reads, not over the whole
  sequence: the same loss with less work.

Presets: ``gpt2-xl``, ``gpt-j-6b``: ROME's ``hparams/FT/*_constr.json`` (layer 0, 25 steps, lr 5e-4,
ε 5e-4 / 5e-5, ROME's mini-batch 128); ``llama-2-7b``: EasyEdit's ``hparams/FT/llama-7b.yaml``
(layer 21, 25 steps, lr 5e-4, unconstrained: EasyEdit's "FT-L" on Llama); ``smollm2-135m``: layer 0,
ε 1e-2, mini-batch 64, chosen on held-out facts (``bench/tune_ft.py``; docs/methods.md: grid and rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from editfast.core.errors import EditfastError, HParamsError
from editfast.data.requests import Request
from editfast.engine.kv import right_pad
from editfast.methods.base import Method, State
from editfast.methods.hparams import HParams
from editfast.methods.locate_then_edit.base import MODULE_KEYS
from editfast.methods.locate_then_edit.targets import target_text
from editfast.models.archs import output_logits
from editfast.models.update import Dense, Update, weight_param

STOP_LOSS = 1e-2  # the originals' threshold: no step below it, and a pass averaging below it ends the loop
OBJECTIVES = {"prompt_last": "ft-l", "target_new": "ft-m"}  # EasyEdit's objective_optimization -> method


@dataclass
class FTHyperParams(HParams):
    """The originals' FT keys (ROME's ``FTHyperParams``; EasyEdit adds ``objective_optimization``)."""

    num_steps: int = 25  # passes over the batch
    lr: float = 5e-4  # Adam's
    weight_decay: float = 0.0  # Adam's
    kl_factor: float = 0.0  # declared by the originals, never used: only 0
    norm_constraint: float | None = None  # ε of the L∞ clamp around the weights before the edit; None/false: none
    batch_size: int = 64  # requests per Adam step (EasyEdit's default; ROME's 128)
    objective_optimization: str = "prompt_last"
    # the originals' module-name keys: checked against the model adapter, never override it
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None

    RANGES: ClassVar[dict] = {"num_steps": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "kl_factor": ">= 0",
                              "norm_constraint": "> 0", "batch_size": ">= 1",
                              "objective_optimization": tuple(OBJECTIVES)}
    OBJECTIVE: ClassVar[str] = "prompt_last"  # the one objective the method of this class runs

    def validate(self) -> None:
        if self.norm_constraint is False:  # the originals' "unconstrained"
            self.norm_constraint = None
        super().validate()
        if self.kl_factor != 0:
            raise HParamsError(f"hparams: kl_factor={self.kl_factor!r} is not allowed; the original FT declares "
                               "kl_factor but never uses it, so only 0 is accepted")
        if self.objective_optimization != self.OBJECTIVE:
            name = OBJECTIVES[self.objective_optimization]
            raise HParamsError(f"hparams: objective_optimization={self.objective_optimization!r} is {name}'s; "
                               f"{OBJECTIVES[self.OBJECTIVE]} runs {self.OBJECTIVE!r} (edit with --method {name})")

    def check_modules(self, adapter: Any) -> None:
        """Raise if a module-name key names other modules than the adapter (EasyEdit's Llama files end
        ``rewrite_module_tmp`` with ``.weight``)."""
        for key, attr in MODULE_KEYS.items():
            given = getattr(self, key)
            if given is None or attr is None:
                continue
            if key == "rewrite_module_tmp" and given.endswith(".weight"):
                given = given[: -len(".weight")]
            if given != getattr(adapter, attr):
                raise HParamsError(f"hparams: {key}={getattr(self, key)!r} does not match the model "
                                   f"({getattr(adapter, attr)!r})")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "norm_constraint": False if self.norm_constraint is None else self.norm_constraint}


# -----------------------------------------------------------------------------------------------
# the equations (dtype-generic; tests check them in float64)


def clamp_to_ball(W: torch.Tensor, W0: torch.Tensor, eps: float) -> torch.Tensor:
    """The projection onto {W : ‖W − W₀‖∞ ≤ ε}, elementwise (the originals' ``torch.clamp``)."""
    return torch.clamp(W, min=W0 - eps, max=W0 + eps)


def request_nll(logits: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Each request's mean negative log-likelihood [n] over its scored tokens: row i of ``logits``
    [P, V] scores token ``labels[i]`` for request ``owner[i]``."""
    nll = F.cross_entropy(logits, labels, reduction="none")
    total = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add_(0, owner, nll)
    count = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add_(0, owner, torch.ones_like(nll))
    return total / count


# -----------------------------------------------------------------------------------------------
# the method


@dataclass
class _Rows:
    """A mini-batch's token rows and, per scored token, its row, the position whose logits score
    it, its id and its request (index in the mini-batch)."""

    ids: list[list[int]]
    row: list[int]
    pos: list[int]
    label: list[int]


def encode(tok, requests: Sequence[Request], objective: str) -> _Rows:
    ids, row, pos, label = [], [], [], []
    for i, r in enumerate(requests):
        prompt = tok(r.filled())["input_ids"]
        target = tok(target_text(r.target_new), add_special_tokens=False)["input_ids"]
        if not prompt or not target:
            raise EditfastError(f"request {r.case_id}: its prompt or target tokenises to nothing")
        last = len(prompt) - 1
        if objective == "prompt_last":  # every target token at the prompt's last position
            ids.append(list(prompt))
            pos += [last] * len(target)
        else:  # teacher-forced: target token j at the position before it
            ids.append(list(prompt) + list(target[:-1]))
            pos += [last + j for j in range(len(target))]
        row += [i] * len(target)
        label += list(target)
    return _Rows(ids, row, pos, label)


class FT(Method):
    name = "ft-l"
    summary = "constrained fine-tuning of the MLP output projection, loss at the prompt's last token (ROME's FT-L)"
    hparams_class = FTHyperParams
    presets = {
        # ROME's hparams/FT/gpt2-xl_constr.json and EleutherAI_gpt-j-6B_constr.json (mini-batch: ROME's default)
        "gpt2-xl": dict(layers=[0], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0, norm_constraint=5e-4,
                        batch_size=128),
        "gpt-j-6b": dict(layers=[0], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0, norm_constraint=5e-5,
                         batch_size=128),
        # EasyEdit's hparams/FT/llama-7b.yaml (prompt_last, unconstrained)
        "llama-2-7b": dict(layers=[21], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0,
                           norm_constraint=False, batch_size=1),
        "smollm2-135m": dict(layers=[0], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0,
                             norm_constraint=1e-2, batch_size=64),
        "tiny": dict(layers=[1], num_steps=10, lr=1e-2, norm_constraint=5e-3, batch_size=2),
    }
    default_batch_size = 1  # both originals edit one request at a time
    easyedit_alg = "FT"

    def claims(self, values: dict) -> bool:
        return values.get("objective_optimization", self.hparams_class.OBJECTIVE) == self.hparams_class.OBJECTIVE

    def sites(self, lm, hp) -> list[str]:
        return [f"{lm.adapter.rewrite_tmp.format(l)}.weight" for l in hp.layers]

    def edit(self, lm, requests, hp, state: State, templates, *, targets=None, trace=None, backend="fast",
             progress=False):
        if targets is not None:
            raise EditfastError(f"{self.name} optimises no target vectors; it takes no targets")
        trace = {} if trace is None else trace
        requests = list(requests)
        chunks = [encode(lm.tokenizer, requests[s: s + hp.batch_size], hp.objective_optimization)
                  for s in range(0, len(requests), hp.batch_size)]
        yield finetune(lm, self.sites(lm, hp), chunks, hp, trace)


def _loss(lm, rows: _Rows) -> torch.Tensor:
    """The mini-batch's loss: the mean over its requests of each one's mean NLL."""
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    ids, mask = right_pad(rows.ids, tok.pad_token_id if tok.pad_token_id is not None else 0, device)
    where = sorted(set(zip(rows.row, rows.pos)))  # each scored position once (prompt_last repeats one)
    at = {rp: k for k, rp in enumerate(where)}
    h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    r, p = torch.tensor(where, device=device).T
    logits = output_logits(model)(h[r, p]).float()
    pick = torch.tensor([at[rp] for rp in zip(rows.row, rows.pos)], device=device)
    owner = torch.tensor(rows.row, device=device)
    return request_nll(logits[pick], torch.tensor(rows.label, device=device), owner, len(rows.ids)).mean()


def finetune(lm, sites: list[str], chunks: list[_Rows], hp: FTHyperParams, trace: dict) -> list[Update]:
    """The originals' loop (Q2): Adam on the ``sites`` weights, the L∞ clamp after every mini-batch;
    returns ΔW per site as ``Dense`` [out, in]. The model's weights and gradient flags are as they
    were when it returns or raises."""
    model = lm.model
    params = [weight_param(model, s) for s in sites]
    for s in sites:  # an offloaded weight's values live outside the module: training them would change nothing
        if model.get_parameter(s).is_meta:
            raise EditfastError(f"fine-tuning cannot train {s}: a device map offloads it; load the model on one device")
    W0 = [p.detach().clone() for p, _ in params]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    losses: list[float] = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p, _ in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam([p for p, _ in params], lr=hp.lr, weight_decay=hp.weight_decay)
        with torch.enable_grad():
            for _ in range(hp.num_steps):
                total = 0.0
                for rows in chunks:
                    opt.zero_grad()
                    loss = _loss(lm, rows)
                    value = loss.item()
                    total += value * len(rows.ids)
                    if value >= STOP_LOSS:
                        loss.backward()
                        opt.step()
                    if hp.norm_constraint is not None:
                        with torch.no_grad():
                            for (p, _), w0 in zip(params, W0):
                                p.copy_(clamp_to_ball(p, w0, hp.norm_constraint))
                losses.append(total / sum(len(c.ids) for c in chunks))
                if losses[-1] < STOP_LOSS:
                    break
        deltas = [(p.detach() - w0).float() for (p, _), w0 in zip(params, W0)]
    finally:
        with torch.no_grad():
            for (p, _), w0 in zip(params, W0):
                p.copy_(w0)
                p.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
    trace["losses"] = losses
    return [Dense(s, (d.T if transposed else d).contiguous()) for s, d, (_, transposed) in zip(sites, deltas, params)]


METHOD = FT()
