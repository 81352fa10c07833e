"""What serving imports: nothing before /ready beyond its budget, and all of it compiled.

Both tests serve a real request (an adapter, streaming, sampling) in a subprocess that
records the modules it has imported twice: when /ready turns true, and at exit.

- The import budget (tests/import_budget.json): the number of modules imported before
  /ready may grow by at most its margin, and the heavy modules it lists as never needed
  before ready (the compiler, the training stack) stay out. Every module is time on every
  cold start. After a re-lock or a deliberate new import: UPDATE_IMPORT_BUDGET=1 pytest
  tests/test_slim_env.py
- The image compiles bytecode only for what importing tools/slim_env.SERVING_IMPORTS
  imports; a library module a request imports beyond that would be compiled from source on
  every start of the image.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lora_adapters import random_adapter
from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from server_process import start_server

from tools import slim_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

PACKAGE = "{{ cookiecutter.package_name }}"
BUDGET = Path(__file__).with_name("import_budget.json")
# Runs the real `serve` command; writes the names of the modules it has imported to
# <record>.ready.json on SIGUSR1 (sent once /ready answers) and to <record> at exit.
RECORDER = """
import atexit, json, runpy, signal, sys
record, sys.argv = sys.argv[1], ["{package}", *sys.argv[2:]]
def dump(path): open(path, "w").write(json.dumps(sorted(sys.modules)))
signal.signal(signal.SIGUSR1, lambda *_: dump(record + ".ready.json"))
atexit.register(dump, record)
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


@dataclass
class Recorded:
    at_ready: list[str]  # every module imported when /ready first answered
    served: list[str]  # the library modules imported by the end of serving


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory) -> Recorded:
    folder = tmp_path_factory.mktemp("imports")
    adapter = random_adapter(tiny_model_dir, folder / "adapter")
    port, record = free_port(), folder / "modules.json"
    command = [
        sys.executable, "-c", RECORDER.format(package=PACKAGE), str(record), "serve",
        "--model", str(tiny_model_dir), f"--adapter=tuned={adapter}", f"server.port={port}",
    ]  # fmt: skip
    server = start_server(command, port, folder / "server.log", {**os.environ})
    at_ready = Path(f"{record}.ready.json")
    server.process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while not at_ready.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    modules_at_ready = json.loads(at_ready.read_text())
    body = {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    json_only = {"temperature": 0, "response_format": dict(type="json_object")}
    for extra in ({"stream": True, "temperature": 0.8, "seed": 1}, {"temperature": 0}, json_only):
        answer = httpx.post(f"{server.url}/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert answer.status_code == 200, answer.text
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    return Recorded(modules_at_ready, library_modules(json.loads(record.read_text())))


def read_budget() -> dict[str, Any]:
    """The committed budget; a file that cannot be read or lacks a field names itself."""
    try:
        budget = json.loads(BUDGET.read_text())
        assert isinstance(budget["modules_before_ready"], int)
        assert isinstance(budget["margin"], int)
        assert all(isinstance(name, str) for name in budget["never_before_ready"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as error:
        pytest.fail(
            f"{BUDGET}: not a readable import budget ({error.__class__.__name__}: {error}); "
            'it holds {"modules_before_ready": int, "margin": int, "never_before_ready": '
            f"[module, ...]}}. Restore it from git, or rewrite the count: "
            f"UPDATE_IMPORT_BUDGET=1 pytest {__file__}"
        )
    return dict(budget)


def test_imports_before_ready_stay_within_the_budget(recorded):
    budget = read_budget()
    count = len(recorded.at_ready)
    if os.environ.get("UPDATE_IMPORT_BUDGET"):
        try:
            updated = {**budget, "modules_before_ready": count}
            BUDGET.write_text(json.dumps(updated, indent=2) + "\n")
        except OSError as error:
            pytest.fail(
                f"{BUDGET}: cannot write the new budget ({error.strerror}); make it writable"
            )
        budget["modules_before_ready"] = count
    never = [
        name
        for name in recorded.at_ready
        if any(name == top or name.startswith(top + ".") for top in budget["never_before_ready"])
    ]
    assert not never, (
        f"imported before /ready, though serving does not need them until a request asks: "
        f"{never[:8]}{' ...' if len(never) > 8 else ''}; defer the import that pulls them in"
    )
    allowed = budget["modules_before_ready"] + budget["margin"]
    assert count <= allowed, (
        f"{count} modules imported before /ready, over the budget of "
        f"{budget['modules_before_ready']} + {budget['margin']} in {BUDGET.name}; defer the new "
        f"imports, or if they are needed: UPDATE_IMPORT_BUDGET=1 pytest {__file__}"
    )


def test_every_library_module_serving_imports_is_compiled(recorded):
    compiled = set(slim_env.serving_modules(Path(sys.executable)))
    missing = sorted(set(recorded.served) - compiled)
    assert not missing, (
        f"a served request imported {len(missing)} library modules that importing "
        f"SERVING_IMPORTS does not (e.g. {missing[:5]} of {missing}), so the image would "
        "compile them at every start; add them, or the module that imports them, to "
        "SERVING_IMPORTS in tools/slim_env.py"
    )
    assert {"torch", "transformers.generation.continuous_batching"} <= compiled


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
    report = slim_env.slim(tmp_path, modules=["served", "absent.module"])
    assert report["compiled_files"] == 1
    assert list((site_packages / "served" / "__pycache__").glob("__init__.*.pyc"))
    assert not (site_packages / "__pycache__").exists(), "an unlisted module was compiled"
    assert not (site_packages / "torch" / "test").exists()
    assert not (site_packages / "served" / "tests").exists(), "an unimported test suite stayed"
    assert not (site_packages / "served" / "stub.pyi").exists()
    assert report["tests_mib"] == pytest.approx((4096 + 6) / 2**20)


@pytest.mark.parametrize("text", ["{", '{"modules_before_ready": "many"}', None])
def test_a_bad_budget_file_names_itself(tmp_path, monkeypatch, text):
    budget = tmp_path / "import_budget.json"
    if text is not None:
        budget.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "BUDGET", budget)
    with pytest.raises(pytest.fail.Exception) as caught:
        read_budget()
    assert str(caught.value).startswith(f"{budget}: not a readable import budget")
