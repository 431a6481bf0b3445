"""The transformers backend: load a causal LM with its tokenizer and answer prompts.

A hub id, a local folder and a manifest name (:mod:`cellscribe.core.domain.manifests`, ``model="cell-o1"``)
go through the same code path (``from_pretrained``). Prompts are rendered with the model's chat
template and tokenised in one call, without extra special tokens (the template already holds them).

Batching
--------
Prompts that share their effective settings are sorted by length, longest first (an out-of-memory
error shows up on the first batch, not after an hour), and cut into batches by a *token budget*:
a batch holds as many prompts as fit in ``max_batch_tokens`` padded tokens (rows x (longest prompt +
new tokens); scoring passes the candidates in chunks of rows that fit the same budget), optionally
also capped at ``batch_size`` prompts. The default budget is 16,384 tokens on CPU and, on CUDA, what
fits in 60% of the memory left free after loading (KV cache plus prefill activations per token, from
the model config). Sorting keeps padding small; left padding lets every row continue at the last column. A
batch that raises (CUDA out of memory) is split in halves and retried down to single prompts; a prompt
that still fails gets ``Generation(text="", error=...)``.

Decode modes
------------
``settings["decode"]`` chooses how answers are made (default ``"generate"``):

- ``"generate"``: ``model.generate`` with the prompt's and the user's settings.
- ``"constrained"``: as ``generate``, with a logits processor (:mod:`._constrained`) that allows only
  legal answers built from ``prompt.candidates`` (one candidate then end-of-sequence; for CellPuzzles
  prompts ``<think>...</think>\\n<answer>`` and a permutation of the candidates). Reasoning stays free
  (without ``<``) and is closed after ``max_reasoning_tokens`` (default: what ``max_new_tokens`` leaves
  after the longest answer). Greedy and sampling; beam search is refused. Prompts without candidates
  are generated freely (with a ``UserWarning``).
- ``"score"``: no generation; every candidate's log-likelihood after the prompt (:mod:`._scoring`),
  reusing the prompt's KV cache, made comparable across candidates of different token lengths by
  ``calibration`` (:mod:`cellscribe.core.domain.scoring`): ``"pmi"`` (the default: minus the
  candidate's log-likelihood after a neutral prompt, the cell sentences replaced by "N/A", scored once
  per run), ``"mean"`` (per token; the older ``length_normalize=True``) or ``"sum"`` (favours short
  labels). ``Generation.label_scores`` holds one ``{label: probability}`` per unit (softmax over the
  candidates of the calibrated scores), ``Generation.confidence`` the probability of each unit's label, and
  ``Generation.text`` the answer as the decoder expects it: the best label, or for a puzzle the
  assignment maximising the summed log-probabilities (``scipy.optimize.linear_sum_assignment``) as
  ``<think>scored</think>\\n<answer>a | b</answer>``. Every prompt needs candidates.

Generation settings
-------------------
Each prompt's effective settings are its format's defaults (``Prompt.generation``) updated with the
user's ``settings``. Keys:

- ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``max_new_tokens``,
  ``min_new_tokens``, ``num_beams`` and any other ``transformers.GenerationConfig`` field are passed to
  ``generate`` on top of the model's ``generation_config.json`` (as a plain ``model.generate(...)``
  call does, so released models keep their shipped defaults such as ``top_k``). With
  ``do_sample=False`` the sampling-only keys are dropped so transformers does not warn.
- ``max_prompt_tokens``: longer prompts are truncated to this many tokens. The *end* is kept (the
  ``truncation_side="left"`` default): the chat template's generation prompt and the response prefix
  sit at the end, and without them the model would continue the prompt instead of answering. Pass
  ``truncation_side="right"`` to ``load`` to keep the start instead (what a tokenizer does by default,
  and so what CellReasoner's scripts did; their 8192-token limit is never reached by its 1000-gene
  sentences). Truncation is reported with a ``UserWarning``; prompt strategies should stay under the
  limit by shortening sentences (they receive ``count_tokens``).
- ``seed``: ``torch.manual_seed(seed)`` before every batch (sampling reproducible for a given batch
  partition). When sampling without a seed, one is drawn per call and recorded in ``info()["seed"]``.
- ``decode``, ``calibration`` (``length_normalize``), ``max_reasoning_tokens``: see above.
- ``stop_strings``: texts that end an answer (transformers' ``stop_strings``, given the tokenizer); the
  prompt strategies set the answer format's (a direct answer's newline, a puzzle's ``</answer>``). The
  output keeps the stop string (up to the end of the token that completed it).

``load(..., deterministic=True)`` makes every call greedy whatever the prompts' defaults say.

Each :class:`~cellscribe.core.types.Generation` records ``n_prompt_tokens`` (after truncation),
``n_output_tokens`` (generated tokens up to and including the first end-of-sequence token) and
``finish_reason`` (``"length"`` when the output hit ``max_new_tokens`` before it ended: a
``UserWarning`` says so once, and the decoders note it on the cell). ``decode="constrained"`` gives
``Generation.confidence``: each label's probability among the candidates (:mod:`._constrained`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import secrets
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from cellscribe.core.domain.manifests import Manifest, find_manifest, list_manifests
from cellscribe.core.types import Generation, Prompt, warn_capped

from ._layout import SCORED_REASONING, TokenLayout, layout_for, tokenize_layout
from ._scoring import left_pad

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKEND_NAME = "transformers"

DECODE_MODES = ("generate", "constrained", "score")
#: Settings keys consumed by the backend itself (never passed to ``generate``).
BACKEND_KEYS = frozenset(
    {"max_prompt_tokens", "seed", "decode", "calibration", "length_normalize", "max_reasoning_tokens"}
)
#: Keys that only matter when sampling; dropped under greedy / beam search.
SAMPLING_KEYS = frozenset({"temperature", "top_p", "top_k", "min_p", "typical_p"})
#: GenerationConfig fields a backend that returns one text per prompt cannot honour.
UNSUPPORTED_KEYS = frozenset(
    {"num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits", "streamer"}
)
#: Token budget per batch on CPU (padded prompt + new tokens, summed over rows).
CPU_BATCH_TOKENS = 16_384
#: Share of the free CUDA memory (after loading) the default token budget may fill.
CUDA_MEMORY_SHARE = 0.6
#: New tokens assumed when sizing batches if neither the settings nor the model set max_new_tokens.
FALLBACK_MAX_NEW_TOKENS = 512

NO_CHAT_TEMPLATE = (
    "this tokenizer has no chat template; cellscribe renders prompts with the model's chat template — "
    "use an instruct/chat model or set tokenizer.chat_template"
)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a Hugging Face hub id (``"org/name"``, no spaces or colons)."""
    return bool(_HUB_ID.fullmatch(spec)) and ".." not in spec


def _check_model_dir(spec: str) -> None:
    """Raise a ``ValueError`` naming the fix when ``spec`` is a local path that cannot be a model."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = (
                " It holds a PEFT adapter (adapter_config.json): pass its base model as model= and this "
                "folder as an adapter."
            )
        raise ValueError(
            f"{spec!r} is not a transformers model directory: it has no config.json.{hint} Point model= "
            "at the folder that holds config.json, the tokenizer files and *.safetensors weights."
        )
    if path.exists():
        raise ValueError(
            f"{spec!r} is a file, not a model directory. Point model= at the folder that holds "
            "config.json, the tokenizer files and *.safetensors weights."
        )
    if not looks_like_hub_id(spec):
        raise ValueError(
            f"model path {spec!r} does not exist. Give an existing local model directory (with "
            "config.json), a Hugging Face hub id like 'Qwen/Qwen2.5-7B-Instruct' or a model manifest "
            "name (`cellscribe adapters` lists them)."
        )


#: Environment variables that put the Hugging Face libraries offline.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
#: Seconds to wait for the hub's address before treating the machine as offline.
HUB_PROBE_SECONDS = 3.0


def hub_offline() -> bool:
    """Whether the Hugging Face hub cannot be used: offline mode is set, or its host (``$HF_ENDPOINT``,
    else huggingface.co) cannot be reached within :data:`HUB_PROBE_SECONDS`. Then hub ids are read
    from the local cache only, so a missing model fails at once instead of after minutes of retries."""
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV):
        return True
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return True
    return False


#: Prompts a GPU run is assumed to decode at once for its cost estimate (the token-budget batches of a
#: ~1,000-token prompt in the memory an 80 GB card leaves a 7B model).
GPU_ASSUMED_BATCH = 32


def _parameter_count(spec: str) -> float | None:
    """Parameters of a local model folder (or one in the hub cache), from its safetensors headers
    (shapes only); ``None`` when they are not on this machine."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(spec, "config.json")
            path = Path(found).parent if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 (no cache, an odd id: the size is unknown)
            path = None
    files = sorted(path.glob("*.safetensors")) if path is not None else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="np") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return float(total) or None


def _resolve_device(device: Any, torch: Any) -> str:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def _resolve_dtype(dtype: Any, device: str, torch: Any) -> torch.dtype:
    """``None``/``"auto"``: bfloat16 on CUDA (float16 where bfloat16 is unsupported), float32 elsewhere."""
    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower().removeprefix("torch."))
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'bfloat16', 'float16' or 'float32'.")
    return resolved


def _resolve_attention(device: str, dtype: Any, torch: Any) -> str:
    """FlashAttention-2 on CUDA in half precision when the ``flash_attn`` package works, else SDPA."""
    if device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


@functools.cache
def _generation_config_fields() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


@attrs.frozen
class _Plan:
    """What one group of prompts is run with (see the module docstring)."""

    kwargs: Mapping[str, Any]
    max_prompt_tokens: int | None = None
    seed: int | None = None
    decode: str = "generate"
    calibration: str = "pmi"
    max_reasoning_tokens: int | None = None

    def key(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True, default=repr)

    @property
    def samples(self) -> bool:
        return self.decode != "score" and bool(self.kwargs.get("do_sample"))


def _optional_int(settings: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        kind = "a positive integer" if minimum > 0 else "an integer >= 0"
        raise ValueError(f"{key} must be {kind}, got {value!r}.")
    return int(value)


def _split_settings(settings: Mapping[str, Any], *, greedy: bool = False) -> _Plan:
    """Effective settings -> a :class:`_Plan`.

    Raises ``ValueError`` for keys that are neither backend keys nor ``GenerationConfig`` fields, and
    for invalid backend values.
    """
    known = _generation_config_fields()
    unknown = sorted(k for k in settings if k not in BACKEND_KEYS and k not in known)
    unsupported = sorted(k for k in settings if k in UNSUPPORTED_KEYS)
    if unknown or unsupported:
        raise ValueError(
            f"unsupported generation setting(s) {', '.join(unknown + unsupported)}: the transformers "
            "backend takes decode, max_prompt_tokens, seed, calibration, max_reasoning_tokens and "
            "the fields of transformers.GenerationConfig (do_sample, temperature, top_p, top_k, "
            "repetition_penalty, max_new_tokens, min_new_tokens, num_beams, ...), one output per prompt."
        )
    kwargs = {k: v for k, v in settings.items() if k not in BACKEND_KEYS}
    if greedy:
        kwargs["do_sample"] = False
    if kwargs.get("do_sample") is False:
        kwargs = {k: v for k, v in kwargs.items() if k not in SAMPLING_KEYS}
    decode = settings.get("decode") or "generate"
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(map(repr, DECODE_MODES))}, got {decode!r}.")
    if decode == "constrained" and int(kwargs.get("num_beams") or 1) > 1:
        raise ValueError(
            "decode='constrained' works with greedy decoding and sampling, not beam search: drop num_beams "
            "or set it to 1."
        )
    from cellscribe.core.domain.scoring import calibration_of

    calibration = calibration_of(settings)
    return _Plan(
        kwargs=kwargs,
        max_prompt_tokens=_optional_int(settings, "max_prompt_tokens", 1),
        seed=_optional_int(settings, "seed", 0),
        decode=decode,
        calibration=calibration,
        max_reasoning_tokens=_optional_int(settings, "max_reasoning_tokens", 0),
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _stop_strings(value: Any) -> tuple[str, ...]:
    """The ``stop_strings`` setting as a tuple of non-empty strings (a single string is one stop)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"stop_strings must be a string or a list of strings, got {value!r}.")
    return tuple(v for v in value if v)


def finished_rows(
    new_tokens: np.ndarray,
    tokenizer: Any,
    *,
    eos_ids: Sequence[int] | set[int],
    pad_id: int | None,
    stops: Sequence[str],
    max_new_tokens: int,
) -> tuple[list[str], list[int], list[str]]:
    """The output of each row of a generated batch: ``(texts, new token counts, finish reasons)``.

    ``generate`` pads a row that finished (at an end token, or at a stop string) until the batch ends.
    A row's output runs up to and including its first end token; a row without one ends where its
    padding starts (a stop string ended it) or at the last column. Its finish reason is ``"stop"``
    unless it ran to ``max_new_tokens`` without ending (``"length"``: the output was cut off). When the
    pad id is also an end token, a row whose last token completed a stop string ended there (transformers
    stops at the token that completes one, which may run past it), and the padding is not counted.
    """
    from cellscribe.core.types import FINISH_LENGTH, FINISH_STOP

    n_rows, width = new_tokens.shape
    is_end = np.isin(new_tokens, sorted(eos_ids))
    has_end = is_end.any(axis=1)
    lengths = np.where(has_end, is_end.argmax(axis=1) + 1, width)
    if pad_id is not None and int(pad_id) not in eos_ids and width:
        # Rows without an end token: their trailing padding (after a stop string) is not output.
        not_pad = new_tokens != int(pad_id)
        last = width - np.argmax(not_pad[:, ::-1], axis=1)
        last[~not_pad.any(axis=1)] = 0
        lengths = np.where(has_end, lengths, last)
    texts = tokenizer.batch_decode([row[:n].tolist() for row, n in zip(new_tokens, lengths)],
                                   skip_special_tokens=True)
    counts, reasons = [], []
    for r in range(n_rows):
        n = int(lengths[r])
        # transformers stops when a stop string is completed within the last token (which may run past
        # its end): look for it in the text that token could complete.
        stopped = False
        if stops and n >= (2 if has_end[r] else 1):
            last = tokenizer.decode([int(new_tokens[r, n - (2 if has_end[r] else 1)])], skip_special_tokens=True)
            stopped = any(stop in texts[r][-(len(last) + len(stop) - 1):] for stop in stops if last)
        if has_end[r] and stopped and pad_id is not None and int(pad_id) in eos_ids:
            n -= 1  # the "end token" is the padding after the stop string
        ended = has_end[r] or stopped or n < width
        counts.append(n)
        reasons.append(FINISH_STOP if ended or width < max_new_tokens else FINISH_LENGTH)
    return texts, counts, reasons


@attrs.define
class _Item:
    """One prompt inside :meth:`TransformersModel.generate`."""

    index: int
    ids: list[int]
    n_prompt: int
    n_units: int = 1
    tl: TokenLayout | None = None
    #: Token ids of the neutral prompt whose scores calibrate this one's (``calibration="pmi"``).
    neutral_ids: tuple[int, ...] | None = None


def manifest_family(manifest: Manifest) -> list[Manifest]:
    """Other manifests with the same base model and backend that name a LoRA adapter, one per modality
    (the first by name wins when several name the same modality)."""
    family: dict[str, Manifest] = {}
    for other in list_manifests(errors="warn"):
        if (
            other.name != manifest.name
            and other.adapter
            and other.base_model == manifest.base_model
            and other.backend == manifest.backend
            and other.modality != manifest.modality
        ):
            family.setdefault(other.modality, other)
    return list(family.values())


class TransformersModel:
    """A loaded causal LM with its tokenizer (the :class:`~cellscribe.core.components.LoadedModel` of
    the transformers backend).

    Attributes
    ----------
    model
        The ``PreTrainedModel``, or a ``PeftModel`` when adapters were loaded (unmerged).
    tokenizer
        Its tokenizer, left-padding, with a pad token.
    spec, revision
        What was loaded (the manifest name when loaded by one).
    manifest
        The :class:`~cellscribe.core.domain.manifests.Manifest` it was loaded from, or ``None``; its
        ``annotate_defaults()`` are the prompt, sentence and generation settings it expects.
    device
        Where inputs are sent (the model's first parameter's device when a ``device_map`` was given).
    batch_size
        Most prompts per batch, or ``None`` for no limit other than the token budget.
    max_batch_tokens
        Token budget per batch (``None``: resolved on first use, see the module docstring).
    adapters
        Modality -> adapter location, for the adapters loaded.
    merged_adapter
        The modality whose adapter was merged into the weights, or ``None``.
    truncation_side
        ``"left"`` keeps the end of an over-long prompt, ``"right"`` its start.
    deterministic
        Every call is greedy.
    """

    #: The ``decode=`` values this model supports (all three: free, constrained, scored).
    decode_modes = DECODE_MODES

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        spec: str,
        revision: str | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        adapters: Mapping[str, str] | None = None,
        merged_adapter: str | None = None,
        truncation_side: str = "left",
        manifest: Manifest | None = None,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> None:
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        if max_batch_tokens is not None and int(max_batch_tokens) < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer or None, got {max_batch_tokens!r}.")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.revision = revision
        self.device = device
        self.batch_size = None if batch_size is None else int(batch_size)
        self.max_batch_tokens = None if max_batch_tokens is None else int(max_batch_tokens)
        self.adapters = dict(adapters or {})
        self.merged_adapter = merged_adapter
        self.truncation_side = truncation_side
        self.manifest = manifest
        self.deterministic = bool(deterministic)
        self.default_seed = seed
        self.seed = seed
        self._active_adapter: str | None = merged_adapter or next(reversed(self.adapters), None)
        self._layouts: dict[Any, TokenLayout] = {}
        self._free_masks: dict[str, tuple[Any, Any]] = {}
        self._neutral_tokens: dict[str, tuple[int, ...]] = {}
        self._neutral_cache: dict[Any, np.ndarray] = {}
        self._last_decode: list[str] = []

    # -- LoadedModel protocol ---------------------------------------------------------------------

    def render(self, prompt: Prompt) -> str:
        """The exact model input text of ``prompt``: chat template, removals, response prefix."""
        return prompt.render(self.tokenizer.apply_chat_template)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` as the model sees it (no special tokens added)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def info(self) -> dict[str, Any]:
        """What identifies the model and how it ran: backend, model, manifest, revision, resolved
        commit, dtype, device, attention kernel, adapters, batching, seed and decode modes used."""
        base = getattr(self.model, "config", None)
        dtype = getattr(self.model, "dtype", None)
        return {
            "backend": BACKEND_NAME,
            "model": self.spec,
            "manifest": self.manifest.name if self.manifest is not None else None,
            "base_model": self.manifest.base_model if self.manifest is not None else self.spec,
            "revision": self.revision,
            "commit": getattr(base, "_commit_hash", None),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "device": self.device,
            "attn_implementation": getattr(base, "_attn_implementation", None),
            "adapters": dict(self.adapters),
            "active_adapter": self._active_adapter,
            "merged_adapter": self.merged_adapter,
            "batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "deterministic": self.deterministic,
            "seed": self.seed,
            "decode": list(self._last_decode),
        }

    def trainable(self) -> dict[str, Any] | None:
        """The torch model, tokenizer and device a trainer fine-tunes (``None`` once an adapter was
        merged into the weights: the base model is gone)."""
        if self.merged_adapter is not None:
            return None
        return {"model": self.model, "tokenizer": self.tokenizer, "device": self.device, "base": self.spec,
                "eos_id": self._answer_end_id()}

    def encode_example(self, prompt: Prompt, answer: str) -> tuple[list[int], list[int]]:
        """``prompt`` rendered and tokenised exactly as :meth:`generate` does (chat template, removals,
        response prefix, no added special tokens), and ``answer`` tokenised on its own (as constrained
        decoding and scoring tokenise answers) followed by the end-of-sequence token generation stops at."""
        prompt_ids = self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
        return list(prompt_ids), [*answer_ids, self._answer_end_id()]

    def _answer_end_id(self) -> int:
        """The end-of-sequence id an answer ends with: the tokenizer's eos when generation stops at it,
        else the first of the generation config's eos ids."""
        eos = self._eos_ids()
        if not eos:
            raise ValueError("this model has no end-of-sequence token; set eos_token_id in its generation_config.json")
        own = self.tokenizer.eos_token_id
        if own in eos:
            return int(own)
        first = self.model.generation_config.eos_token_id
        return int(first[0] if isinstance(first, (list, tuple)) else first)

    def identity(self) -> dict[str, Any]:
        """What determines the answers, for a checkpoint's identity: :meth:`info` without what describes
        how the last call ran (decode modes used, batching, device); the weights' own content is added
        by the run from the model and adapter folders."""
        volatile = ("decode", "batch_size", "max_batch_tokens", "device")
        return {k: v for k, v in self.info().items() if k not in volatile}

    def use_modality(self, modality: str) -> None:
        """Answer with ``modality``'s adapter from now on.

        A modality without an adapter uses the base model (adapters disabled) when others are loaded;
        without any adapter this does nothing. With a merged adapter only its own modality can be used
        (the base weights are gone): another raises ``ValueError``.
        """
        if self.merged_adapter is not None:
            if modality != self.merged_adapter:
                raise ValueError(
                    f"the adapter for {self.merged_adapter!r} was merged into the weights, so modality "
                    f"{modality!r} cannot be answered with the base model; load without merge_adapters "
                    "to switch between modalities."
                )
            return
        if not self.adapters:
            return
        if modality in self.adapters:
            self.model.set_adapter(modality, inference_mode=True)
            self._active_adapter = modality
        else:
            log.info("no adapter for modality %s: answering with the base model", modality)
            self._active_adapter = None

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        settings: Mapping[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        **options: Any,
    ) -> list[Generation]:
        """One :class:`Generation` per prompt, in order.

        Prompts are grouped by effective settings, then run in token-budget batches, longest first
        (see the module docstring). ``progress(n)`` is called after every batch with the number of
        prompts it held. Invalid settings, score mode without candidates and candidates that cannot
        be told apart raise ``ValueError`` before anything is generated.
        """
        prompts = list(prompts)
        user = dict(settings or {})
        texts = [self.render(p) for p in prompts]
        all_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

        # Group by what reaches the model (after dropping sampling-only keys), so prompts whose
        # defaults differ only in keys the user's settings make irrelevant share batches.
        groups: dict[str, tuple[_Plan, list[int]]] = {}
        plans: dict[str, _Plan] = {}
        for i, prompt in enumerate(prompts):
            effective = {**prompt.generation, **user}
            effective_key = json.dumps(effective, sort_keys=True, default=repr)
            if effective_key not in plans:
                plans[effective_key] = _split_settings(effective, greedy=self.deterministic)
            plan = plans[effective_key]
            groups.setdefault(plan.key(), (plan, []))[1].append(i)

        seed = self.default_seed
        if seed is None and any(plan.samples and plan.seed is None for plan, _ in groups.values()):
            seed = secrets.randbelow(2**31)  # recorded in info(), so the run can be repeated
        work: list[tuple[_Plan, str, list[_Item]]] = []
        n_truncated = 0
        n_free = 0
        for plan, members in groups.values():
            if plan.seed is None and seed is not None:
                plan = attrs.evolve(plan, seed=seed)
            items, truncated = self._items(members, prompts, all_ids, plan.max_prompt_tokens)
            n_truncated += truncated
            if plan.decode == "generate":
                work.append((plan, "generate", items))
                continue
            free, fixed = self._attach_layouts(items, prompts, texts, plan)
            n_free += len(free)
            if free:
                work.append((plan, "generate", free))
            if fixed:
                work.append((plan, plan.decode, fixed))
        if n_free:
            warnings.warn(
                f"{n_free} of {len(prompts)} prompts have no candidate labels and were generated without "
                "constraint; pass candidates=[...] to constrain every answer.",
                UserWarning,
                stacklevel=2,
            )
        if n_truncated:
            kept = "end" if self.truncation_side == "left" else "start"
            warnings.warn(
                f"{n_truncated} of {len(prompts)} prompts were longer than max_prompt_tokens and were "
                f"truncated (their {kept} kept); use shorter cell sentences or raise max_prompt_tokens.",
                UserWarning,
                stacklevel=2,
            )

        results: list[Generation | None] = [None] * len(prompts)
        for plan, mode, items in work:
            runner = functools.partial(self._run_batch, plan=plan, mode=mode)
            for batch in self._batches(items, plan, mode):
                for item, output in zip(batch, self._run_or_split(batch, runner)):
                    results[item.index] = output
                if progress is not None:
                    progress(len(batch))
        self.seed = next((p.seed for p, _, _ in work if p.seed is not None), self.seed)
        self._last_decode = sorted({plan.decode for plan, _, _ in work})
        warn_capped(results)
        return results  # type: ignore[return-value]

    # -- preparing work ---------------------------------------------------------------------------

    def _items(
        self, members: list[int], prompts: list[Prompt], all_ids: list[list[int]], max_prompt_tokens: int | None
    ) -> tuple[list[_Item], int]:
        """The group's prompts as items (ids cut to ``max_prompt_tokens``) and how many were cut."""
        n_cut = 0
        items = []
        for i in members:
            ids = all_ids[i]
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                n_cut += 1
                ids = ids[-max_prompt_tokens:] if self.truncation_side == "left" else ids[:max_prompt_tokens]
            items.append(_Item(index=i, ids=list(ids), n_prompt=len(ids), n_units=len(prompts[i].unit_ids)))
        return items, n_cut

    def _attach_layouts(
        self, items: list[_Item], prompts: list[Prompt], texts: list[str], plan: _Plan
    ) -> tuple[list[_Item], list[_Item]]:
        """Give each item its token layout; ``(items without candidates, items with)``.

        Score mode needs candidates for every prompt: raises ``ValueError`` otherwise.
        """
        free, fixed = [], []
        for item in items:
            layout = layout_for(prompts[item.index], texts[item.index])
            if layout is None:
                free.append(item)
                continue
            tl = self._layouts.get(layout)
            if tl is None:
                if len(self._layouts) > 1024:
                    self._layouts.clear()
                tl = self._layouts[layout] = tokenize_layout(layout, self.tokenizer, sorted(self._eos_ids()))
            item.tl = tl
            if plan.decode == "score":
                item.ids = item.ids + list(tl.open_ids) + list(tl.close_ids)
                if plan.calibration == "pmi" and layout.n_labels == 1:
                    item.neutral_ids = self._neutral_ids(prompts[item.index], tl)
            fixed.append(item)
        if free and plan.decode == "score":
            raise ValueError(
                f"decode='score' needs candidate labels, but {len(free)} prompt(s) have none; pass "
                "candidates=[...] (or a labelled reference for k-shot prompts), or use decode='generate'."
            )
        return free, fixed

    def _max_new_tokens(self, kwargs: Mapping[str, Any]) -> int:
        value = kwargs.get("max_new_tokens") or getattr(self.model.generation_config, "max_new_tokens", None)
        return int(value or FALLBACK_MAX_NEW_TOKENS)

    def _token_budget(self) -> int:
        """``max_batch_tokens``, resolved on first use when not given (see the module docstring)."""
        if self.max_batch_tokens is None:
            self.max_batch_tokens = self._default_budget()
            log.info("token budget per batch: %d", self.max_batch_tokens)
        return self.max_batch_tokens

    def _default_budget(self) -> int:
        if not str(self.device).startswith("cuda"):
            return CPU_BATCH_TOKENS
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = getattr(config, "num_attention_heads", 32)
        hidden = getattr(config, "hidden_size", 4096)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = getattr(config, "num_hidden_layers", 32)
        intermediate = getattr(config, "intermediate_size", 4 * hidden)
        size = torch.finfo(self.model.dtype).bits // 8 if self.model.dtype.is_floating_point else 2
        kv = 2 * layers * kv_heads * head_dim * size
        # Prefill activations live one layer at a time: hidden states, attention and the MLP.
        activations = (6 * hidden + 3 * intermediate) * size
        return int(max(2048, min(1 << 20, CUDA_MEMORY_SHARE * free / (kv + activations))))

    def _batches(self, items: list[_Item], plan: _Plan, mode: str) -> list[list[_Item]]:
        """Items sorted longest first (ties in prompt order) and cut by the token budget."""
        budget = self._token_budget()
        new = self._max_new_tokens(plan.kwargs)

        def extra(item: _Item) -> int:
            if mode == "score":  # the candidate pass is chunked within the budget by the scorer
                return item.tl.max_answer_tokens() + 1
            return new if item.tl is None else self._constrained_total(item, plan)

        order = sorted(items, key=lambda it: (-len(it.ids), it.index))
        batches: list[list[_Item]] = []
        current: list[_Item] = []
        width = tail = 0
        for item in order:
            w, t = max(width, len(item.ids)), max(tail, extra(item))
            full = self.batch_size is not None and len(current) >= self.batch_size
            if current and (full or (len(current) + 1) * (w + t) > budget):
                batches.append(current)
                current, w, t = [], len(item.ids), extra(item)
            current.append(item)
            width, tail = w, t
        if current:
            batches.append(current)
        return batches

    def _reasoning_cap(self, item: _Item, plan: _Plan) -> int:
        tl = item.tl
        if not tl.layout.reasoning:
            return 0
        if plan.max_reasoning_tokens is not None:
            return plan.max_reasoning_tokens
        return max(0, self._max_new_tokens(plan.kwargs) - len(tl.open_ids) - tl.max_answer_tokens())

    def _constrained_total(self, item: _Item, plan: _Plan) -> int:
        """New tokens a constrained answer of ``item`` may take: opening, reasoning and answer."""
        return len(item.tl.open_ids) + self._reasoning_cap(item, plan) + item.tl.max_answer_tokens()

    # -- running batches ----------------------------------------------------------------------------

    def _run_or_split(
        self, batch: list[_Item], runner: Callable[[list[_Item]], list[Generation]]
    ) -> list[Generation]:
        """``runner(batch)``; when it raises, the batch is split in halves and retried, down to single
        prompts, which then get an error ``Generation``."""
        try:
            return runner(batch)
        except Exception as exc:  # any failure (CUDA OOM, a bad input) must not end the run
            self._release_memory()
            if len(batch) == 1:
                log.warning("generation failed for one prompt: %s", _describe(exc))
                return [Generation(text="", n_prompt_tokens=batch[0].n_prompt, error=_describe(exc))]
            log.warning("a batch of %d prompts failed (%s); retrying it in halves", len(batch), _describe(exc))
            half = len(batch) // 2
            return self._run_or_split(batch[:half], runner) + self._run_or_split(batch[half:], runner)

    def _run_batch(self, batch: list[_Item], *, plan: _Plan, mode: str) -> list[Generation]:
        import torch

        if plan.seed is not None:
            torch.manual_seed(plan.seed)
        with torch.inference_mode(), self._adapter_context():
            if mode == "score":
                return self._score_batch(batch, plan)
            return self._generate_batch(batch, plan, constrained=mode == "constrained")

    def _generate_batch(self, batch: list[_Item], plan: _Plan, *, constrained: bool) -> list[Generation]:
        import torch

        ids, mask = left_pad([item.ids for item in batch], self.tokenizer.pad_token_id)
        width = ids.shape[1]
        kwargs = dict(plan.kwargs)
        constraint = None
        if constrained:
            from ._constrained import AnswerConstraint, RowState, as_logits_processor

            # A minimum length would forbid the end of a complete answer, and the constraint itself
            # ends it (a stop string could only cut a reasoning short).
            kwargs.pop("min_new_tokens", None)
            kwargs.pop("min_length", None)
            kwargs.pop("stop_strings", None)
            kwargs["max_new_tokens"] = max(self._constrained_total(item, plan) for item in batch)
            states = [RowState(item.tl, self._reasoning_cap(item, plan)) for item in batch]
            pool, banned = self._free_stage_masks()
            constraint = AnswerConstraint(states, pool, banned)
            kwargs["logits_processor"] = as_logits_processor(constraint)
        stops = _stop_strings(kwargs.get("stop_strings"))
        if stops:
            kwargs["stop_strings"] = list(stops)
            kwargs["tokenizer"] = self.tokenizer  # transformers matches stop strings on its token texts
        else:
            kwargs.pop("stop_strings", None)
        output = self.model.generate(
            input_ids=torch.from_numpy(ids).to(self.device),
            attention_mask=torch.from_numpy(mask).to(self.device),
            **kwargs,
        )
        new_tokens = output[:, width:].cpu().numpy()
        texts, n_out, reasons = finished_rows(
            new_tokens, self.tokenizer, eos_ids=self._eos_ids(), pad_id=self.model.generation_config.pad_token_id,
            stops=stops, max_new_tokens=self._max_new_tokens(kwargs),
        )
        confidence: list[Any] = [None] * len(batch)
        if constraint is not None:
            # One label for the whole prompt: every unit gets its confidence.
            confidence = [conf * item.n_units if len(conf) == 1 and item.n_units > 1 else conf
                          for item, conf in zip(batch, constraint.confidences(new_tokens))]
        return [
            Generation(text=text, n_prompt_tokens=item.n_prompt, n_output_tokens=n, finish_reason=reason,
                       confidence=conf)
            for item, text, n, reason, conf in zip(batch, texts, n_out, reasons, confidence)
        ]

    def _score_batch(self, batch: list[_Item], plan: _Plan) -> list[Generation]:
        from cellscribe.core.domain.scoring import calibrate

        from ._scoring import ScoreItem, score_items

        scored = score_items(
            self.model,
            [ScoreItem(item.ids, item.tl) for item in batch],
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            max_batch_tokens=self._token_budget(),
        )
        neutral = self._neutral_scores([item for item in batch if item.neutral_ids is not None])
        out = []
        for item, (sums, counts) in zip(batch, scored):
            method = plan.calibration if item.tl.layout.n_labels == 1 else "sum"
            if method == "pmi" and item.neutral_ids is None:
                method = "sum"
            scores = calibrate(sums, method, n_tokens=counts,
                               neutral=neutral.get((item.tl.layout, item.neutral_ids)))
            out.append(_scored_generation(item, scores))
        return out

    def _neutral_ids(self, prompt: Prompt, tl: TokenLayout) -> tuple[int, ...]:
        """The token ids of ``prompt``'s neutral prompt (:func:`~cellscribe.core.domain.scoring.neutral_prompt`),
        with the layout's scoring prefix, as the prompt's own are scored."""
        from cellscribe.core.domain.scoring import neutral_prompt

        text = self.render(neutral_prompt(prompt))
        ids = self._neutral_tokens.get(text)
        if ids is None:
            if len(self._neutral_tokens) > 1024:
                self._neutral_tokens.clear()
            ids = self._neutral_tokens[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + tuple(tl.open_ids) + tuple(tl.close_ids)

    def _neutral_scores(self, items: list[_Item]) -> dict[Any, np.ndarray]:
        """The summed candidate log-likelihoods after each distinct neutral prompt of ``items`` (one row),
        computed once per model and kept."""
        from ._scoring import ScoreItem, score_items

        keys = {(item.tl.layout, item.neutral_ids): item.tl for item in items}
        # The scores depend on the weights: an adapter switched to (use_modality) scores anew.
        adapter = self._active_adapter
        todo = [key for key in keys if (adapter, *key) not in self._neutral_cache]
        if todo:
            if len(self._neutral_cache) + len(todo) > 1024:
                self._neutral_cache.clear()
            scored = score_items(
                self.model, [ScoreItem(ids, keys[(layout, ids)]) for layout, ids in todo],
                pad_id=self.tokenizer.pad_token_id, device=self.device, max_batch_tokens=self._token_budget(),
            )
            for key, (sums, _) in zip(todo, scored):
                self._neutral_cache[(adapter, *key)] = sums[0]
        return {key: self._neutral_cache[(adapter, *key)] for key in keys}

    def _free_stage_masks(self) -> tuple[Any, Any]:
        device = str(self.device)
        if device not in self._free_masks:
            from ._constrained import free_stage_masks

            vocab = self.model.get_output_embeddings().weight.shape[0]
            pool, banned = free_stage_masks(self.tokenizer, vocab, sorted(self._eos_ids()))
            self._free_masks[device] = (pool.to(device), banned.to(device))
        return self._free_masks[device]

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}

    def _adapter_context(self) -> contextlib.AbstractContextManager:
        if self.adapters and self._active_adapter is None:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    @staticmethod
    def _release_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _scored_generation(item: _Item, matrix: np.ndarray) -> Generation:
    """The :class:`Generation` of a scored prompt from its calibrated scores (see the module docstring)."""
    tl = item.tl
    layout = tl.layout
    shifted = matrix - matrix.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    k = tl.n_candidates
    if layout.n_labels == 1:
        chosen = [int(np.argmax(log_probs[0]))]
    else:
        from scipy.optimize import linear_sum_assignment

        # More cells than candidates: each candidate may then be used ceil(n / k) times.
        copies = math.ceil(layout.n_labels / k) if layout.unique else layout.n_labels
        rows, cols = linear_sum_assignment(-np.tile(log_probs, (1, copies)))
        chosen = [int(c) % k for _, c in sorted(zip(rows, cols))]
    labels = [layout.candidates[j] for j in chosen]
    scores = [dict(zip(layout.candidates, map(float, row))) for row in probs]
    confidence = [float(probs[i, j]) for i, j in enumerate(chosen)]
    if layout.n_labels == 1:
        # One answer for the whole prompt: every unit gets it.
        n_units = max(1, item.n_units)
        scores, confidence = scores * n_units, confidence * n_units
    n_out = sum(len(tl.first[j]) if i == 0 else len(tl.later[j]) for i, j in enumerate(chosen))
    n_out += len(tl.tail_ids) + 1 + (len(tl.open_ids) + len(tl.close_ids) if layout.reasoning else 0)
    return Generation(
        text=layout.text(labels, SCORED_REASONING),
        confidence=tuple(confidence),
        label_scores=tuple(scores),
        n_prompt_tokens=item.n_prompt,
        n_output_tokens=n_out,
    )


class TransformersBackend:
    """Loads causal language models with ``transformers`` (the :class:`~cellscribe.core.components.Backend`
    named ``"transformers"``)."""

    name = BACKEND_NAME
    description = (
        "Hugging Face transformers causal LMs from a local folder, a hub id or a model manifest, rendered "
        "with the model's chat template; token-budget batches; generate, constrained or score decoding; "
        "PEFT adapters per modality"
    )

    def handles(self, spec: str) -> bool:
        """True for a local directory with a ``config.json``, a string shaped like a hub id that is
        not an existing path, or a model manifest name (``"cell-o1"``)."""
        path = Path(spec).expanduser()
        if path.exists():
            return path.is_dir() and (path / "config.json").is_file()
        if looks_like_hub_id(spec):
            return True
        try:
            manifest = find_manifest(spec)
        except ValueError:
            return True  # a broken manifest of that name: load() reports what is wrong with it
        return manifest is not None and manifest.backend == BACKEND_NAME

    def rates(self, spec: str, *, device: str | None = None, dtype: Any = None, batch_size: int | None = None,
              **options: Any) -> Mapping[str, Any] | None:
        """For a cost estimate on a CUDA device, the documented GPU assumption
        (:func:`~cellscribe.core.run.estimate.assumed_gpu_rates`) for the model's size, read from the
        headers of its local safetensors files (no weights are loaded), and :data:`GPU_ASSUMED_BATCH`
        prompts decoded at once unless ``batch_size`` says fewer. ``None`` on a CPU: the estimate times
        the model here."""
        import torch

        from cellscribe.core.run.estimate import assumed_gpu_rates

        if not _resolve_device(device, torch).startswith("cuda"):
            return None
        dtype_name = str(dtype or "bfloat16").lower()
        width = 4.0 if "32" in dtype_name or dtype_name in ("fp32", "float") else 2.0
        batch = min(int(batch_size), GPU_ASSUMED_BATCH) if batch_size else GPU_ASSUMED_BATCH
        return assumed_gpu_rates(_parameter_count(spec), concurrency=batch, bytes_per_param=width,
                                 what=f"transformers generate on {device or 'cuda'}").as_dict()

    def load(
        self,
        spec: str,
        *,
        adapters: Mapping[str, str] | None = None,
        hook: Any = None,
        device: str | None = None,
        dtype: Any = None,
        trust_remote_code: bool = False,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        revision: str | None = None,
        truncation_side: str = "left",
        merge_adapters: bool = False,
        deterministic: bool = False,
        seed: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> TransformersModel:
        """Load tokenizer and model from ``spec`` (a local folder, a hub id or a manifest name).

        Parameters
        ----------
        adapters
            Modality -> adapter location; each is loaded through the ``cellscribe_load_adapter`` hook
            (``hook``, the plugin manager's hook relay; the process-wide host's when ``None``). A
            manifest's adapter is loaded for the manifest's modality unless ``adapters`` names one.
        device
            ``None``/``"auto"``: CUDA when available, else CPU. Ignored when ``model_kwargs`` has a
            ``device_map``.
        dtype
            ``None``/``"auto"``: bfloat16 on CUDA, float32 on CPU; or a torch dtype or its name.
        trust_remote_code
            Passed to ``from_pretrained``; off unless the user opts in.
        batch_size
            Most prompts per batch; ``None``: as many as the token budget allows.
        max_batch_tokens
            Token budget per batch; ``None``: 16,384 on CPU, from free memory on CUDA.
        revision
            Hub branch, tag or commit (default: the manifest's, if any).
        truncation_side
            Which part of a prompt over ``max_prompt_tokens`` to drop (see the module docstring).
        merge_adapters
            Merge the (single) adapter into the weights: faster, but the base model is gone.
        deterministic
            Greedy decoding for every call, whatever the prompts' defaults.
        seed
            Seed used when the settings give none.
        model_kwargs
            Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (``device_map``,
            ``attn_implementation``, ``quantization_config``, ...). The attention kernel defaults to
            FlashAttention-2 on CUDA when installed, else PyTorch SDPA.
        options
            Ignored (options meant for other components).

        Weights are read from safetensors files only. Raises ``ValueError`` for a path that is not a
        model, an invalid manifest, a hub id that cannot be fetched, a tokenizer without a chat
        template, or an adapter whose base model is another model.
        """
        manifest = None if Path(spec).expanduser().exists() else find_manifest(spec)
        base = spec
        adapters = dict(adapters or {})
        if manifest is not None:
            if manifest.backend != BACKEND_NAME:
                raise ValueError(
                    f"manifest {manifest.name!r} is for the {manifest.backend!r} backend, not {BACKEND_NAME!r}"
                )
            base = manifest.base_model
            revision = revision if revision is not None else manifest.revision
            if manifest.adapter and manifest.modality not in adapters:
                adapters = {manifest.modality: manifest.adapter, **adapters}
            # Manifests of the same base for other modalities: their adapters load onto this base too, so
            # a MuData run switches adapter per modality (use_modality) instead of reloading the base.
            for sibling in manifest_family(manifest):
                adapters.setdefault(sibling.modality, sibling.adapter)
            log.info("model %s: manifest %s, base %s", spec, manifest.path, base)
        _check_model_dir(base)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hub_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if revision is not None:
            hub_kwargs["revision"] = revision
        if not Path(base).expanduser().is_dir() and hub_offline():
            log.info("%s: the Hugging Face hub is not reachable; using the local cache only", base)
            hub_kwargs["local_files_only"] = True
        model_kwargs = dict(model_kwargs or {})
        device = _resolve_device(device, torch)
        torch_dtype = _resolve_dtype(dtype, device, torch)
        chosen_attention = "attn_implementation" not in model_kwargs
        if chosen_attention:
            model_kwargs["attn_implementation"] = _resolve_attention(device, torch_dtype, torch)

        try:
            tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left", **hub_kwargs)
        except OSError as exc:
            raise ValueError(
                f"could not load a tokenizer for {base!r} ({exc}). For a hub id check the spelling, your "
                "network access and, for gated models, your Hugging Face login; or give a local folder."
            ) from exc
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(NO_CHAT_TEMPLATE)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"the tokenizer of {base!r} has neither a pad nor an eos token; set "
                    "tokenizer.pad_token in the model folder."
                )
            tokenizer.pad_token = tokenizer.eos_token

        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    base, use_safetensors=True, dtype=torch_dtype, **hub_kwargs, **model_kwargs
                )
            except ValueError as exc:
                # An architecture without SDPA/FlashAttention support: let transformers choose.
                if not chosen_attention or "attn" not in str(exc).lower():
                    raise
                log.info("%s: %s; using transformers' default attention", base, exc)
                model_kwargs.pop("attn_implementation")
                model = AutoModelForCausalLM.from_pretrained(
                    base, use_safetensors=True, dtype=torch_dtype, **hub_kwargs, **model_kwargs
                )
        except OSError as exc:
            raise ValueError(
                f"could not load model weights for {base!r} ({exc}). cellscribe reads safetensors weights "
                "only; convert *.bin checkpoints with save_pretrained(..., safe_serialization=True)."
            ) from exc
        if "device_map" in model_kwargs:
            device = str(next(model.parameters()).device)
        else:
            model.to(device)
        model.eval()

        # Explicit pad/eos: batched generation needs a pad id, and many checkpoints leave it unset.
        gen_config = model.generation_config
        if gen_config.eos_token_id is None:
            gen_config.eos_token_id = tokenizer.eos_token_id
        if gen_config.pad_token_id is None:
            gen_config.pad_token_id = tokenizer.pad_token_id

        merged = None
        if adapters:
            if merge_adapters and len(adapters) != 1:
                raise ValueError(
                    f"merge_adapters needs exactly one adapter, got {len(adapters)} "
                    f"({', '.join(adapters)}); several adapters stay separate and are switched per modality."
                )
            if hook is None:
                from cellscribe.core.plugins import get_host

                hook = get_host().hook
            for modality, adapter in adapters.items():
                loaded = hook.cellscribe_load_adapter(
                    model=model, adapter=str(adapter), modality=modality, backend=BACKEND_NAME
                )
                if loaded is None:
                    raise ValueError(
                        f"no plugin could load adapter {adapter!r} (modality {modality!r}) for the "
                        f"{BACKEND_NAME} backend; install peft or a plugin implementing "
                        "cellscribe_load_adapter."
                    )
                model = loaded
            if merge_adapters:
                model = model.merge_and_unload()
                merged = next(iter(adapters))
            model.eval()
        elif merge_adapters:
            log.info("merge_adapters ignored: no adapter to merge")

        log.info(
            "loaded %s (%s, %s, %s) with adapters %s",
            base, torch_dtype, device, getattr(model.config, "_attn_implementation", None), adapters,
        )
        return TransformersModel(
            model,
            tokenizer,
            spec=spec,
            revision=revision,
            device=device,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            adapters={m: str(a) for m, a in adapters.items()},
            merged_adapter=merged,
            truncation_side=truncation_side,
            manifest=manifest,
            deterministic=deterministic,
            seed=seed,
        )
