"""Tools (scanpy-style ``tl`` namespace): annotate cells and make cell sentences."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .core.spec import RunSpec, parameters_doc, signature, split

__all__ = ["annotate", "gene_activity", "sentences", "transfer_labels"]


def annotate(data: Any, *, copy: bool = False, **params: Any) -> Any:
    # The signature and the Parameters of the docstring are made from the run specification
    # (cellscribe.core.spec), the one place the run's parameters are declared; see below.
    spec = RunSpec.from_kwargs(**params)  # every parameter checked once, before the data is touched
    from .core import run

    data = data.copy() if copy else data
    summary = run.annotate(data, spec)
    if summary["n_failed_prompts"]:
        raise run.FailedPromptsError(summary, key_added=spec.output.key_added, checkpoint=spec.output.checkpoint,
                                     data=data if copy else None)
    return data if copy else None


annotate.__signature__ = signature(  # type: ignore[attr-defined]
    first=[inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Any)],
    last=[inspect.Parameter("copy", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)],
    returns=Any,
)
annotate.__doc__ = """Annotate cell types with a language model reading cell sentences.

    Each cell (or, with ``groupby``, a few representative cells per group) becomes a cell sentence, then a
    prompt; the model's answer is decoded into a label. Undecodable answers become ``NaN`` labels with
    status ``"unresolved"`` and the raw text kept; one bad answer never stops the run. The parameters
    are checked before any data is read or model loaded; a bad value stops with one line naming the
    problem and the fix.

    Parameters
    ----------
    data
        An AnnData, or a MuData whose modality ``mod`` is annotated.
{parameters}
    copy
        Return an annotated copy instead of writing into ``data``.

""".format(parameters=parameters_doc()) + '    Returns\n    -------\n    ``None``, or the annotated copy when ``copy=True``. Writes into the annotated AnnData (for a MuData:\n    ``mdata.mod[mod]``, with the columns mirrored to ``mdata.obs`` as ``"{mod}:{column}"``):\n\n    ``.obs[key_added]``\n        Categorical label (``NaN`` where unresolved).\n    ``.obs[f"{key_added}_confidence"]``\n        Confidence in [0, 1] (``NaN`` where the backend gives none).\n    ``.obs[f"{key_added}_reasoning"]``\n        The model\'s reasoning: its conclusion by default (``reasoning="short"``), the whole text with\n        ``reasoning="full"``, no column with ``"none"`` (empty in direct mode).\n    ``.obs[f"{key_added}_status"]``\n        ``"ok"`` or ``"unresolved"`` (cells with no expressed gene are unresolved, never dropped).\n    ``.obs[f"{key_added}_note"]``\n        Why a cell is unresolved or how its label was matched.\n    ``.obs[f"{key_added}_cell"]``\n        With ``groupby`` only: the representative cells\' own answers.\n    ``.obs[f"{key_added}_ontology_id"]``, ``.obs[f"{key_added}_ontology_name"]``\n        The Cell Ontology term the label names (exact name, synonym, normalised spelling or a common\n        abbreviation such as "CD14+ Mono"); NaN when it maps to no term unambiguously.\n    ``.uns[key_added]``\n        ``"params"`` (everything that reproduces the run: strategies, settings, model, adapter,\n        versions, seed; no credential), ``"summary"`` (counts, failed prompts), ``"sidecar"`` (path of\n        the raw outputs file, ``""`` when none was named), ``"raw"`` (without a ``sidecar`` file: a\n        DataFrame of every prompt\'s raw output, error and token counts), with ``groupby``,\n        ``"clusters"`` (a DataFrame indexed by group: label, vote share, representatives), with a\n        neighbour vote (``neighbor_vote``; ATAC by default) ``"vote"`` (neighbours, embedding, the\n        labels changed), with ``budget`` ``"budget"``.\n\n    Nothing else is written: no file unless ``sidecar`` or ``checkpoint`` names one. An AnnData read\n    with ``backed="r"`` is annotated chunk by chunk of cells (``chunk_size``) without loading its\n    matrix (unless the run needs every cell at once: ``groupby``, ``budget``, a neighbour vote, paired\n    modalities);\n    the results go to its in-memory ``obs`` and ``uns``, the file is not touched.\n\n    Raises\n    ------\n    cellscribe.FailedPromptsError\n        When some prompts got no answer because their model call failed (server errors, a server\n        that went down, a refused key), after the results were written (those cells unresolved, the\n        error in ``_note``). With ``checkpoint=``, the same call again sends only the failed prompts.\n' + """
    ``uns[key_added]["params"]`` re-creates the run: ``RunSpec.from_params(params)`` (with ``reference=``
    again for an external k-shot reference), then ``annotate(data, **spec.kwargs())``.
    """


def sentences(data: Any, **params: Any) -> Any:
    parts = split(params, ("data", "sentences"))
    from .core.plugins import get_host
    from .core.run import prepare_sentences, sentences_frame

    result = prepare_sentences(data, parts["data"], parts["sentences"], host=get_host())
    series = sentences_frame(result.sentences)
    series.attrs["state"] = result.state
    return series


sentences.__signature__ = signature(  # type: ignore[attr-defined]
    first=[inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Any)],
    parts=("data", "sentences"),
)
sentences.__doc__ = """Cell sentences without a model: a ``pandas.Series`` of ``", "``-joined genes per cell.

    The Series is indexed by cell id; ``.attrs["strategy"]`` names the strategy used (``auto``
    resolved), ``.attrs["params"]`` its settings and ``.attrs["state"]`` what it learned from the data.
    ``data`` is not modified.

    Parameters
    ----------
    data
        An AnnData, or a MuData whose modality ``mod`` is used.
{parameters}
    """.format(parameters=parameters_doc(("data", "sentences")))


def gene_activity(
    data: Any,
    *,
    modality: str = "atac",
    mod: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    chunk_size: int = 10_000,
    **options: Any,
) -> Any:
    """The gene activity cellscribe ranks, as a new cells x genes AnnData to inspect in scanpy or muon.

    The same ``prepare`` of the ``modality`` component that the sentence strategy reads makes it (for
    ATAC: peaks aggregated over gene body + promoter, or fragments counted in them; kNN-smoothed and
    enrichment-normalised by default), read chunk by chunk. ``data`` is never modified (so there is no
    ``copy=``); for a MuData, add the result as a modality::

        mdata.mod["gene_activity"] = cs.tl.gene_activity(mdata, gtf="genes.gtf.gz")
        mdata.update()

    Parameters
    ----------
    data
        An AnnData of peaks (or of gene activity, such as the fragments reader's), or a MuData whose
        modality ``mod`` is used.
    modality
        The modality component (``"atac"``).
    mod
        MuData modality key (default: the modality's usual keys, ``"atac"``, ``"peaks"``).
    layer, use_raw
        Read ``layers[layer]`` or ``raw.X`` instead of ``X``.
    chunk_size
        Cells read at a time.
    options
        The modality's options, as for ``modality_options`` of :func:`annotate`: for ATAC ``gtf``
        (needed for peaks), ``promoter``, ``downstream``, ``gene_body``, ``features``, ``smoothing``,
        ``n_neighbors``, ``use_rep``, ``normalization``. A peak matrix is first checked against the
        annotation's genome build (a ``ValueError`` with the measured share refuses another build).

    Returns
    -------
    A new AnnData, one row per cell of the input (same order; ``obs`` and ``obsm`` copied) and one column
    per gene:

    ``X``
        The activity the sentence strategy ranks (float32 CSR): smoothed and normalised as set.
    ``layers["counts"]``
        The aggregated activity before smoothing and normalisation (peak counts summed per gene).
    ``var["n_peaks"]``
        Input features summed into the gene: the peaks that overlap its region (for an input that is
        already gene activity, the columns merged into the symbol: 1, more for duplicated symbols).
    ``var["n_cells"]``
        Cells with any count for the gene (in ``layers["counts"]``).
    ``var["measured"]``
        When the modality says which genes the data can show at all (gene-activity input: those with
        any count); a gene that is not measured never enters a sentence.
    ``uns["gene_activity"]``
        ``"modality"``, ``"mod"``, ``"X"`` and ``"counts"`` (what each matrix holds), ``"source"`` and
        ``"counts_source"`` (what was read and how it became genes), ``"params"`` (the options,
        ``layer``, ``use_raw``), ``"seconds"`` and, when the input came from the fragments reader,
        ``"input"`` (its own record).
    """
    import time

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from .core.plugins import get_host
    from .core.run import select_modality_data

    started = time.perf_counter()
    component = get_host().registry.get("modality", modality)
    adata, key = select_modality_data(data, component, mod)
    read = dict(layer=layer, use_raw=use_raw, chunk_size=chunk_size)
    features = component.prepare(adata, **read, **options)
    activity = _read_rows(features, chunk_size)
    raw = component.prepare(adata, **read, **{**options, "smoothing": False, "normalization": "none"})
    counts = _read_rows(raw, chunk_size) @ _columns(raw.feature_names, features.feature_names)

    # What each gene sums: prepare applied to one "cell" per input feature (an identity matrix).
    var = adata.raw.var if use_raw else adata.var
    identity = ad.AnnData(
        X=sp.identity(var.shape[0], dtype=np.float32, format="csr"), var=var.copy(),
        obs=pd.DataFrame(index=[str(i) for i in range(var.shape[0])]), uns=dict(adata.uns),
    )
    mapping = component.prepare(identity, chunk_size=chunk_size, **{**options, "smoothing": False,
                                                                      "normalization": "none"})
    to_genes = _read_rows(mapping, chunk_size) @ _columns(mapping.feature_names, features.feature_names)

    result = ad.AnnData(
        X=activity.astype(np.float32),
        obs=adata.obs.copy(),
        var=pd.DataFrame(
            {"n_peaks": np.diff(sp.csc_matrix(to_genes).indptr).astype(np.int64),
             "n_cells": np.diff(sp.csc_matrix(counts).indptr).astype(np.int64)},
            index=pd.Index(features.feature_names.astype(str)),
        ),
        obsm={k: v.copy() for k, v in adata.obsm.items()},
        layers={"counts": sp.csr_matrix(counts, dtype=np.float32)},
    )
    if features.measured is not None:
        result.var["measured"] = np.asarray(features.measured, dtype=bool)
    params = {"layer": layer, "use_raw": use_raw, "chunk_size": chunk_size, **options}
    record = {
        "modality": modality,
        "mod": key or "",
        "X": f"the {features.value_kind} the sentence strategy ranks",
        "source": features.source,
        "counts": "the aggregated activity before smoothing and normalisation",
        "counts_source": raw.source,
        "params": {k: v if isinstance(v, (str, int, float, bool)) else str(v)
                   for k, v in params.items() if v is not None},
        "seconds": round(time.perf_counter() - started, 3),
    }
    if isinstance(adata.uns.get("gene_activity"), Mapping):
        record["input"] = dict(adata.uns["gene_activity"])
    result.uns["gene_activity"] = record
    return result


def _read_rows(features: Any, chunk_size: int) -> Any:
    """All rows of a FeatureMatrix as one CSR matrix, read chunk by chunk."""
    import scipy.sparse as sp

    chunks = [chunk for _, _, chunk in features.iter_chunks(chunk_size)]
    if not chunks:
        return sp.csr_matrix((0, features.n_features), dtype="float32")
    return sp.csr_matrix(sp.vstack(chunks, format="csr"), dtype="float32")


def _columns(names: Any, target: Any) -> Any:
    """The 0/1 matrix that takes columns named ``names`` to columns named ``target`` (missing: empty)."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    position = pd.Index(np.asarray(target, dtype=object)).get_indexer(np.asarray(names, dtype=object))
    keep = np.flatnonzero(position >= 0)
    return sp.csr_matrix((np.ones(len(keep), dtype=np.float32), (keep, position[keep])),
                         shape=(len(names), len(target)))


def transfer_labels(data: Any, reference: Any, *, copy: bool = False, **options: Any) -> Any:
    """Transfer the labels of a reference to the cells of ``data`` without a language model.

    SingleR's classic method (Aran et al. 2019), across modalities: each reference label's mean profile
    over the genes both data sets measure, the pairwise marker genes between labels, each query cell's
    Spearman correlation with every label over those genes, fine-tuning among the labels within
    ``tune_threshold`` of the best, and SingleR's pruning of outlying calls. The default is scATAC cells
    (gene activity) against a labelled scRNA-seq reference (expression); any pair of modalities that
    give genes works, the same one included. Fast (no model) and classical: a baseline, and a label
    source when the reference matches the data. Details: :mod:`cellscribe.core.run.transfer`.

    Parameters
    ----------
    data
        The cells to label: an AnnData, or a MuData whose modality ``mod`` is used.
    reference
        The labelled cells: an AnnData, or a MuData (its ``reference_modality`` is read from the usual
        keys). Only read, never modified.
    reference_key
        The ``obs`` column of ``reference`` with the labels (cells without a label are left out).
    modality, reference_modality
        The modality components that turn each side into genes (``"atac"``: gene activity from peaks,
        fragments or a gene-activity matrix; ``"rna"``: expression).
    mod
        MuData modality key of ``data`` (default: the modality's usual keys).
    layer, use_raw
        Which matrix of ``data`` to read (the reference's modality chooses its own).
    n_markers
        Marker genes per ordered pair of labels (default SingleR's ``round(500 * (2/3) ** log2(n))``
        for ``n`` labels).
    fine_tune
        Compare the labels within ``tune_threshold`` of a cell's best again, over their own markers.
    tune_threshold
        Correlation difference within which labels are compared again; also the scale of the
        confidence (``1 - exp(-margin / tune_threshold)``).
    prune
        Make a cell ``unresolved`` when its lead is an outlier (3 MADs below) among the cells given the
        same label (SingleR's ``pruneScores``); its best guess stays in the note.
    modality_options
        Options for the modality components (e.g. ``{"gtf": ..., "normalization": "depth"}`` for
        ATAC: log-normalised activity, 0.95 of PBSmall's cells right against 0.91 with the default
        enrichment-normalised activity).
    chunk_size
        Cells read at a time.
    key_added
        Prefix of the written fields.
    copy
        Return a labelled copy instead of writing into ``data``.

    Returns
    -------
    ``None``, or the labelled copy when ``copy=True``. Writes into the labelled AnnData (for a MuData:
    ``mdata.mod[mod]``, mirrored to ``mdata.obs`` as ``"{mod}:{column}"``):

    ``.obs[key_added]``
        Categorical label, one of the reference's (``NaN`` where unresolved).
    ``.obs[f"{key_added}_confidence"]``
        ``1 - exp(-margin / tune_threshold)`` from the winner's margin over the runner-up in the last
        comparison (0 for a tie; not a calibrated probability); ``NaN`` where unresolved.
    ``.obs[f"{key_added}_score"]``
        The winner's Spearman correlation.
    ``.obs[f"{key_added}_status"]``
        ``"ok"``, or ``"unresolved"`` (no activity on any informative gene, or pruned).
    ``.obs[f"{key_added}_note"]``
        The correlation, margin and fine-tuning of the call; why a cell is unresolved.
    ``.uns[key_added]``
        ``"params"`` (method, modalities, labels, gene counts: measured in the query, in the
        reference, in both, informative; settings, matrices, versions) and ``"summary"`` (counts of
        ok, unresolved, empty and pruned cells, cells per label, seconds).

    Raises
    ------
    KeyError
        ``reference_key`` is not a column of the reference.
    ValueError
        Fewer than two labels; fewer than two genes measured in both data sets; invalid settings.
    """
    from .core.run import transfer

    data = data.copy() if copy else data
    transfer.transfer_labels(data, reference, **options)
    return data if copy else None


def _transfer_signature() -> inspect.Signature:
    """The core function's keywords (declared once, there), with ``copy``, without ``host``."""
    from .core.run import transfer

    params = [p for name, p in inspect.signature(transfer.transfer_labels).parameters.items() if name != "host"]
    copy = inspect.Parameter("copy", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
    return inspect.Signature([*params, copy], return_annotation=Any)


transfer_labels.__signature__ = _transfer_signature()  # type: ignore[attr-defined]
