"""Tiny chat models built offline, for tests that need a real transformers model.

Nothing here downloads anything: the tokenizer is trained locally with the ``tokenizers`` library on
text drawn from the vendored test data (pancreas gene symbols, the CellReasoner and CellPuzzles
instructions, cell-type labels), and the model is a randomly initialised two-layer ``Qwen2ForCausalLM``.
Saved to a directory, the pair loads through ``AutoTokenizer`` / ``AutoModelForCausalLM`` exactly like a
hub checkpoint (about 1 MB, loads in well under a second).

Two platform details shape the tokenizer (see ``NOTES.md``):

- For ``model_type="qwen2"`` ``AutoTokenizer`` ignores the saved tokenizer class and rebuilds a
  ``Qwen2Tokenizer`` with Qwen's NFC normalizer and split regex, so the tokenizer is trained with exactly
  those; ids then survive a save/reload.
- ``<think>`` and ``</think>`` are added as *non-special* tokens, as in the released reasoning models
  (QwQ, Qwen3): decoding with ``skip_special_tokens=True`` keeps them in the output text.

Usage from a test module (the tests folder is on ``sys.path`` under pytest's default rootdir mode)::

    from _tiny_models import finetune_to_answer, make_tiny_model
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"

#: Special tokens of the tiny tokenizer, in id order (ids 0, 1, 2).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Reasoning tags, added as ordinary (non-special) added tokens.
THINK_TOKENS = ("<think>", "</think>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

#: Qwen-style ChatML: one block per message, ``<|im_start|>assistant\n`` as the generation prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _read_json_gz(name: str) -> Any:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def cellreasoner_records(mode: str = "direct") -> list[dict[str, str]]:
    """The vendored CellReasoner reference records for the 350 pancreas cells (``mode``: direct or
    reasoning); each has ``cell_name``, ``instruction``, ``input`` (the sentence) and ``output``."""
    return _read_json_gz(f"pancreas_350_cellreasoner_{mode}.json.gz")


def pancreas_examples(n_per_label: int, n_genes: int = 20, offset: int = 0) -> list[tuple[str, str]]:
    """``(sentence, label)`` pairs from the pancreas reference: ``n_per_label`` cells of each of the five
    labels (skipping the first ``offset`` of each), sentences cut to their first ``n_genes`` genes.

    Ordered label by label, labels sorted.
    """
    by_label: dict[str, list[str]] = {}
    for record in cellreasoner_records("direct"):
        by_label.setdefault(record["output"], []).append(record["input"])
    pairs = []
    for label in sorted(by_label):
        for sentence in by_label[label][offset : offset + n_per_label]:
            pairs.append((", ".join(sentence.split(", ")[:n_genes]), label))
    return pairs


def training_texts() -> list[str]:
    """Text the tiny tokenizer is trained on: every pancreas gene symbol (in 20-gene sentences), plus
    the instructions, chat roles and labels of the reference formats.

    The short, fixed texts are repeated so BPE learns their words whole: prompts built from them stay
    short, which keeps fine-tuning fast.
    """
    import h5py

    with h5py.File(DATA / "pancreas_baron_human_mouse_350.h5ad", "r") as fh:
        var = fh["var"]
        genes = [g.decode() for g in var[var.attrs["_index"]][:]]
    texts = [", ".join(genes[i : i + 20]) for i in range(0, len(genes), 20)]

    fixed = [r["instruction"] for r in (cellreasoner_records("direct")[0], cellreasoner_records("reasoning")[0])]
    with open(DATA / "cellpuzzles_reasoning_exemplar.jsonl", encoding="utf-8") as fh:
        puzzle = json.loads(fh.readline())
    fixed += [puzzle["system_msg"], puzzle["user_msg"], puzzle["assistant_msg"]]
    labels = sorted({r["output"] for r in cellreasoner_records("direct")})
    labels += [label.strip() for label in puzzle["answer"].split("|")]
    fixed += ["system user assistant", "Name the cell type.", "Cell 1: Cell 2: Cell 3:"]
    texts += fixed * 20 + [" ".join(labels)] * 50
    return texts


def make_tokenizer(path: str | Path | None = None, *, texts: Iterable[str] | None = None, vocab_size: int = 2048):
    """Train a Qwen2-compatible byte-level BPE tokenizer with a ChatML chat template.

    ``texts`` defaults to :func:`training_texts`. Returns a ``PreTrainedTokenizerFast`` (eos
    ``<|im_end|>``, pad ``<|endoftext|>``); when ``path`` is given it is also saved there
    (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same pipeline Qwen2Tokenizer rebuilds on load; anything else changes the ids after reload.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts() if texts is None else list(texts), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.chat_template = CHATML_TEMPLATE
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def make_tiny_model(path: str | Path, seed: int = 0, *, tokenizer=None, initializer_range: float = 0.1) -> Path:
    """Write a tiny ``Qwen2ForCausalLM`` with its tokenizer to ``path`` and return ``path``.

    The model has hidden size 64, 2 layers, 4 attention heads (2 key/value heads), intermediate size 128
    and the tokenizer's vocabulary; weights are drawn with ``seed``. ``path`` receives ``config.json``,
    ``model.safetensors``, ``generation_config.json`` (pad and eos = ``<|im_end|>``, greedy) and the
    tokenizer files. ``tokenizer`` defaults to a fresh :func:`make_tokenizer`.

    ``initializer_range`` is larger than Qwen's 0.02 so that the untrained model's greedy output
    depends on its input (with 0.02 it repeats one token whatever the prompt).
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer() if tokenizer is None else tokenizer
    tokenizer.save_pretrained(str(path))
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=eos_id, eos_token_id=eos_id, do_sample=False)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def finetune_to_answer(
    path: str | Path,
    prompts_text: Sequence[str],
    answers: Sequence[str],
    steps: int = 300,
    *,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    num_threads: int | None = 1,
) -> dict[str, float]:
    """Fine-tune the model saved at ``path`` so that greedy generation after each rendered prompt in
    ``prompts_text`` returns the matching answer, then save it back to ``path``.

    Plain torch: AdamW at ``lr``, the loss only on the answer tokens and the closing ``<|im_end|>``.
    Each prompt and its answer are tokenised separately (the backend generates from the prompt's own
    ids). Training stops early once, in one full pass, every answer token is the arg-max with
    probability > 0.9: greedy decoding then reproduces every answer. At most ``steps`` optimiser steps.

    ``num_threads``: torch intra-op threads while training (restored afterwards). A 64-wide model gains
    nothing from threads, and on a busy 2-core machine two threads contend: 20 prompts took 6.7 s with
    one thread and 29 s with two there. ``None`` keeps torch's setting.

    Returns ``{"steps": ..., "loss": ..., "min_target_prob": ...}`` of the last pass.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len(prompts_text) != len(answers) or not answers:
        raise ValueError("give one answer per prompt (and at least one prompt)")
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts_text]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos_id] for a in answers]
    width = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
    n = len(prompt_ids)
    input_ids = torch.full((n, width), eos_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        # Right padding: positions start at 0 as they do in generation, which derives them from the mask.
        input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attention[i, : len(p) + len(a)] = 1
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)

    def score(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean loss, per-token arg-max correctness and per-token target probability of ``rows``."""
        logits = model(input_ids=input_ids[rows], attention_mask=attention[rows]).logits[:, :-1]
        targets = labels[rows][:, 1:]
        mask = targets != -100
        target_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
        target_lp = target_lp.squeeze(-1)[mask]
        return -target_lp.mean(), logits.argmax(-1)[mask] == targets[mask], target_lp.exp()

    def learned(correct: torch.Tensor, probs: torch.Tensor) -> bool:
        stats["min_target_prob"] = probs.min().item()
        return bool(correct.all()) and stats["min_target_prob"] > 0.9

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    stats: dict[str, float] = {"steps": 0, "loss": float("nan"), "min_target_prob": 0.0}
    everything = torch.arange(n)
    full_batch = batch_size >= n

    def train() -> None:
        """Optimiser steps until every answer is learned or ``steps`` is reached (fills ``stats``)."""
        model.train()
        step, done = 0, False
        while not done and step < steps:
            for rows in torch.randperm(n, generator=generator).split(batch_size):
                loss, correct, probs = score(everything if full_batch else rows)
                stats["loss"] = loss.item()
                # In full-batch mode the training pass doubles as the check (before this step's update).
                if full_batch and learned(correct, probs):
                    done = True
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                stats["steps"] = step
                if step >= steps:
                    break
            if not done and not full_batch:
                with torch.no_grad():
                    parts = [score(rows) for rows in everything.split(batch_size)]
                done = learned(torch.cat([c for _, c, _ in parts]), torch.cat([p for _, _, p in parts]))

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        train()
    finally:
        torch.set_num_threads(previous_threads)
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return stats
