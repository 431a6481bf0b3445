"""The cost of a run before it runs (``cellscribe annotate --dry-run``, :meth:`RunPlan.estimate`).

What is counted: the prompts of the plan (with ``budget=``, the first round's, and at most
``n_second_max`` cells more in the re-query round), their prompt tokens (counted with the model's
tokenizer on a sample of the prompts and scaled by characters, or characters / 3.5 without a tokenizer)
and the new tokens they may generate (``max_new_tokens`` per prompt: an upper bound, an answer stops at
its end-of-sequence token).

The model's time is ``prompt tokens / prefill rate + new tokens / decode rate`` (or ``prompts / prompts
per second`` for a model whose time is per prompt, like the offline ``markers`` model). Where the rates
come from, in order (``rate_source`` says which):

1. the caller's ``rates=`` (``--rate KEY=VALUE``: ``prompt_tokens_per_s``, ``new_tokens_per_s``,
   ``prompts_per_s``), each overriding the rest;
2. the backend's documented assumption (``Backend.rates``): a model on a GPU (the transformers backend
   with a CUDA device) or behind a server (the openai backend), where timing it here would not say what
   the run costs; :func:`assumed_gpu_rates` is the arithmetic they share;
3. else measured on this machine: the model is loaded and times a few of the run's prompts twice, with
   1 and with :data:`MEASURE_NEW_TOKENS` + 1 new tokens (after one warm-up prompt): the first gives the
   prefill rate, the difference the decode rate. A model that reports no token counts (``markers``) is
   timed per prompt.

Nothing is written; the model loaded for the measurement is dropped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

log = logging.getLogger(__name__)

__all__ = ["Rates", "RATE_KEYS", "assumed_gpu_rates", "estimate_run", "format_seconds", "CHARS_PER_TOKEN"]

RATE_KEYS = ("prompt_tokens_per_s", "new_tokens_per_s", "prompts_per_s")
#: Characters per token when no tokenizer counts them (English and gene symbols with a BPE tokenizer).
CHARS_PER_TOKEN = 3.5
#: Prompts of the run timed by a measurement (one model call: a batch).
MEASURE_PROMPTS = 8
#: A model timed per prompt is timed again on up to this many prompts when a batch took less than
#: ``MEASURE_MIN_SECONDS``.
MEASURE_PROMPTS_PER_PROMPT = 256
MEASURE_MIN_SECONDS = 0.5
#: New tokens of the second timed call (the first generates one).
MEASURE_NEW_TOKENS = 16

# The GPU assumption (documented in the README, "Cost estimate"): one NVIDIA H100 80 GB in bf16.
#: Prefill is compute-bound: 2 x parameters FLOPs per token at this effective rate (about 70% of the
#: H100's 989 dense bf16 TFLOP/s): a 7B model prefills ~50,000 tokens/s, the issue's "20 GPU-seconds
#: per 1,000 cells of ~1,000 prompt tokens".
GPU_EFFECTIVE_FLOPS = 7.0e14
#: Decoding is bound by reading the weights once per step for every sequence of the batch: 60% of the
#: H100's 3.35 TB/s, so a 7B bf16 model takes ~7 ms a step.
GPU_EFFECTIVE_BANDWIDTH = 2.0e12
#: Parameters assumed when a model's size cannot be read (weights not on this machine).
DEFAULT_PARAMS = 7e9


@attrs.frozen
class Rates:
    """How fast a model answers: prefill and decode tokens per second, or prompts per second; and where
    the figures come from (``source``: measured here, an assumption, or given)."""

    prompt_tokens_per_s: float | None = None
    new_tokens_per_s: float | None = None
    prompts_per_s: float | None = None
    source: str = ""

    def seconds(self, prompts: float, prompt_tokens: float, new_tokens: float | None) -> float | None:
        """Model time of ``prompts`` holding ``prompt_tokens`` and generating ``new_tokens``."""
        if self.prompt_tokens_per_s and self.new_tokens_per_s and new_tokens is not None:
            return prompt_tokens / self.prompt_tokens_per_s + new_tokens / self.new_tokens_per_s
        if self.prompts_per_s:
            return prompts / self.prompts_per_s
        if self.prompt_tokens_per_s and new_tokens is None:
            return prompt_tokens / self.prompt_tokens_per_s
        return None

    @property
    def complete(self) -> bool:
        return bool(self.prompts_per_s or (self.prompt_tokens_per_s and self.new_tokens_per_s))

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*RATE_KEYS, "source") if getattr(self, k) is not None}


def check_rates(rates: Mapping[str, Any] | None) -> dict[str, float]:
    """``rates=`` as floats; a ``ValueError`` naming an unknown key or a value that is not > 0."""
    out = {}
    for key, value in (rates or {}).items():
        if key not in RATE_KEYS:
            raise ValueError(f"unknown rate {key!r}; known: {', '.join(RATE_KEYS)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not number > 0 or math.isinf(number):
            raise ValueError(f"rate {key} must be a positive number, got {value!r}")
        out[key] = number
    return out


def assumed_gpu_rates(n_params: float | None, *, concurrency: int, bytes_per_param: float = 2.0,
                      what: str = "") -> Rates:
    """The documented GPU assumption for a model of ``n_params`` parameters answering ``concurrency``
    prompts at once (the batch, or a server's requests in flight): see :data:`GPU_EFFECTIVE_FLOPS` and
    :data:`GPU_EFFECTIVE_BANDWIDTH`."""
    size = n_params or DEFAULT_PARAMS
    prefill = GPU_EFFECTIVE_FLOPS / (2.0 * size)
    step = size * bytes_per_param / GPU_EFFECTIVE_BANDWIDTH
    decode = max(1, int(concurrency)) / step
    sized = f"{size / 1e9:.2g}B parameters" + ("" if n_params else " (assumed: the size is not known here)")
    return Rates(prefill, decode, None, (
        f"assumed: {what or 'one GPU'} as one NVIDIA H100 in bf16, {sized}: prefill at 2 x parameters "
        f"FLOPs per token at {GPU_EFFECTIVE_FLOPS:.1e} FLOP/s, decoding {max(1, int(concurrency))} prompts per "
        f"step of reading the weights at {GPU_EFFECTIVE_BANDWIDTH / 1e12:.1f} TB/s; override with --rate"))


def format_seconds(seconds: float | None) -> str:
    """``3.2 s``, ``4 min 10 s``, ``2 h 05 min``, ``3.1 days``."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown (no rate: pass --rate prompt_tokens_per_s=... new_tokens_per_s=...)"
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    if seconds < 86400 * 2:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 86400:.1f} days"


def _sig(value: float | None) -> float | None:
    """``value`` to 4 significant figures (printed estimates, not measurements)."""
    return None if value is None else float(f"{value:.4g}")


def _settings(plan: Any) -> dict[str, Any]:
    return dict(plan.spec.generation.generation)


def _max_new_tokens(plan: Any) -> int | None:
    given = _settings(plan).get("max_new_tokens")
    if given is not None:
        return int(given)
    values = {p.generation.get("max_new_tokens") for p in plan.prompts}
    values.discard(None)
    return int(max(values)) if values else None


def _chars(prompts: Sequence[Any]) -> int:
    return sum(len(m["content"]) for p in prompts for m in p.messages)


def _sample(prompts: Sequence[Any], n: int) -> list[Any]:
    """``n`` prompts spread evenly over the run (the first one included)."""
    if len(prompts) <= n:
        return list(prompts)
    step = len(prompts) / n
    return [prompts[int(i * step)] for i in range(n)]


def measure_rates(loaded: Any, prompts: Sequence[Any], settings: Mapping[str, Any]) -> Rates:
    """Time ``loaded.generate`` on a few of ``prompts`` (see the module docstring)."""
    sample = _sample(prompts, MEASURE_PROMPTS)
    loaded.generate(sample[:1], settings={**settings, "max_new_tokens": 1})  # warm-up (lazy set-up, caches)
    t0 = time.perf_counter()
    short = loaded.generate(sample, settings={**settings, "max_new_tokens": 1})
    t_short = time.perf_counter() - t0
    t0 = time.perf_counter()
    long = loaded.generate(sample, settings={**settings, "max_new_tokens": 1 + MEASURE_NEW_TOKENS})
    t_long = time.perf_counter() - t0
    n_prompt = [g.n_prompt_tokens for g in short]
    n_short = [g.n_output_tokens for g in short]
    n_long = [g.n_output_tokens for g in long]
    where = f"measured on this machine: {len(sample)} of the run's prompts in {t_short:.2f} s"
    if any(g.error for g in (*short, *long)):
        raise RuntimeError(f"the model failed while being timed: {next(g.error for g in (*short, *long) if g.error)}")
    if all(v is not None for v in (*n_prompt, *n_short, *n_long)):
        new = sum(n_long) - sum(n_short)
        decode = new / (t_long - t_short) if new > 0 and t_long > t_short else None
        return Rates(sum(n_prompt) / max(t_short, 1e-9), decode, None,
                     f"{where} (1 new token), and {new} more new tokens in {t_long - t_short:.2f} s more")
    # Timed per prompt: a larger sample when a batch takes too little time to be timed well.
    if t_short < MEASURE_MIN_SECONDS and len(prompts) > len(sample):
        sample = _sample(prompts, min(len(prompts), MEASURE_PROMPTS_PER_PROMPT))
        t0 = time.perf_counter()
        loaded.generate(sample, settings=dict(settings))
        t_short = time.perf_counter() - t0
    return Rates(None, None, len(sample) / max(t_short, 1e-9),
                 f"measured on this machine: {len(sample)} of the run's prompts in {t_short:.2f} s (timed per prompt)")


def estimate_run(plan: Any, *, rates: Mapping[str, Any] | None = None, measure: bool = True,
                 host: Any = None) -> dict[str, Any]:
    """The estimated cost of ``plan`` (a :class:`~cellscribe.core.run.plan.RunPlan`; see the module
    docstring): prompts, prompt and new tokens, the model's time, and what the rates are. With ``budget=``
    also the re-query round at most and the full run for comparison. ``measure=False``: no model is
    loaded (without rates the time is unknown). Loads the model only to measure it; writes nothing."""
    from ..models import load_model
    from ..plugins import get_host

    given = check_rates(rates)
    host = host or get_host()
    spec = plan.spec
    m = spec.model
    backend = host.registry.backend_for(m.name) if m.handle is None else host.registry.get("backend", m.handle.backend)
    assumed = None
    if not Rates(**given).complete:
        options = m.handle.options if m.handle is not None else m.load_options()
        made = backend.rates(m.handle.name if m.handle is not None else m.name, device=options["device"],
                             dtype=options["dtype"], batch_size=options["batch_size"],
                             model_options=dict(options["model_options"]))
        assumed = None if made is None else Rates(**{k: made.get(k) for k in (*RATE_KEYS, "source")})
    to_measure = not Rates(**given).complete and assumed is None and measure
    counted_by = f"characters / {CHARS_PER_TOKEN}"
    per_char = 1 / CHARS_PER_TOKEN
    measured = None
    if to_measure or (m.handle is not None and m.handle.is_loaded):
        model = m.handle or load_model(m.name, adapters={spec.data.modality: m.adapter} if m.adapter else None,
                                       host=host, **m.load_options())
        loaded = model.loaded
        loaded.use_modality(spec.data.modality)
        loaded.use_assay(plan.assay)
        plan.make_prompts(loaded.count_tokens)
        if to_measure and plan.prompts:
            loaded.survey(plan.prompts)
            measured = measure_rates(loaded, plan.prompts, _settings(plan))
        sample = _sample(plan.prompts, 64)
        counts = [loaded.count_tokens(msg["content"]) for p in sample for msg in p.messages]
        if counts and all(c is not None for c in counts) and _chars(sample):
            per_char = sum(counts) / _chars(sample)
            counted_by = f"the model's tokenizer on {len(sample)} prompts ({1 / per_char:.2f} characters per token)"
    elif not plan.prompts:
        plan.make_prompts(None)
    base = measured or assumed or Rates()
    chosen = Rates(**{**{k: getattr(base, k) for k in RATE_KEYS}, **given},
                   source="; ".join(filter(None, [base.source] + ([f"given: {', '.join(given)}"] if given else []))))
    prompts = len(plan.prompts)
    prompt_tokens = _chars(plan.prompts) * per_char
    max_new = _max_new_tokens(plan)
    new_tokens = None if max_new is None or chosen.prompts_per_s and not chosen.new_tokens_per_s else prompts * max_new
    seconds = chosen.seconds(prompts, prompt_tokens, new_tokens)
    out: dict[str, Any] = {
        "estimate_prompts": prompts,
        "estimate_prompt_tokens": int(round(prompt_tokens)),
        "estimate_prompt_tokens_per_prompt": int(round(prompt_tokens / prompts)) if prompts else 0,
        "estimate_tokens_counted_by": counted_by,
        "estimate_new_tokens_at_most": new_tokens if new_tokens is None else int(new_tokens),
        "estimate_model_seconds": _sig(seconds),
        "estimate_model_time": format_seconds(seconds),
        **{f"rate_{k}": _sig(v) for k, v in chosen.as_dict().items() if k != "source"},
        "rate_source": chosen.source or "none",
    }
    units = len(plan.unit_rows)
    budget = plan.budget
    if budget is not None and units and prompts:
        per_unit = prompts / units
        extra = min(budget.n_second_max, len(budget.pool) - units)
        scale = (units + extra) / units
        with_requery = seconds * scale if seconds is not None else None
        full = seconds * len(budget.pool) / units if seconds is not None else None
        out.update({
            "estimate_requery_prompts_at_most": int(math.ceil(extra * per_unit)),
            "estimate_model_time_with_requery_at_most": format_seconds(with_requery),
            "estimate_model_seconds_with_requery_at_most": _sig(with_requery),
            "estimate_model_time_without_budget": format_seconds(full),
        })
    return out
