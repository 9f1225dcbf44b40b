"""Curves of sequential editing: how far the weights drift, and plots of ability against edits.

    weight_change(W0, W)                 # l1, rel_share, fro0, fro, fro_growth, spectral, n
    sum_weight_changes({name: wc, ...})  # the same keys, totalled over matrices
    plot_curve(curve, "run.png")         # one run: edit metrics, task metrics, weight drift
    plot_study([curve, ...], "plots/")   # one PNG per task, weights.png, edit_metrics.png

A curve is {"label", "model", "method", "points": [{"edits", "seconds", "edit_metrics",
"tasks": {task: {"primary", "higher_is_better", "metrics", "stderr", "n"}},
"weights": {"total", "per_matrix"}}, ...]}; any field of a point may be missing or null.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from editfast.core.paths import atomic_path
from editfast.eval.edit_metrics import HEADLINE_EDIT_METRICS

EXACT_SPECTRAL_MAX = 2048  # min(shape) up to which the spectral norm is an exact SVD


def spectral_norm(D: torch.Tensor, exact_max: int = EXACT_SPECTRAL_MAX, block: int = 8, iters: int = 300,
                  tol: float = 1e-9) -> float:
    """Largest singular value of a 2-D D: exact SVD for small matrices, else seeded block power iteration."""
    D = D.double()
    if min(D.shape) <= exact_max:
        return torch.linalg.matrix_norm(D, ord=2).item()
    if D.shape[0] < D.shape[1]:
        D = D.T
    g = torch.Generator(device="cpu").manual_seed(0)
    Q = torch.randn(D.shape[1], min(block, D.shape[1]), generator=g, dtype=torch.float64).to(D.device)
    prev = 0.0
    for _ in range(iters):  # subspace iteration on DᵀD: converges in a few steps on a low-rank D
        Q = torch.linalg.qr(D.T @ (D @ Q)).Q
        s = torch.linalg.matrix_norm(D @ Q, ord=2).item()
        if abs(s - prev) <= tol * s:
            break
        prev = s
    return s


def weight_change(W0: torch.Tensor, W: torch.Tensor, thresholds=(0.077, 0.171)) -> dict:
    """How far W moved from W0, in float64 on their device.

    l1: sum |W - W0| (the "Manhattan distance" of the 2024 editing-damage study); rel_share[str(t)]:
    share of elements with |ΔW / W0| > t (an element with W0 = 0 counts iff it changed); fro0, fro:
    Frobenius norms of W0 and W; fro_growth = fro / fro0 - 1; spectral: largest singular value of ΔW.
    """
    if W0.shape != W.shape:
        raise ValueError(f"shapes differ: {tuple(W0.shape)} vs {tuple(W.shape)}")
    W0, W = W0.detach().double(), W.detach().to(W0.device).double()
    D = W - W0
    a0, ad = W0.abs(), D.abs()
    n = W0.numel()
    fro0, fro = torch.linalg.vector_norm(W0).item(), torch.linalg.vector_norm(W).item()
    return {"l1": ad.sum().item(),
            "rel_share": {str(t): (ad > t * a0).sum().item() / n if n else 0.0 for t in thresholds},
            "fro0": fro0, "fro": fro, "fro_growth": fro / fro0 - 1 if fro0 else math.nan,
            "spectral": spectral_norm(D.reshape(D.shape[0], -1) if D.dim() != 2 else D) if n else 0.0, "n": n}


def sum_weight_changes(per_matrix: dict[str, dict]) -> dict:
    """Totals over matrices: l1 summed, rel_share weighted by n, fro as root of summed squares, spectral max."""
    wcs = list(per_matrix.values())
    n = sum(w["n"] for w in wcs)
    fro0 = math.sqrt(sum(w["fro0"] ** 2 for w in wcs))
    fro = math.sqrt(sum(w["fro"] ** 2 for w in wcs))
    keys = wcs[0]["rel_share"] if wcs else {}
    return {"l1": sum(w["l1"] for w in wcs),
            "rel_share": {t: sum(w["rel_share"][t] * w["n"] for w in wcs) / n if n else 0.0 for t in keys},
            "fro0": fro0, "fro": fro, "fro_growth": fro / fro0 - 1 if fro0 else math.nan,
            "spectral": max((w["spectral"] for w in wcs), default=0.0), "n": n}


# ---- plots --------------------------------------------------------------------------------------

def _plt():
    import matplotlib  # ~0.5 s: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (idem)

    return plt


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.nan


def _task_series(curve: dict, task: str):
    """(edits, value, stderr, primary, higher_is_better) of a task's primary metric; points without it skipped."""
    xs, ys, es, primary, hib = [], [], [], None, True
    for p in curve.get("points") or []:
        t = (p.get("tasks") or {}).get(task)
        if not t or p.get("edits") is None or t.get("primary") not in (t.get("metrics") or {}):
            continue
        primary, hib = t["primary"], t.get("higher_is_better", True)
        xs.append(p["edits"])
        ys.append(_num(t["metrics"][primary]))
        se = _num((t.get("stderr") or {}).get(primary))
        es.append(0.0 if math.isnan(se) else se)
    return xs, ys, es, primary, hib


def _weight_series(curve: dict, key: str):
    pts = [(p["edits"], _num(((p.get("weights") or {}).get("total") or {}).get(key)))
           for p in curve.get("points") or [] if p.get("edits") is not None]
    pts = [(x, y) for x, y in pts if not math.isnan(y)]
    return [x for x, _ in pts], [y for _, y in pts]


def _edit_series(curve: dict, metric: str):
    pts = [(p["edits"], _num(p["edit_metrics"].get(metric))) for p in curve.get("points") or []
           if p.get("edits") is not None and p.get("edit_metrics")]
    pts = [(x, y) for x, y in pts if not math.isnan(y)]
    return [x for x, _ in pts], [y for _, y in pts]


def _edit_metric_names(curve: dict) -> list[str]:
    names: list[str] = []
    for p in curve.get("points") or []:
        names += [k for k in (p.get("edit_metrics") or {}) if k not in names]
    first = HEADLINE_EDIT_METRICS
    return sorted(names, key=lambda k: (k not in first, first.index(k) if k in first else 0))


def _task_names(curves: list[dict]) -> list[str]:
    names: list[str] = []
    for c in curves:
        for p in c.get("points") or []:
            names += [k for k in (p.get("tasks") or {}) if k not in names]
    return names


def _xaxis(ax, xs: list) -> None:
    """Label the edits axis; symlog when the edit counts span orders of magnitude (0, 1, 10, ..., 1000)."""
    pos = [x for x in xs if x > 0]
    if pos and max(pos) >= 100 * max(min(pos), 1):
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("number of edits")
    ax.grid(alpha=0.3)


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    return path


def _empty(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_curve(curve: dict, path) -> Path:
    """One run as a PNG: edit metrics, each task's primary metric (± stderr), weight L1 and spectral norm."""
    plt = _plt()
    xs_all = [p["edits"] for p in curve.get("points") or [] if p.get("edits") is not None]
    panels = []  # (title, draw(ax))
    edit_names = _edit_metric_names(curve)
    if edit_names:
        def draw_edit(ax):
            for m in edit_names:
                ax.plot(*_edit_series(curve, m), marker="o", label=m)
            ax.set_ylabel("edit metric")
            ax.legend(fontsize=7)
        panels.append(("edit metrics", draw_edit))
    for task in _task_names([curve]):
        xs, ys, es, primary, hib = _task_series(curve, task)
        if xs:
            def draw_task(ax, xs=xs, ys=ys, es=es, primary=primary, hib=hib, task=task):
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{task} {primary} ± stderr")
                ax.set_ylabel(primary + ("" if hib else " (lower is better)"))
                ax.legend(fontsize=7)
            panels.append((task, draw_task))
    for key, name in (("l1", "L1 drift ‖ΔW‖₁"), ("spectral", "spectral norm ‖ΔW‖₂")):
        xs, ys = _weight_series(curve, key)
        if xs:
            def draw_w(ax, xs=xs, ys=ys, name=name):
                ax.plot(xs, ys, marker="o", color="C3", label=name + " (all matrices)")
                ax.set_ylabel(name)
                ax.legend(fontsize=7)
            panels.append((name, draw_w))
    cols = min(3, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(panels):
            ax.set_title(panels[i][0], fontsize=10)
            panels[i][1](ax)
            _xaxis(ax, xs_all)
        elif panels:
            ax.axis("off")
        else:
            _empty(ax)
    fig.suptitle(f"{curve.get('label', '')} · {curve.get('model', '')}")
    fig.tight_layout()
    return _save(fig, path)


def plot_study(runs: list[dict], out_dir, tasks: list[str] | None = None) -> list[Path]:
    """Runs compared: out_dir/<task>.png (primary metric ± stderr against edits, a line per run),
    weights.png (L1 drift) and edit_metrics.png (each run's first edit metric). Returns the paths."""
    plt = _plt()
    out_dir = Path(out_dir)
    xs_all = [p["edits"] for c in runs for p in c.get("points") or [] if p.get("edits") is not None]
    models = sorted({c.get("model", "") for c in runs} - {""})
    paths = []

    def figure(title, ylabel, series):  # series: [(label, xs, ys, yerr or None)]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for i, (label, xs, ys, es) in enumerate(series):
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=f"C{i % 10}", label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            _empty(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title + (f" · {', '.join(models)}" if models else ""))
        _xaxis(ax, xs_all)
        fig.tight_layout()
        return fig

    for task in tasks if tasks is not None else _task_names(runs):
        series, ylabel = [], task
        for c in runs:
            xs, ys, es, primary, hib = _task_series(c, task)
            series.append((c.get("label", ""), xs, ys, es))
            if primary:
                ylabel = f"{task} {primary}" + ("" if hib else " (lower is better)")
        paths.append(_save(figure(task, ylabel, series), out_dir / f"{task}.png"))
    series = [(c.get("label", ""), *_weight_series(c, "l1"), None) for c in runs]
    paths.append(_save(figure("weight drift", "L1 drift ‖ΔW‖₁ (all edited matrices)", series), out_dir / "weights.png"))
    series = []
    for c in runs:
        names = _edit_metric_names(c)
        xs, ys = _edit_series(c, names[0]) if names else ([], [])
        series.append((f"{c.get('label', '')}: {names[0]}" if names else c.get("label", ""), xs, ys, None))
    paths.append(_save(figure("edit success", "edit metric", series), out_dir / "edit_metrics.png"))
    return paths
