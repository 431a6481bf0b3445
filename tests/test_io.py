"""The built-in readers (plugin ``io``): .h5ad and .h5mu files, in memory and backed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp


@pytest.fixture
def h5ad(host):
    return host.registry.get("reader", "h5ad")


@pytest.fixture
def h5mu(host):
    return host.registry.get("reader", "h5mu")


def test_readers_are_registered_through_the_entry_point(host):
    entries = host.registry.entries["reader"]
    assert {"h5ad", "h5mu"} <= set(entries)
    assert entries["h5ad"].plugin == "io" and entries["h5mu"].plugin == "io"
    assert entries["h5ad"].component.suffixes == (".h5ad",)
    assert entries["h5mu"].component.suffixes == (".h5mu",)
    for entry in (entries["h5ad"], entries["h5mu"]):
        assert entry.component.modality is None
        assert entry.component.description


def test_h5ad_reads_into_memory(h5ad, pancreas_path):
    adata = h5ad.read(str(pancreas_path))
    assert adata.shape == (350, 12474)
    assert not adata.isbacked
    assert sp.issparse(adata.X)
    assert adata.obs["Group"].value_counts().eq(70).all()


def test_h5ad_backed_leaves_x_on_disk(h5ad, pancreas_path, pancreas):
    adata = h5ad.read(pancreas_path, backed="r")
    assert adata.isbacked
    assert not sp.issparse(adata.X) and not isinstance(adata.X, np.ndarray)
    # The first rows read from disk are the same as in memory.
    assert (adata.X[0:25] != pancreas.X[0:25]).nnz == 0


def test_unknown_options_are_ignored(h5ad, pancreas_path):
    # Options of other plugins (an ATAC --gtf, say) reach every reader.
    assert h5ad.read(pancreas_path, gtf="genes.gtf", layer="counts").n_obs == 350


@pytest.mark.parametrize("reader", ["h5ad", "h5mu"])
def test_missing_file_names_the_path(host, tmp_path, reader):
    path = tmp_path / f"nowhere.{reader}"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        host.registry.get("reader", reader).read(str(path))


@pytest.mark.parametrize("backed", ["r+", True, "w"])
def test_bad_backed_mode_is_refused(h5ad, pancreas_path, backed):
    with pytest.raises(ValueError, match="backed must be 'r'"):
        h5ad.read(pancreas_path, backed=backed)


@pytest.fixture
def h5mu_path(tmp_path, pancreas):
    import mudata

    prot = pancreas[:60, :5].copy()
    prot.var_names = [f"protein_{i}" for i in range(5)]
    path = tmp_path / "small.h5mu"
    with mudata.set_options(pull_on_update=False):
        mudata.MuData({"rna": pancreas[:60].copy(), "prot": prot}).write(path)
    return path


def test_h5mu_reads_without_mudata_warnings_and_keeps_options(h5mu, h5mu_path, pancreas):
    import mudata
    from mudata._core.config import OPTIONS

    before = dict(OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        mdata = h5mu.read(str(h5mu_path))
    assert OPTIONS == before, "the reader must not change the caller's mudata options"
    assert isinstance(mdata, mudata.MuData)
    assert set(mdata.mod) == {"rna", "prot"}
    rna = mdata.mod["rna"]
    assert rna.shape == (60, 12474)
    assert (rna.X != pancreas.X[:60]).nnz == 0


def test_h5mu_backed(h5mu, h5mu_path, pancreas):
    mdata = h5mu.read(h5mu_path, backed="r")
    rna = mdata.mod["rna"]
    assert rna.isbacked
    assert (rna.X[0:10] != pancreas.X[:10]).nnz == 0
