"""Solves against the key statistics C, factorised once and reused.

MEMIT needs adj_k = (λC + K Kᵀ)⁻¹ K for every layer and every batch. The reference (the original
code) solves the d×d system in float64 each time. The fast path factorises λC once per layer
for the whole run (Cholesky, fp32, on the model's device) and uses Woodbury:

    (λC + K Kᵀ)⁻¹ K = Y (I + Kᵀ Y)⁻¹,   Y = (λC)⁻¹ K,

so a batch costs two triangular solves with n right-hand sides and an n×n Cholesky instead of a
d×d factorisation. The result is checked by its residual; if a factorisation fails or the
residual is above ``tol`` the float64 solve runs instead, and the fallback is reported, never
silent. ROME's C⁻¹ is computed once per layer (fp32 ``torch.inverse``, as the original).

The same object serves the methods built on other solves against C: EMMET's (λC + νI)⁻¹
(``inverse64``: computed once per layer, where the original inverts the d×d matrix in float64 for
every layer of every batch) and AlphaEdit's null-space projector (``null_projector``: fp32 SVD
once per layer, kept on the model's device).
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
    _cache: dict = field(default_factory=dict)
    reports: list = field(default_factory=list)

    def inverse(self) -> torch.Tensor:
        """fp32 C⁻¹ (ROME), once."""
        if self._inv is None:
            self._inv = torch.inverse(self.C.float())
        return self._inv

    def inverse64(self, lam: float, nu: float = 0.0, backend: str = "fast") -> torch.Tensor:
        """(λC + νI)⁻¹ in float64, an explicit inverse as EMMET's original. The reference computes it on
        every call (the original: every layer of every batch); the fast path once per (λ, ν)."""
        if backend == "reference":
            return regularised_inverse(self.C, lam, nu)
        key = ("inv64", lam, nu)
        if key not in self._cache:
            self._cache[key] = regularised_inverse(self.C, lam, nu)
        return self._cache[key]

    def null_projector(self, threshold: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """AlphaEdit's P = U_s U_sᵀ over the singular vectors of C (fp32 SVD) whose singular value is
        strictly below ``threshold`` (compared in fp32), and the singular values; computed once."""
        key = ("null", threshold)
        if key not in self._cache:
            U, S, _ = torch.linalg.svd(self.C.to(device=device, dtype=torch.float32), full_matrices=False)
            small = U[:, S < torch.tensor(threshold, dtype=torch.float32)]
            self._cache[key] = (small @ small.T, S)
        return self._cache[key]

    def use_projector(self, threshold: float, P: torch.Tensor, S: torch.Tensor) -> None:
        """Use a projector computed elsewhere (the original's, or one shared by a study's sessions)."""
        self._cache[("null", threshold)] = (P, S)

    def adj_keys(self, K: torch.Tensor, lam: float, backend: str = "fast") -> torch.Tensor:
        """(λC + K Kᵀ)⁻¹ K for keys K [d, n]."""
        if backend == "reference":
            return solve_reference(self.C, K, lam)
        if backend != "fast":
            raise ValueError(f"backend must be 'fast' or 'reference', got {backend!r}")
        device = K.device
        if lam not in self._cache:
            L, info = torch.linalg.cholesky_ex(lam * self.C.to(device=device, dtype=torch.float32))
            self._cache[lam] = None if int(info) else L
        L = self._cache[lam]
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


def regularised_inverse(C: torch.Tensor, lam: float, nu: float = 0.0) -> torch.Tensor:
    """(λC + νI)⁻¹ in float64, as EMMET's original (an explicit inverse)."""
    A = lam * C.double()
    if nu:
        A = A + nu * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.inverse(A)


def residual(C: torch.Tensor, K: torch.Tensor, lam: float, adj: torch.Tensor) -> float:
    """‖(λC + K Kᵀ) adj − K‖ / ‖K‖, computed without forming K Kᵀ."""
    dt = adj.dtype
    Kd, Cd = K.to(dt), C.to(device=adj.device, dtype=dt)
    r = lam * (Cd @ adj) + Kd @ (Kd.T @ adj) - Kd
    return (r.norm() / Kd.norm().clamp_min(1e-30)).item()
