"""The real server in a subprocess on a free loopback port: shared by the serve and GPU tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

PACKAGE = "{{ cookiecutter.package_name }}"


def serve_command(model_dir: Path, adapters: dict[str, Path], *overrides: str) -> list[str]:
    """The project's `serve` of a model folder and adapters, with KEY=VALUE overrides."""
    command = [sys.executable, "-m", PACKAGE, "serve", "--model", str(model_dir)]
    return [*command, *(f"--adapter={name}={path}" for name, path in adapters.items()), *overrides]


def serve_env(api_key: str) -> dict[str, str]:
    """This environment, with the server's API key set and the hub offline."""
    return {**os.environ, f"{PACKAGE.upper()}_API_KEY": api_key, "HF_HUB_OFFLINE": "1"}


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log
        self.ready_seen: list[tuple[int, object]] = []  # readiness answers while starting
        self.ready_seconds = 0.0  # process start to the first 200 from the readiness probe

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self, grace: float = 30) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    command: list[str],
    port: int,
    log: Path,
    env: dict[str, str],
    ready_path: str = "/ready",
    timeout: float = 180,
) -> Server:
    """Start `command` and poll `ready_path` until it answers 200; fail with the log if not."""
    started = time.monotonic()
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    while time.monotonic() < started + timeout:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            answer = httpx.get(f"{server.url}{ready_path}", timeout=2)
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        try:
            body: object = answer.json()
        except ValueError:  # vLLM's /health answers with an empty body
            body = answer.text
        server.ready_seen.append((answer.status_code, body))
        if answer.status_code == 200:
            server.ready_seconds = time.monotonic() - started
            return server
        time.sleep(0.02)
    process.kill()
    process.wait()
    pytest.fail(f"server not ready in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
