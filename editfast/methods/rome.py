"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection per fact.

ΔW = v uᵀ with u = C⁻¹k / ‖C⁻¹k‖ (k averaged over the context templates) and
v = (v* − W k_bare) / (k_bareᵀ u), reproducing the original code's use of the bare prompt's key
in the right vector (golden README, quirk Q1; ``r_rome.py`` fixes it). Facts are applied one
after another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from editfast.core.errors import HParamsError
from editfast.methods.locate_then_edit.base import LocateHParams, LocateThenEdit
from editfast.models.update import LowRank


@dataclass
class ROMEHyperParams(LocateHParams):
    # Lengths and counts of the generated context templates: [[length, count], ...].
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])

    RANGES: ClassVar[dict] = {"context_template_length_params": ">= 1"}

    def validate(self) -> None:
        super().validate()
        if len(self.layers) != 1:
            raise HParamsError(f"hparams: ROME edits exactly one layer, got layers={self.layers}")
        if any(len(p) != 2 for p in self.context_template_length_params):
            raise HParamsError(f"hparams: context_template_length_params={self.context_template_length_params} "
                               "is not allowed; it must list [length, count] pairs")


class ROME(LocateThenEdit):
    name = "rome"
    summary = "rank-one model editing: one fact at a time in one MLP layer (Meng et al., 2022)"
    easyedit_alg = "ROME"
    hparams_class = ROMEHyperParams
    # The ROME repository's values; Llama's from EasyEdit's hparams/ROME/llama-7b.yaml (no C⁻¹:
    # mom2_adjustment false there); SmolLM2's layer as MEMIT's middle.
    presets = {
        "gpt2-xl": dict(layers=[17], v_loss_layer=47, clamp_norm_factor=4, v_weight_decay=0.5, mom2_n_samples=100000),
        "gpt-j-6b": dict(layers=[5], v_loss_layer=27, clamp_norm_factor=4, mom2_n_samples=100000),
        "llama-2-7b": dict(layers=[5], v_loss_layer=31, v_num_grad_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4,
                           mom2_adjustment=False, mom2_n_samples=100000),
        "smollm2-135m": dict(layers=[5], v_loss_layer=29, clamp_norm_factor=4, mom2_n_samples=1000),
        "tiny": dict(layers=[1], v_loss_layer=3, mom2_n_samples=128, mom2_max_tokens=64),
    }
    default_batch_size = 1
    max_batch_size = 1
    template_shape = "flat"
    target_site = "mlp"

    def needs_statistics(self, hp) -> bool:
        return hp.mom2_adjustment

    def trace_targets(self, trace, init, delta, losses):
        trace.update(target_init=init[:, 0], delta=delta[:, 0], losses=losses[0])

    def left_vector(self, x, hp, state, trace) -> torch.Tensor:
        """u = C⁻¹k̄ / ‖C⁻¹k̄‖ (k̄: the template-averaged key)."""
        k_avg = x.keys[:, 0]
        if hp.mom2_adjustment:
            inv = state.moments[x.layer].inverse().to(device=k_avg.device, dtype=k_avg.dtype)
            u_un = inv @ k_avg
            trace["inv_mom2"] = inv
        else:
            u_un = k_avg
        trace.update(k_per_template=x.keys_per_template[0], k_avg=k_avg, u_unnormalized=u_un)
        return u_un / u_un.norm()

    def key_and_output(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and the module output that Λ is computed with: the bare prompt's (the original)."""
        return x.k_bare[:, 0], x.w_k_bare[:, 0]

    def solve(self, lm, x, hp, state, backend, trace):
        u = self.left_vector(x, hp, state, trace)
        target = x.targets[:, 0]
        k, w_k = self.key_and_output(x)
        division = k @ u
        v = (target - w_k) / division
        trace.update(u=u, target=target, k_bare=x.k_bare[:, 0], w_k_bare=x.w_k_bare[:, 0], division_factor=division,
                     v=v)
        return LowRank(f"{lm.adapter.rewrite_tmp.format(x.layer)}.weight", v[:, None], u[:, None])


METHOD = ROME()
