"""Benchmark: scATAC annotation on real labelled peak matrices and fragments (issue 12's figures).

Runs ``cellscribe.tl.annotate(modality="atac")`` with the default ``markers`` model, as a new user would,
on the real labelled scATAC data of ``../shared/data/atac`` (see its PROVENANCE.md), with and without a
tissue, and prints:

``schep``
    Schep et al. 2017 (600 cells, 5,036 peaks, hg19): lineage accuracy of the 300 blood and
    lymphoblastoid cells (Monocyte -> myeloid: monocyte, macrophage, dendritic cell, granulocyte or mast
    cell; Erythroblast -> erythroid; LCL 1, LCL 2 Rep1/Rep2 (GM12878) -> B; LMPP -> hematopoietic stem
    or progenitor), per population, and what the cell lines (K562, HL60, ESCs, fibroblasts) and the two
    AML patients get.
``buenrostro``
    Buenrostro et al. 2018 (533 FACS-sorted bone-marrow progenitors, 35,983 peaks): the share of cells
    called a hematopoietic stem or progenitor cell type (Cell Ontology lineage "HSPC") and the 7-gate x
    label confusion (reported, not tuned).
``pbsmall``
    ArchR's PBSmall (150 PBMC from fragments, chr5/chr11): lineage accuracy (B -> B, T -> T or NK,
    monocyte -> myeloid), in a fresh process with the default settings.
``sampled``
    A larger run: 14,400 cells sampled from the 12 Schep 2017 populations (1,200 each; each cell draws
    as many fragments as a real cell of its population has, from the population's pseudo-bulk profile),
    without a tissue and with ``bone marrow``: lineage accuracy of the blood populations as for
    ``schep``, foreign labels over all cells, the inferred context (``--sampled-cells N`` per population).
``sorted``
    Buenrostro 2018 as a user with sorted cells would run it instead: the seven progenitor types as
    ``candidates`` (cells called one of them, unresolved, exact gate), and ``transfer_labels`` from
    Schep 2017's sorted blood populations as a labelled scATAC reference (monocytes, erythroblasts,
    GM12878 B cells, LMPPs; another study, donor and peak set): the share called the reference's
    progenitors, with the default log-normalised activity and with the enrichment the sentences rank.

For every run: the share of cells given a label from the nervous system, the endocrine pancreas or the
gut (Cell Ontology lineages neuron, glial cell, pancreatic endocrine, or a knowledge type recorded only
in the brain, pancreas or GI tract), unresolved cells, what of the knowledge the data could show
(``uns["cellscribe"]["observability"]``) and the wall time. A label counts as right only when its
lineage is expected and it is not such a foreign label (a microglial cell is a macrophage, but not a
blood one).

Usage::

    .venv/bin/python benchmarks/atac_real.py                       # all three data sets
    .venv/bin/python benchmarks/atac_real.py --data schep,pbsmall
    .venv/bin/python benchmarks/atac_real.py --data sorted          # candidates, a scATAC reference
    .venv/bin/python benchmarks/atac_real.py --data sampled         # 14,400 cells (about 2 minutes)
    .venv/bin/python benchmarks/atac_real.py --data schep,buenrostro --binarize   # peaks read as 0/1
    .venv/bin/python benchmarks/atac_real.py --data schep --peaks 0.5 --peak-seeds 8  # random half of the peaks
    .venv/bin/python benchmarks/atac_real.py --data schep --peaks 2500 --peaks-by variable  # the 2,500 most variable
    .venv/bin/python benchmarks/atac_real.py --option n_neighbors=30 --sentence-genes 500
    .venv/bin/python benchmarks/atac_real.py --data schep,buenrostro --primed-ratio 2.5 --prime-everywhere

``--primed-ratio`` changes the lineage-priming factor (the ``markers`` backend's ``PRIMED_RATIO``);
``--prime-everywhere`` lets priming act on every ATAC run, also where the peak set gives no stem prior
(Schep's promoter selection, PBSmall's fragments), to measure what a factor costs mature cells. Each run
then prints the share of each population's cells whose call was primed.

Results: see benchmarks/README.md ("scATAC on real data").
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GTF19 = SHARED / "genome" / "hg19_archr_genes.gtf.gz"
SIZES19 = SHARED / "genome" / "hg19.chrom.sizes"

MYELOID = {"monocyte", "macrophage", "dendritic cell", "granulocyte", "mast cell"}
FOREIGN_LINEAGES = {"neuron", "glial cell", "pancreatic endocrine"}
FOREIGN_ORGANS = {"brain", "pancreas", "gi tract"}
SCHEP_EXPECTED = {
    "Monocyte": MYELOID,
    "Erythroblast": {"erythroid"},
    "LCL 1": {"B cell"},
    "LCL 2 Rep1": {"B cell"},
    "LCL 2 Rep2": {"B cell"},
    "LMPP": {"HSPC"},
}
PBSMALL_EXPECTED = {"B cell": {"B cell"}, "T cell": {"T cell", "NK cell"}, "monocyte": MYELOID}


def _lineage_table(labels: pd.Series) -> pd.DataFrame:
    """Per label: its Cell Ontology lineage and whether it is foreign to blood (see module docstring)."""
    from cellscribe.core.domain.ontology import get_ontology
    from cellscribe.plugins.markers.knowledge import load_knowledge

    onto = get_ontology()
    knowledge = load_knowledge()
    organs = {str(n): {str(t).lower() for t in ts} for n, ts in zip(knowledge.cell_types, knowledge.tissues)}
    rows = {}
    for label in pd.unique(labels.dropna().astype(str)):
        term = onto.lookup(label)
        lineage = onto.lineage(term) if term else None
        where = organs.get(label, set())
        foreign = lineage in FOREIGN_LINEAGES or bool(where and where <= FOREIGN_ORGANS)
        rows[label] = {"lineage": lineage, "foreign": foreign}
    return pd.DataFrame.from_dict(rows, orient="index", columns=["lineage", "foreign"])


def judge(predicted: pd.Series, truth: pd.Series, expected: dict[str, set[str]]) -> pd.DataFrame:
    """Per cell: truth, label, lineage, foreign, and right (lineage expected and not foreign; NaN where
    the truth has no expectation)."""
    table = _lineage_table(predicted)
    labels = predicted.astype(object)
    lineage = labels.map(lambda x: table.loc[x, "lineage"] if isinstance(x, str) else None)
    foreign = labels.map(lambda x: bool(table.loc[x, "foreign"]) if isinstance(x, str) else False)
    truth = truth.astype(str)
    right = [
        (lin in expected[t] and not f) if t in expected else np.nan
        for t, lin, f in zip(truth, lineage, foreign)
    ]
    return pd.DataFrame(
        {"truth": truth.to_numpy(), "label": labels.to_numpy(), "lineage": lineage.to_numpy(),
         "foreign": foreign.to_numpy(), "right": right}
    )


#: Set by ``--binarize``: peak matrices read as 0/1 (as many pipelines store them).
BINARIZE = False
#: Set by ``--peaks FRACTION`` and the seed loop of ``--peak-seeds``: a random share of the peaks kept.
PEAK_FRACTION = 1.0
PEAK_SEED = 0
#: Set by ``--peaks-by``: keep a random share (``random``) or the most variable / most accessible peaks.
PEAKS_BY = "random"


def _is_peaks(adata) -> bool:
    return bool(adata.n_vars) and str(adata.var_names[0]).startswith("chr")  # peaks, not gene activity


def subsample_peaks(adata, fraction: float, seed: int) -> None:
    """Keep a random ``fraction`` of the peaks of ``adata`` (in place; drawn with ``seed``), as public
    matrices subsample them."""
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(adata.n_vars, max(1, int(round(adata.n_vars * fraction))), replace=False))
    adata._inplace_subset_var(keep)


def top_peaks(adata, n: int, by: str) -> None:
    """Keep the ``n`` peaks of ``adata`` with the highest variance (``by="variable"``) or mean
    (``"accessible"``) of log-normalised counts (in place), as public matrices are often cut down."""
    import scipy.sparse as sp

    from cellscribe.plugins.atac.activity import normalize_rows

    counts = normalize_rows(sp.csr_matrix(adata.X, dtype=np.float64), "depth")
    mean = np.asarray(counts.mean(axis=0)).ravel()
    variance = np.asarray(counts.multiply(counts).mean(axis=0)).ravel() - mean**2
    keep = np.sort(np.argsort(-(variance if by == "variable" else mean), kind="stable")[:n])
    adata._inplace_subset_var(keep)


def annotate(adata, *, tissue, options, sentence_genes):
    """Annotate ``adata`` in place as a user would (after ``--binarize`` / ``--peaks``); return seconds."""
    import cellscribe as cs

    if PEAK_FRACTION != 1 and _is_peaks(adata):
        n = int(PEAK_FRACTION) if PEAK_FRACTION > 1 else max(1, int(round(adata.n_vars * PEAK_FRACTION)))
        if PEAKS_BY == "random":
            subsample_peaks(adata, n / adata.n_vars, PEAK_SEED)
        else:
            top_peaks(adata, n, PEAKS_BY)
    if BINARIZE and _is_peaks(adata):
        import scipy.sparse as sp

        adata.X = (sp.csr_matrix(adata.X) > 0).astype(np.float32)

    started = time.perf_counter()
    cs.tl.annotate(
        adata, modality="atac", tissue=tissue, progress=False, sidecar=False,
        modality_options={"gtf": str(GTF19), **options}, n_genes=sentence_genes,
    )
    return time.perf_counter() - started


def _prime_everywhere() -> None:
    """Let lineage priming act on every chromatin run, also without a stem prior (``--prime-everywhere``):
    a what-if for measuring how many mature cells a priming factor converts."""
    from cellscribe.plugins.markers import backend

    backend.MarkersModel._priming_applies = lambda self: True


def report(name: str, adata, judged: pd.DataFrame, seconds: float, *, show_other: bool = True) -> dict:
    entry = adata.uns["cellscribe"]
    status = adata.obs["cellscribe_status"].astype(str)
    known = judged["right"].notna()
    accuracy = float(judged.loc[known, "right"].astype(bool).mean()) if known.any() else float("nan")
    foreign = float(judged["foreign"].mean())
    obs = dict(entry.get("observability", {}))
    print(f"\n== {name}: lineage accuracy {accuracy:.3f} ({int(known.sum())} cells); foreign labels "
          f"{foreign:.1%}; unresolved {float((status == 'unresolved').mean()):.1%}; {seconds:.1f} s")
    if obs:
        print(f"   observability: {obs.get('n_measured_genes')} measured genes, "
              f"{obs.get('marker_weight_observable')} of the marker weight, "
              f"{obs.get('n_cell_types_callable')} of {obs.get('n_cell_types')} types callable")
    per = judged.groupby("truth").agg(
        cells=("right", "size"), right=("right", lambda r: float(r.mean()) if r.notna().any() else np.nan),
        top=("label", lambda x: ", ".join(f"{k} {v}" for k, v in x.fillna("(unresolved)").value_counts().head(3).items())),
    )
    primed = adata.obs["cellscribe_note"].astype(str).str.contains("lineage priming", regex=False).to_numpy()
    if primed.any():
        per.insert(2, "primed", pd.Series(primed).groupby(judged["truth"].to_numpy()).mean().round(2))
    if not show_other:
        per = per[per["right"].notna()]
    print(per.to_string())
    return {"data": name, "accuracy": accuracy, "foreign": foreign, "seconds": seconds}


def run_schep(tissues, options, genes) -> list[dict]:
    import anndata as ad

    out = []
    for tissue in tissues:
        adata = ad.read_h5ad(SHARED / "atac" / "schep2017_blood_celllines_600cells.h5ad")
        seconds = annotate(adata, tissue=tissue, options=options, sentence_genes=genes)
        judged = judge(adata.obs["cellscribe"], adata.obs["cell_type"], SCHEP_EXPECTED)
        out.append(report(f"Schep 2017, tissue={tissue}", adata, judged, seconds))
    return out


def run_buenrostro(tissues, options, genes) -> list[dict]:
    import anndata as ad

    out = []
    for tissue in tissues:
        adata = ad.read_h5ad(SHARED / "atac" / "buenrostro2018_bm0828_facs_533cells.h5ad")
        seconds = annotate(adata, tissue=tissue, options=options, sentence_genes=genes)
        gates = adata.obs["cell_type"].astype(str)
        judged = judge(adata.obs["cellscribe"], gates, {g: {"HSPC"} for g in gates.unique()})
        out.append(report(f"Buenrostro 2018, tissue={tissue}", adata, judged, seconds))
        confusion = pd.crosstab(adata.obs["cellscribe"].astype(object).fillna("(unresolved)"), gates)
        print(confusion.loc[confusion.sum(axis=1).sort_values(ascending=False).index].to_string())
    return out


def run_pbsmall(tissues, options, genes) -> list[dict]:
    from cellscribe.core.run import read_input

    truth = pd.read_csv(SHARED / "atac" / "PBSmall_labels.tsv", sep="\t", index_col=0)["cell_type"]
    out = []
    for tissue in tissues:
        adata = read_input(SHARED / "atac" / "PBSmall_fragments.tsv.gz", gtf=GTF19, chrom_sizes=SIZES19)
        seconds = annotate(adata, tissue=tissue, options=options, sentence_genes=genes)
        judged = judge(adata.obs["cellscribe"], truth.reindex(adata.obs_names), PBSMALL_EXPECTED)
        out.append(report(f"PBSmall, tissue={tissue}", adata, judged, seconds))
    return out


def sampled_schep(per_population: int, seed: int = 0):
    """Cells drawn from each Schep 2017 population's pseudo-bulk peak profile (see ``sampled``)."""
    import anndata as ad
    import scipy.sparse as sp

    schep = ad.read_h5ad(SHARED / "atac" / "schep2017_blood_celllines_600cells.h5ad")
    counts = sp.csr_matrix(schep.X)
    labels = schep.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    blocks, names = [], []
    for population in pd.unique(labels):
        cells = counts[labels == population]
        profile = np.asarray(cells.sum(axis=0)).ravel()
        depths = rng.choice(np.asarray(cells.sum(axis=1)).ravel().astype(np.int64), size=per_population)
        blocks.append(sp.csr_matrix(rng.multinomial(depths, profile / profile.sum()).astype(np.float32)))
        names += [population] * per_population
    adata = ad.AnnData(sp.vstack(blocks, format="csr"), var=schep.var.copy())
    adata.obs_names = [f"sampled{i}" for i in range(adata.n_obs)]
    adata.obs["cell_type"] = names
    return adata


def run_sampled(tissues, options, genes, per_population: int = 1200) -> list[dict]:
    out = []
    for tissue in tissues:
        adata = sampled_schep(per_population)
        seconds = annotate(adata, tissue=tissue, options=options, sentence_genes=genes)
        judged = judge(adata.obs["cellscribe"], adata.obs["cell_type"], SCHEP_EXPECTED)
        out.append(report(f"{adata.n_obs} cells sampled from Schep 2017, tissue={tissue}", adata, judged, seconds,
                          show_other=False))
        context = adata.uns["cellscribe"].get("observability", {}).get("context", {})
        if context.get("inferred"):
            print(f"   inferred context: {list(context.get('organs', []))}, shares "
                  f"{dict(list(dict(context.get('organ_shares', {})).items())[:3])}, routed "
                  f"{list(context.get('routed', []))}, left out {list(context.get('organ_immune_types_left_out', []))}")
    return out


#: Buenrostro 2018's sorting gates as Cell Ontology types (LMPP: the ontology's early lymphoid progenitor).
GATE_TYPES = {
    "HSC": "hematopoietic stem cell", "MPP": "hematopoietic multipotent progenitor cell",
    "LMPP": "early lymphoid progenitor", "CMP": "common myeloid progenitor",
    "GMP": "granulocyte monocyte progenitor cell", "MEP": "megakaryocyte-erythroid progenitor cell",
    "CLP": "common lymphoid progenitor",
}


def run_sorted(tissues, options, genes) -> list[dict]:
    import anndata as ad

    import cellscribe as cs

    out = []
    adata = ad.read_h5ad(SHARED / "atac" / "buenrostro2018_bm0828_facs_533cells.h5ad")
    gates = adata.obs["cell_type"].astype(str)
    started = time.perf_counter()
    cs.tl.annotate(adata, modality="atac", candidates=list(GATE_TYPES.values()), progress=False, sidecar=False,
                   modality_options={"gtf": str(GTF19), **options}, n_genes=genes)
    seconds = time.perf_counter() - started
    called = adata.obs["cellscribe"].astype(object)
    exact = float((called == gates.map(GATE_TYPES)).mean())
    print(f"\n== Buenrostro 2018, the seven gates as candidates: {called.notna().mean():.3f} called one of them, "
          f"{called.isna().mean():.3f} unresolved, exact gate {exact:.3f}; {seconds:.1f} s")
    print(pd.crosstab(called.fillna("(unresolved)"), gates).to_string())
    out.append({"data": "Buenrostro 2018, gates as candidates", "accuracy": float(called.notna().mean()),
                "foreign": 0.0, "seconds": seconds})

    schep = ad.read_h5ad(SHARED / "atac" / "schep2017_blood_celllines_600cells.h5ad")
    schep.obs_names_make_unique()
    reference = schep[schep.obs["cell_type"].isin(list(SCHEP_EXPECTED))].copy()
    reference.obs["population"] = reference.obs["cell_type"].astype(str).str.replace(r"^LCL.*", "B (GM12878)",
                                                                                      regex=True)
    for normalization in ("depth", "enrichment"):
        started = time.perf_counter()
        labelled = cs.tl.transfer_labels(
            adata, reference, reference_key="population", modality="atac", reference_modality="atac",
            modality_options={"gtf": str(GTF19), "normalization": normalization, **options}, copy=True,
        )
        seconds = time.perf_counter() - started
        share = float((labelled.obs["transfer"] == "LMPP").mean())
        print(f"\n== Buenrostro 2018 from Schep 2017's sorted populations (transfer_labels, {normalization}): "
              f"{share:.3f} called the reference's progenitors (LMPP); {seconds:.1f} s")
        print(pd.crosstab(labelled.obs["transfer"].astype(object).fillna("(unresolved)"), gates).to_string())
        out.append({"data": f"Buenrostro 2018 from Schep 2017 ({normalization})", "accuracy": share,
                    "foreign": 0.0, "seconds": seconds})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="schep,buenrostro,pbsmall")
    parser.add_argument("--option", action="append", default=[], help="atac modality option KEY=VALUE")
    parser.add_argument("--sentence-genes", type=int, default=None, help="n_genes (default: the model's)")
    parser.add_argument("--sampled-cells", type=int, default=1200, help="cells per population for 'sampled'")
    parser.add_argument("--binarize", action="store_true", help="read the peak matrices as 0/1")
    parser.add_argument("--peaks", type=float, default=1.0,
                        help="keep this share (at most 1) or number (above 1) of each peak matrix's peaks")
    parser.add_argument("--peak-seeds", type=int, default=1, help="with --peaks: repeat over this many random draws")
    parser.add_argument("--peaks-by", default="random", choices=["random", "variable", "accessible"],
                        help="with --peaks: a random draw, or the most variable / most accessible peaks")
    parser.add_argument("--primed-ratio", type=float, default=None,
                        help="the lineage-priming factor (default: the markers backend's PRIMED_RATIO)")
    parser.add_argument("--prime-everywhere", action="store_true",
                        help="let priming act on every ATAC run, also where the peak set gives no stem prior")
    args = parser.parse_args(argv)
    if not args.peaks > 0 or (args.peaks > 1 and args.peaks != int(args.peaks)):
        parser.error(f"--peaks is a share of the peaks (above 0, at most 1) or a number of peaks; got {args.peaks}")
    global BINARIZE, PEAK_FRACTION, PEAK_SEED, PEAKS_BY
    PEAKS_BY = args.peaks_by
    BINARIZE = args.binarize
    PEAK_FRACTION = args.peaks
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.primed_ratio is not None:
        from cellscribe.plugins.markers import backend

        backend.PRIMED_RATIO = args.primed_ratio
    if args.prime_everywhere:
        _prime_everywhere()
    options = {}
    for item in args.option:
        key, value = item.split("=", 1)
        options[key] = value
    runs = {
        "schep": (run_schep, [None, "blood", "bone marrow"]),
        "buenrostro": (run_buenrostro, [None, "bone marrow"]),
        "pbsmall": (run_pbsmall, [None, "blood"]),
        "sorted": (run_sorted, [None]),
        "sampled": (functools.partial(run_sampled, per_population=args.sampled_cells), [None, "bone marrow"]),
    }
    summary = []
    drawn = args.peaks != 1 and args.peaks_by == "random"
    for seed in range(args.peak_seeds if drawn else 1):
        PEAK_SEED = seed
        for name in args.data.split(","):
            function, tissues = runs[name]
            summary += [{**row, "peak_seed": seed} for row in function(tissues, options, args.sentence_genes)]
    table = pd.DataFrame(summary)
    print("\n" + table.to_string(index=False))
    if drawn:
        share = f"{int(args.peaks)} peaks" if args.peaks > 1 else f"{args.peaks:.0%} of the peaks"
        print(f"\nover {args.peak_seeds} random draws of {share}:")
        grouped = table.groupby("data", sort=False)
        spread = grouped["accuracy"].agg(["mean", "min", "max"])
        spread["foreign mean"], spread["foreign max"] = grouped["foreign"].mean(), grouped["foreign"].max()
        print(spread.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
