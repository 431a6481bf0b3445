"""MuData in and out: modalities addressed by name, results pulled to mdata.obs, nothing else changed."""

from __future__ import annotations

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
from _rule_backend import RulePlugin
from click.testing import CliRunner

from cellscribe.cli import main

PBMC_RULES = {"CD3E": "T cell", "CD2": "T cell", "S100A8": "monocyte", "LYZ": "monocyte",
              "GNLY": "natural killer cell", "MS4A1": "B cell", "CD79A": "B cell"}


@pytest.fixture
def multiome_path(data_dir):
    return data_dir / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu"


@pytest.fixture
def rules(with_plugin):
    plugin = RulePlugin(rules=PBMC_RULES)
    with_plugin(plugin, "rules")
    return plugin.backend.model


def _same(a, b):
    """AnnData equality of matrices, obs, var, obsm, layers and uns keys."""
    for attr in ("obs", "var"):
        pd.testing.assert_frame_equal(getattr(a, attr), getattr(b, attr))
    xa, xb = a.X, b.X
    assert (abs(xa - xb)).sum() == 0 if hasattr(xa, "toarray") else np.array_equal(xa, xb)
    assert set(a.obsm) == set(b.obsm) and set(a.layers) == set(b.layers) and set(a.uns) == set(b.uns)


def test_h5mu_round_trip_changes_only_the_results(rules, multiome_path, tmp_path):
    out = tmp_path / "out.h5mu"
    candidates = [arg for label in sorted(set(PBMC_RULES.values())) for arg in ("--candidate", label)]
    result = CliRunner().invoke(main, ["annotate", str(multiome_path), "--mod", "rna", "-o", str(out),
                                       "--model", "rules", "--sentence", "top-expressed", "--no-progress",
                                       *candidates])
    assert result.exit_code == 0, result.output
    mudata.set_options(pull_on_update=False)
    before, after = mudata.read_h5mu(multiome_path), mudata.read_h5mu(out)
    rna_cols = [c for c in after.mod["rna"].obs if c.startswith("cellscribe")]
    assert "cellscribe" in rna_cols and "cellscribe_status" in rna_cols
    assert {f"rna:{c}" for c in rna_cols} <= set(after.obs)
    # Everything the run did not mean to change is identical.
    _same(before.mod["atac"], after.mod["atac"])
    rna_after = after.mod["rna"]
    rna_after.obs = rna_after.obs.drop(columns=rna_cols)
    del rna_after.uns["cellscribe"]
    _same(before.mod["rna"], rna_after)
    assert list(after.obs_names) == list(before.obs_names)
    assert set(after.uns) - set(before.uns) == {"rna:cellscribe"}
    labels = after.obs["rna:cellscribe"].dropna().astype(str)
    assert set(labels) <= set(PBMC_RULES.values()) and len(labels) > 500


def test_mudata_default_key_and_h5ad_of_one_modality(rules, multiome_path, tmp_path):
    out = tmp_path / "rna.h5ad"
    result = CliRunner().invoke(main, ["annotate", str(multiome_path), "-o", str(out), "--model", "rules",
                                       "--sentence", "top-expressed", "--mod", "rna", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "cellscribe" in ad.read_h5ad(out).obs
    missing_mod = CliRunner().invoke(main, ["annotate", str(multiome_path), "-o", str(tmp_path / "x.h5mu"),
                                            "--model", "rules", "--mod", "peaks"])
    assert missing_mod.exit_code == 1 and "has no modality 'peaks'" in missing_mod.output


@pytest.mark.slow
def test_several_modalities_in_one_command_load_the_model_once(with_plugin, multiome_path, tmp_path):
    plugin = RulePlugin(rules=PBMC_RULES)
    with_plugin(plugin, "rules")
    out = tmp_path / "both.h5mu"
    args = ["annotate", str(multiome_path), "-o", str(out), "--model", "rules", "--sentence", "top-expressed",
            "--modality", "rna", "--modality", "atac", "--no-smoothing", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert plugin.backend.loads == 1
    assert "rna:" in result.output and "atac:" in result.output
    mudata.set_options(pull_on_update=False)
    after = mudata.read_h5mu(out)
    for mod in ("rna", "atac"):
        assert after.mod[mod].uns["cellscribe"]["params"]["modality"] == mod
        assert after.obs[f"{mod}:cellscribe_status"].eq("ok").mean() > 0.5
        assert (tmp_path / f"both.h5mu.cellscribe.{mod}.jsonl.gz").exists()
    assert not (tmp_path / "both.h5mu.cellscribe.ckpt").exists()

    with_mod = CliRunner().invoke(main, [*args, "--mod", "rna", "--force"])
    assert with_mod.exit_code == 2 and "leave it out with several --modality" in with_mod.output
    bare_adapter = CliRunner().invoke(main, [*args, "--adapter", "lora/rna", "--force"])
    assert bare_adapter.exit_code == 2 and "MODALITY=PATH" in bare_adapter.output
    other = CliRunner().invoke(main, [*args[:-6], "--adapter", "atac=lora/atac", "--force"])
    assert other.exit_code == 2 and "not annotated here; add --modality atac" in other.output


def test_two_modalities_in_one_prompt(rules, multiome_path):
    mudata.set_options(pull_on_update=False)
    mdata = mudata.read_h5mu(multiome_path)
    second = mdata.mod["rna"][100:].copy()  # a second modality holding only some of the cells
    second.var_names = [f"{g}-2" for g in second.var_names]
    mdata.mod["rna2"] = second
    mdata.update()
    import cellscribe as cs

    cs.tl.annotate(mdata, modality="rna+rna", mod="rna+rna2", model="rules", sentence="top-expressed",
                   n_genes=5, sidecar=False, progress=False)
    prompt = rules.calls[0]
    assert prompt.sentences[0].startswith("RNA: ") and "\nRNA: " in prompt.sentences[0]
    obs = mdata.obs
    assert obs["cellscribe"].iloc[:100].isna().all()  # not in both modalities: not annotated
    assert obs["cellscribe_status"].iloc[100:].notna().all()
    assert len(rules.calls) == 900 - (obs["cellscribe_note"].iloc[100:] == "no expressed gene in the cell sentence").sum()


def test_rna_atac_and_both_on_the_multiome_file(host, multiome_path, tmp_path):
    """The real multiome subset (45 RNA genes, 174 ATAC peaks, no labels) annotated per modality and
    with both in one prompt, with the default model; the three answers largely agree."""
    import cellscribe as cs
    from cellscribe.core.domain.ontology import get_ontology

    mudata.set_options(pull_on_update=False)
    mdata = mudata.read_h5mu(multiome_path)
    cs.tl.annotate(mdata, mod="rna", sidecar=False, progress=False)
    cs.tl.annotate(mdata, modality="atac", mod="atac", sidecar=False, progress=False)
    out = tmp_path / "both.h5mu"
    result = CliRunner().invoke(main, ["annotate", str(multiome_path), "--modality", "rna+atac", "-o", str(out),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    both = mudata.read_h5mu(out)
    assert (both.obs["cellscribe_status"] == "ok").mean() > 0.95
    before = mudata.read_h5mu(multiome_path)
    for key in ("rna", "atac"):
        _same(before.mod[key], both.mod[key])

    onto = get_ontology()
    groups = {"T cell": "T/NK", "NK cell": "T/NK", "B cell": "B", "monocyte": "myeloid",
              "macrophage": "myeloid", "dendritic cell": "myeloid"}

    def lineage(labels):
        ids = [onto.lookup(x) if isinstance(x, str) else None for x in labels.astype(object)]
        return pd.Series([groups.get(onto.lineage(i), onto.lineage(i)) if i else None for i in ids], index=labels.index)

    rna, atac = lineage(mdata.obs["rna:cellscribe"]), lineage(mdata.obs["atac:cellscribe"])
    joint = lineage(both.obs["cellscribe"])
    shared = rna.notna() & atac.notna()
    assert shared.sum() > 900
    assert (rna[shared] == atac[shared]).mean() > 0.5  # measured 0.62: 45 genes vs 174 peaks
    assert (joint[shared] == atac[shared]).mean() > 0.7  # measured 0.79
