"""editfast.session.curves: weight drift against hand computations, and the plots as valid PNGs."""

import math

import pytest
import torch
from PIL import Image

from editfast.session.curves import (
    overview_figure,
    plot_curve,
    plot_study,
    run_styles,
    spectral_norm,
    study_tasks,
    sum_weight_changes,
    task_figure,
    weight_change,
)


def test_weight_change_by_hand():
    W0 = torch.tensor([[1.0, -2.0], [0.0, 4.0]], dtype=torch.float64)
    W = torch.tensor([[1.1, -2.0], [0.5, 3.0]], dtype=torch.float64)
    wc = weight_change(W0, W)
    # ΔW = [[0.1, 0], [0.5, -1]]; |ΔW/W0| = 0.1, 0, (W0 = 0, changed), 0.25
    assert wc["l1"] == pytest.approx(1.6, rel=1e-12) and wc["n"] == 4
    assert wc["rel_share"] == {"0.077": 0.75, "0.171": 0.5}
    assert wc["fro0"] == pytest.approx(math.sqrt(21), rel=1e-12)
    assert wc["fro"] == pytest.approx(math.sqrt(1.21 + 4 + 0.25 + 9), rel=1e-12)
    assert wc["fro_growth"] == pytest.approx(math.sqrt(14.46 / 21) - 1, rel=1e-12)
    # ΔW ΔWᵀ = [[0.01, 0.05], [0.05, 1.25]]: trace 1.26, determinant 0.01
    assert wc["spectral"] == pytest.approx(math.sqrt((1.26 + math.sqrt(1.26 ** 2 - 0.04)) / 2), rel=1e-12)
    assert weight_change(W0, W, thresholds=(0.3,))["rel_share"] == {"0.3": 0.25}  # only the W0 = 0 element
    same = weight_change(W0, W0.clone())
    assert same["l1"] == 0 and same["spectral"] == 0 and same["rel_share"] == {"0.077": 0.0, "0.171": 0.0}


def test_weight_change_float32_in_float64():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(64, 48, generator=g)
    W = W0 + 1e-3 * torch.randn(64, 48, generator=g)
    wc = weight_change(W0, W)
    D = W.double() - W0.double()
    assert wc["l1"] == pytest.approx(D.abs().sum().item(), rel=1e-12)
    assert wc["spectral"] == pytest.approx(torch.linalg.svdvals(D)[0].item(), rel=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        weight_change(W0, W.T)


def low_rank(m, n, sigmas, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("shape,sigmas", [((300, 200), [3.0]), ((150, 400), [2.0, 1.9, 0.5]),
                                          ((500, 300), [1.0] + [0.99] * 9)])
def test_power_iteration(shape, sigmas):
    D = low_rank(*shape, sigmas)
    assert spectral_norm(D, exact_max=0) == pytest.approx(max(sigmas), rel=1e-6)
    assert spectral_norm(D) == pytest.approx(max(sigmas), rel=1e-10)  # exact path


def test_weight_change_large_matrix_uses_power_iteration():
    W0 = torch.zeros(2049, 2060, dtype=torch.float32)
    D = low_rank(2049, 2060, [0.8, 0.7])  # ROME/MEMIT-like low-rank update
    wc = weight_change(W0, W0 + D.float())
    assert wc["spectral"] == pytest.approx(0.8, rel=1e-4)
    assert wc["rel_share"]["0.077"] == pytest.approx((D.float() != 0).double().mean().item())


def test_sum_weight_changes():
    g = torch.Generator().manual_seed(1)
    mats = {f"m{i}": torch.randn(20 + i, 30, generator=g, dtype=torch.float64) for i in range(3)}
    news = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in mats.items()}
    per = {k: weight_change(mats[k], news[k]) for k in mats}
    tot = sum_weight_changes(per)
    flat = weight_change(torch.cat([m.flatten() for m in mats.values()]).reshape(1, -1),
                         torch.cat([m.flatten() for m in news.values()]).reshape(1, -1))
    for k in ("l1", "fro0", "fro", "fro_growth"):
        assert tot[k] == pytest.approx(flat[k], rel=1e-12)
    assert tot["n"] == flat["n"] == sum(m.numel() for m in mats.values())
    assert tot["rel_share"] == pytest.approx(flat["rel_share"], rel=1e-12)
    assert tot["spectral"] == max(w["spectral"] for w in per.values())
    assert sum_weight_changes({})["n"] == 0


# ---- plots --------------------------------------------------------------------------------------

def curve(label, edits=(0, 1, 10, 100, 1000), drop=()):
    pts = []
    for i, e in enumerate(edits):
        wc = {"l1": 10.0 * e, "rel_share": {"0.077": e / 2000}, "fro0": 5.0, "fro": 5.0 + e / 100, "fro_growth": e / 500,
              "spectral": math.sqrt(e), "n": 100}
        p = {"edits": e, "seconds": 2.0 * e,
             "edit_metrics": {"efficacy": 1 - e / 2000, "paraphrase": 0.8 - e / 3000} if e else None,
             "tasks": {"rte": {"primary": "accuracy", "higher_is_better": True, "metrics": {"accuracy": 0.6 - e / 5000},
                               "stderr": {"accuracy": 0.02}, "n": 100},
                       "wikitext": {"primary": "perplexity", "higher_is_better": False,
                                    "metrics": {"perplexity": 20 + e / 10, "bits_per_byte": 1.0},
                                    "stderr": {"perplexity": float("nan")}, "n": 5}},
             "weights": {"total": wc, "per_matrix": {"layers.4.mlp.down_proj": wc}}}
        for k in drop:
            if i % 2 == 1:
                p.pop(k)
        pts.append(p)
    return {"label": label, "model": "random:tiny-llama", "method": label.split()[0], "points": pts}


def check_png(path, min_w=300, min_h=200):
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_w and im.size[1] >= min_h
        im.verify()


def test_plot_curve(tmp_path):
    assert plot_curve(curve("rome · one at a time"), tmp_path / "rome.png") == tmp_path / "rome.png"
    check_png(tmp_path / "rome.png", 900, 400)  # 2 rows of 3 panels
    plot_curve(curve("memit · one batch", drop=("tasks", "weights", "edit_metrics")), tmp_path / "sparse.png")
    check_png(tmp_path / "sparse.png")
    c = curve("x", edits=(0, 5, 10))
    c["points"][1]["tasks"]["rte"]["stderr"] = {}  # no stderr: plotted without a bar
    del c["points"][2]["tasks"]["wikitext"]["metrics"]["perplexity"]
    plot_curve(c, tmp_path / "linear.png")
    check_png(tmp_path / "linear.png")
    plot_curve({"label": "empty", "model": "m", "points": []}, tmp_path / "empty.png")
    check_png(tmp_path / "empty.png")


def test_plot_study(tmp_path):
    runs = [curve("rome · one at a time"), curve("memit · one batch", edits=(0, 1000)),
            curve("memit · 10 per batch", drop=("tasks", "edit_metrics", "weights"))]
    paths = plot_study(runs, tmp_path / "study")
    assert [p.name for p in paths] == ["overview.png", "rte.png", "wikitext.png", "weights.png", "edit_metrics.png"]
    for p in paths:
        check_png(p)
    paths = plot_study(runs[2:], tmp_path / "one", tasks=["rte", "nq"])  # nq has no points: an empty plot
    assert [p.name for p in paths] == ["overview.png", "rte.png", "nq.png", "weights.png", "edit_metrics.png"]
    for p in paths:
        check_png(p)


def test_study_figures_readable():
    """The remedies study's complaints, on hand-made curves: one run's perplexity of 2e8 puts WikiText
    on a log axis (the others not flattened onto zero), accuracies stay linear; a colour and marker per
    method, a line style per run of it, no two runs alike; the legend outside the data; the overview
    has a panel per task, fluency (from the points' generation) included, with the values plotted as given."""
    runs = [curve("memit · 10 per batch"), curve("memit + RECT · 10 per batch"), curve("rome · one at a time"),
            curve("kn · one at a time"), curve("memit · one batch of B")]
    runs[1]["method"] = runs[4]["method"] = "memit"
    runs[3]["points"][-1]["tasks"]["wikitext"]["metrics"]["perplexity"] = 2.2e8
    for c in runs[:2]:
        for p in c["points"]:
            p["generation"] = {"fluency": 6.2 - p["edits"] / 1000, "fluency_stderr": 0.05, "n": 20}
    styles = run_styles(runs)
    assert len({(s["color"], s["marker"], str(s["linestyle"])) for s in styles}) == len(runs)
    assert styles[0]["color"] == styles[1]["color"] == styles[4]["color"] != styles[2]["color"] != styles[3]["color"]
    assert styles[0]["marker"] == styles[1]["marker"] and len({str(styles[i]["linestyle"]) for i in (0, 1, 4)}) == 3
    assert task_figure(runs, "wikitext").axes[0].get_yscale() == "log"
    fig = task_figure(runs, "rte")
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    fig.canvas.draw()
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= box.x1  # right of the data, never over it
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [c["label"] for c in runs]
    assert study_tasks(runs) == ["rte", "wikitext", "fluency"]
    fig = overview_figure(runs, study_tasks(runs))
    panels = [a for a in fig.axes if a.has_data()]
    assert [a.get_title() for a in panels] == ["rte accuracy", "wikitext perplexity (lower is better) · log",
                                               "fluency"]
    assert [a.get_yscale() for a in panels] == ["linear", "log", "linear"]
    fluency = [list(line.get_ydata()) for line in panels[2].get_lines() if len(line.get_xdata()) > 1]
    assert fluency[0] == pytest.approx([6.2 - e / 1000 for e in (0, 1, 10, 100, 1000)])
    fig.canvas.draw()
    assert fig.legends and fig.legends[0].get_window_extent().x0 >= max(a.get_window_extent().x1 for a in panels)


def test_a_run_under_both_protocols_joins_the_standard_panels():
    from editfast.session.curves import study_tasks, task_result

    def point(edits, tasks):
        return {"edits": edits, "tasks": {k: {"primary": "accuracy", "metrics": {"accuracy": v}} for k, v in tasks.items()}}

    one = {"points": [point(0, {"sst2": 0.6, "wikitext": 16.0})]}
    both = {"points": [point(0, {"sst2:standard": 0.61, "wikitext:standard": 16.5, "sst2:paper": 0.01,
                                 "wikitext:paper": 16.5})]}
    assert study_tasks([one, both]) == ["sst2", "wikitext", "sst2:paper"]  # WikiText's paper numbers are its standard ones
    assert task_result(both["points"][0], "sst2")["metrics"]["accuracy"] == 0.61
    assert task_result(both["points"][0], "sst2:paper")["metrics"]["accuracy"] == 0.01
