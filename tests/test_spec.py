"""The run specification (core/spec.py): checked once, one line per problem; uns[key]["params"] is its
serialisation and re-creates the run."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import cellscribe as cs
from cellscribe.cli import main
from cellscribe.core.spec import RunSpec

PANCREAS_TYPES = ["alpha", "beta", "delta", "activated_stellate", "macrophage"]
RESULT_COLUMNS = ("", "_confidence", "_reasoning", "_status", "_note", "_ontology_id", "_ontology_name")
#: Recorded per run, not part of what defines it.
PER_RUN = {"run_id", "started", "versions", "resumed_batches"}


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        ({"mode": "think"}, ValueError, "mode must be 'direct' or 'reasoning', got 'think'"),
        ({"decode": "beam"}, ValueError, "decode must be one of generate, constrained, score, got 'beam'"),
        ({"candidates": "B cell"}, ValueError, "not the single string 'B cell'; wrap it in a list"),
        ({"k": 0}, ValueError, "k must be a positive integer, got 0"),
        ({"n_genes": -5}, ValueError, "n_genes must be a positive integer"),
        ({"n_gene": 50}, TypeError, "did you mean 'n_genes'"),
        ({"reference_modality": "rna", "modality": "atac"}, ValueError, "needs reference="),
        ({"modality": "rna+atac", "reference_key": "Group"}, ValueError, "combines modalities"),
        ({"modality": "rna+atac", "mod": "rna"}, ValueError, "one MuData modality per modality"),
    ],
)
def test_bad_parameters_stop_before_any_work_with_one_line(pancreas, params, error, message):
    before = pancreas.obs.copy()
    with pytest.raises(error, match=message) as caught:
        cs.tl.annotate(pancreas, **params)
    assert "\n" not in str(caught.value)
    pd.testing.assert_frame_equal(pancreas.obs, before)  # nothing read, nothing written


def test_the_cli_reports_a_bad_parameter_in_one_line(pancreas_path, tmp_path):
    result = CliRunner().invoke(main, ["annotate", str(pancreas_path), "-o", str(tmp_path / "o.h5ad"), "-k", "0"])
    assert result.exit_code == 1 and result.output.strip() == "Error: k must be a positive integer, got 0"
    assert not (tmp_path / "o.h5ad").exists()


def test_spec_parts_and_flat_access():
    spec = RunSpec.from_kwargs(n_genes=300, candidates=["B", "T"], model_options={"x": 1})
    assert spec.sentences.n_genes == 300 and spec["n_genes"] == 300
    assert spec.prompts.candidates == ("B", "T")
    assert spec.changed() == {"n_genes": 300, "candidates": ("B", "T"), "model_options": {"x": 1}}
    assert spec.replace(k=5).prompts.k == 5 and spec.prompts.k == 3  # frozen: a new spec
    assert RunSpec() == RunSpec.from_kwargs(model="markers")  # the default model, by name


def _columns(adata: ad.AnnData, key: str) -> pd.DataFrame:
    return adata.obs[[key + suffix for suffix in RESULT_COLUMNS]].astype(str)


@pytest.mark.parametrize(
    "params",
    [
        # k-shot from the query's own labels, chosen sentence settings, a tissue and other load options.
        pytest.param(
            {"prompt": "k-shot", "reference_key": "Group", "k": 2, "seed": 7, "sentence": "top-expressed",
             "n_genes": 300, "tissue": "pancreas", "prompt_options": {"show_candidates": True}, "chunk_size": 100,
             "generation": {"temperature": 0.0}, "key_added": "kshot"},
            marks=pytest.mark.slow),
        # CellPuzzles prompts over clusters, with candidates, one representative per cluster.
        {"prompt": "puzzle", "candidates": PANCREAS_TYPES, "groupby": "Group", "n_representatives": 2,
         "mode": "reasoning", "seed": 3, "key_added": "puzzles", "sentence_options": {"exclude": ["MALAT1"]}},
    ],
    ids=["k-shot", "puzzle-groupby"],
)
def test_uns_params_re_create_the_same_run(pancreas_path, tmp_path, params):
    first = ad.read_h5ad(pancreas_path)
    cs.tl.annotate(first, **params, sidecar=False, progress=False)
    path = tmp_path / "annotated.h5ad"
    first.write_h5ad(path)
    key = params["key_added"]
    stored = ad.read_h5ad(path).uns[key]["params"]  # as any later reader finds it

    spec = RunSpec.from_params(stored)
    expected = RunSpec.from_kwargs(**params, sidecar=False, progress=False)
    for name, value in expected.changed().items():
        assert spec[name] == value, name
    assert spec.to_params() == RunSpec.from_params(spec.to_params()).to_params()  # a fixed point

    second = ad.read_h5ad(pancreas_path)
    cs.tl.annotate(second, **spec.kwargs())
    pd.testing.assert_frame_equal(_columns(second, key), _columns(first, key))
    again = second.uns[key]["params"]
    same = {k for k in stored if k not in PER_RUN}
    assert same == {k for k in again if k not in PER_RUN}
    for name in sorted(same):
        a, b = stored[name], again[name]
        if isinstance(a, np.ndarray):
            assert list(a) == list(b), name
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), name
        else:
            assert a == b, name


@pytest.mark.slow
def test_an_external_reference_is_given_again(pancreas_path):
    query, reference = ad.read_h5ad(pancreas_path), ad.read_h5ad(pancreas_path)
    cs.tl.annotate(query, prompt="k-shot", reference=reference, reference_key="Group", sidecar=False,
                   progress=False)
    stored = query.uns["cellscribe"]["params"]
    assert stored["reference"] == "AnnData with 350 cells"  # what it was, not the data
    spec = RunSpec.from_params(stored, reference=reference)
    assert spec.prompts.reference is reference and spec.prompts.reference_key == "Group"
    again = ad.read_h5ad(pancreas_path)
    cs.tl.annotate(again, **spec.kwargs())
    pd.testing.assert_frame_equal(_columns(again, "cellscribe"), _columns(query, "cellscribe"))


def test_what_the_model_set_is_left_to_the_model_again():
    # The markers backend asks for top-expressed sentences of 200 genes without uninformative genes (a
    # function: no record can hold it); the run records that the model set them, and what the user gave.
    recorded = {"sentence": "top-expressed", "n_genes": 200, "sentence_options": {"exclude": "<function ...>"},
                "set_by_model": np.array(["n_genes", "sentence", "sentence_options"], dtype=object),
                "as_given": {"sentence": "auto", "sentence_options": {"ties": "first"}}, "seed": np.int64(4)}
    spec = RunSpec.from_params(recorded)
    assert (spec.sentences.sentence, spec.sentences.n_genes) == ("auto", None)
    assert spec.sentences.sentence_options == {"ties": "first"} and spec.prompts.seed == 4
