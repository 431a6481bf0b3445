"""What runs on the Ray workers: the replica actor of ``map_batches`` and the vLLM rows.

Imported by the executor when it runs and by Ray in each worker process; nothing here imports Ray at
module level.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from cellscribe.core.run.checkpoint import generate_safely
from cellscribe.core.run.record import without_credentials
from cellscribe.core.types import Generation, ModelUnavailableError, Prompt

log = logging.getLogger(__name__)


@attrs.frozen
class Unavailable:
    """A replica's model could not answer at all (a server down): the message and what it finished."""

    message: str
    generations: list[Generation | None] | None


class Answerer:
    """A replica of the run's model as a Ray Data actor (``map_batches`` with a callable class).

    The model is loaded once per actor (:meth:`cellscribe.core.models.Replica.load`: loaded and prepared
    as the run prepared its own); each call answers whole batches of the run, one row each, with
    :func:`~cellscribe.core.run.checkpoint.generate_safely` as the local executor does (a failing batch
    retried in halves). With ``servers`` (OpenAI-compatible base URLs), the ``counter`` actor hands each
    replica the next server in turn, and the replica sends its requests there.
    """

    def __init__(self, replica: Any, servers: Sequence[str] = (), counter: Any = None) -> None:
        import ray

        if isinstance(replica, tuple):  # (ObjectRef,): fetched here, not passed inline to every actor
            replica = ray.get(replica[0])
        model_options = None
        if servers:
            index = ray.get(counter.take.remote())
            model_options = {"base_url": servers[index % len(servers)]}
            log.info("replica %d answers through %s", index, without_credentials(model_options["base_url"]))
        self.loaded = replica.load(model_options=model_options)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        answers = []
        for work in batch["work"]:
            prompts, settings = pickle.loads(work)
            try:
                result: Any = generate_safely(self.loaded, prompts, settings, None)
            except ModelUnavailableError as exc:  # stops the run in the driver, which saves what it has
                result = Unavailable(str(exc), exc.generations)
            answers.append(pickle.dumps(result))
        return {"call": np.asarray(batch["call"]), "answer": np.asarray(answers, dtype=object)}


def server_counter() -> Any:
    """An actor handing out 0, 1, 2, ... (which server a replica uses)."""
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.next = 0

        def take(self) -> int:
            self.next += 1
            return self.next - 1

    return Counter.remote()


# -- vLLM through Ray Data's LLM processors ----------------------------------------------------------

#: Generation settings (transformers names) -> vLLM ``SamplingParams`` names. ``max_prompt_tokens`` keeps
#: the end of a longer prompt, as the transformers backend does by default (``truncation_side="left"``).
SAMPLING_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                  "top_k": "top_k", "repetition_penalty": "repetition_penalty", "seed": "seed",
                  "min_p": "min_p", "max_prompt_tokens": "truncate_prompt_tokens"}
#: Settings that only candidate scoring reads (not a generate setting).
IGNORED = frozenset({"do_sample", "length_normalize"})


def sampling_params(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt's effective generation settings as vLLM sampling parameters: ``do_sample=False`` (or no
    temperature) is greedy, ``temperature=0``. Raises ``ValueError`` for a setting vLLM has no name for."""
    unknown = sorted(set(settings) - set(SAMPLING_NAMES) - IGNORED)
    if unknown:
        raise ValueError(f"generation setting(s) {unknown} have no vLLM equivalent; leave them out with "
                         "engine='vllm', or use engine='actors' (the transformers backend on each replica)")
    out = {SAMPLING_NAMES[k]: v for k, v in settings.items() if k in SAMPLING_NAMES and v is not None}
    if settings.get("do_sample") is False or "temperature" not in settings:
        out["temperature"] = 0.0
        for key in ("top_p", "top_k", "min_p"):
            out.pop(key, None)
    return out


def vllm_rows(calls: Sequence[tuple[Sequence[Prompt], Mapping[str, Any]]], loaded: Any) -> list[dict[str, Any]]:
    """One row per prompt of ``calls``: its call and place in it, its token ids exactly as the
    transformers backend feeds them (``LoadedModel.encode_example``: chat template, removals, response
    prefix) and its sampling parameters."""
    rows = []
    for k, (prompts, settings) in enumerate(calls):
        for j, prompt in enumerate(prompts):
            encoded = loaded.encode_example(prompt, "")
            if encoded is None:
                raise ValueError("engine='vllm' needs a model with a tokenizer (a transformers model folder or hub "
                                 "id); use engine='actors' for this model")
            rows.append({"call": k, "pos": j, "tokenized_prompt": list(encoded[0]),
                         "sampling_params": sampling_params({**prompt.generation, **settings})})
    return rows


def vllm_output(row: Mapping[str, Any]) -> dict[str, Any]:
    """What the driver keeps of a processed row (``postprocess`` of the processor)."""
    return {"call": row["call"], "pos": row["pos"], "generated_text": row.get("generated_text", ""),
            "num_input_tokens": row.get("num_input_tokens"), "num_generated_tokens": row.get("num_generated_tokens")}


def vllm_generation(row: Mapping[str, Any]) -> Generation:
    """A processed row (or an error row, which skips ``postprocess``) as a :class:`Generation`."""
    error = row.get("__inference_error__")

    def count(key: str) -> int | None:
        value = row.get(key)
        return int(value) if value is not None and int(value) >= 0 else None

    if error:
        return Generation(text="", error=f"vLLM: {error}")
    return Generation(text=str(row.get("generated_text") or ""), n_prompt_tokens=count("num_input_tokens"),
                      n_output_tokens=count("num_generated_tokens"))
