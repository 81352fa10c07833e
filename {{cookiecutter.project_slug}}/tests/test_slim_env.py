"""tools/slim_env.py: the modules it compiles are the ones a served request imports.

The image compiles bytecode only for tools/serving_modules.txt. This test serves a real
request (an adapter, streaming, sampling) in a subprocess that records every module it
imported, and fails if serving imports a library module the list lacks: that module would
be compiled from source on every start of the image.
Refresh the list after a re-lock: UPDATE_SERVING_MODULES=1 pytest tests/test_slim_env.py
"""

from __future__ import annotations

import json
import os
import signal
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest

from lora_adapters import random_adapter
from server_process import free_port, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import slim_env  # noqa: E402

PACKAGE = "{{ cookiecutter.package_name }}"
# Runs the real `serve` command and writes the names of the modules it imported at exit.
RECORDER = """
import atexit, json, runpy, sys
record, sys.argv = sys.argv[1], ["{package}", *sys.argv[2:]]
atexit.register(lambda: open(record, "w").write(json.dumps(sorted(sys.modules))))
runpy.run_module("{package}", run_name="__main__")
"""


def library_modules(names: list[str]) -> list[str]:
    """The names that are modules of installed libraries (site-packages), not ours."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    return sorted(
        name
        for name in names
        if not name.startswith(PACKAGE) and slim_env.module_files(site_packages, [name])
    )


@pytest.fixture(scope="module")
def served_modules(tiny_model_dir, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("imports")
    adapter = random_adapter(tiny_model_dir, folder / "adapter")
    port, record = free_port(), folder / "modules.json"
    command = [
        sys.executable, "-c", RECORDER.format(package=PACKAGE), str(record), "serve",
        "--model", str(tiny_model_dir), f"--adapter=tuned={adapter}", f"server.port={port}",
    ]  # fmt: skip
    server = start_server(command, port, folder / "server.log", {**os.environ})
    body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for extra in ({"stream": True, "temperature": 0.8, "seed": 1}, {"temperature": 0}):
        answer = httpx.post(f"{server.url}/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert answer.status_code == 200, answer.text
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    return library_modules(json.loads(record.read_text()))


def test_every_library_module_serving_imports_is_compiled(served_modules):
    if os.environ.get("UPDATE_SERVING_MODULES"):
        slim_env.MODULES.write_text("\n".join(served_modules) + "\n")
    listed = set(slim_env.MODULES.read_text().split())
    missing = sorted(set(served_modules) - listed)
    assert not missing, (
        f"serving imports {len(missing)} modules that tools/serving_modules.txt lacks "
        f"(e.g. {missing[:5]}); refresh it: UPDATE_SERVING_MODULES=1 pytest {__file__}"
    )
    assert "torch" in listed and "transformers.generation.continuous_batching" in listed


def test_slim_compiles_only_the_listed_modules(tmp_path):
    site_packages = tmp_path / "lib" / "python3.11" / "site-packages"
    (site_packages / "served").mkdir(parents=True)
    (site_packages / "served" / "__init__.py").write_text("X = 1\n")
    (site_packages / "unused.py").write_text("Y = 2\n")
    (site_packages / "served" / "tests").mkdir()
    (site_packages / "served" / "tests" / "test_x.py").write_text("Z = 3\n")
    (site_packages / "served" / "stub.pyi").write_text("X: int\n")
    (site_packages / "torch" / "test").mkdir(parents=True)
    (site_packages / "torch" / "test" / "test_ops").write_bytes(b"\0" * 4096)
    modules = slim_env.MODULES
    slim_env.MODULES = tmp_path / "modules.txt"
    try:
        slim_env.MODULES.write_text("served\nabsent.module\n")
        report = slim_env.slim(tmp_path)
    finally:
        slim_env.MODULES = modules
    assert report["compiled_files"] == 1
    assert list((site_packages / "served" / "__pycache__").glob("__init__.*.pyc"))
    assert not (site_packages / "__pycache__").exists(), "an unlisted module was compiled"
    assert not (site_packages / "torch" / "test").exists()
    assert not (site_packages / "served" / "tests").exists(), "an unimported test suite stayed"
    assert not (site_packages / "served" / "stub.pyi").exists()
    assert report["tests_mib"] == pytest.approx((4096 + 6) / 2**20)
