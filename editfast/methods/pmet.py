"""PMET (Li et al., AAAI 2024, "PMET: Precise Model Editing in a Transformer"): MEMIT's mass edit of
the MLP weights, with targets found by optimising the attention and the MLP hidden states together
and only the MLP's used.

Targets (``optimize``): at the last edited layer L, one δ is added to the attention block's output
and one to the MLP block's output at the subject's last token of every prompt, both optimised in
one Adam (one batch for all facts, ``targets.optimize_targets`` with two sites). The loss is
MEMIT's with PMET's terms:

    nll_f · NLL + kl_factor · KL(cur ‖ init) + v_weight_decay · (‖δ_attn‖/‖a₀‖² + ‖δ_mlp‖/‖m₀‖²)

each δ clamped to clamp_norm_factor · the norm of its own initial activation (a₀, m₀) after each
step. nll_f is ``nll_loss_factor``, or 0.1 · nll_loss_factor for the step after one at which every
target token was the top prediction (in every rewriting prompt); at such a step the optimisation
also stops if the KL term is ≤ 0.01 (the 0.05 loss threshold and the step limit stay). The target
is z = m₀ + δ_mlp (the attention δ shapes it and is then dropped).

Update, per layer i of the n edited layers (bottom-up, on the model as edited so far), with keys K
as MEMIT's and C the layer's key statistics:

    R  = (z − m_L) / √(n − i)            m_L: MLP output at layer L, bare prompt, edited model
    ΔW = R Kᵀ (K Kᵀ + λC)⁻¹ = R ((λC + K Kᵀ)⁻¹ K)ᵀ,   λ = mom2_update_weight

kept as factors U = R, V = (λC + K Kᵀ)⁻¹ K (``solve.Moment.adj_keys``: float64 solve for the
reference backend, the factorise-once fp32 Woodbury path for the fast one).

How it differs from MEMIT (``memit.py``):
- targets: the MLP output of layer L (MEMIT: the decoder layer's output, the residual stream),
  optimised jointly with an attention-output δ; the weight decay sums both sites' terms; the NLL
  weight and the "all tokens top" stop above; the original's published values use more steps
  (30), a smaller learning rate (0.2) and a larger KL factor (1) for GPT-J;
- residual: m_L is the MLP output (MEMIT: the layer output), and the share of layer i is
  R / √(layers left) (MEMIT: R / (layers left)), so the lower layers take more than 1/n of it;
- λ: 6000 in the original's GPT-J file (MEMIT's GPT-J: 15000); the solve itself is MEMIT's.

Quirks of the original code (xpq-tech/PMET; EasyEdit's ``models/pmet`` is the same algorithm),
reproduced or noted:
- "every target token is the top prediction" is tested there as ``max_prob == prob`` on the mean
  over prompts of exp(mean top log-probability) and exp(−NLL): equal exactly when each target
  token is the top one. editfast tests that per token (the same outcome, independent of the
  summation order, which is not fixed on a GPU).
- the 0.1 factor applies to the step after the one that found the tokens on top (the loss being
  differentiated at that step still has the previous factor); the KL test compares the weighted KL
  (kl_factor · KL) with 0.01.
- the δ at the attention output changes the MLP's input in a sequential block (GPT-2, Llama) but
  m₀ is recorded with δ = 0, so z does not include that change; in GPT-J's parallel block the two
  sites are independent. Reproduced.
- the original solves with an explicit ``torch.inverse`` of K Kᵀ + λC in float64; the reference
  backend here uses ``torch.linalg.solve`` in float64 (the same matrix, ~1e-12 apart).
- the original can also update the attention output projections (two ``rewrite_module_tmps``);
  its published configurations update only the MLP's, and so does editfast
  (``rewrite_module_tmps`` naming an attention module is refused).
- the original's hparams files name the output projections (``mlp_module_tmp`` =
  ``...mlp.fc_out``, ``attn_module_tmp`` = ``...attn.out_proj``); those files load unchanged here
  and editfast reads the blocks' outputs, which are the projections' outputs.
- context templates: MEMIT's ([["{}"], five generated prefixes of 10 tokens]).

Presets: GPT-J 6B from the original repository (hparams/PMET/EleutherAI_gpt-j-6B.json); Llama-2
7B from EasyEdit (hparams/PMET/llama-7b.yaml); neither publishes GPT-2 XL values, so there is no
gpt2-xl preset (give --hparams). SmolLM2-135M: layers and statistics as MEMIT's SmolLM2 preset,
EasyEdit's Llama-style optimisation (20 steps, lr 0.5, KL 0.0625) with MEMIT's clamp 0.75, and
λ = 500 chosen by MEMIT's rule (the largest λ reaching ≥ 0.95 efficacy on held-out facts) with
``bench/tune_pmet.py``; the facts, the λ tried and what they measured are in bench/RESULTS.md
("PMET: the SmolLM2 preset"). The clamp bounds δ_mlp by the MLP output's norm, much smaller than
the residual stream's that MEMIT's clamp uses; the clamp is not tuned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from editfast.core.errors import HParamsError
from editfast.methods.locate_then_edit.base import LocateHParams, LocateThenEdit
from editfast.methods.locate_then_edit.targets import Objective, optimize_targets
from editfast.models.update import LowRank

# The original's schedule constants (compute_zs.py): NLL weight after an all-top step, KL stop.
TOP_NLL_SCALE, TOP_KL_STOP = 0.1, 0.01
# Names the original's hparams files give the attention output projection (attn_module_tmp):
# GPT-J out_proj, Llama o_proj, GPT-NeoX dense, GPT-2 c_proj; its output is the block's output.
ATTN_OUT_PROJ = ("out_proj", "o_proj", "dense", "c_proj")


@dataclass
class PMETHyperParams(LocateHParams):
    # Defaults: the original's GPT-J file (hparams/PMET/EleutherAI_gpt-j-6B.json).
    v_num_grad_steps: int = 30
    v_lr: float = 0.2
    kl_factor: float = 1.0
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 6000.0  # λ
    nll_loss_factor: float = 1.0
    layer_selection: str = "all"
    rewrite_module_tmps: list[str] | None = None  # the original's key; only the MLP projection is allowed

    RANGES: ClassVar[dict] = {"mom2_update_weight": "> 0", "nll_loss_factor": "> 0", "layer_selection": ("all",)}

    def validate(self) -> None:
        super().validate()
        if sorted(self.layers) != list(self.layers):  # unique already (HParams.validate)
            raise HParamsError(f"hparams: PMET layers must be strictly increasing, got {self.layers}")
        if self.rewrite_module_tmps is not None and len(self.rewrite_module_tmps) != 1:
            raise HParamsError(f"hparams: rewrite_module_tmps={self.rewrite_module_tmps} is not allowed; PMET here "
                               "updates the MLP output projection only (one module)")

    def check_modules(self, adapter) -> None:
        """The original's names: mlp/attn_module_tmp may name the blocks or their output projections;
        rewrite_module_tmps must be [the MLP output projection]; where it is given, the original
        ignores rewrite_module_tmp (its GPT-J file names the attention there), and so does this check."""
        if self.rewrite_module_tmps is not None and self.rewrite_module_tmps != [adapter.rewrite_tmp]:
            raise HParamsError(f"hparams: rewrite_module_tmps={self.rewrite_module_tmps} does not match the model "
                               f"([{adapter.rewrite_tmp!r}]); PMET here updates the MLP output projection only")
        if self.mlp_module_tmp not in (None, adapter.mlp_tmp, adapter.rewrite_tmp):
            raise HParamsError(f"hparams: mlp_module_tmp={self.mlp_module_tmp!r} does not match the model "
                               f"({adapter.mlp_tmp!r} or {adapter.rewrite_tmp!r})")
        attn_ok = (None, adapter.attn_tmp, *(f"{adapter.attn_tmp}.{p}" for p in ATTN_OUT_PROJ))
        if self.attn_module_tmp not in attn_ok:
            raise HParamsError(f"hparams: attn_module_tmp={self.attn_module_tmp!r} does not match the model "
                               f"({adapter.attn_tmp!r} or its output projection)")
        rest = replace(self, mlp_module_tmp=None, attn_module_tmp=None,
                       rewrite_module_tmp=None if self.rewrite_module_tmps is not None else self.rewrite_module_tmp)
        super(PMETHyperParams, rest).check_modules(adapter)


class PMET(LocateThenEdit):
    name = "pmet"
    summary = "precise mass editing: attention and MLP targets optimised together, MLP weights edited (Li et al., 2024)"
    hparams_class = PMETHyperParams
    presets = {
        # xpq-tech/PMET hparams/PMET/EleutherAI_gpt-j-6B.json
        "gpt-j-6b": dict(layers=[3, 4, 5, 6, 7, 8], v_loss_layer=27, v_num_grad_steps=30, v_lr=0.2,
                         v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=1.0, mom2_update_weight=6000,
                         nll_loss_factor=1.0, mom2_n_samples=100000),
        # EasyEdit hparams/PMET/llama-7b.yaml (a Llama-2 7B checkpoint)
        "llama-2-7b": dict(layers=[4, 5, 6, 7, 8], v_loss_layer=31, v_num_grad_steps=20, v_lr=0.5,
                           v_weight_decay=0.5, clamp_norm_factor=1.0, kl_factor=0.0625, mom2_update_weight=15000,
                           nll_loss_factor=1.0, mom2_n_samples=100000),
        # λ tuned on 30 held-out known CounterFact facts (bench/tune_pmet.py; the module docstring)
        "smollm2-135m": dict(layers=[4, 5, 6, 7, 8], v_loss_layer=29, v_num_grad_steps=20, v_lr=0.5,
                             v_weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=500,
                             nll_loss_factor=1.0, mom2_n_samples=1000),
        "tiny": dict(layers=[1, 2], v_loss_layer=3, mom2_n_samples=128, mom2_max_tokens=64),
    }
    default_batch_size = None  # all at once
    template_shape = "groups"
    target_site = "mlp"  # z and the residual's current value: the MLP output of the last layer

    @staticmethod
    def objective(hp) -> Objective:
        return Objective(nll_factor=hp.nll_loss_factor, top_nll_factor=TOP_NLL_SCALE * hp.nll_loss_factor,
                         top_kl_stop=TOP_KL_STOP)

    def optimize(self, lm, requests, hp, templates: list[list[str]], trace: dict | None = None, backend: str = "fast",
                 progress: bool = False) -> torch.Tensor:
        """The FFN targets z [d_model, n] of ``requests``: attention and MLP outputs of the last layer
        optimised together (all requests in one batch on the fast backend). ``trace`` receives both
        sites' initial values and deltas, the losses and the seconds spent."""
        trace = {} if trace is None else trace
        adapter, model = lm.adapter, lm.model
        layer = hp.layers[-1]
        sites = [adapter.attn_tmp.format(layer), adapter.mlp_tmp.format(layer)]
        flat = [t for g in templates for t in g]
        t0 = time.perf_counter()
        res = optimize_targets(lm, list(requests), hp, flat, sites, layer, hp.loss_layer(adapter.num_layers(model)),
                               backend=backend, progress=progress, objective=self.objective(hp))
        trace["targets_s"] = trace.get("targets_s", 0.0) + time.perf_counter() - t0
        init = torch.stack([x.target_init for x in res], 2)  # [2, d, n]
        delta = torch.stack([x.delta for x in res], 2)
        trace.update(target_init=init[1], z_delta=delta[1], attn_target_init=init[0], attn_delta=delta[0],
                     losses=[x.losses for x in res])
        return init[1] + delta[1]

    def solve(self, lm, x, hp, state, backend, trace):
        tgt = x.targets - x.cur
        adj_k = state.moments[x.layer].adj_keys(x.keys, hp.mom2_update_weight, backend)
        resid = tgt.to(adj_k.dtype) / math.sqrt(len(hp.layers) - x.index)
        l = x.layer
        trace.update({f"K.layer{l}": x.keys, f"cur_zs.layer{l}": x.cur, f"targets.layer{l}": tgt,
                      f"adj_k.layer{l}": adj_k, f"resid.layer{l}": resid, "zs": x.targets})
        return LowRank(f"{lm.adapter.rewrite_tmp.format(l)}.weight", resid, adj_k)


METHOD = PMET()
