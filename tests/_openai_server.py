"""A small OpenAI-compatible HTTP server for tests, run in a thread on 127.0.0.1 on a free port.

It answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` with the text an ``answer``
function gives for the request body, records every request (path, headers, JSON body), counts the
requests in flight, and can be told to misbehave for the next requests (an HTTP error with or without
``Retry-After``, a stall longer than the client's timeout, a 200 that is not JSON, a connection closed
without an answer) or to die after a number of answers (:meth:`OpenAIServer.kill_after`; a new server on
the same ``port`` is the server back). It is bounded: it shuts itself down after ``lifetime`` seconds,
and every sleep it does ends as soon as it is closed.

Usage::

    with OpenAIServer(answer=lambda body: "beta") as server:
        server.fail(429, retry_after="1")
        ... # point the backend at server.base_url
        assert server.requests[0].body["model"] == "tiny"
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs


@attrs.frozen
class Received:
    """One request as the server read it (header names lower-cased)."""

    path: str
    headers: Mapping[str, str]
    body: Any


@attrs.frozen
class _Action:
    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)
    error: str = ""
    stall: float = 0.0
    raw: bytes | None = None  # a 200 with this body instead of a completion
    drop: bool = False  # close the connection without answering


def user_text(body: Mapping[str, Any]) -> str:
    """The last user message of a chat request, or the prompt of a completions request."""
    if "messages" in body:
        return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    return body["prompt"]


class OpenAIServer:
    """An OpenAI-compatible server for tests (see the module docstring).

    Parameters
    ----------
    answer
        ``answer(body)``: the completion text for a request body (default: ``"beta"``), or a chat
        message mapping (``{"content": ..., "reasoning_content": ...}``) for servers that return the
        reasoning apart; a ``"finish_reason"`` key in that mapping replaces the default ``"stop"``, and ``"stop_reason"`` (vLLM: the
        stop string that ended the answer) is sent as given.
    delay
        Seconds every answer takes, or ``delay(body) -> seconds``.
    api_key
        When given, requests without ``Authorization: Bearer <api_key>`` get a 401 whose message
        repeats the header they sent (as some hosted APIs do), to check clients redact it.
    lifetime
        Seconds after which the server closes itself.
    port
        The port to listen on (default: a free one); a closed server's port gives "the server is back".
    """

    def __init__(
        self,
        answer: Callable[[Mapping[str, Any]], str] | None = None,
        *,
        delay: float | Callable[[Mapping[str, Any]], float] = 0.0,
        api_key: str | None = None,
        lifetime: float = 120.0,
        port: int = 0,
    ) -> None:
        self.answer = answer or (lambda body: "beta")
        self.delay = delay
        self.api_key = api_key
        self.requests: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered = 0
        #: TCP connections the server accepted (fewer than requests when clients keep them alive).
        self.connections = 0
        self._kill_after: int | None = None
        self._script: collections.deque[_Action] = collections.deque()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._timer = threading.Timer(lifetime, self.close)
        self._timer.daemon = True

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def start(self) -> OpenAIServer:
        self._thread.start()
        self._timer.start()
        return self

    def close(self) -> None:
        """Stop serving (idempotent); sleeping handlers wake up and return at once."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- scripting ---------------------------------------------------------------------------------

    def fail(self, status: int, *, times: int = 1, retry_after: str | None = None, message: str = "") -> None:
        """Answer the next ``times`` requests with HTTP ``status`` (and a ``Retry-After`` header)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._script.extend([_Action(status, headers, message or f"scripted {status}")] * times)

    def stall(self, seconds: float, *, times: int = 1) -> None:
        """Make the next ``times`` requests wait ``seconds`` before answering."""
        with self._lock:
            self._script.extend([_Action(stall=seconds)] * times)

    def garbage(self, body: bytes = b"<html><body>502 Bad Gateway</body></html>", *, times: int = 1) -> None:
        """Answer the next ``times`` requests with HTTP 200 and ``body`` (not a JSON completion)."""
        with self._lock:
            self._script.extend([_Action(raw=body)] * times)

    def drop(self, *, times: int = 1) -> None:
        """Close the connection of the next ``times`` requests without answering (a crashing worker)."""
        with self._lock:
            self._script.extend([_Action(drop=True)] * times)

    def kill_after(self, answers: int) -> None:
        """Die (stop listening: later requests find no server) once ``answers`` requests were answered;
        requests in flight then lose their connection."""
        with self._lock:
            self._kill_after = answers

    # -- serving -------------------------------------------------------------------------------------

    def _next_action(self) -> _Action:
        with self._lock:
            return self._script.popleft() if self._script else _Action()

    def _enter(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._closed.wait(seconds)

    def _respond(self, path: str, headers: Mapping[str, str], body: Any) -> tuple[int, dict[str, str], Any]:
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return 404, {}, {"error": {"message": f"no route {path}", "type": "not_found"}}
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            sent = headers.get("authorization", "")
            return 401, {}, {"error": {"message": f"Incorrect API key provided: {sent}", "type": "auth"}}
        action = self._next_action()
        if action.drop:
            return -1, {}, None
        if action.raw is not None:
            return 200, {}, action.raw
        if action.status != 200:
            return action.status, dict(action.headers), {"error": {"message": action.error, "code": action.status}}
        with self._lock:
            dying = self._kill_after is not None and self.answered >= self._kill_after
        if dying:
            threading.Thread(target=self.close, daemon=True).start()
            return -1, {}, None
        self._sleep(action.stall)
        self._sleep(self.delay(body) if callable(self.delay) else self.delay)
        answer = self.answer(body)
        message = dict(answer) if isinstance(answer, Mapping) else {"content": answer}
        finish_reason = message.pop("finish_reason", "stop")
        stop_reason = message.pop("stop_reason", None)
        text = message["content"]
        usage = {
            "prompt_tokens": len(json.dumps(body.get("messages", body.get("prompt"))).split()),
            "completion_tokens": len(text.split()),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason,
                      "stop_reason": stop_reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "stop_reason": stop_reason}
            kind = "text_completion"
        reply = {"id": f"test-{len(self.requests)}", "object": kind, "model": body.get("model"),
                 "choices": [choice], "usage": usage}
        with self._lock:
            self.answered += 1
        return 200, {}, reply


class _Server(ThreadingHTTPServer):
    # A listen backlog like a production server's (uvicorn: 2048) instead of socketserver's 5: clients
    # that open many connections at once are not dropped and retried by the kernel a second later.
    request_queue_size = 1024


def _handler_for(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 (every answer carries its Content-Length): clients may keep connections alive, as
        # with vLLM's server. Headers and body go out at once, not after a delayed ACK.
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def setup(self) -> None:
            with server._lock:
                server.connections += 1
            super().setup()

        def do_POST(self) -> None:
            if server.closed:  # a kept-alive connection to a server that is gone: no answer
                self._send(-1, {}, None)
                return
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send(400, {}, {"error": {"message": "invalid JSON"}})
                return
            server._enter(Received(self.path, headers, body))
            try:
                reply = server._respond(self.path, headers, body)
            finally:
                # Counted as finished before the reply goes out: once the client has the answer it may
                # send its next request at once, and must not find this one still counted.
                server._leave()
            self._send(*reply)

        def _send(self, status: int, headers: Mapping[str, str], payload: Any) -> None:
            if status < 0:  # no answer: the connection is closed under the client
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

    return Handler
