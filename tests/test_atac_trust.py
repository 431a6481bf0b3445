"""What a user needs to trust the ATAC modality, on real data: peak names in every spelling, a gene
annotation of another genome build refused with the measured share, and the gene activity exported.

Real data: the Schep 2017 (hg19, ``chr-start-end``) and Buenrostro 2018 (hg19, ``chr_start_end``) peak
matrices and the hg19/hg38 gene annotations of the shared data folder (skipped when it is absent), the
vendored 10x multiome subset (GRCh38, ``chr:start-end``) and PBSmall fragments (hg19); see the
PROVENANCE files.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellscribe as cs

atac = pytest.importorskip("cellscribe.plugins.atac")
from cellscribe.plugins.atac import build  # noqa: E402

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCHEP = SHARED / "atac" / "schep2017_blood_celllines_600cells.h5ad"
BUENROSTRO = SHARED / "atac" / "buenrostro2018_bm0828_facs_533cells.h5ad"
HG19 = SHARED / "genome" / "hg19_archr_genes.gtf.gz"
HG38 = SHARED / "genome" / "hg38_ensembl101_genes.gtf.gz"
MULTIOME = DATA / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu"
FRAGMENTS = DATA / "atac" / "PBSmall_fragments.tsv.gz"
HG19_CHR5_CHR11 = DATA / "atac" / "hg19_chr5_chr11_genes.gtf.gz"
SIZES = DATA / "atac" / "hg19.chrom.sizes"

needs_shared = pytest.mark.skipif(
    not all(p.exists() for p in (SCHEP, BUENROSTRO, HG19, HG38)), reason="the shared data folder is not available"
)
#: The three spellings of a peak name.
SPELLINGS = {"colon": "{c}:{s}-{e}", "dash": "{c}-{s}-{e}", "underscore": "{c}_{s}_{e}"}
RAW = {"smoothing": False, "normalization": "none"}


def _read(path: Path) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Schep's obs names repeat, as published
        return ad.read_h5ad(path)


@pytest.fixture(scope="module")
def schep():
    return _read(SCHEP)


@pytest.fixture(scope="module")
def buenrostro():
    return _read(BUENROSTRO)


@pytest.fixture(scope="module")
def genes():
    return {"hg19": atac.read_gene_annotation(HG19), "hg38": atac.read_gene_annotation(HG38)}


@pytest.fixture(scope="module")
def multiome_peaks():
    import mudata

    with mudata.set_options(pull_on_update=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mudata.read_h5mu(MULTIOME).mod["atac"]


def _spelled(adata: ad.AnnData, spelling: str, columns: bool) -> ad.AnnData:
    """``adata`` with peaks named in ``spelling``, with or without the var coordinate columns."""
    var = adata.var[["chrom", "start", "end"]]
    names = [SPELLINGS[spelling].format(c=c, s=int(s), e=int(e)) for c, s, e in var.itertuples(index=False)]
    return ad.AnnData(X=adata.X, obs=adata.obs, var=var.set_axis(names) if columns else pd.DataFrame(index=names))


def _matrix(features) -> sp.csr_matrix:
    return sp.csr_matrix(sp.vstack([chunk for _, _, chunk in features.iter_chunks(256)]))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -------------------------------------------------------------------------------------------------
# Peak names
# -------------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name", ["schep", pytest.param("buenrostro", marks=pytest.mark.slow)])
def test_peak_names_in_three_spellings_with_and_without_columns_give_one_activity(name, request):
    adata = request.getfixturevalue(name)
    own = {"schep": "dash", "buenrostro": "underscore"}[name]  # the spelling each file uses
    assert list(_spelled(adata, own, False).var_names) == list(adata.var_names)
    parsed = atac.parse_peak_names(adata.var_names)
    np.testing.assert_array_equal(parsed[["start", "end"]].to_numpy(), adata.var[["start", "end"]].to_numpy())
    assert (parsed["chrom"].to_numpy() == adata.var["chrom"].astype(str).to_numpy()).all()

    for spelling in SPELLINGS:  # the same coordinates from names in every spelling, and from columns
        for columns in (True, False):
            variant = _spelled(adata, spelling, columns)
            coords, source = atac.peak_coordinates(variant.var, variant.var_names)
            assert source.startswith("var columns" if columns else "var_names")
            pd.testing.assert_frame_equal(coords, parsed, check_dtype=False)

    cells = adata[:120]  # the peak-to-gene mapping, not the cell count, is under test
    modality = atac.AtacModality()
    reference = modality.prepare(cells, gtf=str(HG19), **RAW)  # from the var columns
    expected = _matrix(reference)
    assert reference.n_features > 1000 and expected.nnz > 0
    for spelling in SPELLINGS:
        features = modality.prepare(_spelled(cells, spelling, False), gtf=str(HG19), **RAW)
        assert list(features.feature_names) == list(reference.feature_names), spelling
        assert (_matrix(features) != expected).nnz == 0, spelling


def test_multiome_names_use_the_colon_spelling(multiome_peaks):
    coords, source = atac.peak_coordinates(pd.DataFrame(index=multiome_peaks.var_names), multiome_peaks.var_names)
    assert source == "var_names" and coords["start"].notna().all()
    assert multiome_peaks.var_names[0].count(":") == 1


@needs_shared
def test_mixed_or_odd_peak_names_are_refused_naming_the_expected_forms(schep, genes):
    names = schep.var_names.to_numpy(dtype=object).copy()
    symbols = genes["hg19"]["gene_name"].unique()
    forms = "chr:start-end, chr-start-end or chr_start_end"

    mixed = names.copy()
    mixed[: int(0.6 * len(names))] = symbols[: int(0.6 * len(names))]  # genes and peaks in one matrix
    with pytest.raises(ValueError) as err:
        atac.peak_coordinates(pd.DataFrame(index=mixed), mixed)
    message = _one_line(err)
    assert forms in message and "40% of 5036 are intervals" in message and "feature_types" in message

    odd = np.array([n.replace("-", ":", 1).replace("-", "..") for n in names], dtype=object)  # chr1:100..600
    with pytest.raises(ValueError) as err:
        atac.AtacModality().prepare(ad.AnnData(X=schep.X, var=pd.DataFrame(index=odd)), gtf=str(HG19), **RAW)
    assert forms in _one_line(err) and "'chr1:1051395..1051894'" in str(err.value)

    # A few odd names among peaks: a warning names them, they map to no gene, the rest is unchanged.
    few = names.copy()
    few[:50] = [n + ":+" for n in few[:50]]
    with pytest.warns(UserWarning, match=r"50 of 5036 peak names are not intervals written chr:start-end"):
        coords, _ = atac.peak_coordinates(pd.DataFrame(index=few), few)
    assert coords["start"].isna().sum() == 50

    # Gene symbols are not peaks, and not an error (a gene-activity matrix): IGHV7-4-1 parses, is no interval.
    symbols = np.append(symbols[:300], ["IGHV7-4-1", "IGHVIII-5-2"]).astype(object)
    assert atac.peak_coordinates(pd.DataFrame(index=symbols), symbols) is None


# -------------------------------------------------------------------------------------------------
# Genome build
# -------------------------------------------------------------------------------------------------


@needs_shared
def test_build_statistic_separates_right_from_wrong_builds(schep, buenrostro, multiome_peaks, genes):
    """The shares of the module docstring of ``build``: right builds all agree, wrong ones 6-8%."""
    measured = {}
    for name, adata, right, wrong in (
        ("schep", schep, "hg19", "hg38"),
        ("buenrostro", buenrostro, "hg19", "hg38"),
        ("multiome", multiome_peaks, "hg38", "hg19"),
    ):
        peaks, _ = atac.peak_coordinates(adata.var, adata.var_names)
        for build_name in (right, wrong):
            found = build.measure_build(peaks["chrom"], peaks["start"], peaks["end"], genes[build_name])
            measured[name, build_name == right] = found
            assert found.chromosome_share == 1.0 and found.judged
    for name in ("schep", "buenrostro", "multiome"):
        right, wrong = measured[name, True], measured[name, False]
        assert right.ok and right.agreeing_share == 1.0
        assert not wrong.ok and wrong.agreeing_share < 0.1, (name, wrong.summary())
        assert right.tss_share > 2 * right.background_share and wrong.tss_share < 1.5 * wrong.background_share
    assert 0.73 < measured["schep", True].tss_share < 0.74 and 0.11 < measured["schep", False].tss_share < 0.12
    assert 0.19 < measured["buenrostro", True].tss_share < 0.2


@needs_shared
def test_peaks_with_an_annotation_of_another_build_are_refused_before_any_model_work(atac_host, schep, tmp_path):
    before = schep.copy()
    with pytest.raises(ValueError) as err:
        cs.tl.annotate(schep, modality="atac", modality_options={"gtf": str(HG38)}, sidecar=False,
                       checkpoint=tmp_path / "ckpt", progress=False)
    message = _one_line(err)
    assert "does not match the genome build of the peaks" in message
    assert "only 7.7% of the peaks lie in regions where they gather at its transcription start sites" in message
    assert "11% within 1 kb of an annotated TSS against 7.6%" in message
    assert "--gtf" in message and "hg19 peaks need an hg19/GRCh37 annotation" in message
    assert list(schep.obs.columns) == list(before.obs.columns) and not (tmp_path / "ckpt").exists()
    assert (schep.X != before.X).nnz == 0


@pytest.mark.skipif(not HG19.exists(), reason="the shared hg19 annotation is not available")
def test_multiome_peaks_with_the_hg19_annotation_are_refused(multiome_peaks):
    with pytest.raises(ValueError, match=r"only 0\.0% of the peaks lie in regions where they gather"):
        atac.AtacModality().prepare(multiome_peaks, gtf=str(HG19), **RAW)


@needs_shared
@pytest.mark.parametrize("share, refused", [(0.0, True), (0.03, True), (0.5, False)])
def test_chromosome_names_that_do_not_match_are_refused_with_the_share(schep, share, refused):
    """RefSeq accessions (NC_000001.10) against an annotation naming chromosomes chr1: nothing meets."""
    var = schep.var.astype({"chrom": str})
    renamed = np.arange(len(var)) >= int(share * len(var))
    var.loc[renamed, "chrom"] = "NC_0000" + var.loc[renamed, "chrom"].str.replace("chr", "").str.zfill(2) + ".10"
    peaks = ad.AnnData(X=schep.X, var=var)
    if refused:
        with pytest.raises(ValueError) as err:
            atac.AtacModality().prepare(peaks, gtf=str(HG19), **RAW)
        message = _one_line(err)
        assert f"only {100 * share:.1f}% of the 5036 peaks lie on a chromosome the annotation has genes on" in message
        assert "NC_000001.10" in message and "chr1" in message and "--gtf" in message
    else:  # half the peaks on the annotation's chromosomes: counted (the others map to no gene)
        assert atac.AtacModality().prepare(peaks, gtf=str(HG19), **RAW).n_features > 1000


@pytest.mark.skipif(not HG19.exists(), reason="the shared hg19 annotation is not available")
def test_a_small_empty_overlap_still_warns(genes):
    """Too few peaks to judge the build, none on a gene: the run goes on, and says its activity is empty."""
    table = genes["hg19"]
    chr1 = table[table["chrom"] == "chr1"].sort_values("start")
    gaps = chr1["start"].to_numpy()[1:] - np.maximum.accumulate(chr1["end"].to_numpy())[:-1]
    desert = int(np.maximum.accumulate(chr1["end"].to_numpy())[np.argmax(gaps)]) + 10_000  # a gene desert
    names = [f"chr1:{desert + 1000 * i}-{desert + 1000 * i + 500}" for i in range(40)]
    peaks = ad.AnnData(X=sp.random(30, 40, density=0.3, format="csr", random_state=0, dtype=np.float32),
                       var=pd.DataFrame(index=names))
    found = build.measure_build(*atac.parse_peak_names(names).T.to_numpy(), table)
    assert not found.judged and found.ok
    with pytest.warns(UserWarning, match="no peak overlaps a gene region"):
        atac.AtacModality().prepare(peaks, gtf=str(HG19), **RAW)


@pytest.mark.skipif(not HG38.exists(), reason="the shared hg38 annotation is not available")
def test_fragments_with_an_annotation_of_another_build_are_refused_before_counting(monkeypatch):
    snap = pytest.importorskip("snapatac2", reason="needs the atac extra: pip install -e '.[atac]'")

    counted = []
    monkeypatch.setattr(snap.pp, "make_gene_matrix", lambda *a, **k: counted.append(1))
    with pytest.raises(ValueError) as err:
        atac.FragmentsReader().read(FRAGMENTS, gtf=HG38, chrom_sizes=SIZES)
    message = _one_line(err)
    assert "does not match the genome build of the fragments" in message and not counted
    assert "only 22% of the fragments lie in regions where they gather" in message
    assert "the genome the fragments were aligned to" in message


def test_fragments_with_the_right_annotation_record_the_check():
    adata = atac.FragmentsReader().read(FRAGMENTS, gtf=HG19_CHR5_CHR11, chrom_sizes=SIZES)
    check = adata.uns["gene_activity"]["build_check"]
    assert check["chromosome_share"] == 1.0 and check["agreeing_share"] > 0.95
    assert check["tss_share"] > 10 * check["background_share"]


# -------------------------------------------------------------------------------------------------
# Gene activity export
# -------------------------------------------------------------------------------------------------


@needs_shared
def test_gene_activity_is_the_matrix_the_sentences_rank(atac_host, schep, tmp_path):
    before = schep.copy()
    result = cs.tl.gene_activity(schep, gtf=str(HG19))
    assert (schep.X != before.X).nnz == 0 and list(schep.obs.columns) == ["cell_type"] and "gene_activity" not in schep.uns

    modality = atac.AtacModality()
    ranked = modality.prepare(schep, gtf=str(HG19))
    counts = modality.prepare(schep, gtf=str(HG19), **RAW)
    assert result.shape == (600, ranked.n_features) and list(result.var_names) == list(ranked.feature_names)
    assert list(result.obs_names) == list(schep.obs_names) and (result.obs["cell_type"] == schep.obs["cell_type"]).all()
    assert sp.issparse(result.X) and result.X.dtype == np.float32
    assert abs(result.X - _matrix(ranked)).max() < 1e-6
    assert (result.layers["counts"] != _matrix(counts)).nnz == 0

    # n_peaks: the peaks whose region overlap join reaches the gene.
    peaks, _ = atac.peak_coordinates(schep.var, schep.var_names)
    to_genes, names = atac.peaks_to_genes(peaks, atac.read_gene_annotation(HG19))
    per_gene = pd.Series(np.diff(sp.csc_matrix(to_genes).indptr), index=names)
    single = per_gene[~per_gene.index.duplicated(keep=False)]
    assert (result.var.loc[single.index, "n_peaks"] == single).all()
    assert result.var["n_peaks"].min() >= 1 and result.var["n_peaks"].max() > 10  # long genes gather peaks
    assert (result.var["n_cells"] == np.diff(sp.csc_matrix(result.layers["counts"]).indptr)).all()
    record = result.uns["gene_activity"]
    assert record["modality"] == "atac" and record["params"]["gtf"] == str(HG19)
    assert "smoothing" in record["source"] and "none normalisation" in record["counts_source"]

    # It is an ordinary AnnData: written and read back unchanged.
    result.write_h5ad(tmp_path / "activity.h5ad")
    back = ad.read_h5ad(tmp_path / "activity.h5ad")
    assert (back.X != result.X).nnz == 0 and back.uns["gene_activity"]["source"] == record["source"]


def test_gene_activity_of_a_mudata_becomes_one_of_its_modalities(atac_host, tmp_path):
    import mudata

    if not HG38.exists():
        pytest.skip("the shared hg38 annotation is not available")
    with mudata.set_options(pull_on_update=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.read_h5mu(MULTIOME)
        peaks = mdata.mod["atac"].X.copy()
        mdata.mod["gene_activity"] = cs.tl.gene_activity(mdata, gtf=str(HG38), n_neighbors=10)
        mdata.update()
    activity = mdata.mod["gene_activity"]
    assert activity.n_obs == 1000 and list(activity.obs_names) == list(mdata.mod["atac"].obs_names)
    assert {"CD14", "MS4A1", "LYZ"} <= set(activity.var_names) and activity.uns["gene_activity"]["mod"] == "atac"
    assert (mdata.mod["atac"].X != peaks).nnz == 0 and mdata.mod["atac"].n_vars == 174
    with mudata.set_options(pull_on_update=False):
        mdata.write(tmp_path / "with_activity.h5mu")
    assert mudata.read_h5mu(tmp_path / "with_activity.h5mu").mod["gene_activity"].shape == activity.shape
    with pytest.raises(TypeError, match="no modality 'peaks'"):
        cs.tl.gene_activity(mdata, mod="peaks", gtf=str(HG38))


def test_gene_activity_from_fragments_keeps_the_reader_record(atac_host):
    adata = atac.FragmentsReader().read(FRAGMENTS, gtf=HG19_CHR5_CHR11, chrom_sizes=SIZES)
    result = cs.tl.gene_activity(adata, smoothing=False)
    assert result.n_obs == 150 and (result.layers["counts"] != adata.X).nnz == 0
    assert (result.var["n_peaks"] == 1).all() and "build_check" in result.uns["gene_activity"]["input"]


@needs_shared
def test_cli_activity_writes_atomically_and_refuses_to_overwrite_or_a_wrong_build(atac_host, tmp_path):
    from click.testing import CliRunner

    from cellscribe import cli

    built = {name: cli.main.commands.pop(name) for name in ("activity",) if name in cli.main.commands}
    try:
        out = tmp_path / "activity.h5ad"
        args = ["activity", str(SCHEP), "-o", str(out), "--gtf", str(HG19), "--no-smoothing"]
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 0, result.output
        assert "wrote the gene activity of 600 cells x" in result.output
        written = ad.read_h5ad(out)
        assert written.layers["counts"].nnz > 0 and written.uns["gene_activity"]["params"]["smoothing"] is False

        again = CliRunner().invoke(cli.main, args)
        assert again.exit_code != 0 and "already exists; pass --force" in again.output
        assert CliRunner().invoke(cli.main, [*args, "--force"]).exit_code == 0

        wrong = tmp_path / "wrong.h5ad"
        refused = CliRunner().invoke(cli.main, ["activity", str(SCHEP), "-o", str(wrong), "--gtf", str(HG38)])
        assert refused.exit_code != 0 and "only 7.7% of the peaks" in refused.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["activity.h5ad"]  # nothing half-written
    finally:
        cli.main.commands.pop("activity", None)
        cli.main.commands.update(built)


# ------------------------------------------------------------------------------------------ peak coverage


def _coverage(adata, **options):
    from cellscribe.plugins.atac.modality import AtacModality

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        features = AtacModality().prepare(adata, gtf=str(HG19), **RAW, **options)
    return features


@needs_shared
def test_a_peak_set_called_on_progenitors_covers_their_genes(buenrostro):
    """Buenrostro's peaks were called on bone-marrow progenitors: the stem and progenitor genes have more
    peaks than genes of their length, genes of mature blood cells none, and a random half of the peaks
    keeps the ratio (what the modality hands to models as ``coverage``)."""
    from cellscribe.core.types import Assay

    features = _coverage(buenrostro)
    coverage = features.coverage
    assert coverage.attrs["n_peaks"] == buenrostro.n_vars and 0.19 < coverage.attrs["tss_share"] < 0.2
    assert len(coverage) > 20_000 and coverage.index.is_unique  # every annotated gene, a peak or not
    hspc, mature = ["HOXA9", "MEIS1", "GATA2", "CRHBP", "HLF", "MECOM", "CD34"], ["MS4A1", "CD3E", "LYZ"]
    assert (coverage.loc[hspc, "peaks"] > coverage.loc[hspc, "expected"]).all()
    assert (coverage.loc[mature, "peaks"] == 0).all()
    # The expectation follows the region length, and sums to the peaks found.
    by_length = coverage.sort_values("length")["expected"].to_numpy()
    assert by_length[-1000:].mean() > 5 * by_length[:1000].mean()
    assert abs(coverage["expected"].sum() - coverage["peaks"].sum()) < 1e-6 * coverage["peaks"].sum()
    assert Assay.from_features(features).coverage is coverage
    # Buenrostro's peaks are autosomal: genes of chrX and chrY expect none rather than miss their peaks.
    assert coverage.loc[["GATA1", "BTK", "FOXP3"], ["peaks", "expected"]].eq(0).all().all()

    half = buenrostro[:, np.sort(np.random.default_rng(0).choice(buenrostro.n_vars, buenrostro.n_vars // 2,
                                                                  replace=False))].copy()
    sub = _coverage(half).coverage.loc[hspc]
    assert sub["peaks"].sum() > 1.5 * sub["expected"].sum()  # 2.3x on all peaks


@needs_shared
def test_no_peak_set_prior_from_a_promoter_selection_or_when_asked(schep, buenrostro):
    """Schep's 5,036 peaks are 73% promoters (the strongest peaks kept): their coverage says which
    promoters were kept, so none goes to the model, and the run's notes say why."""
    selected = _coverage(schep)
    assert selected.coverage is None
    assert any("no composition prior from the peak set: 73% of the peaks lie within 1 kb of a TSS" in n
               for n in selected.notes)
    assert _coverage(buenrostro, peak_prior=False).coverage is None
    # Nor from fewer than 2,000 peaks (targeted sets); a random fifth of Buenrostro's keeps its prior.
    few = buenrostro[:, np.sort(np.random.default_rng(1).choice(buenrostro.n_vars, 1_500, replace=False))].copy()
    targeted = _coverage(few)
    assert targeted.coverage is None and any("1500 peaks (a targeted selection" in n for n in targeted.notes)
    fifth = buenrostro[:, np.sort(np.random.default_rng(1).choice(buenrostro.n_vars, 7_000, replace=False))].copy()
    assert _coverage(fifth).coverage is not None
    with pytest.raises(ValueError, match="peak_prior"):
        _coverage(buenrostro, peak_prior="often")
