"""Benchmark: the ATAC plugin's gene activity, against snapatac2, and its accuracy on PBSmall.

Three parts (``--parts``, default all):

``fragments``
    Gene activity from a fragment file: ``FragmentsReader.read`` (cellscribe, default settings) against
    the bare snapatac2 calls it wraps, ``import_fragments(..., sorted_by_barcode=False,
    min_num_fragments=0, file=None)`` + ``make_gene_matrix(..., file=None)``, same file, same
    annotation, same threads. Run on the PBSmall file and on a larger synthetic fragment file made from
    it (``--cells`` x ``--fragments-per-cell``; see :func:`make_fragments`). Runs alternate between the
    two and are repeated (``--repeats``); the median and the minimum wall time are reported, and
    cellscribe's overhead is the ratio of the medians.
``peaks``
    The peaks path on a synthetic ``--peak-cells`` x ``--peaks`` count matrix (default 10,000 x
    100,000; see :func:`make_peaks`) and the hg38 annotation: the atac modality without smoothing
    (annotation read, overlap join, then every chunk of cells x genes computed, as a sentence strategy
    reads them), with the defaults (LSI of the peaks, kNN smoothing, enrichment; two passes), and
    ``snapatac2.pp.make_gene_matrix(peaks, use_x=True)`` on the same matrix. Each mode runs in a fresh
    subprocess; wall time and peak resident memory above the loaded data are reported.
``accuracy``
    Lineage accuracy on PBSmall (150 PBMC, labels B cell / T cell / monocyte) with the default
    ``markers`` model for the default settings and for the alternatives (no smoothing, other
    normalisations, neighbourhood sizes, LSI sizes). "lineage" compares Cell Ontology lineages;
    "myeloid" also counts monocyte, macrophage and dendritic cell as one lineage.

Usage::

    .venv/bin/python benchmarks/atac.py                       # everything (about 8 minutes on 2 cores)
    .venv/bin/python benchmarks/atac.py --parts accuracy
    .venv/bin/python benchmarks/atac.py --parts peaks --peak-cells 2000

Results (Dec 2026, the 2-core development machine, snapatac2 2.9, ``--repeats 3``; other engineers'
jobs loaded the machine, so wall times moved by up to 2x between runs: compare CPU times):

Fragments -> gene activity, default settings, hg19 ArchR annotation (23,179 genes), 2 threads:

=============================================  ===================  ==============  ==========
file                                           bare snapatac2       cellscribe      overhead
=============================================  ===================  ==============  ==========
PBSmall, 150 cells, 29,399 fragments           1.45 s (CPU 0.66 s)  1.72 s (0.81)   +19% (+23%)
synthetic, 2,000 cells, 6.0 M fragments        27.34 s (CPU 16.99)  26.51 s (17.55) -3% (+3%)
=============================================  ===================  ==============  ==========

(medians). cellscribe's extra work is the genome-tile matrix and its LSI (``obsm["X_lsi"]``, ~0.3 s for
2,000 cells), the genome-build check on a sample of the fragments (0.05-0.25 s: most of the extra on
the small PBSmall file), reordering rows to the whitelist and the QC flags. In Nov 2026, before the
build check and on an idle machine: +7% (+8% CPU) on PBSmall, +3% (+4%) on the synthetic file.

Peaks -> genes, 10,000 cells x 100,000 peaks, hg38 Ensembl 101 (59,609 genes):

==============================================  =========  ======================  =========
mode                                            seconds    genes / non-zeros       peak MiB
==============================================  =========  ======================  =========
snapatac2 ``make_gene_matrix(use_x=True)``      34.23      21,869 / 15,536,893     539
cellscribe, no smoothing, raw sums              3.97       21,869 / 15,537,757     532
cellscribe defaults (LSI, kNN, enrichment)      33.86      21,869 / 88,688,583     1,584
==============================================  =========  ======================  =========

(On the idle machine in Nov 2026, with 15 smoothing neighbours: 10.70 s, 2.07 s and 16.79 s / 1,491
MiB.) Both give the same genes; the 864 extra non-zeros (of 15.5 M) are peaks that start on a gene's
last base: cellscribe reads GTF coordinates as 1-based and closed and peak names as BED (0-based,
end-exclusive), snapatac2 drops that one-base overlap. With smoothing, every cell holds the genes of 30
neighbours (89 M non-zeros after the enrichment clip); the time is the LSI of the peaks and two passes
of sparse smoothing (the baseline, then the rows the sentence strategy reads). The synthetic peaks lie
anywhere, not at transcription start sites, so the benchmark turns the genome-build check off
(``check_build=False``) that real peak sets pass.

PBSmall lineage accuracy with the ``markers`` model: see ``benchmarks/atac_real.py`` (0.86 with the
default settings, Dec 2026; it counts a microglial cell as wrong for a blood monocyte). The Nov 2026
figures of the ``accuracy`` part below were: defaults 0.580 (0.907 counting monocyte/macrophage/
dendritic cell as one myeloid lineage), no smoothing 0.320 (0.480), smoothing with depth-normalised
activity 0.313 (0.527), neither 0.220 (0.360).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "atac"
SHARED = REPO.parent / "shared" / "data"
PBSMALL = DATA / "PBSmall_fragments.tsv.gz"
LABELS = DATA / "PBSmall_labels.tsv"
HG19_SIZES = DATA / "hg19.chrom.sizes"
HG19_GTF = SHARED / "genome" / "hg19_archr_genes.gtf.gz"
HG38_GTF = SHARED / "genome" / "hg38_ensembl101_genes.gtf.gz"
HG38_SIZES = SHARED / "genome" / "hg38.chrom.sizes"


def _quiet() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")


def _n_jobs() -> int:
    from cellscribe.plugins.atac.fragments import _n_jobs

    return _n_jobs(None)


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------


def make_fragments(path: Path, n_cells: int, per_cell: int, seed: int = 0) -> int:
    """Write a coordinate-sorted 10x fragment file of ``n_cells`` PBMC-like cells (hg19 chr5/chr11).

    Each synthetic cell takes the cell type of a PBSmall cell (cycling through the 150) and draws
    ``per_cell`` fragments (Poisson) with replacement from all PBSmall fragments of that type, each
    moved by a uniform shift of up to 250 bp: real accessible sites, real fragment lengths, at
    ``per_cell`` fragments per cell instead of ~170. Written gzip level 1. Returns the line count.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    frags = pd.read_csv(PBSMALL, sep="\t", header=None, names=["chrom", "start", "end", "barcode", "count"])
    labels = pd.read_csv(LABELS, sep="\t", index_col=0)["cell_type"]
    frags["type"] = labels.reindex(frags["barcode"]).to_numpy()
    types = labels.to_numpy()[np.arange(n_cells) % len(labels)]
    n = rng.poisson(per_cell, n_cells)
    parts = []
    for cell_type in np.unique(types):
        pool = frags[frags["type"] == cell_type]
        cells = np.flatnonzero(types == cell_type)
        owners = np.repeat(cells, n[cells])
        pick = rng.integers(0, len(pool), len(owners))
        shift = rng.integers(-250, 251, len(owners))
        parts.append(pd.DataFrame({
            "chrom": pool["chrom"].to_numpy()[pick],
            "start": np.maximum(pool["start"].to_numpy()[pick] + shift, 0),
            "length": (pool["end"] - pool["start"]).to_numpy()[pick],
            "cell": owners,
        }))
    table = pd.concat(parts, ignore_index=True)
    table["end"] = table["start"] + table["length"]
    table["barcode"] = "SYN" + table["cell"].astype(str).str.zfill(7) + "-1"
    table["count"] = 1
    table = table.sort_values(["chrom", "start", "end"], kind="stable")
    table[["chrom", "start", "end", "barcode", "count"]].to_csv(
        path, sep="\t", header=False, index=False, compression={"method": "gzip", "compresslevel": 1}
    )
    return len(table)


def make_peaks(folder: Path, n_cells: int, n_peaks: int, per_cell: int, seed: int = 0) -> Path:
    """Write ``n_cells`` x ``n_peaks`` synthetic peak counts (hg38) to ``folder/peaks.npz``.

    Peaks: uniform positions over chr1-22 and chrX (weighted by length), widths 300-1,500 bp, sorted.
    Cells: 5 groups; each group opens its own random 20% of the peaks more often (60% of a cell's
    accessible peaks come from its group's set, 40% from all peaks), ~``per_cell`` accessible peaks
    per cell (a 10x PBMC cell has a few thousand), counts 1-4. Stored as CSR (float32) plus the
    peak names ``chr1:100-600``.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    sizes = dict(line.split() for line in HG38_SIZES.read_text().splitlines() if line.strip())
    chroms = [c for c in sizes if c.removeprefix("chr").isdigit() or c == "chrX"]
    lengths = np.array([int(sizes[c]) for c in chroms], dtype=np.int64)
    chrom = rng.choice(len(chroms), n_peaks, p=lengths / lengths.sum())
    start = (rng.random(n_peaks) * (lengths[chrom] - 2000)).astype(np.int64)
    end = start + rng.integers(300, 1500, n_peaks)
    order = np.lexsort((start, chrom))
    names = np.array([f"{chroms[c]}:{s}-{e}" for c, s, e in zip(chrom[order], start[order], end[order])])
    groups = rng.integers(0, 5, n_cells)
    programs = [rng.choice(n_peaks, n_peaks // 5, replace=False) for _ in range(5)]
    indptr, indices = [0], []
    for cell in range(n_cells):
        k = rng.poisson(per_cell)
        own = programs[groups[cell]][rng.integers(0, n_peaks // 5, int(0.6 * k))]
        rest = rng.integers(0, n_peaks, k - len(own))
        cols = np.unique(np.concatenate([own, rest]))
        indices.append(cols)
        indptr.append(indptr[-1] + len(cols))
    indices = np.concatenate(indices).astype(np.int32)
    data = (1 + rng.poisson(0.4, len(indices))).clip(max=4).astype(np.float32)
    matrix = sp.csr_matrix((data, indices, np.asarray(indptr, dtype=np.int64)), shape=(n_cells, n_peaks))
    path = folder / "peaks.npz"
    np.savez(path, data=matrix.data, indices=matrix.indices, indptr=matrix.indptr, shape=matrix.shape,
             names=names, groups=groups)
    return path


# -------------------------------------------------------------------------------------------------
# Part 1: fragments
# -------------------------------------------------------------------------------------------------


def bare_snapatac2(path: Path, gtf: Path, sizes: Path) -> tuple[float, float, tuple[int, int]]:
    """The two snapatac2 calls cellscribe's reader makes, with the same settings.

    :return: wall seconds, CPU seconds (all threads of the process), shape of the gene matrix.
    """
    import snapatac2 as snap

    from cellscribe.plugins.atac import read_chrom_sizes

    chrom_sizes = read_chrom_sizes(sizes)
    wall, cpu = time.perf_counter(), time.process_time()
    data = snap.pp.import_fragments(
        str(path), chrom_sizes, sorted_by_barcode=False, min_num_fragments=0, file=None, n_jobs=_n_jobs()
    )
    genes = snap.pp.make_gene_matrix(data, gene_anno=str(gtf), file=None)
    return time.perf_counter() - wall, time.process_time() - cpu, genes.shape


def cellscribe_reader(path: Path, gtf: Path, sizes: Path) -> tuple[float, float, tuple[int, int]]:
    """``FragmentsReader.read`` with default settings (chromosome sizes read inside, as for the bare run)."""
    from cellscribe.plugins.atac import FragmentsReader

    wall, cpu = time.perf_counter(), time.process_time()
    adata = FragmentsReader().read(path, gtf=gtf, chrom_sizes=sizes)
    return time.perf_counter() - wall, time.process_time() - cpu, adata.shape


def part_fragments(args: argparse.Namespace, workdir: Path) -> None:
    import snapatac2  # noqa: F401  (imported once, outside the timings)

    gtf = HG19_GTF if HG19_GTF.exists() else DATA / "hg19_chr5_chr11_genes.gtf.gz"
    files = [("PBSmall (150 cells, 29,399 fragments)", PBSMALL)]
    big = workdir / f"synthetic_{args.cells}x{args.fragments_per_cell}.tsv.gz"
    if not big.exists():
        started = time.perf_counter()
        n = make_fragments(big, args.cells, args.fragments_per_cell)
        print(f"made {big.name}: {n:,} fragments in {time.perf_counter() - started:.1f} s")
    files.append((f"synthetic ({args.cells:,} cells x ~{args.fragments_per_cell:,} fragments)", big))
    # Warm the annotation and file caches of both paths once, untimed.
    bare_snapatac2(PBSMALL, gtf, HG19_SIZES)
    cellscribe_reader(PBSMALL, gtf, HG19_SIZES)
    print(f"\nfragments -> gene activity ({gtf.name}, {_n_jobs()} threads, {args.repeats} alternating runs)")
    print(f"{'file':46s} {'':7s} {'bare snapatac2':>15s} {'cellscribe':>11s} {'overhead':>9s}")
    for label, path in files:
        bare, ours = [], []
        for _ in range(args.repeats):
            *times, shape_bare = bare_snapatac2(path, gtf, HG19_SIZES)
            bare.append(times)
            *times, shape_ours = cellscribe_reader(path, gtf, HG19_SIZES)
            ours.append(times)
        assert shape_bare == shape_ours, (shape_bare, shape_ours)
        bare, ours = np.array(bare), np.array(ours)
        for column, what in ((0, "wall median"), (0, "wall min"), (1, "CPU median"), (1, "CPU min")):
            pick = np.median if "median" in what else np.min
            b, o = float(pick(bare[:, column])), float(pick(ours[:, column]))
            print(f"{label:46s} {what:11s} {b:11.2f} s {o:9.2f} s {o / b - 1:+8.1%}")
            label = ""


# -------------------------------------------------------------------------------------------------
# Part 2: peaks
# -------------------------------------------------------------------------------------------------


def _load_peaks(path: Path):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    saved = np.load(path)
    matrix = sp.csr_matrix((saved["data"], saved["indices"], saved["indptr"]), shape=tuple(saved["shape"]))
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(matrix.shape[0])])
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=saved["names"]))


def _rss_mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process in MiB, from ``/proc/self/status`` (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the process's peak resident memory (VmHWM) to its current value (Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def worker(mode: str, data: Path) -> dict:
    """One peaks mode in this (fresh) process: timings and peak memory above the loaded data.

    The peak is the resident set's high-water mark after it was reset once the data and libraries
    were loaded, minus the resident set at that moment: what the mode itself needed at most.
    """
    _quiet()
    import scipy.sparse as sp

    adata = _load_peaks(data)
    if mode == "snapatac2":
        adata.X = adata.X.astype(np.uint32)  # make_gene_matrix(use_x=True) reads unsigned counts only
    import snapatac2 as snap  # noqa: F401  (imports outside the timings)
    import sklearn.utils.extmath  # noqa: F401

    from cellscribe.plugins.atac import AtacModality

    _reset_peak()
    base = _rss_mib("VmRSS")
    out: dict = {"mode": mode}
    started = time.perf_counter()
    if mode == "snapatac2":
        genes = snap.pp.make_gene_matrix(adata, gene_anno=str(HG38_GTF), use_x=True, file=None)
        out["genes"] = int((np.asarray(genes.X.sum(axis=0)).ravel() > 0).sum())
        out["nnz"] = int(genes.X.nnz)
    else:
        options = {"smoothing": False, "normalization": "none"} if mode == "no-smoothing" else {}
        # Synthetic peaks lie anywhere, not at transcription start sites as real ones gather: the
        # genome-build check (which real peak sets pass) would rightly refuse them.
        features = AtacModality().prepare(adata, gtf=str(HG38_GTF), check_build=False, **options)
        out["prepare_s"] = time.perf_counter() - started
        nnz = 0
        for _, _, chunk in features.iter_chunks(10_000):
            nnz += chunk.nnz
        out["genes"] = int(features.n_features)
        out["nnz"] = nnz
        assert isinstance(chunk, sp.csr_matrix)
    out["seconds"] = time.perf_counter() - started
    out["peak_mib_above_data"] = _rss_mib("VmHWM") - base
    return out


def part_peaks(args: argparse.Namespace, workdir: Path) -> None:
    if not HG38_GTF.exists():
        print(f"peaks: skipped, {HG38_GTF} not found")
        return
    path = workdir / f"peaks_{args.peak_cells}x{args.peaks}.npz"
    if not path.exists():
        started = time.perf_counter()
        make_peaks(workdir, args.peak_cells, args.peaks, args.peaks_per_cell)
        (workdir / "peaks.npz").rename(path)
        print(f"made {path.name} in {time.perf_counter() - started:.1f} s")
    print(f"\npeaks -> genes: {args.peak_cells:,} cells x {args.peaks:,} peaks, hg38 Ensembl 101 annotation "
          "(fresh process per mode; times include reading the annotation)")
    print(f"{'mode':36s} {'seconds':>8s} {'of which prepare':>17s} {'genes':>7s} {'non-zeros':>12s} {'peak MiB':>9s}")
    for mode, label in (("snapatac2", "snapatac2 make_gene_matrix(use_x)"),
                        ("no-smoothing", "cellscribe, no smoothing, raw sums"),
                        ("default", "cellscribe defaults (LSI+kNN+enrich)")):
        result = subprocess.run(
            [sys.executable, __file__, "--worker", mode, "--data", str(path)],
            capture_output=True, text=True, check=True,
        )
        r = json.loads(result.stdout.strip().splitlines()[-1])
        prepare = f"{r['prepare_s']:.2f}" if "prepare_s" in r else "-"
        print(f"{label:36s} {r['seconds']:8.2f} {prepare:>17s} {r['genes']:7,d} {r['nnz']:12,d} "
              f"{r['peak_mib_above_data']:9.0f}")


# -------------------------------------------------------------------------------------------------
# Part 3: accuracy on PBSmall
# -------------------------------------------------------------------------------------------------


def lineages(predicted) -> np.ndarray:
    """The Cell Ontology lineage of each predicted label (None when it maps to no term)."""
    from cellscribe.core.domain.ontology import get_ontology

    onto = get_ontology()
    ids = [onto.lookup(str(p)) if isinstance(p, str) else None for p in predicted.astype(object)]
    return np.array([onto.lineage(i) if i else None for i in ids], dtype=object)


def lineage_accuracy(predicted, truth) -> tuple[float, float]:
    """(share of cells whose Cell Ontology lineage is right, the same with myeloid lineages merged)."""
    from cellscribe.core.domain.ontology import get_ontology

    onto = get_ontology()
    ids = [onto.lookup(str(p)) if isinstance(p, str) else None for p in predicted.astype(object)]
    lineage = np.array([onto.lineage(i) if i else None for i in ids], dtype=object)
    gold = truth.reindex(predicted.index).to_numpy(dtype=object)
    myeloid = {"monocyte", "macrophage", "dendritic cell"}
    merge = np.vectorize(lambda x: "myeloid" if x in myeloid else str(x), otypes=[object])
    return float(np.mean(lineage == gold)), float(np.mean(merge(lineage) == merge(gold)))


def part_accuracy(args: argparse.Namespace) -> None:
    import pandas as pd

    import cellscribe
    from cellscribe.core import plugins
    from cellscribe.plugins import atac
    from cellscribe.plugins.atac import FragmentsReader, knn_operator, lsi, tile_matrix

    host = plugins.make_host()
    if "atac" not in host.registry.names("modality"):
        host = plugins.make_host(extra=[("atac", atac)])
    if "markers" not in host.registry.names("backend"):
        print("accuracy: skipped, the markers backend is not registered")
        return
    plugins.set_host(host)
    labels = pd.read_csv(LABELS, sep="\t", index_col=0)["cell_type"]
    gtf = DATA / "hg19_chr5_chr11_genes.gtf.gz"
    adata = FragmentsReader().read(PBSMALL, gtf=gtf, chrom_sizes=HG19_SIZES)
    truth = labels.reindex(adata.obs_names).to_numpy()
    import snapatac2 as snap

    from cellscribe.plugins.atac import read_chrom_sizes

    imported = snap.pp.import_fragments(str(PBSMALL), read_chrom_sizes(HG19_SIZES), sorted_by_barcode=False,
                                        min_num_fragments=0, file=None, n_jobs=_n_jobs())
    tiles = tile_matrix(imported)[imported.obs_names.get_indexer(adata.obs_names)]

    def run(options: dict, embedding=None) -> tuple[float, float, float, str]:
        data = adata.copy()
        if embedding is not None:
            data.obsm["X_lsi"] = embedding
        purity = np.nan
        if options.get("smoothing", True):
            op = knn_operator(data.obsm["X_lsi"], n_neighbors=options.get("n_neighbors", 15)).tocoo()
            off = op.row != op.col
            purity = float(np.mean(truth[op.row[off]] == truth[op.col[off]]))
        cellscribe.tl.annotate(data, modality="atac", progress=False, sidecar=False, modality_options=options)
        right = lineages(data.obs["cellscribe"]) == truth
        per_type = " ".join(f"{int(right[truth == t].sum()):2d}" for t in ("B cell", "T cell", "monocyte"))
        return (*lineage_accuracy(data.obs["cellscribe"], labels), purity, per_type)

    rows = [
        ("defaults (smoothing, 15 neighbours, enrichment)", {}),
        ("no smoothing", {"smoothing": False}),
        ("smoothing, depth normalisation", {"normalization": "depth"}),
        ("no smoothing, depth normalisation", {"smoothing": False, "normalization": "depth"}),
        ("smoothing, raw counts (normalization=none)", {"normalization": "none"}),
        ("smoothing, 5 neighbours", {"n_neighbors": 5}),
        ("smoothing, 30 neighbours", {"n_neighbors": 30}),
    ]
    print("\nPBSmall lineage accuracy, markers model (150 cells; chance 0.33)")
    print(f"{'settings':56s} {'lineage':>8s} {'myeloid':>8s} {'kNN purity':>11s}  right of 50: B  T  mono")
    for label, options in rows:
        strict, merged, purity, per_type = run(options)
        print(f"{label:56s} {strict:8.3f} {merged:8.3f} {purity:11.3f}               {per_type}")
    for n_components in (5, 10, 20):
        for seed in range(args.seeds):
            embedding = lsi(tiles, n_components=n_components, seed=seed)
            strict, merged, purity, per_type = run({}, embedding)
            print(f"{f'LSI {n_components} components, SVD seed {seed}':56s} {strict:8.3f} {merged:8.3f} "
                  f"{purity:11.3f}               {per_type}")


# -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="fragments,peaks,accuracy")
    parser.add_argument("--cells", type=int, default=2000, help="synthetic fragment file: cells")
    parser.add_argument("--fragments-per-cell", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-cells", type=int, default=10_000)
    parser.add_argument("--peaks", type=int, default=100_000)
    parser.add_argument("--peaks-per-cell", type=int, default=2500)
    parser.add_argument("--seeds", type=int, default=3, help="accuracy: SVD seeds per LSI size")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellscribe-atac-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return
    _quiet()
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    print(f"cellscribe ATAC benchmark; {os.cpu_count()} CPUs; workdir {args.workdir}")
    if "fragments" in parts:
        part_fragments(args, args.workdir)
    if "peaks" in parts:
        part_peaks(args, args.workdir)
    if "accuracy" in parts:
        part_accuracy(args)


if __name__ == "__main__":
    main()
