"""MEMIT (Meng et al., 2023): many facts at once, the residual spread over several layers.

For each layer l (in order, on the model as edited so far): keys K at the subject's last token
(bare template weighted ½, the others share ½), residual R = (z − h_zlayer) / (layers left), and
ΔW_l = R Kᵀ (λC_l + K Kᵀ)⁻¹, kept as factors U = R, V = (λC_l + K Kᵀ)⁻¹ K
(see ``solve.Moment`` for the reference float64 solve and the fast factorise-once path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editfast.core.errors import HParamsError
from editfast.methods.locate_then_edit.base import LocateHParams, LocateThenEdit
from editfast.models.update import LowRank


@dataclass
class MEMITHyperParams(LocateHParams):
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 20000.0  # λ
    layer_selection: str = "all"

    RANGES: ClassVar[dict] = {"mom2_update_weight": "> 0", "layer_selection": ("all",)}

    def validate(self) -> None:
        super().validate()
        if sorted(self.layers) != list(self.layers):  # unique already (HParams.validate)
            raise HParamsError(f"hparams: MEMIT layers must be strictly increasing, got {self.layers}")


class MEMIT(LocateThenEdit):
    name = "memit"
    summary = "mass-editing: a batch of facts spread over several MLP layers (Meng et al., 2023)"
    easyedit_alg = "MEMIT"
    hparams_class = MEMITHyperParams
    # The MEMIT repository's values; Llama's from EasyEdit; SmolLM2's λ tuned here (docs/hparams.md).
    presets = {
        "gpt2-xl": dict(layers=[13, 14, 15, 16, 17], v_loss_layer=47, clamp_norm_factor=0.75,
                        mom2_update_weight=20000, mom2_n_samples=100000),
        "gpt-j-6b": dict(layers=[3, 4, 5, 6, 7, 8], v_loss_layer=27, v_num_grad_steps=25, clamp_norm_factor=0.75,
                         mom2_update_weight=15000, mom2_n_samples=100000),
        "llama-2-7b": dict(layers=[4, 5, 6, 7, 8], v_loss_layer=31, v_num_grad_steps=25, v_weight_decay=1e-3,
                           clamp_norm_factor=4, mom2_update_weight=15000, mom2_n_samples=100000),
        # λ tuned on 30 held-out known facts (bench/tune_preset.py; docs/hparams.md, "SmolLM2 preset").
        "smollm2-135m": dict(layers=[4, 5, 6, 7, 8], v_loss_layer=29, clamp_norm_factor=0.75,
                             mom2_update_weight=2000, mom2_n_samples=1000),
        "tiny": dict(layers=[1, 2], v_loss_layer=3, mom2_n_samples=128, mom2_max_tokens=64),
    }
    default_batch_size = None  # all at once
    template_shape = "groups"
    target_site = "layer"

    def solve(self, lm, x, hp, state, backend, trace):
        tgt = x.targets - x.cur
        adj_k = state.moments[x.layer].adj_keys(x.keys, hp.mom2_update_weight, backend)
        resid = tgt.to(adj_k.dtype) / (len(hp.layers) - x.index)
        l = x.layer
        trace.update({f"K_per_template.layer{l}": x.keys_per_template, f"K.layer{l}": x.keys,
                      f"cur_zs.layer{l}": x.cur, f"targets.layer{l}": tgt, f"adj_k.layer{l}": adj_k,
                      f"resid.layer{l}": resid, "zs": x.targets})
        return LowRank(f"{lm.adapter.rewrite_tmp.format(l)}.weight", resid, adj_k)


METHOD = MEMIT()
