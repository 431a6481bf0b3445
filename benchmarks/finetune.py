"""Fine-tune SmolLM2-135M-Instruct with `cellscribe finetune` on CPU and measure it (issue 17).

    python benchmarks/finetune.py pbmc   [--model DIR] [--work DIR] [--epochs 2] [--n-genes 20] [--adapter DIR] ...
    python benchmarks/finetune.py resume [--model DIR] [--work DIR]
    python benchmarks/finetune.py multiome --rna-adapter DIR [--model DIR] [--work DIR]

``pbmc``: ``cellscribe finetune`` (a subprocess, timed from start to exit: loading, records, training and
the final validation; wall clock and the command's CPU seconds, with ``uptime`` before and after) on
``pbmc68k_reduced`` (``bulk_labels``; no donor column, so a seeded 70/30 split stratified by label).
The adapter's answers on the 30% held-out cells are the command's own final validation
(``validation_answers.csv``); on the same cells, with the same rendered prompts (checked) and
candidates, the base model without the adapter (``decode="score"``) and the offline ``markers`` model
(candidates = the 10 labels). Prints fine accuracy (exact label), lineage accuracy (T / NK / B /
myeloid / progenitor, from an explicit map of the 10 labels; also with NK apart from T) and the
manifest's own metrics. ``--adapter DIR`` measures a finished adapter folder instead of training one
(when it has no ``validation_answers.csv``, its held-out cells are annotated again, ``--max-cells N``
of them, seeded); per-cell answers of every model go to ``WORK/answers.csv``.

``resume``: the same command on 48 cells (batch 4, 12 steps, a checkpoint every 4), once uninterrupted,
once killed (SIGKILL) right after its first checkpoint and restarted with ``--resume``; prints the
largest difference between the two adapters' weights.

``multiome``: an ATAC adapter trained on labelled scATAC cells (a seeded subset of 24 cells per type
of the Schep 2017 sorted blood populations and cell lines, peaks -> gene activity with the hg19
annotation), then one ``load_model(base, adapters={"rna": ..., "atac": ...})`` annotates both
modalities of the first 48 cells of the (unlabelled) 10x PBMC multiome subset; prints the ATAC
adapter's validation and what ``uns`` records for each modality.

The model is built by ``scripts/build_real_model.py`` (default ``~/.cache/cellscribe/smollm2-135m-instruct``).
Numbers depend on the machine's load: the development machines are shared 2-core boxes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "cellscribe" / "smollm2-135m-instruct"
SHARED = ROOT.parent / "shared" / "data"

#: pbmc68k_reduced's bulk_labels by lineage.
LINEAGE = {
    "CD14+ Monocyte": "myeloid", "Dendritic": "myeloid", "CD19+ B": "B", "CD56+ NK": "NK", "CD34+": "progenitor",
    "CD4+/CD25 T Reg": "T", "CD4+/CD45RA+/CD25- Naive T": "T", "CD4+/CD45RO+ Memory": "T",
    "CD8+ Cytotoxic T": "T", "CD8+/CD45RA+ Naive Cytotoxic": "T",
}
#: The project's lineage groups (README, examples/pbmc68k_annotate.py): T and NK cells together.
GROUPS = {"T": "T/NK", "NK": "T/NK"}
#: The run settings of the measured adapter (also the base model's run, so the prompts are the same).
PROMPT_OPTIONS = {"show_candidates": False, "instruction": "Cell type?"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cellscribe.cli import main; main()", *args]


def _child_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def scores(truth, predicted) -> dict[str, float]:
    """Fine accuracy (the exact label), lineage accuracy as the project defines it (T/NK, B, myeloid,
    progenitor) and with NK apart from T."""
    truth = [str(t) for t in truth]
    predicted = [str(p) for p in predicted]
    fine = np.mean([t == p for t, p in zip(truth, predicted)])
    strict = [LINEAGE.get(p) == LINEAGE[t] for t, p in zip(truth, predicted)]
    grouped = [GROUPS.get(LINEAGE.get(p), LINEAGE.get(p)) == GROUPS.get(LINEAGE[t], LINEAGE[t])
               for t, p in zip(truth, predicted)]
    return {"fine_accuracy": round(float(fine), 4), "lineage_accuracy": round(float(np.mean(grouped)), 4),
            "lineage_accuracy_nk_apart": round(float(np.mean(strict)), 4)}


def finetune_args(data: Path, out: Path, model: Path, a: argparse.Namespace, *extra: str) -> list[str]:
    return cli("-v", "finetune", str(data), "-o", str(out), "--label-key", "bulk_labels", "--base", str(model),
               "--sentence", "data-hvg", "--n-genes", str(a.n_genes), "--epochs", str(a.epochs),
               "--learning-rate", str(a.lr), "--lora-rank", str(a.rank), "--lora-alpha", str(2 * a.rank),
               "--lora-layers", str(a.layers), "--seed", "0", "--no-progress",
               *[x for k, v in PROMPT_OPTIONS.items() for x in ("--prompt-option", f"{k}={json.dumps(v) if isinstance(v, bool) else v}")],
               *extra)


def pbmc(a: argparse.Namespace) -> dict:
    import scanpy as sc

    import cellscribe as cs

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pbmc68k_reduced.h5ad"
    adata = sc.datasets.pbmc68k_reduced()
    adata.write_h5ad(data)
    out = Path(a.adapter) if a.adapter else work / "adapter_rna"
    if out.exists() and not (out / "cellscribe_adapter.json").exists():
        raise SystemExit(f"{out} holds an unfinished run; remove it first")
    result: dict = {"settings": {"n_genes": a.n_genes, "epochs": a.epochs, "lr": a.lr, "rank": a.rank,
                                 "lora_layers": a.layers, "sentence": "data-hvg", "prompt_options": PROMPT_OPTIONS},
                    "cpus": os.cpu_count(), "uptime_before": _uptime()}
    if not out.exists():
        started, cpu = time.perf_counter(), _child_cpu()
        proc = subprocess.run(finetune_args(data, out, Path(a.model), a), capture_output=True, text=True)
        result["finetune_wall_seconds"] = round(time.perf_counter() - started, 1)
        # CPU seconds of the command: on a shared machine the wall clock also counts other people's jobs.
        result["finetune_cpu_seconds"] = round(_child_cpu() - cpu, 1)
        (work / "finetune.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"cellscribe finetune failed:\n{proc.stderr[-3000:]}")
    result["uptime_after"] = _uptime()
    manifest = json.loads((out / "cellscribe_adapter.json").read_text())
    result["manifest_validation"] = {k: v for k, v in manifest["validation"].items() if k != "per_label_recall"}
    result["manifest_seconds"] = manifest["training"]["seconds"]
    result["trainer"] = {k: manifest["trainer"][k] for k in ("steps", "batch_size", "train_loss", "seconds_training")}

    labels = manifest["labels"]
    if (out / "validation_answers.csv").is_file():
        # The adapter's answers on the held-out cells, as the command's own final validation gave them.
        answers = pd.read_csv(out / "validation_answers.csv", keep_default_na=False).set_index("cell")
    elif (work / "adapter_answers.csv").is_file():  # measured before, by the branch below
        answers = pd.read_csv(work / "adapter_answers.csv", keep_default_na=False).set_index("cell")
    else:  # an adapter made before the command wrote them: annotate its held-out cells again
        held = [json.loads(line)["cell_ids"][0] for line in (out / "dataset" / "validation.jsonl").open()]
        if a.max_cells is not None and a.max_cells < len(held):  # a seeded subset of the held-out cells
            held = sorted(np.random.default_rng(0).choice(held, a.max_cells, replace=False).tolist())
        again = adata[held].copy()
        started, cpu = time.perf_counter(), _own_cpu()
        cs.tl.annotate(again, model=str(a.model), adapter=str(out), decode=manifest["validation"]["decode"],
                       sidecar=False, progress=False, key_added="tuned")
        result["adapter_annotation"] = {"seconds": round(time.perf_counter() - started, 1),
                                        "cpu_seconds": round(_own_cpu() - cpu, 1)}
        answers = pd.DataFrame({"label": again.obs["bulk_labels"].astype(str).to_numpy(),
                                "answer": again.obs["tuned"].astype(object).fillna("").to_numpy()},
                               index=pd.Index(held, name="cell"))
        answers.to_csv(work / "adapter_answers.csv")
    cells = adata[answers.index].copy()
    truth = cells.obs["bulk_labels"].astype(str).to_numpy()
    assert (truth == answers["label"].to_numpy()).all()
    result["adapter"] = {**scores(truth, answers["answer"]), "unresolved": int((answers["answer"] == "").sum())}
    if not a.skip_base:
        # The base model on the same cells with the same prompts: the run the adapter's manifest sets up,
        # without the adapter (checked: every rendered prompt equal).
        from cellscribe.core.run import plan_run

        tuned = cs.load_model(str(a.model), adapters={"rna": str(out)})
        bare = cs.load_model(str(a.model))
        # The adapter's sentences rank the genes it learned (data-hvg on the training cells), in that
        # list's order: ranked-hvg over the same list makes the same sentences for the base model.
        run = dict(decode="score", sentence="ranked-hvg", n_genes=manifest["n_genes"],
                   sentence_options={"gene_list": manifest["sentence_state"]["data_hvg"]["genes"]},
                   prompt_options=manifest["prompt_options"], candidates=labels)
        with_adapter = plan_run(cells, model=tuned, decode="score").prompts
        without = plan_run(cells, model=bare, **run).prompts
        same = sum(tuned.loaded.render(x) == bare.loaded.render(y) for x, y in zip(with_adapter, without, strict=True))
        result["base_prompts_equal"] = f"{same} of {len(without)}"
        del tuned
        base = cells.copy()
        started, cpu = time.perf_counter(), _own_cpu()
        cs.tl.annotate(base, model=bare, **run, sidecar=False, progress=False, key_added="base")
        result["base_model"] = {**scores(truth, base.obs["base"]), "seconds": round(time.perf_counter() - started, 1),
                                "cpu_seconds": round(_own_cpu() - cpu, 1)}
        del bare
    markers = cells.copy()
    cs.tl.annotate(markers, candidates=labels, sidecar=False, progress=False, key_added="markers")
    result["markers"] = scores(truth, markers.obs["markers"])
    table = pd.DataFrame({"label": truth, "adapter": answers["answer"].to_numpy(),
                          "markers": markers.obs["markers"].astype(object).to_numpy()}, index=cells.obs_names)
    if not a.skip_base:
        table["base"] = base.obs["base"].astype(object).to_numpy()
    table.to_csv(work / "answers.csv")
    result["n_validation_cells"] = int(cells.n_obs)
    return result


def resume(a: argparse.Namespace) -> dict:
    import scanpy as sc
    from safetensors.numpy import load_file

    work = Path(a.work) / "resume"
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"pbmc{a.resume_cells}.h5ad"
    sc.datasets.pbmc68k_reduced()[:a.resume_cells].copy().write_h5ad(data)
    save = 4
    extra = ("--save-steps", str(save), "--validation-fraction", "0", "--train-batch-size", "4")
    a = argparse.Namespace(**{**vars(a), "epochs": 1.0})
    whole, cut = work / "uninterrupted", work / "killed"
    for folder in (whole, cut):
        if folder.exists():
            raise SystemExit(f"{folder} exists; remove {work} first")
    started = time.perf_counter()
    subprocess.run(finetune_args(data, whole, Path(a.model), a, *extra), check=True, capture_output=True)
    seconds = time.perf_counter() - started
    proc = subprocess.Popen(finetune_args(data, cut, Path(a.model), a, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = cut / "checkpoints" / f"checkpoint-{save}"
    while proc.poll() is None and not (first / "trainer_state.json").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = sorted(p.name for p in (cut / "checkpoints").glob("checkpoint-*"))
    subprocess.run(finetune_args(data, cut, Path(a.model), a, *extra, "--resume"), check=True, capture_output=True)
    w1 = load_file(str(whole / "adapter_model.safetensors"))
    w2 = load_file(str(cut / "adapter_model.safetensors"))
    diff = max(float(np.abs(w1[k] - w2[k]).max()) for k in w1)
    scale = max(float(np.abs(w1[k]).max()) for k in w1)
    m = json.loads((cut / "cellscribe_adapter.json").read_text())
    return {"killed_while_running": killed, "checkpoints_at_kill": steps_done, "resumed_from": m["trainer"]["resumed_from"],
            "steps": m["trainer"]["steps"], "max_abs_weight_difference": diff, "max_abs_weight": scale,
            "uninterrupted_seconds": round(seconds, 1)}


def multiome(a: argparse.Namespace) -> dict:
    import anndata as ad
    import mudata

    import cellscribe as cs

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    atac_data = work / "schep2017_unique.h5ad"
    atac = ad.read_h5ad(SHARED / "atac" / "schep2017_blood_celllines_600cells.h5ad")
    atac.obs_names_make_unique()  # published GSM ids repeat
    # A seeded, label-stratified subset keeps the CPU run short (12 types x a.atac_per_type cells).
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(atac.obs["cell_type"] == t),
                                              min(a.atac_per_type, int((atac.obs["cell_type"] == t).sum())), replace=False)
                                   for t in atac.obs["cell_type"].unique()]))
    atac[keep].copy().write_h5ad(atac_data)
    gtf19 = ROOT / "tests" / "data" / "atac" / "hg19_genes.gtf.gz"
    out = work / "adapter_atac"
    result: dict = {}
    if not out.exists():
        started, cpu = time.perf_counter(), _child_cpu()
        result["uptime_before"] = _uptime()
        args = cli("-v", "finetune", str(atac_data), "-o", str(out), "--modality", "atac", "--label-key", "cell_type",
                   "--base", str(a.model), "--n-genes", str(a.n_genes), "--epochs", str(a.atac_epochs),
                   "--learning-rate", str(a.lr), "--lora-rank", str(a.rank), "--lora-alpha", str(2 * a.rank),
                   "--lora-layers", str(a.layers), "--no-progress", "--gtf", str(gtf19), "--seed", "0",
                   "--max-eval-cells", str(a.max_eval_cells),
                   *[x for k, v in PROMPT_OPTIONS.items() for x in ("--prompt-option", f"{k}={json.dumps(v) if isinstance(v, bool) else v}")])
        proc = subprocess.run(args, capture_output=True, text=True)
        (work / "finetune_atac.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"ATAC finetune failed:\n{proc.stderr[-3000:]}")
        result["atac_finetune_wall_seconds"] = round(time.perf_counter() - started, 1)
        result["atac_finetune_cpu_seconds"] = round(_child_cpu() - cpu, 1)
        result["uptime_after"] = _uptime()
    m = json.loads((out / "cellscribe_adapter.json").read_text())
    result["atac_validation"] = {k: v for k, v in m["validation"].items() if k != "per_label_recall"}
    result["atac_training"] = {k: m["training"][k] for k in ("n_train", "n_validation", "method", "seconds")}
    result["atac_trainer"] = {k: m["trainer"][k] for k in ("epochs", "steps", "batch_size", "train_loss")}
    mdata = mudata.read_h5mu(ROOT / "tests" / "data" / "multiome" / "pbmc10k_multiome_1000cells_subset.h5mu")
    mdata = mdata[:a.multiome_cells].copy()
    gtf38 = SHARED / "genome" / "hg38_ensembl101_genes.gtf.gz"
    model = cs.load_model(str(a.model), adapters={"rna": str(a.rna_adapter), "atac": str(out)})
    started, cpu = time.perf_counter(), _own_cpu()
    for modality in ("rna", "atac"):
        cs.tl.annotate(mdata, modality=modality, model=model, decode="score", sidecar=False, progress=False,
                       modality_options={"gtf": str(gtf38)} if modality == "atac" else None)
    result["mudata_run"] = {"cells": int(mdata.n_obs), "seconds": round(time.perf_counter() - started, 1),
                            "cpu_seconds": round(_own_cpu() - cpu, 1), "load_model_calls": 1}
    for modality in ("rna", "atac"):
        params = mdata.mod[modality].uns["cellscribe"]["params"]
        result[f"uns_{modality}"] = {"adapter": str(params["adapter"]),
                                     "manifest": {k: str(v) for k, v in params["adapter_manifests"][modality].items()
                                                  if k in ("base_model", "sentence", "n_genes", "training_fingerprint")},
                                     "label_counts": mdata.mod[modality].obs["cellscribe"].value_counts().head(5).to_dict()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("pbmc", "resume", "multiome"))
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--work", default="/tmp/cellscribe_finetune_bench")
    parser.add_argument("--n-genes", type=int, default=20)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--atac-epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--skip-base", action="store_true")
    parser.add_argument("--atac-per-type", type=int, default=24, help="Schep cells per type for the ATAC adapter")
    parser.add_argument("--max-eval-cells", type=int, default=48, help="ATAC adapter: held-out cells validated")
    parser.add_argument("--multiome-cells", type=int, default=48)
    parser.add_argument("--resume-cells", type=int, default=48, help="cells of the resume runs (batch 4)")
    parser.add_argument("--rna-adapter", default=None)
    parser.add_argument("--max-cells", type=int, default=None,
                        help="pbmc --adapter without validation_answers.csv: measure a seeded subset of its held-out cells")
    parser.add_argument("--adapter", default=None, help="pbmc: measure this finished adapter folder instead of training")
    parser.add_argument("--json", default=None, help="also write the result here")
    a = parser.parse_args()
    if not (Path(a.model) / "config.json").is_file():
        raise SystemExit(f"no model at {a.model}: run scripts/build_real_model.py first")
    result = {"pbmc": pbmc, "resume": resume, "multiome": multiome}[a.what](a)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
