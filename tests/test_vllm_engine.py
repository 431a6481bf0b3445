"""vLLM as a tested serving engine: its OpenAI-compatible server on the real small model, on CPU.

Starts ``python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32`` from the separate
environment ``scripts/vllm_env.sh`` makes (``$CELLSCRIBE_VLLM_VENV``, default
``~/.cache/cellscribe/venv-vllm``) on the model ``scripts/build_real_model.py`` builds, and runs
``cellscribe annotate --model openai:smollm2 --base-url ...`` against it:

- the prompt the server renders from the chat messages cellscribe sends is, token for token, the
  prompt the local transformers backend renders (vLLM's ``/tokenize`` applies the served chat template
  to the very messages sent, recorded by a proxy), in direct and reasoning mode (the ``<think> `` prefix
  sent as an assistant message to continue);
- zero-shot under greedy decoding gives the local backend's outputs, with server and client rendering;
- a Cell-o1 puzzle runs; an answer without ``<answer>`` leaves its cells unresolved with a note;
- candidates through the server's structured outputs (``guided_choice``): 100% legal labels;
- candidate scoring: the openai backend refuses ``decode="score"``; the server does offer prompt
  log-probabilities, checked against the local model, for the backend to use later.

Skipped when that environment (or vLLM in it) is absent; slow: vLLM starts in ~2-10 minutes on two
busy cores (``$CELLSCRIBE_VLLM_START_TIMEOUT``, default 1500 s). ``$CELLSCRIBE_VLLM_BASE_URL``
(``http://127.0.0.1:8000/v1``, served name ``smollm2``) uses a server you started instead. Not run by
``.ci/run``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _real_model  # noqa: E402

from cellscribe.core.run.record import read_sidecar  # noqa: E402

import cellscribe as cs  # noqa: E402

pytestmark = pytest.mark.slow

SERVED = "smollm2"
N_CELLS = 4
GREEDY = {"do_sample": False, "max_new_tokens": 16}
CANDIDATES = ["B cell", "natural killer cell", "CD14-positive monocyte", "plasmacytoid dendritic cell",
              "CD8-positive, alpha-beta cytotoxic T cell"]


def vllm_python() -> Path:
    venv = Path(os.environ.get("CELLSCRIBE_VLLM_VENV")
                or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cellscribe" / "venv-vllm")
    python = venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vLLM environment at {venv}: make it with scripts/vllm_env.sh")
    found = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                           capture_output=True, text=True)
    if found.stdout.strip() != "True":
        pytest.skip(f"vLLM is not installed in {venv}: run scripts/vllm_env.sh")
    return python


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url: str, body: dict, timeout: float = 300.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return _real_model.real_model_dir()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The API root of a vLLM server on the real model (started here, or ``$CELLSCRIBE_VLLM_BASE_URL``)."""
    given = os.environ.get("CELLSCRIBE_VLLM_BASE_URL")
    if given:
        yield given.rstrip("/")
        return
    python = vllm_python()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--dtype", "float32", "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "4096", "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    timeout = float(os.environ.get("CELLSCRIBE_VLLM_START_TIMEOUT", "1500"))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode} while starting:\n{_tail(log_path)}")
            try:
                if any(m["id"] == SERVED for m in _get(f"{base}/models")["data"]):
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() - started > timeout:
                pytest.fail(f"vLLM did not answer /v1/models within {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(5)
        print(f"vLLM ready in {time.monotonic() - started:.0f} s at {base}")
        yield base
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


class RecordingProxy:
    """Forwards every request to ``upstream`` (the API root) and keeps each POST body (path, JSON)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.bodies: list[tuple[str, dict]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.removeprefix("/v1")
                proxy.bodies.append((path, json.loads(raw)))
                request = urllib.request.Request(proxy.upstream + path, data=raw, method="POST",
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=600) as response:
                        status, data = response.status, response.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="module")
def pbmc_file(tmp_path_factory) -> Path:
    import scanpy as sc

    path = tmp_path_factory.mktemp("pbmc") / "pbmc.h5ad"
    sc.datasets.pbmc68k_reduced()[:N_CELLS].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def local_model(model_dir):
    return cs.load_model(str(model_dir))


def _local_run(local_model, pbmc_file, **kw):
    """The local transformers backend on the same cells: (adata, the Prompt objects it was asked)."""
    import anndata as ad

    adata = ad.read_h5ad(pbmc_file)
    with _real_model.recording(local_model.loaded) as prompts:
        cs.tl.annotate(adata, model=local_model, use_raw=True, sidecar=False, progress=False, **kw)
    return adata, prompts


def _cli(pbmc_file: Path, out: Path, base_url: str, *args: str):
    """``cellscribe annotate --model openai:smollm2 --base-url ...``; the annotated AnnData and sidecar."""
    import anndata as ad
    from click.testing import CliRunner

    from cellscribe.cli import main

    result = CliRunner().invoke(main, [
        "annotate", str(pbmc_file), "-o", str(out), "--model", f"openai:{SERVED}", "--base-url", base_url,
        "--use-raw", "--no-progress", "--force", *args,
    ])
    assert result.exit_code == 0, result.output
    sidecar = read_sidecar(str(out) + ".cellscribe.jsonl.gz")
    return ad.read_h5ad(out), sidecar


def _greedy_args(settings=GREEDY):
    return [a for k, v in settings.items() for a in ("--generation", f"{k}={json.dumps(v)}")]


def _root(base_url: str) -> str:
    return base_url.removesuffix("/v1")


@pytest.mark.parametrize("mode", ["direct", "reasoning"])
def test_the_server_renders_the_local_prompt(server, local_model, pbmc_file, tmp_path, mode):
    settings = {"do_sample": False, "max_new_tokens": 4}
    with RecordingProxy(server) as proxy:
        _cli(pbmc_file, tmp_path / "out.h5ad", proxy.base_url, "--mode", mode, *_greedy_args(settings))
    _, prompts = _local_run(local_model, pbmc_file, mode=mode, generation=settings)
    loaded = local_model.loaded
    local = {p.sentences[0]: loaded.tokenizer(loaded.render(p), add_special_tokens=False)["input_ids"]
             for p in prompts}
    sent = [body for path, body in proxy.bodies if path == "/chat/completions"]
    assert len(sent) == N_CELLS
    for body in sent:
        # vLLM's /tokenize applies the served chat template to exactly the request's messages and flags.
        request = {k: body[k] for k in ("messages", "add_generation_prompt", "continue_final_message") if k in body}
        served = _post(f"{_root(server)}/tokenize", {"model": SERVED, **request})["tokens"]
        query = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        assert served == local[query], loaded.tokenizer.decode(served)
        if mode == "reasoning":
            assert body["messages"][-1] == {"role": "assistant", "content": "<think> "}


def test_zero_shot_greedy_matches_the_local_backend(server, local_model, pbmc_file, model_dir, tmp_path):
    local, _ = _local_run(local_model, pbmc_file, generation=GREEDY)
    served, sidecar = _cli(pbmc_file, tmp_path / "server.h5ad", server, *_greedy_args())
    client, _ = _cli(pbmc_file, tmp_path / "client.h5ad", server, *_greedy_args(),
                     "--model-option", "render=client", "--model-option", f"tokenizer={model_dir}")
    expected = local.obs["cellscribe"].astype(object).tolist()
    assert served.obs["cellscribe"].astype(object).tolist() == expected
    assert client.obs["cellscribe"].astype(object).tolist() == expected
    assert all(r["output"] and r["n_output_tokens"] == GREEDY["max_new_tokens"] for r in sidecar)
    assert served.uns["cellscribe"]["params"]["model_info"]["backend"] == "openai"


def test_puzzle_without_an_answer_tag_is_unresolved_with_a_note(server, pbmc_file, tmp_path):
    adata, sidecar = _cli(pbmc_file, tmp_path / "puzzle.h5ad", server, "--prompt", "puzzle",
                          *[a for c in CANDIDATES[:N_CELLS] for a in ("--candidate", c)],
                          *_greedy_args({"do_sample": False, "max_new_tokens": 48}))
    assert len(sidecar) == 1 and len(sidecar[0]["unit_ids"]) == N_CELLS and sidecar[0]["output"]
    obs = adata.obs
    ok = obs["cellscribe_status"] == "ok"
    assert set(obs.loc[ok, "cellscribe"].astype(str)) <= set(CANDIDATES)
    assert (obs.loc[~ok, "cellscribe_note"].str.len() > 0).all()


def test_guided_choice_gives_only_candidates(server, pbmc_file, tmp_path):
    adata, sidecar = _cli(pbmc_file, tmp_path / "guided.h5ad", server, "--decode", "constrained",
                          "--model-option", "guided_choice=true",
                          *[a for c in CANDIDATES for a in ("--candidate", c)], *_greedy_args())
    assert (adata.obs["cellscribe_status"] == "ok").all()
    assert adata.obs["cellscribe"].astype(str).isin(CANDIDATES).all()
    assert all(r["output"] in CANDIDATES for r in sidecar)


def test_score_is_refused_but_the_server_offers_candidate_log_probabilities(server, local_model, pbmc_file,
                                                                            tmp_path):
    import torch

    from click.testing import CliRunner

    from cellscribe.cli import main

    result = CliRunner().invoke(main, [
        "annotate", str(pbmc_file), "-o", str(tmp_path / "score.h5ad"), "--model", f"openai:{SERVED}",
        "--base-url", server, "--use-raw", "--no-progress", "--decode", "score",
        *[a for c in CANDIDATES for a in ("--candidate", c)],
    ])
    assert result.exit_code != 0 and "decode='score'" in result.output, result.output

    # What the backend could use: vLLM returns prompt log-probabilities (/completions, prompt_logprobs=0),
    # so a candidate's log-probability is the sum over its tokens after the rendered prompt.
    _, prompts = _local_run(local_model, pbmc_file, generation={"do_sample": False, "max_new_tokens": 1})
    loaded = local_model.loaded
    tokenizer, model = loaded.tokenizer, loaded.model
    text = loaded.render(prompts[0])
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    served, local = [], []
    for label in CANDIDATES:
        ids = tokenizer(text + label, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        reply = _post(f"{server}/completions", {"model": SERVED, "prompt": ids, "max_tokens": 1,
                                                "temperature": 0, "prompt_logprobs": 0})
        entries = reply["choices"][0]["prompt_logprobs"]
        served.append(sum(entries[i][str(ids[i])]["logprob"] for i in range(len(prompt_ids), len(ids))))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        local.append(sum(logits[i - 1, ids[i]].item() for i in range(len(prompt_ids), len(ids))))
    assert np.allclose(served, local, atol=0.05), (served, local)
    assert np.argmax(served) == np.argmax(local)
    assert all(math.isfinite(x) for x in served)
