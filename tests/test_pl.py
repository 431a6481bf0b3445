"""Plots of a real run (pbmc68k_reduced annotated by the default model): every tick label inside its
figure, one colour per label in every figure, legible heatmaps with 30 labels, scanpy conventions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from cellscribe import pl  # noqa: E402
from cellscribe.core.evaluation.evaluate import evaluate  # noqa: E402


TRUTH = "bulk_labels"


@pytest.fixture
def pbmc(host):
    """pbmc68k_reduced annotated by the default model (markers), per cell and per louvain cluster."""
    import scanpy as sc

    import cellscribe

    adata = sc.datasets.pbmc68k_reduced()
    options = dict(sidecar=False, progress=False, use_raw=True)
    cellscribe.tl.annotate(adata, **options)
    cellscribe.tl.annotate(adata, groupby="louvain", key_added="by_cluster", **options)
    return adata


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts_outside(fig) -> list[str]:
    """Tick labels, axis labels, titles and legend texts whose box leaves the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    outside = []
    for ax in fig.axes:
        texts = [ax.xaxis.label, ax.yaxis.label, ax.title]
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            texts += [tick.label1 for tick in axis.get_major_ticks() if low - 1e-9 <= tick.get_loc() <= high + 1e-9]
        legend = ax.get_legend()
        if legend is not None:
            texts += legend.get_texts()
        for text in texts:
            if not text.get_visible() or not text.get_text():
                continue
            extent = text.get_window_extent(renderer)
            if extent.x0 < box.x0 - 1 or extent.y0 < box.y0 - 1 or extent.x1 > box.x1 + 1 or extent.y1 > box.y1 + 1:
                outside.append(text.get_text())
    return outside


def _label_colours(fig) -> dict[str, set[str]]:
    """label -> colours of the artists that show it (gid ``label-color:<label>``)."""
    found: dict[str, set[str]] = {}
    for artist in fig.findobj(lambda a: str(a.get_gid() or "").startswith("label-color:")):
        label = artist.get_gid().split(":", 1)[1]
        marker = getattr(artist, "get_markerfacecolor", None)  # legend handles are markers
        colour = marker() if marker is not None else artist.get_facecolor()
        found.setdefault(label, set()).add(to_hex(colour))
    return found


def _all_figures(adata):
    evaluation = evaluate(adata, TRUTH)
    return {
        "confusion": pl.confusion(adata, TRUTH, "cellscribe", return_fig=True),
        "confusion by cluster": pl.confusion(adata, TRUTH, "by_cluster", return_fig=True),
        "embedding": pl.embedding(adata, "cellscribe", return_fig=True),
        "embedding truth": pl.embedding(adata, TRUTH, panels=["label"], return_fig=True),
        "grades": pl.grades(evaluation, return_fig=True),
        "reliability": pl.reliability(evaluation, return_fig=True),
    }


def test_no_text_leaves_any_figure(pbmc):
    pl.set_label_colors(pbmc, [TRUTH, "cellscribe", "by_cluster"])
    for name, fig in _all_figures(pbmc).items():
        assert _texts_outside(fig) == [], name


def test_a_label_has_one_colour_in_every_figure(pbmc):
    before = list(pbmc.uns[f"{TRUTH}_colors"])
    mapping = pl.set_label_colors(pbmc, [TRUTH, "cellscribe", "by_cluster"])
    assert list(pbmc.uns[f"{TRUTH}_colors"]) == before  # the data's own truth colours are kept
    # a prediction naming a true label takes its colour; other labels get colours of their own
    assert mapping["natural killer cell"] == mapping["CD56+ NK"]
    assert mapping["B cell"] == mapping["CD19+ B"]
    assert mapping["conventional dendritic cell"] not in {mapping[t] for t in pbmc.obs[TRUTH].cat.categories}
    for column in (TRUTH, "cellscribe", "by_cluster"):
        stored = dict(zip(pbmc.obs[column].cat.categories, pbmc.uns[f"{column}_colors"]))
        assert all(mapping[label] == colour for label, colour in stored.items())

    seen: dict[str, set[str]] = {}
    figures = _all_figures(pbmc)
    for name, fig in figures.items():
        for label, colours in _label_colours(fig).items():
            assert len(colours) == 1, (name, label, colours)
            seen.setdefault(label, set()).update(colours)
    assert {"CD56+ NK", "natural killer cell", "CD19+ B", "Dendritic"} <= set(seen)
    for label, colours in seen.items():
        assert colours == {mapping[label]}, (label, colours, mapping[label])

    # the points themselves: as many points of a label's colour as cells with that label
    fig = figures["embedding"]
    points = next(c for c in fig.axes[0].collections if c.get_gid() == "embedding:cellscribe")
    drawn = pd.Series([to_hex(c) for c in points.get_facecolors()]).value_counts()
    expected = pbmc.obs["cellscribe"].map(mapping).value_counts()
    assert drawn.to_dict() == expected.to_dict()


def test_confusion_heatmap_stays_legible_with_30_labels():
    import anndata as ad

    rng = np.random.default_rng(0)
    labels = [f"{name} {i}" for i, name in enumerate(
        ["CD4-positive, alpha-beta memory T cell", "classical monocyte", "plasmacytoid dendritic cell",
         "pancreatic acinar cell", "endothelial cell of hepatic sinusoid", "naive B cell"] * 5)]
    truth = rng.choice(labels, 3000)
    pred = np.where(rng.random(3000) < 0.7, truth, rng.choice(labels + ["something else entirely"], 3000))
    adata = ad.AnnData(obs=pd.DataFrame({"truth": pd.Categorical(truth, categories=labels), "run": pred},
                                        index=[f"c{i}" for i in range(3000)]))
    fig = pl.confusion(adata, "truth", "run", return_fig=True)
    assert _texts_outside(fig) == []
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for ticks in (ax.get_yticklabels(), ax.get_xticklabels()):
            boxes = [t.get_window_extent(renderer) for t in ticks if t.get_text()]
            assert all(t.get_fontsize() >= 7 for t in ticks)
            for a, b in zip(boxes, boxes[1:]):  # neighbouring tick labels never overlap
                assert not a.overlaps(b), (a, b)
    heat = fig.axes[0]
    assert heat.images[0].get_array().shape == (30, 31)
    rows = heat.images[0].get_array().sum(axis=1)
    assert np.allclose(rows, 1.0)
    assert len(heat.texts) == 0  # too many columns for numbers in the cells


def test_scanpy_conventions(pbmc, tmp_path):
    evaluation = evaluate(pbmc, TRUTH)
    fig, axes = plt.subplots(1, 3)
    assert pl.grades(evaluation, ax=axes[0], show=False) is None
    assert pl.reliability(pbmc, TRUTH, ["cellscribe"], ax=axes[1], show=False) is None
    assert pl.embedding(pbmc, "cellscribe", panels=["confidence"], ax=axes[2], show=False) is None
    assert len(axes[0].patches) == 4 * len(evaluation.runs)  # four grades stacked per run
    path = tmp_path / "confusion.png"
    assert pl.confusion(pbmc, TRUTH, "cellscribe", save=path) is None
    assert path.stat().st_size > 10_000
    fig = pl.embedding(pbmc, "cellscribe", basis="pca", return_fig=True)
    assert fig.axes[0].get_xlabel() == "PCA1"
    with pytest.raises(ValueError, match="no embedding 'tsne'"):
        pl.embedding(pbmc, "cellscribe", basis="tsne")
    with pytest.raises(ValueError, match="2 panels need 2 axes"):
        pl.embedding(pbmc, "cellscribe", ax=axes[0])
    with pytest.raises(ValueError, match="pass truth="):
        pl.grades(pbmc)


def test_grade_bars_and_reliability_show_the_numbers(pbmc):
    evaluation = evaluate(pbmc, TRUTH)
    fig = pl.grades(evaluation, return_fig=True)
    ax = fig.axes[0]
    heights = {}
    for patch in ax.patches:
        heights.setdefault(round(patch.get_x() + patch.get_width() / 2), []).append(patch.get_height())
    for i, run in enumerate(evaluation.runs.values()):
        assert sum(heights[i]) == pytest.approx(1.0)
        assert max(heights[i]) == pytest.approx(max(run.grade_counts.values()) / run.n_cells)
    assert [t.get_text() for t in ax.texts] == [f"{r.graded_score:.2f}" for r in evaluation.runs.values()]
    fig = pl.reliability(evaluation, return_fig=True)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0] == "perfectly calibrated"
    assert legend[1] == f"cellscribe (ECE {evaluation['cellscribe'].ece:.3f})"


def test_coverage_figure_draws_each_runs_table(pbmc):
    evaluation = evaluate(pbmc, TRUTH)
    fig = pl.coverage(evaluation, return_fig=True)
    ax = fig.axes[0]
    run = evaluation["cellscribe"]
    drawn = ax.lines[0]  # the first run's "subtype correct" line
    table = run.coverage.dropna()
    assert np.allclose(drawn.get_xdata(), table.index.to_numpy(dtype=float))
    assert np.allclose(drawn.get_ydata(), table["subtype_correct"].to_numpy())
    assert "most confident first" in ax.get_xlabel()
    assert "true type or a subtype" in pl.reliability(evaluation, return_fig=True).axes[0].get_ylabel()


@pytest.mark.slow
def test_report_figures(pbmc, tmp_path):
    evaluation = evaluate(pbmc, TRUTH)
    figures = pl.report_figures(pbmc, evaluation, tmp_path)
    assert list(figures) == [
        "Grade distribution per run",
        "Reliability of the confidences (correct: the true type or a subtype of it)",
        "Accuracy against coverage (cells called most confident first)",
        "Confusion: cellscribe",
        "Embedding: cellscribe",
        "Confusion: by_cluster",
        "Embedding: by_cluster",
        "Embedding: true labels",
    ]
    assert all(path.exists() and path.parent == tmp_path / "figures" for path in figures.values())
