"""The transformers backend: load a causal LM with its tokenizer and generate answers to prompts.

A hub id and a local folder go through the same code path (``from_pretrained``). Prompts are rendered
with the model's own chat template, tokenised without extra special tokens (the template already
holds them), left-padded and generated in batches of prompts that share their generation settings,
longest first. Only the new tokens are decoded.

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
  size).

Each :class:`~cellscribe.core.types.Generation` records ``n_prompt_tokens`` (after truncation) and
``n_output_tokens`` (generated tokens up to and including the first end-of-sequence token).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellscribe.core.types import Generation, Prompt

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKEND_NAME = "transformers"

#: Settings keys consumed by the backend itself (never passed to ``generate``).
BACKEND_KEYS = frozenset({"max_prompt_tokens", "seed"})
#: Keys that only matter when sampling; dropped under greedy / beam search.
SAMPLING_KEYS = frozenset({"temperature", "top_p", "top_k", "min_p", "typical_p"})
#: GenerationConfig fields a backend that returns one text per prompt cannot honour.
UNSUPPORTED_KEYS = frozenset(
    {"num_return_sequences", "return_dict_in_generate", "output_scores", "output_logits", "streamer"}
)

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
            "config.json) or a Hugging Face hub id like 'Qwen/Qwen2.5-7B-Instruct'."
        )


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


@functools.cache
def _generation_config_fields() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


def _split_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], int | None, int | None]:
    """Effective settings -> (``generate`` keyword arguments, ``max_prompt_tokens``, ``seed``).

    Raises ``ValueError`` for keys that are neither backend keys nor ``GenerationConfig`` fields.
    """
    known = _generation_config_fields()
    unknown = sorted(k for k in settings if k not in BACKEND_KEYS and k not in known)
    unsupported = sorted(k for k in settings if k in UNSUPPORTED_KEYS)
    if unknown or unsupported:
        raise ValueError(
            f"unsupported generation setting(s) {', '.join(unknown + unsupported)}: the transformers "
            "backend takes max_prompt_tokens, seed and the fields of transformers.GenerationConfig "
            "(do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, min_new_tokens, "
            "num_beams, ...), one output per prompt."
        )
    kwargs = {k: v for k, v in settings.items() if k not in BACKEND_KEYS}
    if kwargs.get("do_sample") is False:
        kwargs = {k: v for k, v in kwargs.items() if k not in SAMPLING_KEYS}
    max_prompt_tokens = settings.get("max_prompt_tokens")
    if max_prompt_tokens is not None and int(max_prompt_tokens) < 1:
        raise ValueError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}.")
    seed = settings.get("seed")
    return (
        kwargs,
        None if max_prompt_tokens is None else int(max_prompt_tokens),
        None if seed is None else int(seed),
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class TransformersModel:
    """A loaded causal LM with its tokenizer (the :class:`~cellscribe.core.components.LoadedModel` of
    the transformers backend).

    Attributes
    ----------
    model
        The ``PreTrainedModel``, or a ``PeftModel`` when adapters were loaded.
    tokenizer
        Its tokenizer, left-padding, with a pad token.
    spec, revision
        What was loaded.
    device
        Where inputs are sent (the model's first parameter's device when a ``device_map`` was given).
    batch_size
        Prompts per ``generate`` call.
    adapters
        Modality -> adapter location, for the adapters loaded.
    truncation_side
        ``"left"`` keeps the end of an over-long prompt, ``"right"`` its start.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        spec: str,
        revision: str | None = None,
        device: str = "cpu",
        batch_size: int = 8,
        adapters: Mapping[str, str] | None = None,
        truncation_side: str = "left",
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.revision = revision
        self.device = device
        self.batch_size = int(batch_size)
        self.adapters = dict(adapters or {})
        self.truncation_side = truncation_side
        self._active_adapter: str | None = next(reversed(self.adapters), None)

    # -- LoadedModel protocol ---------------------------------------------------------------------

    def render(self, prompt: Prompt) -> str:
        """The exact model input text of ``prompt``: chat template, removals, response prefix."""
        return prompt.render(self.tokenizer.apply_chat_template)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` as the model sees it (no special tokens added)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def info(self) -> dict[str, Any]:
        """What identifies the model: backend, model, revision, resolved commit, dtype, device, adapters."""
        base = getattr(self.model, "config", None)
        dtype = getattr(self.model, "dtype", None)
        return {
            "backend": BACKEND_NAME,
            "model": self.spec,
            "revision": self.revision,
            "commit": getattr(base, "_commit_hash", None),
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "device": self.device,
            "adapters": dict(self.adapters),
            "active_adapter": self._active_adapter,
        }

    def use_modality(self, modality: str) -> None:
        """Answer with ``modality``'s adapter from now on.

        A modality without an adapter uses the base model (adapters disabled) when others are loaded;
        without any adapter this does nothing.
        """
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

        Prompts are grouped by effective settings (see the module docstring), then generated
        ``batch_size`` at a time, longest first. ``progress(n)`` is called after every batch with
        the number of prompts it held. A batch that raises is retried one prompt at a time; a prompt
        that still fails gets ``Generation(text="", error=...)``. Invalid settings raise
        ``ValueError`` before anything is generated.
        """
        prompts = list(prompts)
        user = dict(settings or {})
        # Group by what reaches generate (after dropping sampling-only keys), so prompts whose
        # defaults differ only in keys the user's settings make irrelevant share batches.
        groups: dict[str, tuple[tuple[dict[str, Any], int | None, int | None], list[int]]] = {}
        split: dict[str, tuple[dict[str, Any], int | None, int | None]] = {}
        for i, prompt in enumerate(prompts):
            effective = {**prompt.generation, **user}
            effective_key = json.dumps(effective, sort_keys=True, default=repr)
            if effective_key not in split:
                split[effective_key] = _split_settings(effective)
            plan = split[effective_key]
            key = json.dumps(plan, sort_keys=True, default=repr)
            groups.setdefault(key, (plan, []))[1].append(i)
        plans = list(groups.values())

        results: list[Generation | None] = [None] * len(prompts)
        n_truncated = 0
        for (kwargs, max_prompt_tokens, seed), members in plans:
            ids, truncated = self._encode([self.render(prompts[i]) for i in members], max_prompt_tokens)
            n_truncated += truncated
            order = sorted(range(len(members)), key=lambda j: -len(ids[j]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                outputs = self._generate_or_retry([ids[j] for j in batch], kwargs, seed)
                for j, output in zip(batch, outputs):
                    results[members[j]] = output
                if progress is not None:
                    progress(len(batch))
        if n_truncated:
            kept = "end" if self.truncation_side == "left" else "start"
            warnings.warn(
                f"{n_truncated} of {len(prompts)} prompts were longer than max_prompt_tokens and were "
                f"truncated (their {kept} kept); use shorter cell sentences or raise max_prompt_tokens.",
                UserWarning,
                stacklevel=2,
            )
        return results  # type: ignore[return-value]

    # -- internals ----------------------------------------------------------------------------------

    def _encode(self, texts: list[str], max_prompt_tokens: int | None) -> tuple[list[list[int]], int]:
        """Token ids of ``texts`` (each cut to ``max_prompt_tokens``) and how many were cut."""
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens is None:
            return ids, 0
        n_cut = sum(len(row) > max_prompt_tokens for row in ids)
        if self.truncation_side == "left":
            return [row[-max_prompt_tokens:] for row in ids], n_cut
        return [row[:max_prompt_tokens] for row in ids], n_cut

    def _generate_or_retry(
        self, batch: list[list[int]], kwargs: Mapping[str, Any], seed: int | None
    ) -> list[Generation]:
        try:
            return self._generate_batch(batch, kwargs, seed)
        except Exception as exc:  # any failure (CUDA OOM, a bad input) must not end the run
            self._release_memory()
            if len(batch) == 1:
                log.warning("generation failed for one prompt: %s", _describe(exc))
                return [Generation(text="", n_prompt_tokens=len(batch[0]), error=_describe(exc))]
            log.warning(
                "a batch of %d prompts failed (%s); retrying them one at a time", len(batch), _describe(exc)
            )
            return [self._generate_or_retry([ids], kwargs, seed)[0] for ids in batch]

    def _generate_batch(
        self, batch: list[list[int]], kwargs: Mapping[str, Any], seed: int | None
    ) -> list[Generation]:
        import torch

        pad_id = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            # Left padding: every prompt ends at the last column, where generation continues.
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode(), self._adapter_context():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                **kwargs,
            )
        new_tokens = output[:, width:].tolist()
        eos = self._eos_ids()
        generations = []
        for ids, tokens in zip(batch, new_tokens):
            # Finished rows are filled with padding: count up to and including the first end token.
            n_out = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
            text = self.tokenizer.decode(tokens[:n_out], skip_special_tokens=True)
            generations.append(Generation(text=text, n_prompt_tokens=len(ids), n_output_tokens=n_out))
        return generations

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


class TransformersBackend:
    """Loads causal language models with ``transformers`` (the :class:`~cellscribe.core.components.Backend`
    named ``"transformers"``)."""

    name = BACKEND_NAME
    description = (
        "Hugging Face transformers causal LMs from a local folder or a hub id, rendered with the model's "
        "chat template; PEFT adapters per modality"
    )

    def handles(self, spec: str) -> bool:
        """True for a local directory with a ``config.json``, or a string shaped like a hub id that is
        not an existing path."""
        path = Path(spec).expanduser()
        if path.exists():
            return path.is_dir() and (path / "config.json").is_file()
        return looks_like_hub_id(spec)

    def load(
        self,
        spec: str,
        *,
        adapters: Mapping[str, str] | None = None,
        hook: Any = None,
        device: str | None = None,
        dtype: Any = None,
        trust_remote_code: bool = False,
        batch_size: int = 8,
        revision: str | None = None,
        truncation_side: str = "left",
        model_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> TransformersModel:
        """Load tokenizer and model from ``spec`` (a local folder or a hub id).

        Parameters
        ----------
        adapters
            Modality -> adapter location; each is loaded through the ``cellscribe_load_adapter`` hook
            (``hook``, the plugin manager's hook relay; the process-wide host's when ``None``).
        device
            ``None``/``"auto"``: CUDA when available, else CPU. Ignored when ``model_kwargs`` has a
            ``device_map``.
        dtype
            ``None``/``"auto"``: bfloat16 on CUDA, float32 on CPU; or a torch dtype or its name.
        trust_remote_code
            Passed to ``from_pretrained``; off unless the user opts in.
        batch_size
            Prompts per ``generate`` call.
        revision
            Hub branch, tag or commit.
        truncation_side
            Which part of a prompt over ``max_prompt_tokens`` to drop (see the module docstring).
        model_kwargs
            Extra keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (``device_map``,
            ``attn_implementation``, ``quantization_config``, ...).
        options
            Ignored (options meant for other components).

        Weights are read from safetensors files only. Raises ``ValueError`` for a path that is not a
        model, a hub id that cannot be fetched, or a tokenizer without a chat template.
        """
        _check_model_dir(spec)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hub_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if revision is not None:
            hub_kwargs["revision"] = revision
        model_kwargs = dict(model_kwargs or {})
        device = _resolve_device(device, torch)
        torch_dtype = _resolve_dtype(dtype, device, torch)

        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, padding_side="left", **hub_kwargs)
        except OSError as exc:
            raise ValueError(
                f"could not load a tokenizer for {spec!r} ({exc}). For a hub id check the spelling, your "
                "network access and, for gated models, your Hugging Face login; or give a local folder."
            ) from exc
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(NO_CHAT_TEMPLATE)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"the tokenizer of {spec!r} has neither a pad nor an eos token; set "
                    "tokenizer.pad_token in the model folder."
                )
            tokenizer.pad_token = tokenizer.eos_token

        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec, use_safetensors=True, dtype=torch_dtype, **hub_kwargs, **model_kwargs
            )
        except OSError as exc:
            raise ValueError(
                f"could not load model weights for {spec!r} ({exc}). cellscribe reads safetensors weights "
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

        if adapters:
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
            model.eval()

        log.info("loaded %s (%s, %s) with adapters %s", spec, torch_dtype, device, dict(adapters or {}))
        return TransformersModel(
            model,
            tokenizer,
            spec=spec,
            revision=revision,
            device=device,
            batch_size=batch_size,
            adapters={m: str(a) for m, a in (adapters or {}).items()},
            truncation_side=truncation_side,
        )
