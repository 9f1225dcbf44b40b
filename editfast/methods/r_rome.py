"""r-ROME (Gupta et al., 2024, "Rebuilding ROME"): ROME with its key inconsistency fixed.

The original ROME builds u from the template-averaged key k̄ but computes Λ with the bare
prompt's key and output: v = (v* − W k_bare) / (k_bareᵀ u). r-ROME uses the averaged key in both:
v = (v* − W̄k̄) / (k̄ᵀ u), where W̄k̄ is the module's output averaged over the same templates (W k̄
plus the bias, the module being linear). Then the edited layer maps k̄ exactly to v*; ROME's
update does so only for k_bare. Everything else is ROME's.
"""

from __future__ import annotations

from editfast.methods.rome import ROME


class RROME(ROME):
    name = "r-rome"
    summary = "ROME with the averaged key used in both vectors (Gupta et al., 2024)"
    easyedit_alg = "R-ROME"

    def key_and_output(self, x):
        return x.keys[:, 0], x.outs_per_template[0].mean(0)


METHOD = RROME()
