"""Layer 1, the base: what every other layer may use and that uses nothing of editfast.

Errors a user can cause (``errors``), file and cache locations and atomic writes (``paths``), the
versions and library differences editfast adapts to (``compat``), the CPU threads' wait policy
(``threads``) and torchrun's process group (``distributed``). Imports: the standard library,
torch, and other ``editfast.core`` modules only. ``editfast.kernels`` is the same layer.
"""
