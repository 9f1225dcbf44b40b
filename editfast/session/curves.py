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

from editfast.core.errors import EditfastError
from editfast.core.paths import atomic_path
from editfast.eval.edit_metrics import HEADLINE_EDIT_METRICS
from editfast.eval.tasks import resolve_tasks

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
        t = task_result(p, task)
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


def _panel(key: str) -> str | None:
    """The panel a task key is drawn in: "sst2:standard" with "sst2", "sst2:paper" its own; None for a
    protocol-free task under a second protocol ("wikitext:paper": the standard panel's numbers)."""
    task, _, protocol = key.partition(":")
    if not protocol or protocol == "standard":
        return task
    try:
        free = resolve_tasks(task)[0].protocol_free
    except EditfastError:  # a task this version does not know: drawn under its key
        free = False
    return None if free else key


def _task_names(curves: list[dict]) -> list[str]:
    names: list[str] = []
    for c in curves:
        for p in c.get("points") or []:
            names += [k for k in map(_panel, p.get("tasks") or {}) if k and k not in names]
    return names


def _xaxis(ax, xs: list) -> None:
    """Label the edits axis; symlog when the edit counts span orders of magnitude (0, 1, 10, ..., 1000)."""
    pos = [x for x in xs if x > 0]
    if pos and max(pos) >= 100 * max(min(pos), 1):
        # with matplotlib, only when a plot is drawn
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("symlog", linthresh=1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # 0, 1, 10, 100, 1,000
        ax.autoscale_view()  # the limits again, on the new scale (else a log y axis keeps the linear ones)
    elif 1 < len(set(xs)) <= 12:
        ax.set_xticks(sorted(set(xs)))  # the checkpoints themselves: 0, 10, 20
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


# One colour and marker per method (a run's "method"), a line style per run of the same method
# (its setting or post-process): no two runs of a figure alike. Colour-blind-safe first (tab10).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#393b79", "#637939", "#843c39", "#7b4173", "#3182bd")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "d", "H", "8", "1")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1)))


def run_styles(runs: list[dict]) -> list[dict]:
    """{color, marker, linestyle} per run: colour and marker by method (in order of first appearance),
    line style by the run's rank among the runs of its method."""
    methods: list[str] = []
    seen: dict[str, int] = {}
    out = []
    for c in runs:
        m = str(c.get("method") or c.get("label", "").split(" ")[0])
        if m not in methods:
            methods.append(m)
        i, j = methods.index(m), seen.get(m, 0)
        seen[m] = j + 1
        out.append({"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
                    "linestyle": LINESTYLES[(j + i // len(COLOURS)) % len(LINESTYLES)]})
    return out


def task_result(p: dict, task: str) -> dict | None:
    """A point's result for ``task`` in the tasks' layout; "fluency" is read from the point's
    ``generation`` (n-gram entropy of greedy generations) where no task of that name ran."""
    tasks = p.get("tasks") or {}
    t = tasks.get(task)
    if t is None and ":" not in task:  # a run evaluated under several protocols: its standard one is the task's
        t = tasks.get(f"{task}:standard")
    if t is None and task == "fluency" and isinstance(p.get("generation"), dict) and "fluency" in p["generation"]:
        g = p["generation"]
        t = {"primary": "fluency", "higher_is_better": True, "metrics": {"fluency": g["fluency"]},
             "stderr": {"fluency": g.get("fluency_stderr")}, "n": g.get("n")}
    return t


def study_tasks(runs: list[dict]) -> list[str]:
    """Every task the runs' points hold, in order, then fluency where the points carry generations."""
    names = _task_names(runs)
    if "fluency" not in names and any(task_result(p, "fluency") for c in runs for p in c.get("points") or []):
        names.append("fluency")
    return names


def log_scale(primary: str | None, ys: list[float]) -> bool:
    """Perplexity, and any positive metric whose values span more than a factor of 100, on a log axis."""
    real = [y for y in ys if not math.isnan(y)]
    pos = [y for y in real if y > 0]
    return bool(pos) and len(pos) == len(real) and (
        "perplexity" in (primary or "") or max(pos) > 100 * min(pos))


def _draw(ax, runs: list[dict], styles: list[dict], series) -> bool:
    """One line per run with its style (error bars where given); returns whether any was drawn."""
    drawn, ys_all, primary = False, [], None
    for c, st in zip(runs, styles):
        xs, ys, es, primary_c = series(c)
        primary = primary or primary_c
        if xs:
            ax.errorbar(xs, ys, yerr=es, capsize=3, label=c.get("label", ""), markersize=5, linewidth=1.4, **st)
            ys_all += ys
            drawn = True
    if drawn and log_scale(primary, ys_all):
        _log_y(ax, ys_all)
    if not drawn:
        _empty(ax)
    return drawn


def _log_y(ax, ys: list[float]) -> None:
    """A log y axis; within one decade (perplexities of 16 to 19) its ticks labelled as plain numbers."""
    # with matplotlib, only when a plot is drawn
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    real = [y for y in ys if not math.isnan(y)]
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if max(real) < 10 * min(real) else NullFormatter())


def _legend_outside(fig, axes, runs: list[dict], styles: list[dict]) -> None:
    """A handle per run, to the right of the data: of the axes for one panel, of the figure for
    small multiples (a list of axes). ``_save_tight`` keeps it inside the image."""
    # with matplotlib, only when a plot is drawn
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], label=c.get("label", ""), **st) for c, st in zip(runs, styles)]
    if isinstance(axes, list):
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8, frameon=False)
    else:
        axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0,
                    frameon=False)


def _task_xy(task: str):
    def series(c):
        xs, ys, es, primary, _ = _task_series(c, task)
        return xs, ys, es, primary
    return series


def _ylabel(runs: list[dict], task: str) -> str:
    for c in runs:
        _, _, _, primary, hib = _task_series(c, task)
        if primary:
            name = task if primary == task else f"{task} {primary}"  # "fluency", not "fluency fluency"
            return name + ("" if hib else " (lower is better)") + (" · log" if "perplexity" in primary else "")
    return task


def task_figure(runs: list[dict], task: str, title: str = ""):
    """Primary metric of ``task`` ± stderr against edits, a line per run, legend outside."""
    plt = _plt()
    styles = run_styles(runs)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    _draw(ax, runs, styles, _task_xy(task))
    ax.set_ylabel(_ylabel(runs, task))
    ax.set_title(title or task)
    _xaxis(ax, _edits(runs))
    _legend_outside(fig, ax, runs, styles)
    return fig


def overview_figure(runs: list[dict], tasks: list[str], title: str = ""):
    """Small multiples: a panel per task (fluency included), a line per run, one legend outside."""
    plt = _plt()
    styles = run_styles(runs)
    cols = min(3, max(len(tasks), 1))
    rows = max(1, math.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 3.6, 3.3 * rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(tasks):
            ax.axis("off")
            continue
        _draw(ax, runs, styles, _task_xy(tasks[i]))
        ax.set_title(_ylabel(runs, tasks[i]), fontsize=9)
        _xaxis(ax, _edits(runs))
    if not tasks:
        _empty(axes.flat[0])
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.99, 0.97))
    _legend_outside(fig, list(axes.flat), runs, styles)
    return fig


def _edits(runs: list[dict]) -> list:
    return [p["edits"] for c in runs for p in c.get("points") or [] if p.get("edits") is not None]


def _save_tight(fig, path) -> Path:
    """Saved with the legend outside the axes included in the image."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_study(runs: list[dict], out_dir, tasks: list[str] | None = None) -> list[Path]:
    """Runs compared: out_dir/overview.png (a panel per task), <task>.png (primary metric ± stderr
    against edits, a line per run), weights.png (L1 drift) and edit_metrics.png (a panel per
    headline edit-success rate). Returns the paths, the overview first."""
    out_dir = Path(out_dir)
    models = sorted({c.get("model", "") for c in runs} - {""})
    on = f" · {', '.join(models)}" if models else ""
    tasks = study_tasks(runs) if tasks is None else tasks
    paths = [_save_tight(overview_figure(runs, tasks, f"ability against edits{on}"), out_dir / "overview.png")]
    for task in tasks:
        paths.append(_save_tight(task_figure(runs, task, task + on), out_dir / f"{task}.png"))
    plt = _plt()
    styles = run_styles(runs)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    _draw(ax, runs, styles, lambda c: (*_weight_series(c, "l1"), None, "l1"))
    ax.set_ylabel("L1 drift ‖ΔW‖₁ (all edited matrices)")
    ax.set_title("weight drift" + on)
    _xaxis(ax, _edits(runs))
    _legend_outside(fig, ax, runs, styles)
    paths.append(_save_tight(fig, out_dir / "weights.png"))
    rates = list(dict.fromkeys(k for c in runs for k in _edit_metric_names(c) if k.endswith(("_success", "_acc"))))
    rates = rates or list(dict.fromkeys(k for c in runs for k in _edit_metric_names(c)))[:1]
    cols = max(1, min(3, len(rates)))
    fig, axes = plt.subplots(1, cols, figsize=(4.4 * cols + 3.6, 3.9), squeeze=False)
    for ax, m in zip(axes.flat, rates or [None]):
        if m is None:
            _empty(ax)
            continue
        _draw(ax, runs, styles, lambda c, m=m: (*_edit_series(c, m), None, m))
        ax.set_title(m, fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        _xaxis(ax, _edits(runs))
    fig.suptitle("edit success" + on)
    fig.tight_layout(rect=(0, 0, 0.99, 0.95))
    _legend_outside(fig, list(axes.flat), runs, styles)
    paths.append(_save_tight(fig, out_dir / "edit_metrics.png"))
    return paths
