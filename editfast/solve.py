"""Solves against the key statistics C, factorised once and reused.

MEMIT needs adj_k = (λC + K Kᵀ)⁻¹ K for every layer and every batch. The reference (the original
code) solves the d×d system in float64 each time. The fast path factorises λC once per layer
for the whole run (Cholesky, fp32, on the model's device) and uses Woodbury:

    (λC + K Kᵀ)⁻¹ K = Y (I + Kᵀ Y)⁻¹,   Y = (λC)⁻¹ K,

so a batch costs two triangular solves with n right-hand sides and an n×n Cholesky instead of a
d×d factorisation. The result is checked by its residual; if a factorisation fails or the
residual is above ``tol`` the float64 solve runs instead, and the fallback is reported, never
silent. ROME's C⁻¹ is computed once per layer (fp32 ``torch.inverse``, as the original).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

RESIDUAL_TOL = 1e-4


@dataclass
class Moment:
    """The second moment C of one layer's keys, with its factorisations cached."""

    C: torch.Tensor
    _inv: torch.Tensor | None = None
    _chol: dict = field(default_factory=dict)
    reports: list = field(default_factory=list)

    def inverse(self) -> torch.Tensor:
        """fp32 C⁻¹ (ROME), once."""
        if self._inv is None:
            self._inv = torch.inverse(self.C.float())
        return self._inv

    def adj_keys(self, K: torch.Tensor, lam: float, backend: str = "fast") -> torch.Tensor:
        """(λC + K Kᵀ)⁻¹ K for keys K [d, n]."""
        if backend == "reference":
            return solve_reference(self.C, K, lam)
        if backend != "fast":
            raise ValueError(f"backend must be 'fast' or 'reference', got {backend!r}")
        device = K.device
        if lam not in self._chol:
            L, info = torch.linalg.cholesky_ex(lam * self.C.to(device=device, dtype=torch.float32))
            self._chol[lam] = None if int(info) else L
        L = self._chol[lam]
        if L is not None:
            Kf = K.float()
            Y = torch.cholesky_solve(Kf, L)
            S = torch.eye(Kf.shape[1], device=device) + Kf.T @ Y
            Ls, info = torch.linalg.cholesky_ex(S)
            if not int(info):
                adj = Y @ torch.cholesky_solve(torch.eye(S.shape[0], device=device), Ls)
                resid = residual(self.C, K, lam, adj)
                if resid <= RESIDUAL_TOL:
                    self.reports.append({"solve": "cholesky-woodbury fp32", "residual": resid})
                    return adj
                reason = f"relative residual {resid:.1e} > {RESIDUAL_TOL:.0e}"
            else:
                reason = "Cholesky of I + KᵀY failed"
        else:
            reason = "Cholesky of λC failed (C not positive definite in fp32)"
        warnings.warn(f"fp32 solve rejected ({reason}); using the float64 solve", RuntimeWarning, stacklevel=2)
        adj = solve_reference(self.C, K, lam)
        self.reports.append({"solve": "float64 fallback", "reason": reason,
                             "residual": residual(self.C, K, lam, adj)})
        return adj


def solve_reference(C: torch.Tensor, K: torch.Tensor, lam: float) -> torch.Tensor:
    """The original: torch.linalg.solve(λC + K Kᵀ, K) in float64."""
    K = K.double()
    return torch.linalg.solve(lam * C.to(K.device).double() + K @ K.T, K)


def residual(C: torch.Tensor, K: torch.Tensor, lam: float, adj: torch.Tensor) -> float:
    """‖(λC + K Kᵀ) adj − K‖ / ‖K‖, computed without forming K Kᵀ."""
    dt = adj.dtype
    Kd, Cd = K.to(dt), C.to(device=adj.device, dtype=dt)
    r = lam * (Cd @ adj) + Kd @ (Kd.T @ adj) - Kd
    return (r.norm() / Kd.norm().clamp_min(1e-30)).item()


def as_moment(x) -> Moment:
    return x if isinstance(x, Moment) else Moment(x)
