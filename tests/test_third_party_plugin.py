"""A third-party modality package (examples/cellscribe-adt) drops in through its entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from _rule_backend import RulePlugin  # noqa: E402

import cellscribe as cs  # noqa: E402
from cellscribe.core import plugins  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cellscribe-adt"


@pytest.fixture
def adt_installed(tmp_path, monkeypatch):
    """Make the example package importable and visible as an installed distribution with its
    entry point (what ``pip install examples/cellscribe-adt`` does), then build a host from discovery."""
    site = tmp_path / "site"
    dist = site / "cellscribe_adt-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cellscribe-adt\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[cellscribe]\nadt = cellscribe_adt\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("CELLSCRIBE_LOAD_PLUGINS", "cellscribe-adt")
    rules = RulePlugin(rules={"CD19": "B cell", "CD3E": "T cell", "CD14": "monocyte"})
    host = plugins.make_host(extra=[("rules", rules)])
    previous = plugins.set_host(host)
    yield host
    plugins.set_host(previous)
    sys.modules.pop("cellscribe_adt", None)


def _cite_seq(n_per_type=20, seed=0):
    rng = np.random.default_rng(seed)
    panel = ["CD3_TotalSeqB", "CD19_TotalSeqB", "CD14_TotalSeqB", "CD4_TotalSeqB", "CD16_TotalSeqB", "CD56_TotalSeqB"]
    high = {"T cell": 0, "B cell": 1, "monocyte": 2}
    counts, labels = [], []
    for label, col in high.items():
        block = rng.poisson(5, size=(n_per_type, len(panel)))
        block[:, col] += rng.poisson(400, size=n_per_type)
        counts.append(block)
        labels += [label] * n_per_type
    obs = pd.DataFrame({"truth": labels}, index=[f"cell{i}" for i in range(len(labels))])
    return ad.AnnData(sp.csr_matrix(np.vstack(counts).astype(np.float32)), obs=obs, var=pd.DataFrame(index=panel))


def test_adt_modality_registered_through_entry_point(adt_installed):
    infos = {i.name: i for i in adt_installed.plugins()}
    assert infos["adt"].origin == "cellscribe-adt" and infos["adt"].version == "0.1.0"
    assert "modality:adt" in infos["adt"].provides


def test_annotate_with_a_third_party_modality(adt_installed):
    adata = _cite_seq()
    cs.tl.annotate(adata, modality="adt", model="rules", sentence="top-expressed", n_genes=3,
                   sidecar=False, progress=False)
    assert (adata.obs["cellscribe"].astype(str) == adata.obs["truth"]).all()
    assert adata.uns["cellscribe"]["params"]["plugins"]["modality"] == "adt"


def test_external_plugins_stay_out_unless_selected(adt_installed, monkeypatch):
    monkeypatch.setenv("CELLSCRIBE_LOAD_PLUGINS", "")
    assert "adt" not in plugins.make_host().registry.names("modality")
    monkeypatch.delenv("CELLSCRIBE_LOAD_PLUGINS")
    monkeypatch.setenv("CELLSCRIBE_DISABLE_PLUGINS", "cellscribe-adt")
    assert "adt" not in plugins.make_host().registry.names("modality")


def _installed(tmp_path, monkeypatch, name, declaration):
    """A plugin package ``name`` (one modality, ``name``) installed as a distribution with its entry
    point and, when ``declaration`` is given, a ``cellscribe.provides`` one pointing at it."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(
        "from cellscribe import FeatureMatrix, hookimpl\n"
        "class Modality:\n"
        f"    name = {name!r}\n"
        "    description = 'a test modality'\n"
        "    def prepare(self, adata, **options):\n"
        "        return FeatureMatrix(X=adata.X, feature_names=adata.var_names, cell_ids=adata.obs_names)\n"
        "@hookimpl\n"
        "def cellscribe_register_modalities(register):\n"
        "    register(Modality())\n"
    )
    entry_points = f"[cellscribe]\n{name} = {name}\n"
    if declaration is not None:
        (site / f"{name}_meta.py").write_text(f"PROVIDES = {declaration!r}\n")
        entry_points += f"\n[cellscribe.provides]\n{name} = {name}_meta:PROVIDES\n"
    dist = site / f"{name}-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CELLSCRIBE_LOAD_PLUGINS", name)
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_plugin_that_declares_what_it_provides_is_imported_when_a_run_needs_it(tmp_path, monkeypatch):
    _installed(tmp_path, monkeypatch, "lazyomics", {"modality": ["lazyomics"]})
    host = plugins.make_host()
    assert "lazyomics" not in sys.modules
    assert "lazyomics" in host.registry.names("modality")
    host.registry.get("modality", "rna")
    host.registry.backend_for("markers")
    assert "lazyomics" not in sys.modules
    assert host.registry.get("modality", "lazyomics").name == "lazyomics"
    assert "lazyomics" in sys.modules
    info = {i.name: i for i in host.plugins()}["lazyomics"]
    assert info.origin == "lazyomics" and info.provides == ("modality:lazyomics",)


def test_a_plugin_without_a_readable_declaration_is_imported_at_once(tmp_path, monkeypatch, caplog):
    _installed(tmp_path, monkeypatch, "eageromics", None)
    plugins.make_host()
    assert "eageromics" in sys.modules
    monkeypatch.delitem(sys.modules, "eageromics")
    _installed(tmp_path / "bad", monkeypatch, "badomics", {"modalities": ["badomics"]})
    with caplog.at_level("WARNING", logger="cellscribe.core.plugins"):
        host = plugins.make_host()
    assert "badomics" in sys.modules and "cannot read what it provides" in caplog.text
    assert host.registry.get("modality", "badomics").name == "badomics"
