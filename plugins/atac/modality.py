"""The ATAC modality: chromatin accessibility to a cells x genes gene-activity FeatureMatrix.

Three inputs, one output:

1. **gene activity** already computed (the fragments reader of this plugin, Signac's ``GeneActivity``,
   ArchR's gene scores, ``snapatac2.pp.make_gene_matrix``): features are gene symbols (or Ensembl ids,
   mapped as for RNA) and are used as they are;
2. **peaks** (cells x peaks, as Cell Ranger ARC, Signac or muon store them): peak coordinates come from
   ``var`` columns (``chrom``/``seqnames``, ``start``, ``end``) or from names such as ``chr1:100-600``,
   ``chr1-100-600`` or ``chr1_100_600``; each gene's activity is the sum of the peaks that overlap its
   body plus promoter (strand-aware; :mod:`.annotation`), one sparse product per chunk of cells. The
   genes come from a GTF/GFF (``gtf=``) or, without one, from the peak-to-gene table Cell Ranger ARC
   leaves in ``uns["atac"]["peak_annotation"]`` (as muon reads it);
3. **fragments**: read by :class:`~.fragments.FragmentsReader` into input 1.

Then, for every input: optional neighbour smoothing over an LSI embedding (:mod:`.embedding`; on by
default), and a normalisation (:mod:`.activity`; ``"enrichment"`` by default) chosen so that the genes a
cell type opens more than others rank first. Measured on PBSmall (150 PBMC, ~170 fragments per cell;
``benchmarks/atac.py``, Nov 2026, 15 neighbours) with the ``markers`` model: the defaults gave 58% of the
cells the right Cell Ontology lineage (91% when monocytes called macrophages count as myeloid), against
32% (48%) without smoothing and 22% (36%) without smoothing and with depth-normalised activity.

The FeatureMatrix says which genes the data measure (``measured``): for peaks, the genes some peak
overlaps (the output columns); for gene activity, the genes with a count in any cell. Models score within
them (:class:`~cellscribe.core.types.Assay`); ``benchmarks/atac_real.py`` measures the result on real
labelled peak matrices. For peaks read with a GTF it also says how densely the peak set covers each gene
(``coverage``, :mod:`.coverage`; the ``peak_prior`` option), which tells which cells the peaks were
called on; the ``markers`` model reads a composition prior from it.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellscribe.core.domain.genes import choose_gene_symbols, merge_duplicate_symbols
from cellscribe.core.domain.matrix import DEFAULT_CHUNK, iter_row_chunks, summarize
from cellscribe.core.types import FeatureMatrix

from ._options import as_bool, as_int
from .activity import NORMALIZATIONS, ActivityMatrix, gene_baseline
from .annotation import read_gene_annotation, resolve_annotation
from .coverage import peak_coverage
from .coverage import usable as usable_coverage
from .embedding import DEFAULT_NEIGHBORS, knn_operator, lsi
from .fragments import DEFAULT_PROMOTER
from .overlap import peak_coordinates, peaks_to_genes

log = logging.getLogger(__name__)

__all__ = ["AtacModality", "FEATURE_KINDS"]

FEATURE_KINDS = ("auto", "peaks", "genes")
#: Cells with counts per smoothing neighbour at least: small runs smooth over fewer neighbours (10 cells:
#: 3), so that neighbourhoods stay local (PBSmall's 10 first cells: 0 of 10 answered with 10
#: neighbours, 10 of 10 with 3).
MIN_CELLS_PER_NEIGHBOR = 3
#: Cells with counts the enrichment normalisation needs (over one cell every gene is its own baseline and
#: nothing is left to rank); fewer fall back to depth normalisation, which one cell supports (1 PBSmall
#: cell: 0 -> 1 answered; 2 cells: enrichment answered 93% of 15 random pairs, depth 90%).
MIN_ENRICHMENT_CELLS = 2
#: ``obsm`` key of an LSI embedding used for smoothing when present (the fragments reader writes it;
#: muon's ``atac.tl.lsi`` too).
LSI_KEY = "X_lsi"


def _choose_matrix(adata: Any, layer: str | None, use_raw: bool | None) -> tuple[Any, pd.DataFrame, pd.Index, str]:
    if layer is not None and use_raw:
        raise ValueError("pass either layer= or use_raw=True, not both")
    if layer is not None:
        if layer not in adata.layers:
            available = ", ".join(repr(k) for k in adata.layers.keys()) or "none"
            raise ValueError(f"layer {layer!r} not found (adata.layers has: {available}); leave layer unset to use X")
        return adata.layers[layer], adata.var, adata.var_names, f"layers[{layer!r}]"
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True but adata has no .raw; leave use_raw unset to use adata.X")
        return adata.raw.X, adata.raw.var, adata.raw.var_names, "raw.X"
    return adata.X, adata.var, adata.var_names, "X"


def _in_memory(matrix: Any) -> bool:
    return sp.issparse(matrix) or isinstance(matrix, np.ndarray)


def _load(matrix: Any, chunk_size: int, what: str) -> sp.csr_matrix:
    """``matrix`` as an in-memory CSR (no copy for CSR input); backed matrices are read with a warning."""
    if sp.issparse(matrix) and matrix.format == "csr":
        return matrix
    if not _in_memory(matrix):
        message = (f"{what} needs the whole matrix: reading the on-disk (backed) matrix into memory; pass "
                   "smoothing=False (--no-smoothing) to keep it on disk")
        warnings.warn(message, UserWarning, stacklevel=4)
    return sp.vstack([chunk for _, _, chunk in iter_row_chunks(matrix, chunk_size)], format="csr")


class AtacModality:
    """Chromatin accessibility (scATAC-seq, the ATAC of a multiome) as gene activity."""

    name = "atac"
    description = (
        "Chromatin accessibility as gene activity: from fragments (snapatac2), peaks (aggregated over gene "
        "body + promoter) or a gene activity matrix; kNN-smoothed on LSI, enrichment-normalised."
    )
    mudata_keys: tuple[str, ...] = ("atac", "peaks", "ATAC")
    #: Options for label transfer (``cellscribe.tl.transfer_labels``): correlation wants log-normalised
    #: activity, which keeps genes below a cell's average (0.95 of PBSmall right against 0.91 with the
    #: enrichment the sentences rank).
    transfer_options = {"normalization": "depth"}
    #: A single cell's gene activity rests on a few fragments per gene, so calls flip between close types
    #: from cell to cell of one population: each cell's label is decided with its 15 nearest cells in the
    #: LSI (``neighbor_vote``; scanpy's default neighbourhood), as scATAC is usually annotated by cluster.
    default_neighbor_vote = 15

    def embedding(
        self, adata: Any, *, layer: str | None = None, use_raw: bool | None = None, use_rep: str | None = None,
        n_components: int | None = None, seed: int = 0, chunk_size: int = DEFAULT_CHUNK, **options: Any,
    ) -> tuple[np.ndarray, str]:
        """The LSI embedding the smoothing uses, for a budgeted run: ``obsm[use_rep]``, else
        ``obsm["X_lsi"]`` (the fragments reader writes it; muon's ``atac.tl.lsi`` too), else an LSI
        (:func:`.embedding.lsi`) of the input matrix (peaks, or gene activity). ``adata`` is not touched."""
        rep = use_rep if use_rep is not None else (LSI_KEY if LSI_KEY in adata.obsm else None)
        if rep is not None:
            if rep not in adata.obsm:
                keys = ", ".join(map(repr, adata.obsm.keys())) or "none"
                raise ValueError(f"use_rep={rep!r} is not in obsm (keys: {keys}); leave it unset to compute an "
                                 "LSI embedding")
            return np.asarray(adata.obsm[rep], dtype=np.float32), f"obsm[{rep!r}]"
        matrix, _, _, source = _choose_matrix(adata, layer, use_raw)
        embedding = lsi(_load(matrix, chunk_size, "an LSI embedding"), n_components=n_components, seed=seed)
        return embedding, f"LSI of {source} ({embedding.shape[1]} components)"

    def prepare(
        self,
        adata: Any,
        *,
        layer: str | None = None,
        use_raw: bool | None = None,
        gtf: str | None = None,
        promoter: int = DEFAULT_PROMOTER,
        downstream: int = 0,
        gene_body: bool = True,
        features: str = "auto",
        smoothing: bool = True,
        n_neighbors: int = DEFAULT_NEIGHBORS,
        n_components: int | None = None,
        use_rep: str | None = None,
        normalization: str = "enrichment",
        check_build: bool = True,
        peak_prior: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        **options: Any,
    ) -> FeatureMatrix:
        """Describe the ATAC data of ``adata`` as a cells x genes gene-activity FeatureMatrix.

        Parameters
        ----------
        adata
            Cells x peaks or cells x genes (gene activity). Never modified; a backed matrix stays on
            disk unless smoothing or an LSI needs it whole (then it is read with a warning).
        layer, use_raw
            Read ``layers[layer]`` or ``raw.X`` instead of ``X``.
        gtf
            Gene annotation for peaks (a GTF/GFF path; a snapatac2 genome name needs a download).
            Without it, peaks use ``uns["atac"]["peak_annotation"]`` when present. Ignored for gene
            activity.
        promoter, downstream, gene_body
            A gene's region for peaks: its body (``gene_body``) plus ``promoter`` bp upstream of the
            TSS and ``downstream`` bp after the end, strand-aware (as snapatac2 counts fragments).
        features
            ``"auto"`` (peaks when ``var`` has coordinates or most ``var_names`` are intervals, else
            genes), ``"peaks"`` or ``"genes"``.
        smoothing
            Average each cell's counts over its ``n_neighbors`` nearest cells (itself included) in an
            LSI embedding before normalising. Cells without counts are neither smoothed nor used as
            neighbours.
        n_neighbors
            Neighbourhood size of the smoothing.
        n_components
            LSI components when the embedding is computed here (default: one per 30 cells, 5 to 30).
        use_rep
            ``obsm`` key of the embedding to smooth over; default ``obsm["X_lsi"]`` when present
            (the fragments reader writes it), else an LSI of the input matrix (peaks, or genes).
        normalization
            ``"enrichment"`` (default), ``"depth"`` or ``"none"``; see :mod:`.activity`.
        check_build
            Refuse peaks whose gene annotation is of another genome build (:mod:`.build`; the error
            gives the measured share). ``False`` skips the check, for peak sets without promoter peaks
            or synthetic data.
        peak_prior
            For peaks with a GTF: count the peaks around every gene against genes of the same length
            (:mod:`.coverage`) and give the table to the model (``Assay.coverage``), which may read the
            data set's composition from it (the ``markers`` model does: see "Composition prior" in its
            docstring), unless half or more of the peaks lie at promoters or there are fewer than 2,000 of
            them (a selection: :func:`.coverage.usable`; a note in ``uns[key]["params"]["matrix_notes"]``
            says so). ``False`` leaves it out: for a peak set
            not called on these cells (a reference atlas's peaks, a published list of regions).
        chunk_size
            Cells per chunk when reading and computing rows.
        options
            Options of other components; ignored.

        Returns
        -------
        A FeatureMatrix with one row per cell of ``adata`` (same order; cells without counts give empty
        rows), one column per gene symbol, ``value_kind="activity"``. Its matrix is computed lazily,
        chunk by chunk, when the sentence strategy reads it.

        Raises
        ------
        ValueError
            Negative values (scaled data); peaks without a gene annotation; invalid options; gene ids
            that cannot be made symbols.
        TypeError
            ``adata`` is not an AnnData.
        """
        import anndata

        if not isinstance(adata, anndata.AnnData):
            if hasattr(adata, "mod"):
                raise TypeError(
                    "the atac modality needs an AnnData, got a MuData; pass its ATAC modality, e.g. "
                    f"mdata.mod['atac'] (modalities: {', '.join(map(repr, adata.mod))})"
                )
            raise TypeError(f"the atac modality needs an AnnData, got {type(adata).__name__}")
        if features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {features!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
        smoothing = as_bool(smoothing, "smoothing")
        check_build = as_bool(check_build, "check_build")
        gene_body = as_bool(gene_body, "gene_body")
        peak_prior = as_bool(peak_prior, "peak_prior")
        promoter = as_int(promoter, "promoter", 0)
        downstream = as_int(downstream, "downstream", 0)
        n_neighbors = as_int(n_neighbors, "n_neighbors", 1)
        if n_components is not None:
            n_components = as_int(n_components, "n_components", 1)
        started = time.perf_counter()

        matrix, var, var_names, source = _choose_matrix(adata, layer, use_raw)
        first = matrix if _in_memory(matrix) else next(iter_row_chunks(matrix, chunk_size))[2]
        if summarize(first, chunk_size).has_negative:
            raise ValueError(
                f"{source} contains negative values (scaled or centred data); gene activity is ranked from "
                "counts or non-negative scores: pass layer= (or use_raw=True) to choose such a matrix"
            )

        measured = None  # peaks: every gene some peak overlaps is measured
        coverage = None
        prior_note = None
        coords = None if features == "genes" else peak_coordinates(var, var_names)
        if features == "peaks" and coords is None:
            raise ValueError(
                "features='peaks' but the peaks have no coordinates: give var columns chrom, start, end, or "
                "var_names like 'chr1:100-600'"
            )
        if coords is not None:
            peaks, coord_source = coords
            to_genes, names, how, coverage = self._peak_genes(
                adata, peaks, gtf, promoter, downstream, gene_body, check_build, with_coverage=peak_prior
            )
            what = f"{source}: {len(peaks)} peaks ({coord_source}) -> {len(names)} genes ({how})"
            if coverage is not None:
                fit, why = usable_coverage(coverage)
                if not fit:
                    prior_note = f"no composition prior from the peak set: {why}"
                    log.info("atac: %s", prior_note)
                    coverage = None
        else:
            symbols = choose_gene_symbols(var, var_names)
            log.info("atac: gene activity; %s", symbols.note)
            names, to_genes, _ = merge_duplicate_symbols(symbols.symbols, np.float32)
            measured = _measured_genes(matrix, to_genes, chunk_size)
            what = f"{source}: gene activity ({len(names)} genes, {int(measured.sum())} with any count)"

        notes: list[str] = [] if prior_note is None else [prior_note]
        n_active = None
        if smoothing:
            activity, smooth_note, n_active = self._smoothed(
                adata, matrix, to_genes, use_rep, n_neighbors, n_components, chunk_size
            )
            what += f"; {smooth_note}"
            if "asked" in smooth_note:
                notes.append(smooth_note)
        else:
            activity = ActivityMatrix(matrix, to_genes=to_genes, normalization="none")
        if normalization == "enrichment":
            n_active = _active_cells(matrix, chunk_size) if n_active is None else n_active
            if n_active < MIN_ENRICHMENT_CELLS:
                # Over one cell, every gene equals its own baseline: enrichment would leave nothing to rank.
                note = (f"enrichment normalisation compares the cells annotated together and needs at least "
                        f"{MIN_ENRICHMENT_CELLS} cells with counts ({n_active} here): depth normalisation used, "
                        "which reads each cell alone")
                log.warning("atac: %s", note)
                notes.append(note)
                normalization = "depth"
        if normalization == "enrichment":
            activity = activity.with_normalization("enrichment", gene_baseline(activity, chunk_size))
        else:
            activity = activity.with_normalization(normalization)
        what += f"; {normalization} normalisation"

        result = FeatureMatrix(
            X=activity,
            feature_names=names,
            cell_ids=adata.obs_names.to_numpy(),
            value_kind="activity",
            source=what,
            modality=self.name,
            measured=measured,
            notes=notes,
            coverage=coverage,
        )
        log.info("atac: %d cells x %d genes from %s in %.2f s", result.n_cells, result.n_features, what,
                 time.perf_counter() - started)
        return result

    @staticmethod
    def _peak_genes(
        adata: Any, peaks: pd.DataFrame, gtf: str | None, promoter: int, downstream: int, gene_body: bool,
        check_build: bool = True, with_coverage: bool = True,
    ) -> tuple[sp.csr_matrix, np.ndarray, str, pd.DataFrame | None]:
        """The peaks x gene-symbols 0/1 matrix and its genes, from a GTF or from Cell Ranger's peak
        annotation, with a note saying which, and the genes' peak coverage (:func:`.coverage.peak_coverage`;
        ``None`` without ``with_coverage`` or from Cell Ranger's table, which has no gene lengths)."""
        if gtf is None:
            table = _peak_annotation(adata)
            if table is None:
                raise ValueError(
                    "these are peaks; turning them into gene activity needs a gene annotation: pass "
                    "gtf=PATH (--gtf PATH, a GTF/GFF of the genome the peaks were called on)"
                )
            to_genes, names = _from_peak_annotation(table, adata.var_names)
            return to_genes, names, "uns['atac']['peak_annotation']", None
        genes = read_gene_annotation(resolve_annotation(gtf))
        to_genes, names = peaks_to_genes(
            peaks, genes, upstream=promoter, downstream=downstream, gene_body=gene_body, check_build=check_build
        )
        if to_genes.nnz == 0:
            warnings.warn(
                f"no peak overlaps a gene region of {gtf!r}: every cell's gene activity is empty. Check that "
                "the annotation belongs to the peaks' genome build",
                UserWarning,
                stacklevel=4,
            )
        unique, merge, _ = merge_duplicate_symbols(names, np.float32)
        if merge is not None:  # genes sharing a symbol: a peak counts once per symbol
            to_genes = sp.csr_matrix(to_genes @ merge)
            to_genes.data = np.minimum(to_genes.data, 1)
        region = "gene body" if gene_body else "TSS"
        coverage = peak_coverage(peaks, to_genes, unique, genes, upstream=promoter, downstream=downstream,
                                 gene_body=gene_body) if with_coverage else None
        return to_genes, unique, f"{region} + {promoter} bp promoter + {downstream} bp downstream of {gtf}", coverage

    @staticmethod
    def _smoothed(
        adata: Any, matrix: Any, to_genes: sp.spmatrix | None, use_rep: str | None, n_neighbors: int,
        n_components: int | None, chunk_size: int,
    ) -> tuple[ActivityMatrix, str, int]:
        """Gene counts in memory with the kNN averaging operator over the chosen embedding, a note on the
        neighbourhood, and the number of cells with counts."""
        if use_rep is not None and use_rep not in adata.obsm:
            raise ValueError(
                f"use_rep={use_rep!r} is not in obsm (keys: {', '.join(map(repr, adata.obsm.keys())) or 'none'}); "
                "leave it unset to compute an LSI embedding"
            )
        rep = use_rep if use_rep is not None else (LSI_KEY if LSI_KEY in adata.obsm else None)
        inputs = _load(matrix, chunk_size, "smoothing")
        counts = inputs if to_genes is None else sp.csr_matrix(inputs @ to_genes, dtype=np.float32)
        if not np.issubdtype(counts.dtype, np.floating):
            counts = counts.astype(np.float32)
        active = np.asarray(counts.sum(axis=1)).ravel() > 0
        if rep is not None:
            embedding = np.asarray(adata.obsm[rep], dtype=np.float32)
            origin = f"obsm[{rep!r}]"
        else:
            embedding = lsi(inputs, n_components=n_components)
            origin = f"LSI of the input ({embedding.shape[1]} components)"
        if embedding.shape[0] != counts.shape[0]:
            raise ValueError(f"obsm[{rep!r}] has {embedding.shape[0]} rows for {counts.shape[0]} cells")
        # A neighbourhood must stay a small part of the data: averaging 30 of 10 cells would make every
        # cell the same average cell, and enrichment over that average would leave nothing to rank.
        n_active = int(active.sum())
        k = max(1, min(n_neighbors, n_active // MIN_CELLS_PER_NEIGHBOR))
        if k < 2:  # a neighbourhood of the cell alone: nothing to smooth
            note = (f"no kNN smoothing: {n_neighbors} neighbours asked, {n_active} cells with counts allow none "
                    f"(at least {2 * MIN_CELLS_PER_NEIGHBOR} needed for 2); each cell read alone")
            log.warning("atac: %s", note)
            return ActivityMatrix(counts, normalization="none"), note, n_active
        operator = knn_operator(embedding, n_neighbors=k, active=active)
        note = f"kNN smoothing ({k} neighbours on {origin})"
        if k < n_neighbors:
            note += f"; {n_neighbors} asked, {n_active} cells with counts allow {k}"
            log.info("atac: %s", note)
        return ActivityMatrix(counts, neighbors=operator, normalization="none"), note, n_active


def _active_cells(matrix: Any, chunk_size: int) -> int:
    """Cells with any non-zero count (one pass; a backed matrix chunk by chunk)."""
    n = 0
    for _, _, chunk in iter_row_chunks(matrix, chunk_size):
        chunk = sp.csr_matrix(chunk)
        chunk.eliminate_zeros()
        n += int(np.count_nonzero(np.diff(chunk.indptr)))
    return n


def _measured_genes(matrix: Any, to_genes: sp.spmatrix | None, chunk_size: int) -> np.ndarray:
    """Boolean mask of the genes with a count in any cell (one pass; a backed matrix chunk by chunk).

    A gene-activity matrix lists every gene of its annotation, but fragments from part of the genome
    (PBSmall covers chromosomes 5 and 11) or a sparse assay leave many genes without a single count:
    those genes are not measured, and models must not weigh them (:class:`~cellscribe.core.types.Assay`).
    """
    n_features = matrix.shape[1]
    seen = np.zeros(n_features, dtype=bool)
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        seen[np.unique(csr.indices[csr.data != 0])] = True
    else:
        for _, _, chunk in iter_row_chunks(matrix, chunk_size):
            chunk = sp.csr_matrix(chunk)
            seen[np.unique(chunk.indices[chunk.data != 0])] = True
    if to_genes is None:
        return seen
    return np.asarray(sp.csr_matrix(to_genes).T @ seen.astype(np.float32)).ravel() > 0


def _peak_annotation(adata: Any) -> pd.DataFrame | None:
    """Cell Ranger ARC's peak-to-gene table as muon stores it (``uns["atac"]["peak_annotation"]``)."""
    atac = adata.uns.get("atac") if hasattr(adata.uns, "get") else None
    table = atac.get("peak_annotation") if isinstance(atac, dict) else None
    if not isinstance(table, pd.DataFrame) or "peak" not in table.columns:
        return None
    return table


def _from_peak_annotation(table: pd.DataFrame, var_names: pd.Index) -> tuple[sp.csr_matrix, np.ndarray]:
    genes = (table["gene"] if "gene" in table.columns else pd.Series(table.index, index=table.index)).astype(str)
    peaks = table["peak"].astype(str)
    rows = pd.Index(var_names.astype(str)).get_indexer(peaks.to_numpy())
    found = rows >= 0
    codes, names = pd.factorize(genes.to_numpy()[found])
    matrix = sp.csr_matrix(
        (np.ones(int(found.sum()), dtype=np.float32), (rows[found], codes)), shape=(len(var_names), len(names))
    )
    matrix.data = np.minimum(matrix.data, 1)  # duplicate pairs count once
    log.info("atac: peaks -> genes from uns['atac']['peak_annotation'] (%d pairs, %d genes)",
             int(found.sum()), len(names))
    return matrix, np.asarray(names, dtype=object)
