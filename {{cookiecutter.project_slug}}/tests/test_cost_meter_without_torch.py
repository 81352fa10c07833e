"""`token-cost --url` meters an external endpoint where torch cannot be imported.

What the `meter` extra promises: a machine that only measures (no model, no torch) runs
the meter. The meter runs in a child process whose import system refuses torch (and
records every attempt), against a small OpenAI-compatible server made with the standard
library, which has no /info and no /metrics, like a hosted API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "{{ cookiecutter.package_name }}"

# Refuse torch and anything under it, write down who asked, run the CLI.
CHILD = """
import atexit, importlib.abc, json, sys

attempts = []

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError("torch is not installed here: " + name)
        return None

sys.meta_path.insert(0, NoTorch())
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(attempts)))
from PACKAGE.cli import main
sys.exit(main(sys.argv[2:]))
"""


class FakeOpenAI(BaseHTTPRequestHandler):
    """GET /v1/models and a streamed POST /v1/chat/completions; 404 for anything else."""

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "root": "org/fake"}]})
        else:
            self._json(404, {"error": {"message": f"no {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length))
        if self.path != "/v1/chat/completions" or request.get("model") != "fake-model":
            self._json(404, {"error": {"message": "unknown model or path"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                  for piece in ("Hel", "lo", "!")]  # fmt: skip
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_token_cost_url_runs_and_writes_a_card_without_torch(fake_endpoint, tmp_path):
    attempts = tmp_path / "torch_imports.json"
    command = [
        sys.executable, "-c", CHILD.replace("PACKAGE", PACKAGE), str(attempts),
        "token-cost", "--url", fake_endpoint, "--concurrency", "1,2", "--requests", "4",
        "--out", str(tmp_path / "reports"), "prompts.source=synthetic", "load.warmup_requests=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(attempts.read_text()) == [], "the meter tried to import torch"

    cards = list((tmp_path / "reports").glob("*-serving/cost_card.json"))
    assert len(cards) == 1, done.stdout[-2000:]
    card = json.loads(cards[0].read_text())
    assert not card["partial"] and card["kind"] == "serving"
    serving = card["serving"]
    assert serving["endpoint"]["model"] == "fake-model"
    assert serving["model"]["name_or_path"] == "org/fake"
    assert [level["requests"]["ok"] for level in serving["levels"]] == [4, 4]
    assert all(level["output_tokens"] == 12 for level in serving["levels"])
    # An endpoint without GET /info: said so, never guessed from the meter's machine.
    environment = card["environment"]
    assert environment["device"].startswith("not reported by the server")
    assert environment["dtype"] == "not reported by the server"
    assert serving["model"]["engine"] is None and serving["model"]["tokenizer"] is None
    assert (cards[0].parent / "cost_card.png").is_file()
