"""The ``openai`` backend plugin: models served over an OpenAI-compatible HTTP API.

Registers the backend ``openai`` (:class:`~.backend.OpenAIBackend`), used with
``model="openai:<served model name>"``: vLLM, SGLang, TGI and Ollama servers, and hosted APIs, for
when one machine is not enough. Requests go out concurrently (bounded), with retries and backoff on
rate limits and server errors; the API key comes from an environment variable and is never logged.
See :mod:`.backend` for the options, how CellReasoner's prompt edits are sent, and how settings map.

HTTP goes through ``httpx`` (a pool of kept-alive connections per model); ``transformers`` is imported
only when a local tokenizer is asked for.
"""

from __future__ import annotations

from cellscribe import hookimpl

from .backend import BACKEND_NAME, OpenAIBackend, OpenAIModel, retry_after_seconds

__all__ = ["BACKEND_NAME", "OpenAIBackend", "OpenAIModel", "retry_after_seconds", "cellscribe_register_backends"]


@hookimpl(trylast=True)
def cellscribe_register_backends(register) -> None:
    register(OpenAIBackend())
