"""Tools (scanpy-style ``tl`` namespace): annotate cells and make cell sentences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.models import Model

__all__ = ["annotate", "gene_activity", "sentences", "transfer_labels"]


def annotate(
    data: Any,
    *,
    modality: str = "rna",
    mod: str | None = None,
    prompt: str = "zero-shot",
    model: str | Model | None = None,
    mode: str = "direct",
    candidates: Sequence[str] | None = None,
    reference: Any = None,
    reference_key: str | None = None,
    reference_modality: str | None = None,
    k: int = 3,
    groupby: str | None = None,
    n_representatives: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    sentence: str = "auto",
    n_genes: int | None = None,
    generation: Mapping[str, Any] | None = None,
    decode: str = "generate",
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    batch_size: int | None = None,
    checkpoint: str | Path | None = None,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    tissue: str | None = None,
    model_options: Mapping[str, Any] | None = None,
    prompt_options: Mapping[str, Any] | None = None,
    sentence_options: Mapping[str, Any] | None = None,
    modality_options: Mapping[str, Any] | None = None,
    sidecar: str | Path | bool | None = None,
    chunk_size: int = 10_000,
    progress: bool = True,
    key_added: str = "cellscribe",
    copy: bool = False,
) -> Any:
    """Annotate cell types with a language model reading cell sentences.

    Each cell (or, with ``groupby``, a few representative cells per group) becomes a cell sentence, then a
    prompt; the model's answer is decoded into a label. Undecodable answers become ``NaN`` labels with
    status ``"unresolved"`` and the raw text kept; one bad answer never stops the run.

    Parameters
    ----------
    data
        An AnnData, or a MuData whose modality ``mod`` is annotated.
    modality
        Modality plugin that turns the data into a cells x genes matrix (``"rna"``; ``cellscribe
        plugins`` lists the installed ones).
    mod
        MuData modality key (default: the modality's usual keys, e.g. ``"rna"``).
    prompt
        Prompt strategy: ``"zero-shot"`` (CellReasoner), ``"k-shot"`` (examples from ``reference``),
        ``"puzzle"`` (Cell-o1 CellPuzzles; needs ``candidates``).
    model
        ``None`` (the offline default, ``"markers"``), a registered backend name, a model manifest name
        (``"cellreasoner-7b"``, ``"cell-o1"``: ``cellscribe adapters`` lists them; a manifest's prompt,
        sentence and generation settings apply wherever you kept the defaults), a local model directory
        or a Hugging Face hub id (transformers backend), or ``"openai:<name>"`` for a serving engine.
        Or a model already loaded by :func:`cellscribe.load_model`, reused without loading it again
        (its load options are fixed: ``adapter``, ``device``, ``dtype``, ``trust_remote_code``,
        ``batch_size``, ``tissue`` and ``model_options`` must then be left out).
    mode
        ``"direct"`` (answer only) or ``"reasoning"`` (think first; CellReasoner's reasoning mode).
    candidates
        Allowed labels. Answers are matched to them; unmatched answers are unresolved.
    reference, reference_key
        Labelled examples for ``k-shot``: an AnnData (or MuData) and its label column. With
        ``reference=None`` and a ``reference_key``, the labelled cells of ``data`` itself are used.
    reference_modality
        The modality of ``reference`` when it differs from ``modality``: an scRNA-seq reference for
        scATAC cells is ``reference_modality="rna"`` (examples are expression sentences, queries gene
        activity sentences; the reference keeps only the genes both can show). Default: the query's
        modality; a reference of peaks for a query of gene symbols, or the reverse, is refused with an
        error asking for it. Recorded with the gene counts in ``uns[key_added]["params"]``.
    k
        Examples per label in ``k-shot`` prompts.
    groupby
        An ``obs`` column of clusters: each group is annotated from ``n_representatives`` typical cells
        and every cell receives its group's majority label.
    n_representatives
        Cells per group with ``groupby`` (default: the prompt strategy's choice, 5; 1 for puzzles).
    layer, use_raw
        Which matrix to read (default ``X``; scaled data is detected and counts/log layers or ``.raw``
        used instead when present).
    sentence
        Sentence strategy: ``"auto"``, ``"ranked-hvg"``, ``"top-expressed"``, ``"data-hvg"``.
    n_genes
        Genes per sentence (default: the strategy's; 1000 for ranked-hvg, 50 for top-expressed).
    generation
        Generation settings overriding the format's defaults (``temperature``, ``top_p``,
        ``max_new_tokens``, ``do_sample``, ``repetition_penalty``, ``seed`` ...).
    decode
        ``"generate"`` (free text, decoded afterwards), ``"constrained"`` (the answer is forced to be one
        of the candidates; a permutation of them for puzzles) or ``"score"`` (each candidate's
        likelihood; gives a probability per candidate). The last two need candidates and a backend that
        supports them (transformers).
    seed
        Seed for example sampling and puzzle grouping.
    max_prompt_tokens
        Token budget per prompt (k-shot examples are shortened to fit).
    batch_size
        Prompts per model call (default: the backend's choice; transformers fills batches up to a token
        budget, ``model_options={"max_batch_tokens": N}``).
    checkpoint
        A folder where finished batches of outputs are saved as they complete; running the same call
        again with the same folder resumes where it stopped (the CLI uses ``OUTPUT.cellscribe.ckpt``).
    adapter
        A LoRA adapter (path or hub id) for this modality, loaded onto the model.
    device, dtype
        Model placement (default: GPU with bf16 when available, else CPU with fp32).
    trust_remote_code
        Allow a hub model's own code to run. Off unless you ask for it.
    tissue
        Tissue of origin (``"blood"``, ``"pancreas"``): knowledge-based models restrict their cell types
        to it.
    model_options
        Backend-specific settings passed to the backend's ``load``.
    prompt_options, sentence_options, modality_options
        Strategy- and plugin-specific settings (e.g. ``{"system_role": True}`` for puzzles).
    sidecar
        Where the full raw model outputs go (JSONL, one record per prompt). ``None``: a new file in
        ``./cellscribe_runs/``; ``False``: not written.
    chunk_size
        Cells per chunk when reading the matrix.
    progress
        Show a progress bar.
    key_added
        Prefix of the written fields.
    copy
        Return an annotated copy instead of writing into ``data``.

    Returns
    -------
    ``None``, or the annotated copy when ``copy=True``. Writes into the annotated AnnData (for a MuData:
    ``mdata.mod[mod]``, with the columns mirrored to ``mdata.obs`` as ``"{mod}:{column}"``):

    ``.obs[key_added]``
        Categorical label (``NaN`` where unresolved).
    ``.obs[f"{key_added}_confidence"]``
        Confidence in [0, 1] (``NaN`` where the backend gives none).
    ``.obs[f"{key_added}_reasoning"]``
        The model's reasoning text (empty in direct mode).
    ``.obs[f"{key_added}_status"]``
        ``"ok"`` or ``"unresolved"`` (cells with no expressed gene are unresolved, never dropped).
    ``.obs[f"{key_added}_note"]``
        Why a cell is unresolved or how its label was matched.
    ``.obs[f"{key_added}_cell"]``
        With ``groupby`` only: the representative cells' own answers.
    ``.obs[f"{key_added}_ontology_id"]``, ``.obs[f"{key_added}_ontology_name"]``
        The Cell Ontology term the label names (exact name, synonym, normalised spelling or a common
        abbreviation such as "CD14+ Mono"); NaN when it maps to no term unambiguously.
    ``.uns[key_added]``
        ``"params"`` (everything that reproduces the run: strategies, settings, model, adapter,
        versions, seed), ``"summary"`` (counts), ``"sidecar"`` (path of the raw outputs) and, with
        ``groupby``, ``"clusters"`` (label and vote share per group).
    """
    options = {name: value for name, value in locals().items() if name not in ("data", "copy")}
    from .core import pipeline

    data = data.copy() if copy else data
    pipeline.annotate(data, **options)
    return data if copy else None


def sentences(
    data: Any,
    *,
    modality: str = "rna",
    mod: str | None = None,
    sentence: str = "auto",
    n_genes: int | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    sentence_options: Mapping[str, Any] | None = None,
    modality_options: Mapping[str, Any] | None = None,
    chunk_size: int = 10_000,
):
    """Cell sentences without a model: a ``pandas.Series`` of ``", "``-joined genes per cell.

    The Series is indexed by cell id; ``.attrs["strategy"]`` names the strategy used (``auto``
    resolved) and ``.attrs["params"]`` its settings. ``data`` is not modified.
    """
    from .core import pipeline
    from .core.plugins import get_host

    host = get_host()
    modality_c = host.registry.get("modality", modality)
    adata, _ = pipeline.select_modality_data(data, modality_c, mod)
    features = modality_c.prepare(
        adata, layer=layer, use_raw=use_raw, chunk_size=chunk_size, **dict(modality_options or {})
    )
    state: dict = {}
    cs = pipeline.build_sentences(
        features, sentence, n_genes=n_genes, state=state, host=host, chunk_size=chunk_size,
        options=sentence_options,
    )
    series = pipeline.sentences_frame(cs)
    series.attrs["state"] = state
    return series


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

    from .core import pipeline
    from .core.plugins import get_host

    started = time.perf_counter()
    component = get_host().registry.get("modality", modality)
    adata, key = pipeline.select_modality_data(data, component, mod)
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


def transfer_labels(
    data: Any,
    reference: Any,
    *,
    reference_key: str,
    modality: str = "atac",
    reference_modality: str = "rna",
    mod: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    n_markers: int | None = None,
    fine_tune: bool = True,
    tune_threshold: float = 0.05,
    prune: bool = True,
    modality_options: Mapping[str, Any] | None = None,
    chunk_size: int = 10_000,
    key_added: str = "transfer",
    copy: bool = False,
) -> Any:
    """Transfer the labels of a reference to the cells of ``data`` without a language model.

    SingleR's classic method (Aran et al. 2019), across modalities: each reference label's mean profile
    over the genes both data sets measure, the pairwise marker genes between labels, each query cell's
    Spearman correlation with every label over those genes, fine-tuning among the labels within
    ``tune_threshold`` of the best, and SingleR's pruning of outlying calls. The default is scATAC cells
    (gene activity) against a labelled scRNA-seq reference (expression); any pair of modalities that
    give genes works, the same one included. Fast (no model) and classical: a baseline, and a label
    source when the reference matches the data. Details: :mod:`cellscribe.core.transfer`.

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
    from .core import transfer

    data = data.copy() if copy else data
    transfer.transfer_labels(
        data, reference, reference_key=reference_key, modality=modality, reference_modality=reference_modality,
        mod=mod, layer=layer, use_raw=use_raw, n_markers=n_markers, fine_tune=fine_tune,
        tune_threshold=tune_threshold, prune=prune, modality_options=modality_options, chunk_size=chunk_size,
        key_added=key_added,
    )
    return data if copy else None
