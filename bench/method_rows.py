"""Benchmark rows of the methods beyond MEMIT/ROME: AlphaEdit and EMMET here, KN (``kn_rows.py``).

- a sequential session (several batches, the accumulated keys carried) on the ``fast`` backend
  against the ``reference`` backend (the original algorithm step by step: z one request at a time,
  AlphaEdit's P (K Kᵀ + K_p K_pᵀ) formed every batch and its keys recomputed after it, EMMET's
  (λC)⁻¹ inverted for every layer of every batch); statistics excluded (both read the cached C);
- the solve alone at the model's real key width, after a few batches: what the projector kept on
  the device with P·K_pK_pᵀ updated in O(d²n) (AlphaEdit), or the inverse computed once (EMMET),
  saves against the original's per-batch d³ work.

    python bench/run.py --only methods [--quick]
"""

from __future__ import annotations

import torch

from bench.kernel_rows import device_name, median_time, row
from editfast.data.requests import load_dataset
from editfast.methods.locate_then_edit.base import LayerInputs, LocateState
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.registry import METHODS, make_hparams, resolve_hparams
from editfast.models.load import load_model
from editfast.models.update import restore
from editfast.session.session import EditSession


def session_pair(lm, method: str, reqs, bs: int) -> tuple[float, float, float]:
    """Seconds of the edits of one session per backend, and the max relative difference of the final
    weights (fast against reference)."""
    out, weights = {}, {}
    for backend in ("reference", "fast"):
        s = EditSession(lm, method, reqs, batch_size=bs, templates="fixed", evaluate=False, progress=False,
                        backend=backend)
        res = s.run()
        out[backend] = res.timings["edit_s"]
        weights[backend] = {k: lm.model.get_parameter(k).detach().clone() for k in s.sites}
        restore(lm, s.base)
    diff = max(((weights["fast"][k] - weights["reference"][k]).norm()
                / (weights["reference"][k] - s.base[k]).norm().clamp_min(1e-30)).item() for k in s.sites)
    return out["reference"], out["fast"], diff


def solve_stage(method: str, d: int, d_out: int, n: int, batches: int, dev: torch.device) -> tuple[float, float]:
    """Seconds per layer-solve after ``batches`` earlier batches, reference vs fast, at key width d."""
    m = METHODS[method]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g) / d ** 0.5
    C = (A @ A.T + 1e-3 * torch.eye(d)).to(dev)
    C = C * (0.05 / C.diagonal().mean())  # singular values around the AlphaEdit threshold
    hp = make_hparams(method, {"layers": [0]})
    K = (torch.randn(d, n, generator=g) * 0.3).to(dev)
    tgt = torch.randn(d_out, n, generator=g).to(dev)
    x = LayerInputs(0, 0, K.T[:, None], K, None, K, None, torch.zeros_like(tgt), tgt)

    class LM:
        class adapter:
            rewrite_tmp = "w.{}"

    times = {}
    for backend in ("reference", "fast"):
        state = LocateState(moments={0: Moment(C)})
        for _ in range(batches):
            m.restore_state(state, {"keys.layer0": (torch.randn(d, n, generator=g) * 0.3).to(dev)})
        m.solve(LM, x, hp, state, backend, {})  # warm: the projector / inverse of the fast path, once
        times[backend] = median_time(lambda: m.solve(LM, x, hp, state, backend, {}), repeats=3)
    return times["reference"], times["fast"]


def method_rows(model: str, quick: bool, device: str, dtype: str) -> list[dict]:
    """AlphaEdit's and EMMET's rows, then KN's (``kn_rows.py``)."""
    from bench.kn_rows import kn_rows

    return remedy_rows(model, quick, device, dtype) + kn_rows(model, quick, device, dtype)


def remedy_rows(model: str, quick: bool, device: str, dtype: str) -> list[dict]:
    lm = load_model(model, device=device, dtype=dtype)
    dev = device_name(torch.device(device))
    n, bs = (10, 5) if quick else (30, 10)
    reqs = load_dataset("counterfact", n)
    rows = []
    for method in ("alphaedit", "emmet"):
        warm = EditSession(lm, method, reqs[:2], templates="fixed", evaluate=False, progress=False)
        warm.run()  # statistics computed (or read) once, threads up
        restore(lm, warm.base)
        ref_s, fast_s, diff = session_pair(lm, method, reqs, bs)
        layers = resolve_hparams(method, lm.spec, lm.model.config).layers
        rows.append(row(f"{method}: session fast vs reference", dev,
                        f"{model}, n={n} in batches of {bs}, layers {layers}", dtype, ref_s, fast_s,
                        f"{n / fast_s:.2f} edits/s vs {n / ref_s:.2f}; final ΔW differs {diff:.1e} (relative)"))
    d_in = lm.adapter.rewrite_weight(lm.model, 0).shape[1 if not lm.adapter.weight_in_out else 0]
    d_out = lm.model.config.hidden_size
    for method in ("alphaedit", "emmet"):
        ref_s, fast_s = solve_stage(method, d_in, d_out, bs, 5, torch.device(device))
        what = "P (KKᵀ + K_pK_pᵀ) per batch vs P·K_pK_pᵀ kept" if method == "alphaedit" else \
            "(λC)⁻¹ per batch vs once per layer"
        rows.append(row(f"{method} solve: {what}", dev, f"d={d_in}, n={bs}, 5 earlier batches", "float32/float64",
                        ref_s, fast_s, "one layer's solve"))
    return rows
