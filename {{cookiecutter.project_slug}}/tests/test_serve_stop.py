"""Stopping the server when its drain grace runs out: every request in flight gets an
OpenAI error answer (a JSON 503, or an error event that ends the stream), the process exits
0, and the log has no traceback. A server of its own, so the test runs in any order."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import httpx
import pytest

from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from server_process import start_server

pytestmark = pytest.mark.slow

LONG = {"model": "tiny", "prompt": "Tell", "max_tokens": 480, "temperature": 0}


def test_requests_cut_off_by_the_grace_get_an_error_answer(tiny_model_dir, tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "{{ cookiecutter.package_name }}", "serve",
        "--model", str(tiny_model_dir), "model.served_name=tiny", f"server.port={port}",
        "limits.max_tokens_cap=480", "server.shutdown_grace_s=0",
    ]  # fmt: skip
    server = start_server(command, port, tmp_path / "server.log", {**os.environ})
    url = f"{server.url}/v1/completions"
    answers: dict[str, object] = {}
    streaming = threading.Event()

    def plain() -> None:
        answers["plain"] = httpx.post(url, json=LONG, timeout=60)

    def stream() -> None:
        with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=60) as response:
            events = []
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    streaming.set()
            answers["stream"] = events

    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for thread in threads:
        thread.start()
    assert streaming.wait(30)
    deadline = time.monotonic() + 10
    while server.metrics()["llm_requests_in_flight"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.metrics()["llm_requests_in_flight"] == 2
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert server.process.wait(30) == 0

    plain_answer = answers["plain"]
    assert plain_answer.status_code == 503
    error = plain_answer.json()["error"]
    assert error["type"] == "server_error" and "grace" in error["message"]
    events = answers["stream"]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert "grace" in last["error"]["message"], last
    log = server.log.read_text()
    assert "cutting off 2 request(s)" in log
    for noise in ("Traceback", "Task was destroyed", "asynchronous generator"):
        assert noise not in log, f"{noise!r} in the server log:\n{log[-3000:]}"
