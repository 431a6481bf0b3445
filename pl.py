"""Plots (scanpy-style ``pl`` namespace): how a run did and where it went wrong.

Every function follows scanpy's conventions: draw into ``ax`` when given (else a new figure),
``show`` the figure (default: when not drawing into a given ``ax``, not returning it and not saving
it), ``save`` it to a file, ``return_fig=True`` to get the :class:`~matplotlib.figure.Figure` back.

Colours of cell type labels come from ``uns[f"{column}_colors"]`` (scanpy's place for them), set
by :func:`set_label_colors` so that a label has one colour in every figure: a predicted label that
names a true one ("NK cells" for "CD56+ NK") takes the true label's colour, and colours already in
``uns`` for the truth column are kept. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .core.evaluation.evaluate import (
    UNRESOLVED,
    Evaluation,
    confusion_table,
    evaluate,
    match_labels,
    resolve_run,
    truth_column,
)
from .core.evaluation.grading import GRADE_NAMES, GRADE_SCALE

log = logging.getLogger(__name__)

__all__ = [
    "GRADE_COLORS",
    "set_label_colors",
    "label_colors",
    "confusion",
    "grades",
    "embedding",
    "reliability",
    "coverage",
    "report_figures",
]

#: Colours of the four grades (incorrect to subtype correct), the same in every figure.
GRADE_COLORS: Mapping[float, str] = {0.0: "#d9d9d9", 0.25: "#fdd49e", 0.5: "#6baed6", 1.0: "#08519c"}

_UNRESOLVED_COLOR = "#bdbdbd"
_MAX_TICK_CHARS = 32
# Tab20-like then many more distinct colours (matplotlib's qualitative maps), hex strings.
_PALETTE_MAPS = ("tab20", "tab20b", "tab20c", "Set3", "Pastel1", "Dark2", "Accent")


def _palette(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colours: list[str] = []
    for name in _PALETTE_MAPS:
        cmap = colormaps[name]
        colours += [to_hex(cmap(i)) for i in range(cmap.N)]
    colours = list(dict.fromkeys(colours))
    if n > len(colours):
        cmap = colormaps["hsv"]
        colours += [to_hex(cmap(i / (n - len(colours)))) for i in range(n - len(colours))]
    return colours


def _categories(data: Any, column: str) -> list[str]:
    values = data.obs[column]
    if not isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype("category")
        data.obs[column] = values
    return [str(c) for c in values.cat.categories]


def set_label_colors(data: Any, columns: Sequence[str], *, palette: Sequence[str] | None = None) -> dict[str, str]:
    """Give every label of ``columns`` one colour and write ``uns[f"{column}_colors"]``.

    The first column is the reference (usually the truth): its existing ``uns`` colours are kept
    when they fit its categories. A label of a later column that names a reference label (same
    cell type, :func:`cellscribe.core.evaluation.evaluate.match_labels`) takes that label's colour; the others get
    unused colours of ``palette`` (default: matplotlib's qualitative maps). Columns that are not
    categorical are made categorical, as scanpy does.

    :return: ``label -> colour`` over all columns.
    """
    from matplotlib.colors import to_hex

    columns = list(dict.fromkeys(columns))
    if not columns:
        raise ValueError("no columns given; pass the truth column and the run keys to colour")
    reference = columns[0]
    ref_labels = _categories(data, reference)
    mapping: dict[str, str] = {}
    existing = data.uns.get(f"{reference}_colors")
    if existing is not None and len(existing) == len(ref_labels):
        mapping.update({label: to_hex(c) for label, c in zip(ref_labels, existing)})
    labels_needed = list(ref_labels)
    aliases: dict[str, str] = {}
    for column in columns[1:]:
        labels = _categories(data, column)
        for label, target in zip(labels, match_labels(ref_labels, labels)):
            if target in ref_labels and target != label:
                aliases[label] = target
            elif label not in labels_needed:
                labels_needed.append(label)
    used = set(mapping.values())
    wanted = len(labels_needed) + len(used)
    candidates = list(palette) if palette is not None else _palette(wanted)
    unused = [c for c in dict.fromkeys(to_hex(c) for c in candidates) if c not in used]
    missing = sum(label not in mapping for label in labels_needed) - len(unused)
    if missing > 0:
        unused += [c for c in _palette(wanted + missing + len(candidates)) if c not in used and c not in unused]
    for label in labels_needed:
        if label not in mapping:
            mapping[label] = unused.pop(0)
    for label, target in aliases.items():
        mapping[label] = mapping[target]
    for column in columns:
        data.uns[f"{column}_colors"] = [mapping[label] for label in _categories(data, column)]
    return mapping


def label_colors(data: Any, column: str) -> dict[str, str]:
    """``label -> colour`` of one column from ``uns[f"{column}_colors"]`` (set first when missing)."""
    labels = _categories(data, column)
    colours = data.uns.get(f"{column}_colors")
    if colours is None or len(colours) != len(labels):
        set_label_colors(data, [column])
        colours = data.uns[f"{column}_colors"]
    from matplotlib.colors import to_hex

    return {label: to_hex(c) for label, c in zip(labels, colours)}


# ------------------------------------------------------------------------------------ helpers


def _finish(fig: Any, *, show: bool | None, save: str | Path | None, return_fig: bool, own: bool) -> Any:
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if show is None:
        show = own and not return_fig and save is None
    if show:
        plt.show()
    if return_fig:
        return fig
    if own and not show:
        plt.close(fig)
    return None


def _short(label: str) -> str:
    return label if len(label) <= _MAX_TICK_CHARS else label[: _MAX_TICK_CHARS - 1] + "…"


def _as_evaluation(data: Any, truth: str | None, keys: str | Sequence[str] | None) -> Evaluation:
    if isinstance(data, Evaluation):
        return data
    if truth is None:
        raise ValueError("pass truth= (the obs column of true labels) or an Evaluation from cellscribe.core.evaluation.evaluate")
    return evaluate(data, truth, keys)


# ------------------------------------------------------------------------------------ confusion


def confusion(
    data: Any,
    truth: str,
    key: str,
    *,
    normalize: bool = True,
    cmap: str = "Blues",
    annotate: bool | None = None,
    title: str | None = None,
    ax: Any = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Any:
    """Heatmap of true labels (rows) against predictions (columns), rows normalised to 1.

    Predictions that name a true label are written in its spelling, so the diagonal holds the
    correct cells; other predicted labels and ``(unresolved)`` follow as extra columns. A strip of
    label colours (``uns[f"{truth}_colors"]``, see :func:`set_label_colors`) runs along both axes.
    The figure grows with the number of labels so that 30 and more stay legible; shares are printed
    in the cells when there are at most 15 columns (``annotate``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    table = confusion_table(data.obs[truth], data.obs[key], normalize=normalize)
    colours = label_colors(data, truth)
    colours.update({k: v for k, v in label_colors(data, key).items() if k not in colours})
    n_rows, n_cols = table.shape
    own = ax is None
    if own:
        longest = max((len(_short(str(x))) for x in [*table.index, *table.columns]), default=10)
        margin = 0.8 + 0.065 * longest
        fig, ax = plt.subplots(figsize=(margin + 0.3 * n_cols + 1.4, margin + 0.3 * n_rows + 0.6))
    fig = ax.figure
    image = ax.imshow(table.to_numpy(), cmap=cmap, vmin=0, vmax=1 if normalize else None, aspect="auto",
                      interpolation="nearest")
    divider = make_axes_locatable(ax)
    left = divider.append_axes("left", size=0.15, pad=0.02)
    bottom = divider.append_axes("bottom", size=0.15, pad=0.02)
    bar = divider.append_axes("right", size=0.15, pad=0.1)
    fig.colorbar(image, cax=bar, label="share of the true label" if normalize else "cells")
    for strip, labels, vertical in ((left, table.index, True), (bottom, table.columns, False)):
        for i, label in enumerate(map(str, labels)):
            colour = _UNRESOLVED_COLOR if label == UNRESOLVED else colours.get(label, "#ffffff")
            xy = (0, i - 0.5) if vertical else (i - 0.5, 0)
            strip.add_patch(Rectangle(xy, 1 if vertical else 1, 1, facecolor=colour, edgecolor="white",
                                      linewidth=0.5, gid=f"label-color:{label}"))
        strip.set_xlim(0, 1) if vertical else strip.set_xlim(-0.5, len(labels) - 0.5)
        strip.set_ylim(len(labels) - 0.5, -0.5) if vertical else strip.set_ylim(0, 1)
        for side in strip.spines.values():
            side.set_visible(False)
    left.set_yticks(range(n_rows), [_short(str(x)) for x in table.index], fontsize=8)
    left.set_xticks([])
    bottom.set_xticks(range(n_cols), [_short(str(x)) for x in table.columns], fontsize=8, rotation=90)
    bottom.set_yticks([])
    ax.set_xticks([])
    ax.set_yticks([])
    left.set_ylabel(f"true label ({truth})")
    bottom.set_xlabel(f"prediction ({key})")
    if annotate is None:
        annotate = n_cols <= 15
    if annotate:
        values = table.to_numpy()
        for (i, j), value in np.ndenumerate(values):
            if value >= (0.005 if normalize else 1):
                ax.text(j, i, f"{value:.2f}" if normalize else f"{int(value)}", ha="center", va="center",
                        fontsize=7, color="white" if value > 0.6 * (values.max() or 1) else "black")
    ax.set_title(title or f"{key} vs {truth}", fontsize=10)
    if own:
        fig.tight_layout()
    return _finish(fig, show=show, save=save, return_fig=return_fig, own=own)


# ------------------------------------------------------------------------------------ grades


def grades(
    data: Any,
    truth: str | None = None,
    keys: str | Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax: Any = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Any:
    """Stacked bars of the grade distribution (CellReasoner's scale) per run, with the mean graded
    score printed on each bar. ``data``: an annotated AnnData/MuData (with ``truth``, ``keys``) or an
    :class:`~cellscribe.core.evaluation.evaluate.Evaluation`."""
    import matplotlib.pyplot as plt

    evaluation = _as_evaluation(data, truth, keys)
    names = list(evaluation.runs)
    own = ax is None
    if own:
        longest = max(len(_short(n)) for n in names)
        fig, ax = plt.subplots(figsize=(3.4 + 0.6 * len(names), 3.6 + 0.06 * longest))
    fig = ax.figure
    bottom = np.zeros(len(names))
    for grade in sorted(GRADE_SCALE):
        shares = np.array([
            evaluation.runs[n].grade_counts.get(grade, 0) / max(evaluation.runs[n].n_cells, 1) for n in names
        ])
        ax.bar(range(len(names)), shares, bottom=bottom, color=GRADE_COLORS[grade], edgecolor="white",
               label=f"{GRADE_NAMES[grade]} ({grade:g})", gid=f"grade-color:{grade:g}")
        bottom += shares
    for i, name in enumerate(names):
        ax.text(i, 1.01, f"{evaluation.runs[name].graded_score:.2f}", ha="center", va="bottom", fontsize=8)
    tilt = len(names) > 1 and max(len(n) for n in names) > 6
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=40 if tilt else 0,
                  ha="right" if tilt else "center", rotation_mode="anchor", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of cells")
    ax.set_title(title or f"graded score vs {evaluation.truth}", fontsize=10)
    handles, texts = ax.get_legend_handles_labels()  # best grade on top, as in the bars
    ax.legend(handles[::-1], texts[::-1], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    if own:
        fig.tight_layout()
    return _finish(fig, show=show, save=save, return_fig=return_fig, own=own)


# ------------------------------------------------------------------------------------ embedding


def _basis(data: Any, basis: str | None) -> str:
    available = list(data.obsm.keys())
    if basis is not None:
        for name in (basis, f"X_{basis}"):
            if name in available:
                return name
        raise ValueError(
            f"no embedding {basis!r} in obsm; available: {available or 'none'} (compute one, e.g. sc.tl.umap)"
        )
    for preferred in ("X_umap", "X_tsne", "X_draw_graph_fa", "X_pca"):
        if preferred in available:
            return preferred
    two_d = [k for k in available if np.asarray(data.obsm[k]).ndim == 2 and np.asarray(data.obsm[k]).shape[1] >= 2]
    if not two_d:
        raise ValueError("no 2-d embedding in obsm; compute one first (sc.pp.neighbors then sc.tl.umap)")
    return two_d[0]


def embedding(
    data: Any,
    key: str,
    *,
    basis: str | None = None,
    panels: Sequence[str] = ("label", "confidence"),
    size: float | None = None,
    legend_loc: str = "right margin",
    ax: Any = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Any:
    """Cells on an embedding (UMAP when present, else another 2-d ``obsm`` entry) coloured by the
    predicted label (colours of ``uns[f"{key}_colors"]``) and by the confidence.

    :param panels: ``"label"`` and/or ``"confidence"``; a panel per entry, side by side.
    :param ax: one axes per panel (a single axes for a single panel).
    :param legend_loc: ``"right margin"`` or ``"none"``.
    """
    import matplotlib.pyplot as plt

    panels = list(panels)
    unknown = set(panels) - {"label", "confidence"}
    if unknown or not panels:
        raise ValueError(f"panels must be 'label' and/or 'confidence', got {panels}")
    name = _basis(data, basis)
    coords = np.asarray(data.obsm[name])[:, :2]
    colours = label_colors(data, key)
    labels = data.obs[key]
    own = ax is None
    if own:
        longest = max((len(_short(c)) for c in colours), default=8)
        width = 4.2 + (0.07 * longest + 0.6 if "label" in panels else 0)
        fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), squeeze=False)
        axes = list(axes[0])
    else:
        axes = list(np.ravel(ax)) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if len(axes) != len(panels):
            raise ValueError(f"{len(panels)} panels need {len(panels)} axes, got {len(axes)}")
        fig = axes[0].figure
    size = size if size is not None else float(np.clip(20000 / max(len(coords), 1), 1.0, 40.0))
    order = np.random.default_rng(0).permutation(len(coords))  # no category hides under another
    for panel, axis in zip(panels, axes):
        if panel == "label":
            codes = labels.cat.codes.to_numpy()[order]
            point_colours = np.array([colours[c] for c in labels.cat.categories] + [_UNRESOLVED_COLOR])[codes]
            axis.scatter(coords[order, 0], coords[order, 1], c=point_colours, s=size, linewidths=0, rasterized=True,
                         gid=f"embedding:{key}")
            if legend_loc != "none":
                from matplotlib.lines import Line2D

                shown = [c for c in labels.cat.categories if (labels == c).any()]
                handles = [Line2D([], [], marker="o", linestyle="", color=colours[c], label=_short(c)) for c in shown]
                if labels.isna().any():
                    handles.append(Line2D([], [], marker="o", linestyle="", color=_UNRESOLVED_COLOR, label=UNRESOLVED))
                legend = axis.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                                     fontsize=7, ncol=1 if len(handles) <= 18 else 2, handletextpad=0.1)
                for handle, category in zip(legend.legend_handles, shown):
                    handle.set_gid(f"label-color:{category}")
            axis.set_title(key, fontsize=10)
        else:
            column = f"{key}_confidence"
            if column not in data.obs.columns:
                raise ValueError(f"no obs column {column!r}: this run stored no confidence; plot panels=('label',)")
            from matplotlib import colormaps

            values = pd.to_numeric(data.obs[column], errors="coerce").to_numpy()[order]
            cmap = colormaps["viridis"].with_extremes(bad=_UNRESOLVED_COLOR)  # no confidence: grey
            points = axis.scatter(coords[order, 0], coords[order, 1], c=values, cmap=cmap, vmin=0, vmax=1,
                                  s=size, linewidths=0, rasterized=True, plotnonfinite=True)
            fig.colorbar(points, ax=axis, fraction=0.05, pad=0.02, label="confidence")
            axis.set_title(f"{key} confidence", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel(f"{name.removeprefix('X_').upper()}1")
        axis.set_ylabel(f"{name.removeprefix('X_').upper()}2")
    if own:
        fig.tight_layout()
    return _finish(fig, show=show, save=save, return_fig=return_fig, own=own)


# ------------------------------------------------------------------------------------ reliability


def reliability(
    data: Any,
    truth: str | None = None,
    keys: str | Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax: Any = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Any:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line per run
    (marker area by the number of cells), the diagonal for perfect calibration and each run's ECE
    in the legend. Accuracy here is the share *subtype correct*: the prediction is the true type or a
    subtype of it (grade 1 of CellReasoner's scale), which is what the confidence claims; the figure
    says so. Runs without confidences are left out. ``data``: an annotated object (with ``truth`` and
    ``keys``) or an :class:`~cellscribe.core.evaluation.evaluate.Evaluation`."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    evaluation = _as_evaluation(data, truth, keys)
    runs = [r for r in evaluation.runs.values() if r.reliability["n"].sum() > 0]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
    fig = ax.figure
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888888", linewidth=1, label="perfectly calibrated")
    cmap = colormaps["Dark2"]
    for i, run in enumerate(runs):
        table = run.reliability[run.reliability["n"] > 0]
        colour = cmap(i % cmap.N)
        ax.plot(table["confidence"], table["accuracy"], color=colour, linewidth=1.2,
                label=f"{_short(run.name)} (ECE {run.ece:.3f})")
        ax.scatter(table["confidence"], table["accuracy"], s=12 + 120 * table["n"] / table["n"].max(), color=colour,
                   zorder=3)
    if not runs:
        ax.text(0.5, 0.5, "no run stored confidences", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("share correct in bin (true type or a subtype)")
    ax.set_title(title or f"calibration vs {evaluation.truth}", fontsize=10)
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    if own:
        fig.tight_layout()
    return _finish(fig, show=show, save=save, return_fig=return_fig, own=own)


def coverage(
    data: Any,
    truth: str | None = None,
    keys: str | Sequence[str] | None = None,
    *,
    title: str | None = None,
    ax: Any = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Any:
    """Accuracy against coverage, one colour per run: the cells a run called, most confident first; at
    each coverage (share of all cells called) the share *subtype correct* (solid: the true type or a
    subtype of it) and *exact* (dashed: names the true type) among them, and the graded score (dotted).
    A curve that rises to the left means the confidence ranks right answers first: abstaining on the
    least confident cells buys accuracy. Runs without confidences are left out. ``data``: an annotated
    object (with ``truth`` and ``keys``) or an :class:`~cellscribe.core.evaluation.evaluate.Evaluation`."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    evaluation = _as_evaluation(data, truth, keys)
    runs = [r for r in evaluation.runs.values() if r.coverage["accuracy"].notna().any()]
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
    fig = ax.figure
    cmap = colormaps["Dark2"]
    for i, run in enumerate(runs):
        table = run.coverage[run.coverage["accuracy"].notna()]
        x = table.index.to_numpy(dtype=float)
        colour = cmap(i % cmap.N)
        ax.plot(x, table["subtype_correct"], color=colour, linewidth=1.4, marker="o", markersize=3,
                label=f"{_short(run.name)}: subtype correct")
        ax.plot(x, table["accuracy"], color=colour, linewidth=1.0, linestyle="--", label="exact")
        ax.plot(x, table["graded"], color=colour, linewidth=1.0, linestyle=":", label="graded")
    if not runs:
        ax.text(0.5, 0.5, "no run stored confidences", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(1.02, 0.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage: share of cells called, most confident first")
    ax.set_ylabel("accuracy among the cells called")
    ax.set_title(title or f"accuracy against coverage vs {evaluation.truth}", fontsize=10)
    ax.legend(loc="lower left", fontsize=7, frameon=False)
    if own:
        fig.tight_layout()
    return _finish(fig, show=show, save=save, return_fig=return_fig, own=own)


# ------------------------------------------------------------------------------------ report


def report_figures(
    data: Any | Mapping[str, Any],
    evaluation: Evaluation,
    out_dir: str | Path,
    *,
    truth: str | None = None,
    basis: str | None = None,
) -> dict[str, Path]:
    """Draw the report's figures as PNG files into ``out_dir/figures`` and return ``caption -> path``
    (in order) for :func:`cellscribe.core.evaluation.evaluate.write_report`.

    Figures: grade distribution per run, reliability diagram, accuracy against coverage, and per run
    the confusion heatmap and
    the embedding coloured by prediction and confidence (left out when the data has no 2-d
    embedding). Label colours are set once per object over the truth and all its runs
    (:func:`set_label_colors`), so a label keeps its colour across figures.
    """
    import matplotlib

    truth = truth or evaluation.truth
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    objects = dict(data) if isinstance(data, Mapping) else {"": data}
    figures: dict[str, Path] = {}
    with matplotlib.rc_context({"figure.max_open_warning": 0}):
        path = folder / "grades.png"
        grades(evaluation, save=path, show=False)
        figures["Grade distribution per run"] = path
        path = folder / "reliability.png"
        reliability(evaluation, save=path, show=False)
        figures["Reliability of the confidences (correct: the true type or a subtype of it)"] = path
        path = folder / "coverage.png"
        coverage(evaluation, save=path, show=False)
        figures["Accuracy against coverage (cells called most confident first)"] = path
        for label, obj in objects.items():
            # runs of this object, grouped by the object that holds them (a MuData's modality)
            holders: dict[int, tuple[Any, list[tuple[str, str]]]] = {}
            for name in evaluation.runs:
                if label and not name.startswith(f"{label}:"):
                    continue
                key = name.split(":", 1)[1] if label else name
                holder, column = resolve_run(obj, key)
                holders.setdefault(id(holder), (holder, []))[1].append((name, column))
            for holder, runs in holders.values():
                try:
                    truth_col = truth_column(holder, truth)
                except ValueError as exc:
                    log.warning("no per-run figures for %s: %s", [n for n, _ in runs], exc)
                    continue
                set_label_colors(holder, [truth_col, *(column for _, column in runs)])
                for name, column in runs:
                    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
                    path = folder / f"confusion_{safe}.png"
                    confusion(holder, truth_col, column, save=path, show=False)
                    figures[f"Confusion: {name}"] = path
                    panels = ["label"] + (["confidence"] if f"{column}_confidence" in holder.obs.columns else [])
                    path = folder / f"embedding_{safe}.png"
                    try:
                        embedding(holder, column, basis=basis, panels=panels, save=path, show=False)
                        figures[f"Embedding: {name}"] = path
                    except ValueError as exc:
                        log.warning("no embedding figure for %s: %s", name, exc)
                prefix = "".join(c if c.isalnum() else "_" for c in (label or "")) or "truth"
                path = folder / f"embedding_{prefix}_{''.join(c if c.isalnum() else '_' for c in truth_col)}.png"
                try:
                    embedding(holder, truth_col, basis=basis, panels=["label"], save=path, show=False)
                    figures[f"Embedding: true labels{' of ' + label if label else ''}"] = path
                except ValueError as exc:
                    log.warning("no embedding figure for the true labels: %s", exc)
    return figures
