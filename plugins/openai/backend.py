"""The ``openai`` backend: models behind an OpenAI-compatible HTTP API (vLLM, SGLang, TGI, Ollama, hosted).

``model="openai:<served name>"`` sends each prompt as one request to ``{base_url}/chat/completions``
(or ``/completions``, see *Rendering*), with at most ``max_concurrency`` requests in flight, and returns
the answers in prompt order. Requests go through one ``httpx.Client`` per model, whose pool keeps up to
``max_concurrency`` HTTP/1.1 connections alive from one request (and one batch) to the next, sent from a
thread pool. The default concurrency, :data:`DEFAULT_CONCURRENCY` (64), keeps a local vLLM's batch
full (it batches the requests in flight); for ``api.openai.com``, whose rate limits a burst only
trips, it is :data:`HOSTED_CONCURRENCY` (8).

Connection
----------
``base_url`` is the API root (``http://host:8000/v1``); when not given it is read from
``CELLSCRIBE_OPENAI_BASE_URL``, then ``OPENAI_BASE_URL``, else ``https://api.openai.com/v1``. The API key
is read from the environment variable named by ``api_key_env`` (``OPENAI_API_KEY``) and sent as a bearer
token; local servers started without a key need none. The key is never logged, never put in
:meth:`OpenAIModel.info` (which the run parameters record) and is removed from any error text a server
sends back. It cannot be passed as an option, because model options are recorded in the run parameters.

Dialect
-------
Servers differ in which fields beyond OpenAI's they understand. ``dialect="vllm"`` (the default except
for ``api.openai.com``) sends the extra fields vLLM understands (SGLang understands most; TGI and Ollama
ignore unknown fields): ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``continue_final_message``/``add_generation_prompt`` for a response prefix, ``truncate_prompt_tokens``.
``dialect="openai"`` (the default for ``api.openai.com``, which rejects unknown fields) sends only
OpenAI's fields and warns once about each setting it had to leave out. ``extra_body`` adds fields to
every request (``{"chat_template_kwargs": {...}}``); it may override mapped settings but not the
request's ``model``, ``messages`` or ``prompt``.

Rendering
---------
A chat API renders messages with the *server's* chat template, so the two edits CellReasoner makes to
the rendered text (``Prompt.remove_from_rendered`` and ``Prompt.response_prefix``, FORMATS.md) cannot
be made on that text. Two renderings are offered:

``render="server"`` (default)
    The messages are sent with every removed string deleted from each message's content. That is the
    same model input as deleting them from the rendered text as long as the server's chat template does
    not write those strings itself (Qwen2.5-Instruct's, the base of CellReasoner-7B, does not; a
    reasoning model's template that opens the answer with ``<think>`` does: use ``render="client"``
    for those). A response prefix is sent as a final assistant message that the model continues
    (``continue_final_message``, vLLM dialect): the answer then reads exactly as after a local
    prefill. The OpenAI dialect cannot prefill, so the prefix is left out with a warning (the decoders
    read the answer either way).
``render="client"``
    The prompt is rendered here, exactly as the transformers backend renders it (chat template, removals,
    prefix), with a local copy of the served model's tokenizer (``tokenizer=``: a folder or hub id,
    loaded with ``transformers.AutoTokenizer``), and the text is sent to the legacy ``/completions``
    endpoint (with ``add_special_tokens: false`` in the vLLM dialect: the template holds them). The
    model input is then byte-identical to a local run. vLLM and SGLang serve ``/completions`` for chat
    models; check that another server does not wrap the text in its own template.

A ``tokenizer`` also gives :meth:`OpenAIModel.count_tokens` (prompt strategies fit k-shot examples
with it) and lets ``max_prompt_tokens`` be enforced: prompts longer than it are sent with
``truncate_prompt_tokens`` (vLLM keeps the end of the prompt, like the transformers backend's default).
Without a tokenizer ``max_prompt_tokens`` is not checked, and a server rejects prompts longer than its
context with an HTTP 400 (the prompt's units become unresolved).

Generation settings
-------------------
Each prompt's effective settings are ``Prompt.generation`` updated with the user's ``settings``, named
as in transformers: ``max_new_tokens`` -> ``max_tokens`` (``max_completion_tokens`` in the OpenAI
dialect), ``temperature``, ``top_p``, ``seed``, ``stop_strings`` -> ``stop``, and in the vLLM dialect
``top_k``, ``min_p``, ``repetition_penalty``, ``min_new_tokens`` -> ``min_tokens``. ``do_sample=False``
sends ``temperature: 0`` (greedy) and drops the sampling-only keys. ``num_beams`` > 1 and unknown keys
raise ``ValueError``.

A server leaves the stop string that ended an answer out of it (the transformers backend keeps it): it is
put back, the one vLLM names (``stop_reason``), else what the prompt's answer format needs
(:meth:`~cellscribe.core.answers.AnswerFormat.restore_stop`: a tagged answer's ``</answer>``), so both
backends give the decoders the same text. Each
``Generation.finish_reason`` is the server's (``"stop"``, or ``"length"`` when the answer hit
``max_new_tokens``: the decoders note it on the cell, and the backend warns).

``decode``: only ``"generate"`` is native. ``"score"`` raises ``ValueError`` (scoring candidates needs the
model's log-probabilities: use the transformers backend). ``"constrained"`` raises too unless
``guided_choice`` is set: then each one-cell prompt with candidates is sent with vLLM's guided choice
(``structured_outputs: {"choice": [...]}``, vLLM >= 0.12; ``guided_choice="guided_choice"`` sends the
older ``guided_choice`` field), which forces the whole answer to be one candidate (no reasoning). Puzzle
prompts cannot be constrained this way.

Failures
--------
Each request's failure is classified, and only what a retry can fix is retried:

- HTTP 429, 408 and 5xx: retried up to ``max_retries`` times, after ``backoff * 2**attempt`` seconds
  (capped at ``max_backoff``, with random jitter) or after the server's ``Retry-After`` (or
  ``retry-after-ms``), honoured up to ``max_backoff``;
- no connection (refused, unknown host) or a connection lost mid-answer: retried at most
  :data:`CONNECT_RETRIES` times (a server that is down stays down longer than that is worth);
- no answer within ``timeout`` seconds: retried at most :data:`TIMEOUT_RETRIES` time;
- other 4xx (a prompt the server rejects, such as a 400 for a prompt over its context) and a 200 that
  is not a completion (not JSON, no choices): that prompt fails at once, not retried.

A failed prompt gets a ``Generation`` with ``error`` set (its units become unresolved, and a re-run
from the checkpoint sends it again). Two failures stop the whole call with
:class:`~cellscribe.core.types.ModelUnavailableError`, which stops the run (the answers already
received are kept): a 401, 403 or 404, which every request would get, and :data:`DOWN_AFTER` (or
``max_concurrency``, when larger) requests failing in a row without a server answer (no connection,
timeouts, 5xx or 429 after their retries): a server that is down or was killed. With the defaults a
server that refuses connections stops a run within a few seconds. Error texts never hold the API key
or the credentials of ``base_url``.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import email.utils
import json
import logging
import os
import queue
import random
import threading
import time
import urllib.parse
import warnings
from base64 import b64encode
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from cellscribe import __version__
from cellscribe.core.answers import FREE, AnswerFormat, opens_think, with_reasoning
from cellscribe.core.types import FINISH_LENGTH, FINISH_STOP, Generation, ModelUnavailableError, Prompt, warn_capped

log = logging.getLogger(__name__)

BACKEND_NAME = "openai"
SPEC_PREFIX = "openai:"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Environment variables read, in order, when ``base_url`` is not given.
BASE_URL_ENVS = ("CELLSCRIBE_OPENAI_BASE_URL", "OPENAI_BASE_URL")
#: Hosts whose API rejects fields it does not know (the ``openai`` dialect is their default).
STRICT_HOSTS = frozenset({"api.openai.com"})
DIALECTS = ("vllm", "openai")
RENDERINGS = ("server", "client")
DECODE_MODES = ("generate", "constrained", "score")
#: Requests in flight by default: enough to keep a local vLLM's batch full.
DEFAULT_CONCURRENCY = 64
#: Requests in flight by default on hosts in :data:`STRICT_HOSTS` (rate-limited hosted APIs).
HOSTED_CONCURRENCY = 8
#: Requests in flight at the start, and the gain in answers per second that doubling them must bring to
#: be kept (``OpenAIModel._run``).
INITIAL_WORKERS = 8
PROBE_GAIN = 1.5
#: Answers over which the rate is measured while probing (at least; four per worker).
PROBE_WINDOW = 64
#: Longest error body read from a server.
MAX_ERROR_BODY = 64 * 1024

#: transformers-named settings -> request fields every OpenAI-compatible API understands.
STANDARD_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop_strings": "stop"}
#: transformers-named settings -> request fields only the vLLM dialect sends.
VLLM_FIELDS = {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
               "min_new_tokens": "min_tokens"}
#: Values of VLLM_FIELDS settings that change nothing (leaving them out is not worth a warning).
NEUTRAL = {"top_k": (0, -1), "min_p": (0,), "repetition_penalty": (1,), "min_new_tokens": (0,)}
#: Settings the backend consumes itself.
OWN_KEYS = frozenset({"do_sample", "max_new_tokens", "max_prompt_tokens", "num_beams"})
SAMPLING_KEYS = frozenset({"temperature", "top_p", "top_k", "min_p"})
#: Request fields ``extra_body`` must not replace.
RESERVED_FIELDS = frozenset({"model", "messages", "prompt", "stream", "n"})

#: HTTP statuses worth retrying: rate limit, request timeout, server errors (>= 500).
RETRY_STATUSES = frozenset({408, 429})
#: HTTP statuses that will fail every request of a run the same way: the run stops at the first.
FATAL_STATUSES = frozenset({401, 403, 404})
#: Retries of a request that found no server (connection refused, unknown host) or lost it mid-answer:
#: a server that is down stays down longer than retries are worth waiting (at most ``max_retries``).
CONNECT_RETRIES = 2
#: Retries of a request that timed out (it already waited ``timeout`` seconds; at most ``max_retries``).
TIMEOUT_RETRIES = 1
#: Requests failing in a row without a server answer (no connection, timeouts, 5xx or 429 after their
#: retries) after which the server counts as down and the run stops: this many, or ``max_concurrency``
#: when larger (every request in flight failed).
DOWN_AFTER = 3
#: Longest server error message kept in a Generation's error.
MAX_DETAIL = 300


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a server asks to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP
    date); ``None`` when absent or unreadable."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _server_message(raw: bytes) -> str:
    """The human part of an error body (OpenAI, vLLM, TGI and Ollama shapes), shortened."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            text = str(error.get("message") or error)
        elif isinstance(error, str):
            text = error
        else:
            text = str(payload.get("message") or payload.get("detail") or payload)
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


@attrs.frozen
class _Call:
    """One prepared request: endpoint path, JSON body, whether the prefix opened a ``<think>``, and the
    prompt's answer format (which restores a stop string the server cut)."""

    path: str
    body: Mapping[str, Any]
    think_open: bool = False
    answer: AnswerFormat = FREE


@attrs.define
class _RunState:
    """Shared by the requests of one ``generate`` call: cancellation, a run-wide failure, and the
    requests that failed in a row without a server answer."""

    down_after: int = DOWN_AFTER
    stop: threading.Event = attrs.field(factory=threading.Event)
    fatal: str | None = None
    in_a_row: int = 0
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def answered(self) -> None:
        with self.lock:
            self.in_a_row = 0

    def unanswered(self, message: str) -> None:
        """A request failed for want of a working server; after ``down_after`` in a row the run stops."""
        with self.lock:
            self.in_a_row += 1
            if self.in_a_row >= self.down_after and self.fatal is None:
                self.fatal = f"the server is not answering ({self.in_a_row} requests in a row failed; last: {message})"


@attrs.define
class _Notes:
    """What request building had to leave out, warned about once per ``generate`` call."""

    dropped: set[str] = attrs.field(factory=set)
    prefix_dropped: int = 0
    over_limit: int = 0
    over_limit_sent_whole: int = 0


class _BadResponse(Exception):
    """A 200 response that is not a completion (not retried)."""


class _HTTPStatus(Exception):
    """A response with an error status: its code, headers and (start of the) body."""

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        super().__init__(f"HTTP {code}")
        self.code, self.headers, self.body = code, headers, body


class OpenAIModel:
    """A model served over an OpenAI-compatible API (the :class:`~cellscribe.core.components.LoadedModel`
    of the ``openai`` backend). Built by :meth:`OpenAIBackend.load`; see the module docstring.

    Attributes
    ----------
    model_name
        The served model name (the ``spec`` after ``openai:``).
    base_url
        The API root as shown (without credentials).
    max_concurrency, timeout, max_retries, backoff, max_backoff
        Request limits (see *Failures*).
    dialect, render
        See *Dialect* and *Rendering*.
    tokenizer
        The local tokenizer, or ``None``.
    adapters
        Modality -> served adapter name; :meth:`use_modality` switches the requested model to it.
    """

    def __init__(
        self,
        model_name: str,
        *,
        base_url: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        dialect: str | None = None,
        render: str = "server",
        tokenizer: Any = None,
        tokenizer_source: str | None = None,
        guided_choice: bool | str = False,
        extra_body: Mapping[str, Any] | None = None,
        adapters: Mapping[str, str] | None = None,
    ) -> None:
        url, basic_auth, host = _split_base_url(base_url)
        self.model_name = model_name
        self.base_url = url
        self.api_key_env = api_key_env
        if max_concurrency is None:
            max_concurrency = HOSTED_CONCURRENCY if host in STRICT_HOSTS else DEFAULT_CONCURRENCY
        self.max_concurrency = _positive_int("max_concurrency", max_concurrency)
        self.timeout = _positive_float("timeout", timeout)
        self.max_retries = _non_negative_int("max_retries", max_retries)
        self.backoff = _positive_float("backoff", backoff, allow_zero=True)
        self.max_backoff = _positive_float("max_backoff", max_backoff, allow_zero=True)
        if dialect is None:
            dialect = "openai" if host in STRICT_HOSTS else "vllm"
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be 'vllm' or 'openai', got {dialect!r} (see the openai backend docs).")
        self.dialect = dialect
        if render not in RENDERINGS:
            raise ValueError(f"render must be 'server' or 'client', got {render!r}.")
        if render == "client" and tokenizer is None:
            raise ValueError(
                "render='client' renders prompts locally and needs the served model's tokenizer: pass "
                "model_options={'tokenizer': '<local folder or hub id of the model>'}."
            )
        if render == "client" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template, so prompts cannot be rendered locally; give the "
                "tokenizer of the served chat model, or use render='server'."
            )
        self.render = render
        self.tokenizer = tokenizer
        self._tokenizer_source = tokenizer_source
        guided_choice = guided_choice or False
        if guided_choice not in (False, True, "structured_outputs", "guided_choice"):
            raise ValueError(
                f"guided_choice must be True/'structured_outputs' (vLLM >= 0.12), 'guided_choice' (older "
                f"vLLM) or False, got {guided_choice!r}."
            )
        self.guided_choice = guided_choice
        self.extra_body = dict(extra_body or {})
        clash = sorted(RESERVED_FIELDS & set(self.extra_body))
        if clash:
            raise ValueError(
                f"extra_body must not set {', '.join(clash)}: cellscribe sets them for every request."
            )
        self.adapters = dict(adapters or {})
        self._served = model_name

        # Secrets live only in the request headers and in the redaction list, never in an attribute
        # that info(), repr() or an error message shows.
        self._secrets = tuple(s for s in (api_key, basic_auth and basic_auth[1]) if s)
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"cellscribe/{__version__}",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        elif basic_auth:
            token = b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        self._headers = headers
        self._client: Any = None
        #: Requests in flight that kept the server busy, found by the first call (``_run``); ``None``
        #: until then.
        self.workers: int | None = None
        self._probed: int | None = None
        self._client_lock = threading.Lock()
        self._rng = random.Random()

    def _http(self) -> Any:
        """The ``httpx.Client`` whose pool keeps up to ``max_concurrency`` connections alive (made on
        first use; :meth:`close` closes it)."""
        with self._client_lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(
                    headers=self._headers,
                    timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=self.max_concurrency,
                                        max_keepalive_connections=self.max_concurrency),
                    follow_redirects=False,
                )
            return self._client

    def close(self) -> None:
        """Close the kept-alive connections (a later call opens new ones)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __del__(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # interpreter shutdown: nothing left to release
                pass

    def __repr__(self) -> str:
        return f"OpenAIModel(model={self.model_name!r}, base_url={self.base_url!r})"

    # -- LoadedModel protocol ---------------------------------------------------------------------

    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` by the local tokenizer (no special tokens added); ``None`` without one."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def info(self) -> dict[str, Any]:
        """What identifies the model and how it is reached (no credentials)."""
        return {
            "backend": BACKEND_NAME,
            "model": self.model_name,
            "base_url": self.base_url,
            "max_concurrency": self.max_concurrency,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "dialect": self.dialect,
            "render": self.render,
            "tokenizer": self._tokenizer_source,
            "guided_choice": self.guided_choice,
            "api_key_env": self.api_key_env,
            "authenticated": "Authorization" in self._headers,
            "adapters": dict(self.adapters),
            "served_model": self._served,
        }

    def identity(self) -> dict[str, Any]:
        """What determines the answers (a checkpoint resumes only answers of the same identity): the
        server's URL without credentials, the served model, the request dialect, the rendering and its
        tokenizer, guided choice and extra request fields; not timeouts, retries or concurrency."""
        return {
            "backend": BACKEND_NAME,
            "base_url": self.base_url,
            "model": self.model_name,
            "served_model": self._served,
            "dialect": self.dialect,
            "render": self.render,
            "tokenizer": self._tokenizer_source,
            "guided_choice": self.guided_choice,
            "extra_body": self._redact(json.dumps(self.extra_body, sort_keys=True, default=str)),
            "adapters": dict(self.adapters),
        }

    @property
    def decode_modes(self) -> tuple[str, ...]:
        """The ``decode`` values :meth:`generate` accepts with this configuration."""
        return ("generate", "constrained") if self.guided_choice else ("generate",)

    def use_modality(self, modality: str) -> None:
        """Request ``modality``'s served adapter from now on (the base model when it has none)."""
        if not self.adapters:
            return
        self._served = self.adapters.get(modality, self.model_name)
        if modality not in self.adapters:
            log.info("no adapter for modality %s: requesting the base model %s", modality, self.model_name)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        settings: Mapping[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        **options: Any,
    ) -> list[Generation]:
        """One :class:`Generation` per prompt, in prompt order; ``progress(1)`` as each one finishes.

        Requests run concurrently (at most ``max_concurrency``) and are retried as the module docstring
        says; a prompt that still fails gets ``Generation(text="", error=...)``. Invalid settings or an
        unsupported ``decode`` raise ``ValueError`` before any request is sent.
        """
        prompts = list(prompts)
        user = dict(settings or {})
        decode = user.pop("decode", None) or "generate"
        self._check_decode(decode, prompts)
        notes = _Notes()
        calls = [self._prepare(p, {**p.generation, **user}, decode, notes) for p in prompts]
        self._warn(notes, len(prompts))
        if not calls:
            return []
        t0 = time.perf_counter()
        results, fatal = self._run(calls, progress)
        failed = [g for g in results if g.error]
        if fatal is not None:
            raise ModelUnavailableError(fatal, results)
        if failed:
            log.warning("%d of %d prompts failed; first error: %s", len(failed), len(results), failed[0].error)
        warn_capped(results)
        log.info("%d prompts answered by %s in %.1f s", len(results), self.base_url, time.perf_counter() - t0)
        return results

    # -- building requests ----------------------------------------------------------------------------

    def _check_decode(self, decode: str, prompts: Sequence[Prompt]) -> None:
        if decode == "generate":
            return
        if decode == "score":
            raise ValueError(
                "decode='score' needs the model's probability of every candidate label, which the openai "
                "backend cannot compute; use a local model (transformers backend) or decode='generate'."
            )
        if decode != "constrained":
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}.")
        if not self.guided_choice:
            raise ValueError(
                "decode='constrained' is not available through the openai backend by default; use a local "
                "model (transformers backend), or on a vLLM server pass model_options={'guided_choice': "
                "True} to have the server force each answer to one candidate."
            )
        bad = sum(len(p.unit_ids) != 1 or not p.candidates for p in prompts)
        if bad:
            raise ValueError(
                f"guided choice forces a prompt's whole answer to one candidate, so it needs one-cell "
                f"prompts with candidates; {bad} of {len(prompts)} prompts are puzzles or have no "
                "candidates. Give candidates= (or a k-shot reference), or use the transformers backend "
                "for puzzles."
            )

    def _settings_fields(self, effective: Mapping[str, Any], notes: _Notes) -> tuple[dict[str, Any], int | None]:
        """Effective (transformers-named) settings -> request fields and ``max_prompt_tokens``."""
        known = OWN_KEYS | set(STANDARD_FIELDS) | set(VLLM_FIELDS)
        unknown = sorted(k for k in effective if k not in known)
        if unknown:
            raise ValueError(
                f"unsupported generation setting(s) {', '.join(unknown)} for the openai backend; it takes "
                f"{', '.join(sorted(known))}. Send other server fields with model_options={{'extra_body': "
                "{...}}."
            )
        num_beams = effective.get("num_beams")
        if num_beams is not None and int(num_beams) > 1:
            raise ValueError(
                "beam search (num_beams > 1) is not available through the OpenAI API; use the transformers "
                "backend or num_beams=1."
            )
        greedy = effective.get("do_sample") is False
        fields: dict[str, Any] = {}
        for key, name in STANDARD_FIELDS.items():
            if effective.get(key) is not None and not (greedy and key in SAMPLING_KEYS):
                fields[name] = effective[key]
        if "stop" in fields:  # a string is one stop; an empty one (--generation stop_strings=) none
            stops = [fields["stop"]] if isinstance(fields["stop"], str) else list(fields["stop"])
            fields["stop"] = [str(v) for v in stops if v]
            if not fields["stop"]:
                del fields["stop"]
        for key, name in VLLM_FIELDS.items():
            value = effective.get(key)
            if value is None or (greedy and key in SAMPLING_KEYS):
                continue
            if self.dialect == "vllm":
                fields[name] = value
            elif value not in NEUTRAL[key]:
                notes.dropped.add(key)
        if greedy:
            fields["temperature"] = 0
        if effective.get("max_new_tokens") is not None:
            max_name = "max_tokens" if self.dialect == "vllm" else "max_completion_tokens"
            fields[max_name] = int(effective["max_new_tokens"])
        max_prompt_tokens = effective.get("max_prompt_tokens")
        if max_prompt_tokens is not None and int(max_prompt_tokens) < 1:
            raise ValueError(f"max_prompt_tokens must be a positive integer, got {max_prompt_tokens!r}.")
        return fields, None if max_prompt_tokens is None else int(max_prompt_tokens)

    def _prepare(self, prompt: Prompt, effective: Mapping[str, Any], decode: str, notes: _Notes) -> _Call:
        """The request for one prompt (see *Rendering* in the module docstring)."""
        fields, max_prompt_tokens = self._settings_fields(effective, notes)
        body: dict[str, Any] = {"model": self._served}
        rendered: str | None = None
        think_open = False
        if self.render == "client":
            rendered = prompt.render(self.tokenizer.apply_chat_template)
            path = "/completions"
            body["prompt"] = rendered
            if self.dialect == "vllm":
                body["add_special_tokens"] = False
        else:
            path = "/chat/completions"
            messages = []
            for message in prompt.messages:
                message = dict(message)
                for token in prompt.remove_from_rendered:
                    message["content"] = message["content"].replace(token, "")
                messages.append(message)
            if prompt.response_prefix:
                if self.dialect == "vllm":
                    messages.append({"role": "assistant", "content": prompt.response_prefix})
                    body["continue_final_message"] = True
                    body["add_generation_prompt"] = False
                    think_open = opens_think(prompt.response_prefix)
                else:
                    notes.prefix_dropped += 1
            body["messages"] = messages
        if max_prompt_tokens is not None and self.tokenizer is not None:
            if rendered is None:
                rendered = prompt.render(self.tokenizer.apply_chat_template)
            if self.count_tokens(rendered) > max_prompt_tokens:
                notes.over_limit += 1
                if self.dialect == "vllm":
                    body["truncate_prompt_tokens"] = max_prompt_tokens
                else:
                    notes.over_limit_sent_whole += 1
        body.update(fields)
        if decode == "constrained":
            choices = list(prompt.candidates)
            if self.guided_choice == "guided_choice":
                body["guided_choice"] = choices
            else:
                body["structured_outputs"] = {"choice": choices}
        body.update(self.extra_body)
        return _Call(path, body, think_open, prompt.answer)

    def _warn(self, notes: _Notes, n: int) -> None:
        if notes.dropped:
            warnings.warn(
                f"the openai dialect cannot send {', '.join(sorted(notes.dropped))}: these settings were "
                "left out. Use dialect='vllm' for a server that understands them.",
                UserWarning,
                stacklevel=3,
            )
        if notes.prefix_dropped:
            warnings.warn(
                "the openai dialect cannot prefill the answer, so the prompts' response prefix (CellReasoner "
                "reasoning mode's '<think> ') was left out; on a vLLM or SGLang server use dialect='vllm', or "
                "render='client' with the model's tokenizer for the exact published input.",
                UserWarning,
                stacklevel=3,
            )
        if notes.over_limit:
            action = (
                "sent whole (the openai dialect cannot truncate; the server may reject them)"
                if notes.over_limit_sent_whole
                else "truncated by the server to their last max_prompt_tokens tokens"
            )
            warnings.warn(
                f"{notes.over_limit} of {n} prompts are longer than max_prompt_tokens and were {action}; use "
                "shorter cell sentences or raise max_prompt_tokens.",
                UserWarning,
                stacklevel=3,
            )

    # -- sending ----------------------------------------------------------------------------------------

    def _run(self, calls: Sequence[_Call], progress: Callable[[int], None] | None) -> tuple[list[Generation], str | None]:
        """Send ``calls`` with at most ``max_concurrency`` in flight; results in call order, and the
        run-wide failure that stopped them (``None`` when none did).

        Requests are sent by worker threads that take the next call when theirs is answered. How many
        work is found by probing: :data:`INITIAL_WORKERS` to start with, then twice as many while that
        raises the answers per second by :data:`PROBE_GAIN` or more, up to ``max_concurrency`` (a server
        that batches, such as vLLM, answers more the more it is sent at once). Where doubling gains
        nothing (a server that answers at once, a client short of CPU) the workers go back to the
        number before, whose thread switching costs less client CPU. The number found is kept for the
        model's next calls (:attr:`workers`).
        """
        state = _RunState(down_after=max(DOWN_AFTER, self.max_concurrency))
        results: list[Generation | None] = [None] * len(calls)
        limit = min(self.max_concurrency, len(calls))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=limit, thread_name_prefix="cellscribe-openai")
        pending = iter(range(len(calls)))
        done: queue.SimpleQueue[tuple[int, Generation]] = queue.SimpleQueue()
        lock = threading.Lock()
        active = 0
        target = min(self.workers or self._probed or INITIAL_WORKERS, limit)

        def start() -> None:
            nonlocal active
            with lock:
                n = max(target - active, 0)
                active += n
            for _ in range(n):
                pool.submit(work)

        def work() -> None:
            nonlocal active
            while not state.stop.is_set():
                with lock:
                    i = None if active > target else next(pending, None)
                    if i is None:
                        active -= 1
                        return
                try:
                    generation = self._send(calls[i], state)
                except Exception as exc:  # a bug in one request costs that prompt, never the run
                    generation = Generation(text="", error=self._redact(_describe(exc)))
                done.put((i, generation))

        probing = self.workers is None and target < limit
        window_start, window_done, last_rate = time.perf_counter(), 0, 0.0
        try:
            start()
            for n_done in range(1, len(calls) + 1):
                i, generation = done.get()
                results[i] = generation
                if progress is not None:
                    progress(1)
                window_done += 1
                window = max(PROBE_WINDOW, 4 * target)
                if probing and window_done >= window and len(calls) - n_done > window:
                    now = time.perf_counter()
                    rate = window_done / max(now - window_start, 1e-9)
                    if last_rate and rate < PROBE_GAIN * last_rate:
                        target, probing = target // 2, False  # doubling gained nothing: back
                    elif target < limit:
                        target, last_rate = min(2 * target, limit), rate
                        start()
                    else:
                        probing = False
                    window_start, window_done = now, 0
        except BaseException:
            # Interrupted (Ctrl-C): stop retrying and drop what was not started; requests in flight end
            # at their timeout.
            state.stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        if self.workers is None:
            if probing:  # the call ended first: the next one goes on from here
                self._probed = target
            elif len(calls) >= limit:
                self.workers = target
                log.info("openai backend: %d requests in flight keep %s busy", target, self.base_url)
        return results, state.fatal  # type: ignore[return-value]

    def _send(self, call: _Call, state: _RunState) -> Generation:
        """One prompt's request with retries; always returns a Generation (see *Failures*)."""
        url = self.base_url + call.path
        attempt = 0
        while True:
            if state.fatal is not None:
                return Generation(text="", error=state.fatal)
            if state.stop.is_set():
                return Generation(text="", error="cancelled")
            retry_after = None
            status = None
            import httpx

            try:
                generation = self._parse(self._post(url, call.body), call)
                state.answered()
                return generation
            except _HTTPStatus as exc:
                status = exc.code
                retry_after = retry_after_seconds(exc.headers)
                message = self._http_error(exc, url, call)
                kind = "server" if status in RETRY_STATUSES or status >= 500 else "request"
            except _BadResponse as exc:
                message, kind = self._redact(f"unexpected response from {url}: {exc}"), "request"
            except (httpx.TimeoutException, TimeoutError):
                message, kind = f"no response from {url} within {self.timeout:g} s", "timeout"
            except httpx.ConnectError as exc:
                message, kind = self._redact(f"cannot reach {url}: {exc}"), "connection"
            except (httpx.TransportError, OSError) as exc:
                # Lost mid-answer (a server that closed the connection, a reset), or a kept-alive
                # connection the server had closed: a new connection is tried.
                message, kind = self._redact(f"connection to {url} failed: {_describe(exc)}"), "connection"
            limit = {"server": self.max_retries, "timeout": min(TIMEOUT_RETRIES, self.max_retries),
                     "connection": min(CONNECT_RETRIES, self.max_retries)}.get(kind, 0)
            if attempt >= limit:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                if status in FATAL_STATUSES:
                    state.fatal = message
                elif kind != "request":
                    state.unanswered(message + tries)
                log.info("request failed%s: %s", tries, message)
                return Generation(text="", error=message + tries)
            delay = self._delay(attempt, retry_after)
            log.info("%s; retry %d of %d in %.2f s", message, attempt + 1, limit, delay)
            if state.stop.wait(delay):
                return Generation(text="", error="cancelled")
            attempt += 1

    def _post(self, url: str, body: Mapping[str, Any]) -> Any:
        """POST ``body`` as JSON on a kept-alive connection; the parsed JSON answer. Raises
        :class:`_HTTPStatus` for an error status, :class:`_BadResponse` for a 200 that is not JSON and
        httpx's errors for the transport."""
        response = self._http().post(url, content=json.dumps(body).encode("utf-8"))
        raw = response.content
        if response.status_code >= 400:
            raise _HTTPStatus(response.status_code, response.headers, raw[:MAX_ERROR_BODY])
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _BadResponse(f"not JSON ({_server_message(raw)!r})") from exc

    def _parse(self, payload: Any, call: _Call) -> Generation:
        """A completion response -> Generation (text without the prompt and its prefix, token counts)."""
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise _BadResponse(f"no choices in {_server_message(json.dumps(payload).encode())!r}")
        choice = choices[0]
        if call.path == "/completions":
            text = choice.get("text") or ""
        else:
            message = choice.get("message") or {}
            text = message.get("content") or ""
            # Servers started with a reasoning parser return the reasoning apart; put it back in
            # <think> tags so decoders see one text, as from a local run.
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if reasoning:
                text = with_reasoning(reasoning, text, think_open=call.think_open)
        reason = choice.get("finish_reason")
        if reason not in (FINISH_STOP, FINISH_LENGTH):
            reason = None if reason is None else str(reason)
        if reason == FINISH_STOP:
            # vLLM names the stop string that ended the answer (``stop_reason``); other servers do not,
            # and the answer format restores what it needs.
            matched = choice.get("stop_reason")
            stops = call.body.get("stop") or ()
            if isinstance(matched, str) and matched in stops and not text.endswith(matched):
                text += matched
            else:
                text = call.answer.restore_stop(text)
        usage = payload.get("usage") or {}
        return Generation(
            text=text,
            n_prompt_tokens=usage.get("prompt_tokens"),
            n_output_tokens=usage.get("completion_tokens"),
            finish_reason=reason,
        )

    def _http_error(self, exc: _HTTPStatus, url: str, call: _Call) -> str:
        detail = _server_message(exc.body) if exc.body else ""
        message = f"HTTP {exc.code} from {url}" + (f": {detail}" if detail else "")
        if exc.code in (401, 403):
            where = f"the environment variable {self.api_key_env}" if self.api_key_env else "api_key_env"
            message += f" (check the API key in {where})"
        elif exc.code == 404:
            message += (
                f" (check base_url, the API root such as http://host:8000/v1, and the model name "
                f"{call.body.get('model')!r}; GET {self.base_url}/models lists what the server serves)"
            )
        elif exc.code == 400 and call.body.get("continue_final_message"):
            message += " (if the server cannot continue an assistant message, use dialect='openai')"
        return self._redact(message)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        ceiling = min(self.backoff * 2**attempt, self.max_backoff)
        # "Equal jitter": at least half the exponential delay, so retries spread without collapsing.
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (an int, an integral float or such a string)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _positive_int(name: str, value: Any) -> int:
    number = _whole_number(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return number


def _non_negative_int(name: str, value: Any) -> int:
    number = _whole_number(value)
    if number is None or number < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    return number


def _positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")
    return number


def _split_base_url(base_url: str) -> tuple[str, tuple[str, str] | None, str]:
    """``base_url`` -> (URL without credentials or trailing slash, (user, password) or None, host)."""
    parts = urllib.parse.urlsplit(str(base_url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"base_url must be an http(s) URL of the API root, like http://localhost:8000/v1; got "
            f"{_without_credentials(parts)!r}."
        )
    path = parts.path.rstrip("/")
    for endpoint in ("/chat/completions", "/completions"):
        if path.endswith(endpoint):
            raise ValueError(
                f"base_url is the API root, not an endpoint: drop {endpoint!r} (use "
                f"{_without_credentials(parts._replace(path=path[: -len(endpoint)]))!r})."
            )
    basic = (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))
    shown = _without_credentials(parts._replace(path=path, query="", fragment=""))
    return shown, basic if parts.username else None, parts.hostname


def _without_credentials(parts: urllib.parse.SplitResult) -> str:
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _load_tokenizer(tokenizer: Any, trust_remote_code: bool) -> tuple[Any, str | None]:
    """A tokenizer object from a path/hub id (loaded with AutoTokenizer) or as given; and its source."""
    if tokenizer is None:
        return None, None
    if not isinstance(tokenizer, (str, os.PathLike)):
        if not callable(getattr(tokenizer, "apply_chat_template", None)):
            raise ValueError(
                "tokenizer must be a local folder, a hub id or a transformers tokenizer object, got "
                f"{type(tokenizer).__name__}."
            )
        return tokenizer, type(tokenizer).__name__
    from transformers import AutoTokenizer

    source = str(tokenizer)
    try:
        loaded = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load the tokenizer {source!r} ({exc}); give a local folder or hub id of the served "
            "model's tokenizer."
        ) from exc
    return loaded, source


class OpenAIBackend:
    """Loads models served over an OpenAI-compatible HTTP API (the
    :class:`~cellscribe.core.components.Backend` named ``"openai"``)."""

    name = BACKEND_NAME
    description = (
        "models behind an OpenAI-compatible HTTP API (vLLM, SGLang, TGI, Ollama, hosted): "
        "model='openai:<served name>', concurrent requests with retries"
    )
    #: The keyword arguments of :meth:`load` (to spot misspelled model options).
    OPTIONS = (
        "base_url", "api_key_env", "max_concurrency", "timeout", "max_retries", "backoff", "max_backoff",
        "dialect", "render", "tokenizer", "guided_choice", "extra_body",
    )

    def rates(self, spec: str, *, model_options: Mapping[str, Any] | None = None, **_: Any) -> Mapping[str, Any]:
        """For a cost estimate: the documented GPU assumption
        (:func:`~cellscribe.core.run.estimate.assumed_gpu_rates`) for a server running a 7B model on one
        H100 with ``max_concurrency`` requests in flight (a server's size and hardware are not known
        here; ``--rate`` gives the real figures). Nothing is sent."""
        from cellscribe.core.run.estimate import assumed_gpu_rates

        concurrency = int((model_options or {}).get("max_concurrency") or 8)
        return assumed_gpu_rates(None, concurrency=concurrency,
                                 what=f"the server ({concurrency} requests in flight)").as_dict()

    def handles(self, spec: str) -> bool:
        """True for ``"openai:<name>"``."""
        return isinstance(spec, str) and spec.startswith(SPEC_PREFIX)

    def load(
        self,
        spec: str,
        *,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        dialect: str | None = None,
        render: str = "server",
        tokenizer: Any = None,
        guided_choice: bool | str = False,
        extra_body: Mapping[str, Any] | None = None,
        adapters: Mapping[str, str] | None = None,
        hook: Any = None,
        tissue: str | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        dtype: Any = None,
        trust_remote_code: bool = False,
        **options: Any,
    ) -> OpenAIModel:
        """Connect to a served model; nothing is sent until :meth:`OpenAIModel.generate`.

        Parameters
        ----------
        spec
            ``"openai:<name>"``: ``<name>`` is the model name the server expects (``vllm serve``'s model
            or ``--served-model-name``, an Ollama tag like ``llama3.1:8b``, a hosted model id).
        base_url
            API root; default from ``CELLSCRIBE_OPENAI_BASE_URL``, ``OPENAI_BASE_URL``, else OpenAI's.
            Credentials in it (``https://user:pass@host/v1``) are sent as basic auth when there is no
            API key, and never shown.
        api_key_env
            Name of the environment variable holding the API key (may be unset for local servers;
            ``None`` sends no key).
        max_concurrency
            Requests in flight at once, each on its own kept-alive connection (default
            :data:`DEFAULT_CONCURRENCY`, 64; :data:`HOSTED_CONCURRENCY`, 8, for ``api.openai.com``).
        timeout
            Seconds to wait for a server's answer before the attempt counts as failed.
        max_retries, backoff, max_backoff
            Retries of a failed request and their delays (module docstring, *Failures*).
        dialect
            ``"vllm"`` or ``"openai"``: which request fields to send (default by host).
        render
            ``"server"`` (chat messages) or ``"client"`` (render locally, ``/completions``).
        tokenizer
            The served model's tokenizer (folder, hub id or tokenizer object) for ``render="client"``,
            ``count_tokens`` and ``max_prompt_tokens``.
        guided_choice
            Serve ``decode="constrained"`` with vLLM's guided choice (``True``, ``"structured_outputs"``
            or ``"guided_choice"``).
        extra_body
            Fields added to every request.
        adapters
            Modality -> the name under which the server serves that LoRA adapter (vLLM
            ``--lora-modules NAME=PATH``); files cannot be loaded into a server from here.
        hook, tissue, batch_size
            Ignored (concurrency, not batches, sets the pace).
        device, dtype
            Not applicable (the server decides); a warning is given when set.
        trust_remote_code
            Passed to ``AutoTokenizer`` when loading ``tokenizer``.

        Raises ``ValueError`` for an empty model name, a bad URL or option, an API key passed as an
        option, a missing key for api.openai.com, or an adapter given as a local path.
        """
        if not self.handles(spec) or not spec[len(SPEC_PREFIX) :].strip():
            raise ValueError(
                f"model {spec!r}: give the served model name after the prefix, like 'openai:gpt-4o-mini' or "
                "'openai:Qwen/Qwen2.5-7B-Instruct'."
            )
        if "api_key" in options:
            raise ValueError(
                "do not pass api_key as a model option (model options are recorded in the run parameters); "
                "put the key in an environment variable and name it with api_key_env (default "
                "OPENAI_API_KEY)."
            )
        ignored = sorted(k for k in options if difflib.get_close_matches(k, self.OPTIONS, n=1, cutoff=0.8))
        if ignored:
            hints = ", ".join(f"{k!r} (did you mean {difflib.get_close_matches(k, self.OPTIONS, 1, 0.8)[0]!r}?)"
                              for k in ignored)
            warnings.warn(f"unknown openai backend option(s) ignored: {hints}", UserWarning, stacklevel=2)
        if device is not None or dtype is not None:
            warnings.warn(
                "device and dtype do not apply to the openai backend (the server decides); ignored.",
                UserWarning,
                stacklevel=2,
            )
        model_name = spec[len(SPEC_PREFIX) :].strip()
        if base_url is None:
            base_url = next((os.environ[e] for e in BASE_URL_ENVS if os.environ.get(e)), DEFAULT_BASE_URL)
        api_key = (os.environ.get(api_key_env, "").strip() or None) if api_key_env else None
        host = urllib.parse.urlsplit(str(base_url).strip()).hostname
        if api_key is None and host in STRICT_HOSTS:
            raise ValueError(
                f"{host} needs an API key: set the environment variable {api_key_env or 'OPENAI_API_KEY'} "
                "(or name another one with api_key_env), or point base_url at your own server."
            )
        served_adapters = {str(m): str(a) for m, a in (adapters or {}).items()}
        for modality, adapter in served_adapters.items():
            if Path(adapter).expanduser().exists():
                raise ValueError(
                    f"adapter {adapter!r} is a local path, and the openai backend cannot load weights into a "
                    f"server. Serve it (vLLM: --enable-lora --lora-modules {modality}={adapter}) and give its "
                    f"served name ({modality!r}) as the adapter."
                )
        loaded_tokenizer, source = _load_tokenizer(tokenizer, trust_remote_code)
        model = OpenAIModel(
            model_name,
            base_url=base_url,
            api_key=api_key,
            api_key_env=api_key_env,
            max_concurrency=max_concurrency,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            dialect=dialect,
            render=render,
            tokenizer=loaded_tokenizer,
            tokenizer_source=source,
            guided_choice=guided_choice,
            extra_body=extra_body,
            adapters=served_adapters,
        )
        log.info(
            "openai backend: model %s at %s (%s dialect, %s rendering, up to %d requests at once)",
            model_name, model.base_url, model.dialect, model.render, model.max_concurrency,
        )
        return model
