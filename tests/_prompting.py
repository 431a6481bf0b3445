"""Test helpers for the prompting plugin: cell sentences built with core.domain.ranking only (independent of
the sentence and modality plugins), the reference data files, and a Qwen-like chat template."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cellscribe.core.domain.ranking import rank_by_order, rank_by_value
from cellscribe.core.types import CellSentences

DATA = Path(__file__).parent / "data"
RANKED_HVG = (
    Path(__file__).resolve().parents[1] / "plugins" / "sentences" / "data" / "cellreasoner_ranked_hvg.list"
)


def ranked_hvg_chunks(adata, chunk_size: int = 100, max_len: int = 1000) -> Iterator[CellSentences]:
    """CellReasoner sentences (FORMATS.md): list genes present and non-zero, in list order."""
    genes = [g for g in RANKED_HVG.read_text().splitlines() if g]
    where = {g: i for i, g in enumerate(genes)}
    position = np.array([where.get(g, -1) for g in adata.var_names], dtype=np.int64)
    vocabulary = np.array(genes, dtype=object)
    X = sp.csr_matrix(adata.X)
    for start in range(0, adata.n_obs, chunk_size):
        stop = min(start + chunk_size, adata.n_obs)
        indptr, ranked = rank_by_order(X[start:stop], position, len(genes), max_len)
        yield CellSentences(adata.obs_names[start:stop], vocabulary, indptr, ranked, "ranked-hvg")


def ranked_hvg(adata, max_len: int = 1000) -> CellSentences:
    return CellSentences.concatenate(list(ranked_hvg_chunks(adata, adata.n_obs, max_len)))


def top_expressed(adata, n_genes: int = 50) -> CellSentences:
    """Cell-o1 sentences: the cell's highest counts first."""
    indptr, ranked = rank_by_value(sp.csr_matrix(adata.X), n_genes)
    return CellSentences(adata.obs_names, adata.var_names.to_numpy(), indptr, ranked, "top-expressed")


def cellreasoner_reference(mode: str) -> bytes:
    """The decompressed CellReasoner reference file of ``mode`` (direct/reasoning)."""
    return gzip.decompress((DATA / f"pancreas_350_cellreasoner_{mode}.json.gz").read_bytes())


def exemplar() -> dict:
    """The CellPuzzles reasoning exemplar record."""
    return json.loads((DATA / "cellpuzzles_reasoning_exemplar.jsonl").read_text(encoding="utf-8"))


def qwen_template(messages, tokenize=False, add_generation_prompt=True) -> str:
    """A chat template shaped like Qwen2.5's (enough to test the rendering edits)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
