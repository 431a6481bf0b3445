"""Throughput of the transformers backend: cells/s and tokens/s per decode mode, beside a naive loop.

The model is built from a config with random weights (no download): ``tiny`` (2 layers, hidden 64) by
default on CPU, ``qwen2.5-7b`` (Qwen2.5-7B-Instruct's shape, bf16) on CUDA. It is built on the meta
device and materialised on the target device, so a 7B model never exists in CPU memory. Its tokenizer
is a byte-level BPE trained here on CellReasoner's 10,000 ranked genes and the prompt texts (the
recipe of ``tests/_tiny_models.py``); the model's vocabulary keeps its configured size (152,064 for the
7B shape), so the output layer costs what it costs in the real model.

Cells are synthetic CellReasoner "ranked HVG" sentences: for each cell a random subset of the vendored
gene list, in list order, ``--genes`` long on average (CellReasoner uses up to 1,000). Prompts are the
published CellReasoner direct-mode prompts (``cellscribe.plugins.prompting``).

Modes, all in one run on the same model and cells:

``naive``        CellReasoner's inference loop: batches of 4 cells in input order, the tokenizer with
                 padding per batch, ``model.generate``, published direct-mode sampling settings.
``generate``     :meth:`TransformersModel.generate`: one tokenizer pass, length-sorted token-budget
                 batches, same settings. Both run at a fixed output length (``min_new_tokens =
                 max_new_tokens = --new-tokens``) so they do the same work.
``constrained``  ``decode="constrained"`` over ``--candidates`` labels (answers are a label + eos).
``score``        ``decode="score"`` over the same labels (one prompt pass, cached candidate pass).

Run ``python benchmarks/llm.py --help``. Needs torch, transformers, tokenizers, numpy, scipy, pandas
and attrs; not scanpy, anndata or snapatac2. Works from an installed cellscribe or a plain checkout.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GENE_LIST = ROOT / "plugins" / "sentences" / "data" / "cellreasoner_ranked_hvg.list"
LABELS = (
    "CD14+ Mono", "CD16+ Mono", "Memory CD4 T", "Naive CD4 T", "CD8 T", "NK", "B", "Platelet",
    "DC", "pDC", "alpha", "beta",
)
#: CellReasoner's published direct-mode sampling settings (FORMATS.md).
SAMPLING = {"do_sample": True, "temperature": 0.01, "top_p": 0.01, "repetition_penalty": 1.1}
NAIVE_BATCH = 4

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, initializer_range=0.1, tie_word_embeddings=True),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408, initializer_range=0.02, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, initializer_range=0.02, tie_word_embeddings=False,
                       vocab_size=152064, rope_theta=1_000_000.0),
}


def _import_cellscribe():
    """Import cellscribe, from a plain source checkout (not installed) when needed."""
    try:
        import cellscribe  # noqa: F401
    except ModuleNotFoundError:
        # The checkout's root is the package: expose it under its package name.
        shim = Path(tempfile.mkdtemp(prefix="cellscribe-path-"))
        (shim / "cellscribe").symlink_to(ROOT, target_is_directory=True)
        sys.path.insert(0, str(shim))
    import cellscribe

    return cellscribe


def make_sentences(n_cells: int, n_genes: int, seed: int = 0) -> list[str]:
    """Synthetic ranked-HVG sentences: per cell a random subset of the gene list, in list order, of
    ``n_genes`` genes on average (uniform between half and one and a half times that)."""
    genes = np.array(GENE_LIST.read_text(encoding="utf-8").split())
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, n_genes // 2), max(2, n_genes * 3 // 2), size=n_cells)
    out = []
    for length in lengths:
        keep = np.sort(rng.choice(len(genes), size=min(int(length), len(genes)), replace=False))
        out.append(", ".join(genes[keep]))
    return out


def make_tokenizer(instructions: list[str]):
    """A Qwen2-compatible BPE tokenizer trained on the gene list and the prompt texts."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_models import make_tokenizer as train

    genes = GENE_LIST.read_text(encoding="utf-8").split()
    texts = [", ".join(genes[i : i + 20]) for i in range(0, len(genes), 20)]
    texts += instructions * 20 + [" ".join(LABELS)] * 50 + ["system user assistant"] * 20
    tokenizer = train(texts=texts, vocab_size=4096)
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(shape: str, tokenizer, device: str, dtype, attn: str):
    """A ``Qwen2ForCausalLM`` of ``shape`` with random weights, built on the meta device and
    materialised on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = dict(SHAPES[shape])
    params.setdefault("vocab_size", len(tokenizer))
    config = Qwen2Config(**params, max_position_embeddings=32768, bos_token_id=None, eos_token_id=eos,
                         pad_token_id=eos)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
        # Buffers are not parameters: the rotary frequencies must be computed again on the device.
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config).to(device)
    model.eval()
    model.generation_config = GenerationConfig(pad_token_id=eos, eos_token_id=eos, do_sample=False)
    return model


def naive_loop(model, tokenizer, texts: list[str], settings: dict, device: str) -> tuple[int, int]:
    """CellReasoner's loop: 4 prompts at a time in input order. Returns (prompt tokens, new tokens)."""
    import torch

    n_prompt = n_new = 0
    for start in range(0, len(texts), NAIVE_BATCH):
        inputs = tokenizer(texts[start : start + NAIVE_BATCH], return_tensors="pt", padding=True,
                           add_special_tokens=False, return_token_type_ids=False).to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, **settings)
        new = out[:, inputs["input_ids"].shape[1] :]
        tokenizer.batch_decode(new, skip_special_tokens=True)
        n_prompt += int(inputs["attention_mask"].sum())
        n_new += int(new.numel())
    return n_prompt, n_new


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Run every requested mode: one result row per mode, and what was run (model, device, sizes)."""
    import torch

    _import_cellscribe()
    from cellscribe.plugins.prompting.cellreasoner import (
        DIRECT_INSTRUCTION,
        REASONING_INSTRUCTION,
        cellreasoner_prompt,
    )
    from cellscribe.plugins.transformers import TransformersModel

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("qwen2.5-7b" if device.startswith("cuda") else "tiny")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    attn = "sdpa"
    if device.startswith("cuda"):
        from transformers.utils import is_flash_attn_2_available

        attn = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    torch.manual_seed(0)

    t0 = time.perf_counter()
    tokenizer = make_tokenizer([DIRECT_INSTRUCTION, REASONING_INSTRUCTION])
    model = build_model(shape, tokenizer, device, dtype, attn)
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {shape}: {n_params / 1e6:,.1f}M parameters, {dtype}, {attn}, on {device}; "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)

    candidates = list(LABELS[: args.candidates])
    cells = make_sentences(args.cells, args.genes, seed=0)
    prompts = [
        cellreasoner_prompt(f"cell{i}", s, mode="direct", strategy="zero-shot", candidates=candidates,
                            show_candidates=False)
        for i, s in enumerate(cells)
    ]
    loaded = TransformersModel(model, tokenizer, spec=f"random-{shape}", device=device,
                               max_batch_tokens=args.max_batch_tokens)
    texts = [loaded.render(p) for p in prompts]
    lengths = [loaded.count_tokens(t) for t in texts[:64]]
    print(f"{len(prompts)} cells, {args.genes} genes on average, prompts of {np.mean(lengths):,.0f} tokens "
          f"on average (first 64); {args.new_tokens} new tokens per cell in naive and generate mode", flush=True)

    fixed = {**SAMPLING, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    # Warm-up (kernels, allocator, the free-stage vocabulary masks) outside the timed runs.
    loaded.generate(prompts[:2], settings={**fixed, "max_new_tokens": 2, "min_new_tokens": 2})
    loaded.generate(prompts[:2], settings={"decode": "constrained"})
    loaded.generate(prompts[:2], settings={"decode": "score"})
    naive_loop(model, tokenizer, texts[:NAIVE_BATCH], {**fixed, "max_new_tokens": 2, "min_new_tokens": 2}, device)

    rows = []
    modes = args.modes.split(",")
    if "naive" in modes:
        n = min(args.naive_cells or len(texts), len(texts))
        _sync(device)
        t = time.perf_counter()
        n_prompt, n_new = naive_loop(model, tokenizer, texts[:n], fixed, device)
        _sync(device)
        rows.append(dict(mode="naive", cells=n, seconds=time.perf_counter() - t, prompt_tokens=n_prompt,
                         new_tokens=n_new, batches=math.ceil(n / NAIVE_BATCH)))
    for mode in ("generate", "constrained", "score"):
        if mode not in modes:
            continue
        settings = fixed if mode == "generate" else {**SAMPLING, "decode": mode}
        batches: list[int] = []
        profiler = cProfile.Profile() if args.profile and mode == "generate" else None
        _sync(device)
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        out = loaded.generate(prompts, settings=settings, progress=batches.append)
        if profiler:
            profiler.disable()
        _sync(device)
        seconds = time.perf_counter() - t
        assert all(g.error is None for g in out), [g.error for g in out if g.error][:3]
        if mode != "generate":
            assert all(g.text in candidates for g in out)
        new = sum(g.n_output_tokens for g in out)
        if mode == "score":
            new = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in candidates) * len(out)
        prompt_tokens = sum(g.n_prompt_tokens for g in out)
        rows.append(dict(mode=mode, cells=len(out), seconds=seconds, prompt_tokens=prompt_tokens,
                         new_tokens=new, batches=len(batches)))
        if mode == "generate":
            assert all(g.n_output_tokens == args.new_tokens for g in out)  # same work as the naive loop
        if profiler:
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(12)
            print(stream.getvalue())

    for row in rows:
        row["cells_per_s"] = row["cells"] / row["seconds"]
        row["prompt_tokens_per_s"] = row["prompt_tokens"] / row["seconds"]
        row["new_tokens_per_s"] = row["new_tokens"] / row["seconds"]
        # Dense FLOPs: 2 per parameter per token read or written (attention over the context excluded).
        row["tflops"] = 2 * n_params * (row["prompt_tokens"] + row["new_tokens"]) / row["seconds"] / 1e12
    return rows, dict(shape=shape, device=device, dtype=str(dtype), attn=attn, n_params=n_params,
                      max_batch_tokens=loaded.max_batch_tokens, new_tokens=args.new_tokens,
                      genes=args.genes, candidates=len(candidates),
                      gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None)


def print_table(rows: list[dict], meta: dict, peak_tflops: float | None) -> None:
    naive = next((r["cells_per_s"] for r in rows if r["mode"] == "naive"), None)
    head = f"{'mode':<12}{'cells':>7}{'batches':>9}{'seconds':>9}{'cells/s':>10}{'prompt tok/s':>14}" \
           f"{'new tok/s':>11}{'TFLOP/s':>9}{'x naive':>9}"
    if peak_tflops:
        head += f"{'% peak':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['mode']:<12}{r['cells']:>7}{r['batches']:>9}{r['seconds']:>9.2f}{r['cells_per_s']:>10.1f}"
                f"{r['prompt_tokens_per_s']:>14,.0f}{r['new_tokens_per_s']:>11,.0f}{r['tflops']:>9.3f}"
                f"{(r['cells_per_s'] / naive if naive else float('nan')):>9.1f}")
        if peak_tflops:
            line += f"{100 * r['tflops'] / peak_tflops:>8.1f}"
        print(line)
    if peak_tflops:
        print(f"prefill roofline at {peak_tflops:.0f} TFLOP/s: "
              f"{peak_tflops * 1e12 / (2 * meta['n_params']):,.0f} tokens/s for this model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--shape", choices=sorted(SHAPES), help="model shape (default: tiny on CPU, qwen2.5-7b on CUDA)")
    add("--device", default="auto")
    add("--cells", type=int, default=None, help="cells (default 256 on CPU, 512 on CUDA)")
    add("--naive-cells", type=int, default=None, help="cells for the naive loop (default: all; 64 on CUDA)")
    add("--genes", type=int, default=None, help="genes per sentence on average (default 200; 1000 on CUDA)")
    add("--new-tokens", type=int, default=None, help="fixed output length (default 32; 256 on CUDA)")
    add("--candidates", type=int, default=8, help="candidate labels for constrained/score (max 12)")
    add("--max-batch-tokens", type=int, default=None, help="token budget per batch (default: the backend's)")
    add("--modes", default="naive,generate,constrained,score")
    add("--peak-tflops", type=float, default=None, help="hardware peak for %% of peak (default 790 on CUDA)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add("--profile", action="store_true", help="cProfile the generate mode")
    add("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.cells = args.cells or (512 if cuda else 256)
    args.naive_cells = args.naive_cells or (64 if cuda else None)
    args.genes = args.genes or (1000 if cuda else 200)
    args.new_tokens = args.new_tokens or (256 if cuda else 32)
    peak = args.peak_tflops or (790.0 if cuda else None)
    rows, meta = run(args)
    print()
    print_table(rows, meta, peak)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
