"""/openapi.json tells the truth: schemathesis generates requests from it (valid and
not), sends them to a real server on the tiny model, and checks every answer against the
document: status codes, content types, bodies, headers, and no 5xx.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from server_process import start_server

pytestmark = pytest.mark.slow

KEY = "openapi-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = free_port()
    command = [
        sys.executable, "-m", "{{ cookiecutter.package_name }}", "serve", "--model", str(tiny_model_dir),
        "model.served_name=tiny", f"server.port={port}", "limits.max_tokens_cap=8",
    ]  # fmt: skip
    env = {**os.environ, "{{ cookiecutter.package_name | upper }}_API_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    handle = start_server(command, port, tmp_path_factory.mktemp("openapi") / "server.log", env)
    yield handle
    handle.stop()


def test_every_answer_matches_the_document(server, tmp_path):
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is in the test dependency group"
    result = subprocess.run(
        [
            schemathesis, "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
            "--checks", "all", "--header", f"Authorization: Bearer {KEY}",
            "--max-examples", "40", "--seed", "1", "--no-color",
            "--report", "junit", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "7 passed" in output or "No issues found" in output, output[-3000:]
    assert "Traceback" not in server.log.read_text()
