"""Helpers for the tests of the transformers backend's decode modes and adapters.

Prompts in the two reference formats built directly (no prompting plugin: tests of one plugin do not
lean on another), PEFT LoRA adapters made offline, and a brute-force candidate scorer that runs one
full forward pass per candidate, to check the cached scorer against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from _tiny_models import cellreasoner_records, pancreas_examples

from cellscribe import Prompt
from cellscribe.core.answers import TAGGED

DIRECT = cellreasoner_records("direct")[0]["instruction"]
REASONING = cellreasoner_records("reasoning")[0]["instruction"]
PUZZLE_SYSTEM = "Assign one cell type to each cell, all different, as <answer>a | b</answer>."

#: Candidate labels with a shared prefix ("T cell" / "T cell, CD8") and multi-token labels.
CANDIDATES = ("alpha", "beta", "delta", "gamma", "ductal", "acinar cell", "T cell", "T cell, CD8")


def sentences(n: int, n_genes: int = 20) -> list[str]:
    """``n`` pancreas cell sentences of various lengths."""
    pairs = pancreas_examples(4, n_genes=n_genes)
    return [", ".join(s.split(", ")[: 3 + (7 * i) % n_genes]) for i, (s, _) in enumerate(pairs[:n])]


def cellreasoner_prompt(
    sentence: str, candidates: Sequence[str] = CANDIDATES, *, reasoning: bool = False, **fields
) -> Prompt:
    """A CellReasoner prompt (direct, or reasoning with the published ``<think>`` edits)."""
    extra = {"remove_from_rendered": ("<think>",), "response_prefix": "<think> "} if reasoning else {}
    return Prompt(
        messages=(
            {"role": "system", "content": REASONING if reasoning else DIRECT},
            {"role": "user", "content": sentence},
        ),
        unit_ids=("cell",),
        sentences=(sentence,),
        decoder="cellreasoner",
        candidates=tuple(candidates),
        meta={"mode": "reasoning" if reasoning else "direct"},
        **extra,
        **fields,
    )


def puzzle_prompt(cells: Sequence[str], candidates: Sequence[str], **fields) -> Prompt:
    """A CellPuzzles-shaped prompt: one user message listing the cells and the candidates."""
    body = "\n".join(f"Cell {i}: {s}" for i, s in enumerate(cells, start=1))
    body += "\n\nMatch the cells above to one of the following cell types:\n" + "\n".join(sorted(candidates))
    return Prompt(
        messages=({"role": "user", "content": f"{body}\n{PUZZLE_SYSTEM}"},),
        unit_ids=tuple(f"cell{i}" for i in range(len(cells))),
        sentences=tuple(cells),
        strategy="puzzle",
        decoder="cellpuzzles",
        answer=TAGGED,
        candidates=tuple(sorted(candidates)),
        **fields,
    )


def make_lora(base_dir: Path, out: Path, seed: int, targets: Sequence[str] = ("q_proj", "v_proj")) -> Path:
    """Save a LoRA adapter for the model in ``base_dir`` with random (non-zero) A and B to ``out``."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    # init_lora_weights=False: peft's default (B = 0) would leave the outputs unchanged.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def brute_force_log_likelihood(loaded, prompt: Prompt, continuation_ids: Sequence[int], n_scored: int) -> float:
    """Summed log-probability of the last ``n_scored`` tokens of ``continuation_ids`` after ``prompt``,
    from one full forward pass (no cache, no padding). The final token's term counts every eos id."""
    import torch

    prompt_ids = loaded.tokenizer(loaded.render(prompt), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + list(continuation_ids)])
    with torch.inference_mode():
        log_probs = torch.log_softmax(loaded.model(input_ids=ids).logits[0].double(), dim=-1)
    total = 0.0
    eos = sorted(loaded._eos_ids())
    for pos in range(ids.shape[1] - n_scored, ids.shape[1]):
        token = int(ids[0, pos])
        row = log_probs[pos - 1]
        total += float(torch.logsumexp(row[eos], 0)) if token in eos else float(row[token])
    return total
