"""Nothing lost, nothing false (issue 14): one test per point of the issue, each of which failed before.

1. repeated obs names: every cell its own answer, with a warning (Schep's file annotates as is)
2. a checkpoint resumes only its own run's answers (server, model options, weights) and one run owns it
3. a NUL in an answer never costs the run (nor its re-run)
4. failed model calls are counted, raised in Python, exit non-zero on the command line, and resumed
5. NaN and inf in the matrix are refused, naming where
6. one candidate, or an empty candidates list or file, is refused
7. credentials in a base URL are never recorded
8. what can be checked before the model runs is: a MuData to .h5ad without --mod, an unwritable folder
9. a damaged or mistyped input file, a read-only output folder: one line, no traceback
10. small ATAC runs answer, and say in uns what they did differently
11. group names with "/" survive h5ad in uns[key]["clusters"]
12. a Python call writes no file unless asked; raw outputs stay in memory

The fault-injection suite of the command line against a misbehaving server is tests/test_faults.py.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _fault_helpers import PANCREAS, annotate_args, invoke, one_line, rule_answer  # noqa: E402
from _openai_server import OpenAIServer  # noqa: E402
from _rule_backend import RuleModel, RulePlugin  # noqa: E402

import cellscribe as cs  # noqa: E402
from cellscribe.core.run.checkpoint import CheckpointInUse, path_digest  # noqa: E402

DATA = Path(__file__).parent / "data"
ATAC = DATA / "atac"
QUIET = {"progress": False}


pytestmark = pytest.mark.usefixtures("no_openai_env")


@pytest.fixture
def cells():
    """40 pancreas cells, 8 of each of the five types (raw counts)."""
    adata = ad.read_h5ad(PANCREAS)
    return adata[_eight_per_type(adata)].copy()


def _eight_per_type(adata) -> np.ndarray:
    groups = adata.obs["Group"].astype(str).to_numpy()
    return np.sort(np.concatenate([np.flatnonzero(groups == g)[:8] for g in sorted(set(groups))]))


@pytest.fixture
def rules(with_plugin):
    plugin = RulePlugin()
    with_plugin(plugin, "rules")
    return plugin.backend.model


# -- 1 ----------------------------------------------------------------------------------------------------


def test_1_repeated_obs_names_each_cell_gets_its_own_answer(cells, rules, tmp_path):
    unique = cells.copy()
    cs.tl.annotate(unique, model="rules", sidecar=False, **QUIET)
    labels = unique.obs["cellscribe"].astype(str).to_numpy()
    a, b = int(np.flatnonzero(labels == "alpha")[0]), int(np.flatnonzero(labels == "delta")[0])
    names = cells.obs_names.to_numpy().copy()
    names[b] = names[a]  # an alpha and a delta cell share a name, as after a concatenation
    cells.obs_names = names
    with pytest.warns(UserWarning, match="obs_names_make_unique"):
        cs.tl.annotate(cells, model="rules", sidecar=tmp_path / "raw.jsonl", **QUIET)
    columns = [c for c in unique.obs if c.startswith("cellscribe")]
    assert cells.obs.loc[:, columns].reset_index(drop=True).equals(unique.obs[columns].reset_index(drop=True))
    assert cells.obs["cellscribe"].iloc[a] == "alpha" and cells.obs["cellscribe"].iloc[b] == "delta"
    units = [u for line in (tmp_path / "raw.jsonl").open() for u in json.loads(line)["unit_ids"]]
    assert len(set(units)) == len(units) == 40 and f"{names[a]}#1" in units


def test_1_schep_annotates_as_is(tmp_path):
    schep = ad.read_h5ad(ATAC / "schep2017_blood_celllines_600cells.h5ad")
    rows = np.flatnonzero(schep.obs_names.duplicated(keep=False))[:16]
    subset = schep[np.r_[rows, 0:44]].copy()  # 16 cells sharing names, and 44 others
    renamed = subset.copy()
    renamed.obs_names_make_unique()
    options = dict(modality="atac", tissue="blood", sidecar=False, modality_options={"gtf": str(ATAC / "hg19_genes.gtf.gz")})
    with pytest.warns(UserWarning, match="obs_names_make_unique"):
        cs.tl.annotate(subset, **options, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cs.tl.annotate(renamed, **options, **QUIET)
    assert subset.obs_names.tolist() == schep.obs_names[np.r_[rows, 0:44]].tolist()  # names kept
    pd.testing.assert_series_equal(subset.obs["cellscribe"].reset_index(drop=True),
                                   renamed.obs["cellscribe"].reset_index(drop=True))


# -- 2 ----------------------------------------------------------------------------------------------------


def test_2_another_server_or_model_option_is_not_resumed(cells, tmp_path, openai_host):
    folder = tmp_path / "ckpt"
    kw = dict(model="openai:tiny", checkpoint=folder, sidecar=False, **QUIET)
    with OpenAIServer(answer=lambda body: "alpha") as first, OpenAIServer(answer=lambda body: "beta") as second:
        cs.tl.annotate(cells, model_options={"base_url": first.base_url}, **kw)
        assert set(cells.obs["cellscribe"].astype(str)) == {"alpha"}
        cs.tl.annotate(cells, model_options={"base_url": second.base_url}, **kw)  # same name, another server
        assert set(cells.obs["cellscribe"].astype(str)) == {"beta"} and len(second.requests) == 40
        assert cells.uns["cellscribe"]["params"]["resumed_batches"] == 0
        # A transport setting does not change answers: resumed.
        cs.tl.annotate(cells, model_options={"base_url": second.base_url, "timeout": 7}, **kw)
        assert cells.uns["cellscribe"]["params"]["resumed_batches"] == 1 and len(second.requests) == 40
        # A setting that changes the request does.
        cs.tl.annotate(cells, model_options={"base_url": second.base_url, "extra_body": {"top_k": 3}}, **kw)
        assert cells.uns["cellscribe"]["params"]["resumed_batches"] == 0 and len(second.requests) == 80


@pytest.fixture
def openai_host(with_plugin):
    from cellscribe.core import plugins

    host = plugins.make_host()
    plugins.set_host(host)
    return host


def test_2_weights_replaced_at_the_same_path_are_not_resumed(cells, tmp_path, host):
    from _tiny_models import make_tiny_model, make_tokenizer

    tokenizer = make_tokenizer()
    model_dir = make_tiny_model(tmp_path / "model", seed=0, tokenizer=tokenizer)
    kw = dict(model=str(model_dir), checkpoint=tmp_path / "ckpt", generation={"max_new_tokens": 3},
              sentence="top-expressed", n_genes=10, **QUIET)
    few = cells[:4].copy()
    cs.tl.annotate(few, **kw)
    cs.tl.annotate(few, **kw)
    assert few.uns["cellscribe"]["params"]["resumed_batches"] == 1  # same weights: resumed
    first = few.uns["cellscribe"]["raw"]["output"].tolist()
    make_tiny_model(model_dir, seed=1, tokenizer=tokenizer)  # retrained in place
    cs.tl.annotate(few, **kw)
    assert few.uns["cellscribe"]["params"]["resumed_batches"] == 0
    fresh = cells[:4].copy()
    cs.tl.annotate(fresh, **{**kw, "checkpoint": None})
    assert few.uns["cellscribe"]["raw"]["output"].tolist() == fresh.uns["cellscribe"]["raw"]["output"].tolist()
    assert first != fresh.uns["cellscribe"]["raw"]["output"].tolist()


def test_2_large_weight_files_are_fingerprinted_by_content_without_reading_them(tmp_path):
    """A 15 GB shard is not read whole: its header, size, mtime and sampled blocks are; a change in any
    of them (values rewritten with the old mtime kept, a new tensor layout) changes the digest."""
    shard = tmp_path / "model-00001-of-00002.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with shard.open("wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(15 * 2**30)  # sparse: 15 GB that take no disk
    before = path_digest(shard)
    stat = shard.stat()
    with shard.open("r+b") as fh:  # new values where a sampled block lies (the middle), same size
        fh.seek(shard.stat().st_size // 2)
        fh.write(b"\x01" * 64)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    assert path_digest(shard) != before
    assert path_digest(tmp_path) is not None  # a model folder (it holds a .safetensors file)
    assert path_digest(tmp_path / "missing") is None and path_digest("markers") is None


def test_2_a_checkpoint_folder_owned_by_a_live_run_is_refused(cells, rules, tmp_path):
    folder = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cellscribe.core.run.checkpoint import hold_folder\n"
         "with hold_folder(sys.argv[1], run='other'):\n    print('held', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointInUse, match=f"process {holder.pid}"):
            cs.tl.annotate(cells, model="rules", checkpoint=folder, sidecar=False, **QUIET)
        assert rules.calls == []
    finally:
        holder.kill()
        holder.wait()
    cs.tl.annotate(cells, model="rules", checkpoint=folder, sidecar=False, **QUIET)  # free once it died
    assert len(rules.calls) == 40


# -- 3 ----------------------------------------------------------------------------------------------------


def test_3_a_nul_in_an_answer_is_written_and_resumed(cells, with_plugin, tmp_path):
    # (An answer must name a cell type to be a label without candidates: "beta\x1b[0m" would be
    # "beta [0m", unresolved; the escape alone keeps the label.)
    plugin = RulePlugin(rules={"GCG": "alpha\x00", "IAPP": "beta\x1b", "SST": "delta"})
    with_plugin(plugin, "rules")
    kw = dict(model="rules", checkpoint=tmp_path / "ckpt", sidecar=tmp_path / "raw.jsonl", **QUIET)
    cs.tl.annotate(cells, **kw)
    cells.write_h5ad(tmp_path / "out.h5ad")
    in_memory = cells.copy()
    cs.tl.annotate(in_memory, model="rules", **QUIET)  # the raw outputs kept in uns, written too
    in_memory.write_h5ad(tmp_path / "in_memory.h5ad")
    again = ad.read_h5ad(PANCREAS)[_eight_per_type(ad.read_h5ad(PANCREAS))].copy()
    cs.tl.annotate(again, **kw)  # from the checkpoint that holds the NULs
    assert again.uns["cellscribe"]["params"]["resumed_batches"] >= 1
    again.write_h5ad(tmp_path / "again.h5ad")
    obs = ad.read_h5ad(tmp_path / "again.h5ad").obs
    assert {"alpha", "beta"} <= set(obs["cellscribe"].dropna().astype(str))
    assert obs["cellscribe_note"].astype(str).str.contains("control character").any()
    assert any("\x00" in json.loads(line)["output"] for line in (tmp_path / "raw.jsonl").open())  # raw kept


# -- 4 ----------------------------------------------------------------------------------------------------


class _Flaky(RuleModel):
    """Fails the model call of the cells in ``failing`` (as a server error would)."""

    def __init__(self, failing):
        from _rule_backend import PANCREAS_RULES

        super().__init__(PANCREAS_RULES)
        self.failing = set(failing)

    def generate(self, prompts, **kw):
        if any(u in self.failing for p in prompts for u in p.unit_ids):
            raise RuntimeError("HTTP 500 from the server")
        return super().generate(prompts, **kw)


def test_4_failed_calls_raise_after_writing_and_a_rerun_sends_only_them(cells, with_plugin, tmp_path):
    reference = cells.copy()
    failing = [str(cells.obs_names[3]), str(cells.obs_names[25])]
    model = _Flaky(failing)
    with_plugin(RulePlugin(model=model), "rules")
    kw = dict(model="rules", checkpoint=tmp_path / "ckpt", sidecar=False, batch_size=2, **QUIET)
    with pytest.raises(cs.FailedPromptsError, match="2 of 40 prompts got no answer") as raised:
        cs.tl.annotate(cells, **kw)
    summary = cells.uns["cellscribe"]["summary"]
    assert summary["n_failed_prompts"] == 2 and raised.value.summary["n_failed_units"] == 2
    assert (cells.obs.loc[failing, "cellscribe_status"] == "unresolved").all()
    assert cells.obs.loc[failing, "cellscribe_note"].str.contains("HTTP 500").all()
    assert (cells.obs.drop(index=failing)["cellscribe_status"] == "ok").all()

    model.failing.clear()  # the server is back
    model.calls.clear()
    cs.tl.annotate(cells, **kw)
    assert sorted(p.unit_ids[0] for p in model.calls) == sorted(failing)  # only the failed prompts
    cs.tl.annotate(reference, **{**kw, "checkpoint": None})
    columns = [c for c in reference.obs if c.startswith("cellscribe")]
    pd.testing.assert_frame_equal(cells.obs[columns], reference.obs[columns])


def test_4_copy_keeps_the_annotated_copy_on_the_error(cells, with_plugin):
    with_plugin(RulePlugin(model=_Flaky([str(cells.obs_names[0])])), "rules")
    with pytest.raises(cs.FailedPromptsError) as raised:
        cs.tl.annotate(cells, model="rules", sidecar=False, copy=True, **QUIET)
    assert "cellscribe" not in cells.obs and raised.value.data.obs["cellscribe"].notna().sum() == 39


# -- 5 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_5_nan_and_inf_are_refused_naming_where(cells, rules, value, shown):
    X = cells.X.tocsr().astype(np.float32)
    row = 7
    start, stop = X.indptr[row], X.indptr[row + 1]
    k = start + int(np.argmax(X.data[start:stop]))
    X.data[k] = value
    cells.X = X
    gene = str(cells.var_names[X.indices[k]])
    with pytest.raises(ValueError, match=f"holds {shown} for cell '{cells.obs_names[row]}' .*gene '{gene}'"):
        cs.tl.annotate(cells, model="rules", sidecar=False, **QUIET)
    assert rules.calls == [] and "cellscribe" not in cells.obs


# -- 6 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("candidates, match", [
    (["alpha"], "single candidate"),
    ([], "candidates is empty"),
    (["alpha", " "], "blank"),
    (["alpha", "alpha"], "duplicate"),
])
def test_6_one_or_no_candidate_is_refused(cells, rules, candidates, match):
    with pytest.raises(ValueError, match=match):
        cs.tl.annotate(cells, model="rules", candidates=candidates, sidecar=False, **QUIET)
    assert rules.calls == []


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_6_an_empty_candidates_file_is_refused(tmp_path, text):
    labels = tmp_path / "labels.txt"
    labels.write_text(text)
    out = tmp_path / "out.h5ad"
    result = invoke(["annotate", str(PANCREAS), "-o", str(out), "--candidates-file", str(labels), "--limit", "5"])
    assert result.exit_code == 2 and "holds no label" in result.output and not out.exists()


# -- 7 ----------------------------------------------------------------------------------------------------


def test_7_credentials_in_the_base_url_are_never_recorded(tmp_path):
    secret = "pa55-w0rd-77c1"
    out = tmp_path / "out.h5ad"
    with OpenAIServer(answer=rule_answer) as server:
        url = server.base_url.replace("http://", f"http://alice:{secret}@") + f"?api-key={secret}"
        result = invoke(annotate_args(out, url, "--checkpoint", str(tmp_path / "kept")))
        assert result.exit_code == 0, result.output
        assert server.requests[0].headers["authorization"].startswith("Basic ")  # still used to connect
    params = ad.read_h5ad(out).uns["cellscribe"]["params"]
    assert params["model_options"]["base_url"] == server.base_url + "?api-key=***"
    written = [out, tmp_path / "out.h5ad.cellscribe.jsonl.gz", *sorted((tmp_path / "kept").iterdir())]
    contents = [gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes() for p in written]
    assert not any(secret.encode() in content for content in contents)  # the sidecar read uncompressed
    assert secret not in result.output


# -- 8 ----------------------------------------------------------------------------------------------------


def test_8_mudata_to_h5ad_without_mod_is_refused_before_any_request(tmp_path):
    import mudata

    source = tmp_path / "in.h5mu"
    mudata.MuData({"rna": ad.read_h5ad(PANCREAS)[:20].copy()}).write(source)
    with OpenAIServer(answer=rule_answer) as server:
        result = invoke(annotate_args(tmp_path / "out.h5ad", server.base_url, source=source))
        assert server.requests == []
    assert result.exit_code == 2 and "--mod" in result.output
    assert not (tmp_path / "out.h5ad").exists() and not (tmp_path / "out.h5ad.cellscribe.ckpt").exists()


def test_8_9_an_unwritable_output_folder_is_refused_before_any_request(tmp_path, readonly_folder):
    with OpenAIServer(answer=rule_answer) as server:
        result = invoke(annotate_args(readonly_folder / "out.h5ad", server.base_url,
                                      "--checkpoint", str(tmp_path / "ckpt")))
        assert server.requests == []
    assert result.exit_code == 1 and one_line(result.output) and "cannot write the output" in result.output


# -- 9 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["truncated", "not-hdf5", "not-gzip"])
def test_9_a_damaged_or_mistyped_file_is_one_line(tmp_path, case):
    if case == "truncated":
        source = tmp_path / "in.h5ad"
        source.write_bytes(PANCREAS.read_bytes()[:5000])
        extra, message = [], "truncated"
    elif case == "not-hdf5":
        source = tmp_path / "in.h5ad"
        source.write_text("cell,CD3E\nAAAC-1,3\n")
        extra, message = [], "not an HDF5 file"
    else:
        source = tmp_path / "fragments.tsv.gz"
        source.write_text("chr5\t100\t200\tAAAC-1\t1\n")
        extra = ["--modality", "atac", "--gtf", str(ATAC / "hg19_chr5_chr11_genes.gtf.gz"),
                 "--chrom-sizes", str(ATAC / "hg19.chrom.sizes")]
        message = "not gzip-compressed"
    out = tmp_path / "out.h5ad"
    result = invoke(["annotate", str(source), "-o", str(out), *extra, "--no-progress"])
    assert result.exit_code == 1 and one_line(result.output) and message in result.output, result.output
    assert not out.exists() and not (tmp_path / "out.h5ad.cellscribe.ckpt").exists()


# -- 10 ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pbsmall():
    from cellscribe.core.run import read_input

    return read_input(ATAC / "PBSmall_fragments.tsv.gz", gtf=ATAC / "hg19_chr5_chr11_genes.gtf.gz",
                      chrom_sizes=ATAC / "hg19.chrom.sizes")


def test_10_small_atac_runs_answer_and_say_what_they_changed(pbsmall):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ten = pbsmall[:10].copy()
        cs.tl.annotate(ten, modality="atac", sidecar=False, **QUIET)
        one = pbsmall[:1].copy()
        cs.tl.annotate(one, modality="atac", sidecar=False, **QUIET)
    assert (ten.obs["cellscribe_status"] == "ok").sum() >= 5
    assert any("30 asked, 10 cells with counts allow 3" in n for n in ten.uns["cellscribe"]["params"]["matrix_notes"])
    notes = " ".join(one.uns["cellscribe"]["params"]["matrix_notes"])
    assert "depth normalisation used" in notes and "no kNN smoothing" in notes
    assert one.uns["cellscribe"]["summary"]["n_empty"] == 0  # one cell has a sentence of its own


def test_10_twelve_multiome_cells(tmp_path):
    out = tmp_path / "out.h5mu"
    result = invoke(["annotate", str(DATA / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu"), "-o", str(out),
                     "--modality", "atac", "--limit", "12", "--no-progress"])
    assert result.exit_code == 0, result.output
    import mudata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atac = mudata.read_h5mu(out).mod["atac"]
    assert (atac.obs["cellscribe_status"] == "ok").sum() >= 6
    assert any("cells with counts allow" in n for n in atac.uns["cellscribe"]["params"]["matrix_notes"])


# -- 11 ---------------------------------------------------------------------------------------------------


def test_11_group_names_with_a_slash_survive_h5ad(tmp_path):
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    assert "CD4+/CD25 T Reg" in set(pbmc.obs["bulk_labels"])
    cs.tl.annotate(pbmc, groupby="bulk_labels", n_representatives=2, sidecar=False, **QUIET)
    clusters = pbmc.uns["cellscribe"]["clusters"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pbmc.write_h5ad(tmp_path / "pbmc.h5ad")
    assert not [w for w in caught if "/" in str(w.message) and "key" in str(w.message).lower()]
    back = ad.read_h5ad(tmp_path / "pbmc.h5ad").uns["cellscribe"]["clusters"]
    assert set(back.index) == set(pbmc.obs["bulk_labels"].astype(str))
    assert back.loc["CD4+/CD25 T Reg", "label"] == clusters.loc["CD4+/CD25 T Reg", "label"] != ""


# -- 12 ---------------------------------------------------------------------------------------------------


def test_12_a_python_call_writes_no_file_unless_asked(cells, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = time.time()
    cs.tl.annotate(cells, **QUIET)
    assert list(tmp_path.iterdir()) == []
    raw = cells.uns["cellscribe"]["raw"]  # the raw outputs stay in memory
    assert len(raw) == cells.uns["cellscribe"]["summary"]["n_prompts"] == 40
    assert raw["output"].str.len().gt(0).all() and cells.uns["cellscribe"]["sidecar"] == ""
    cells.write_h5ad(tmp_path / "cells.h5ad")  # and survive h5ad
    assert len(ad.read_h5ad(tmp_path / "cells.h5ad").uns["cellscribe"]["raw"]) == 40
    named = cells.copy()
    cs.tl.annotate(named, sidecar=tmp_path / "raw.jsonl", **QUIET)  # a file only where asked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "raw.jsonl"]
    assert "raw" not in named.uns["cellscribe"] and os.path.getmtime(tmp_path / "raw.jsonl") >= before
