"""The serving image, built and run for real: the CPU variant through the baked project's own
`nox -s docker`, then served to the official openai client from a container.

Needs a Docker engine; skips with the reason where none runs. The torch index is
$IMAGE_TEST_TORCH_INDEX, else the stand-in index that shared/docker/standin.sh serves on
this machine when it answers, else the official CPU index (a hosted runner).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TEMPLATE, bake

STANDIN_INDEX = "http://127.0.0.1:8765/"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
UNREACHABLE = "http://127.0.0.1:9/"
PACKAGE, TAG = "lora_chat", "lora-chat:local"
# Builds a tiny model inside the image (it has torch, transformers and tokenizers) with the
# baked project's own test helpers; pytest is not in the image, and only its decorator is used.
TINY_MODEL = """
import sys, types
sys.modules["pytest"] = types.SimpleNamespace(fixture=lambda *a, **k: (lambda f: f))
sys.path.insert(0, "/project-tests")
from conftest import build_tiny_model, build_tiny_tokenizer
tokenizer = build_tiny_tokenizer()
tokenizer.save_pretrained("/out")
build_tiny_model(tokenizer).save_pretrained("/out")
"""


def _engine_running() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.skipif(
        not _engine_running(),
        reason="no Docker engine (`docker info` failed): the image test needs one "
        "(.ci/run starts one with shared/docker/standin.sh where that exists)",
    ),
]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except OSError:
        return False
    return True


def torch_index() -> str:
    if os.environ.get("IMAGE_TEST_TORCH_INDEX"):
        return os.environ["IMAGE_TEST_TORCH_INDEX"]
    return STANDIN_INDEX if _answers(STANDIN_INDEX + "torch/") else CPU_INDEX


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def nox_docker(project: Path, index: str, *args: str) -> subprocess.CompletedProcess:
    """The baked project's `nox -s docker` (--network host: pip in the build then reaches
    the package index the way pip on this machine does)."""
    command = [sys.executable, "-m", "nox", "-f", str(project / "noxfile.py"), "-s", "docker"]
    command += ["--", "--network", "host", *args]
    env = {**os.environ, "TORCH_INDEX_URL": index}
    return subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=1500
    )


def image_id() -> str:
    return docker("image", "inspect", "-f", "{{.Id}}", TAG).stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The cpu variant, built into lora-chat:local."""
    project = bake(tmp_path_factory.mktemp("image"), torch_backend="cpu")
    built = nox_docker(project, torch_index())
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    return project


@pytest.fixture(scope="module")
def tiny_model(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    out.chmod(0o777)  # the image's user (uid 10001) writes it
    mounts = ["-v", f"{project / 'tests'}:/project-tests:ro", "-v", f"{out}:/out"]
    docker("run", "--rm", *mounts, "--entrypoint", "python", TAG, "-c", TINY_MODEL, timeout=300)
    for path in out.iterdir():
        path.chmod(0o644)
    return out


def serve(model: Path, *overrides: str) -> tuple[str, str]:
    """Start the image on the tiny model; returns (container id, base URL) once ready."""
    port = free_port()
    command = [PACKAGE, "serve", "server.host=0.0.0.0", "server.port=8000",
               "model.name_or_path=/models/tiny", "model.served_name=tiny", *overrides]  # fmt: skip
    run = ["run", "-d", "-p", f"127.0.0.1:{port}:8000", "-v", f"{model}:/models/tiny:ro"]
    container = docker(*run, TAG, *command).stdout.strip()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        if state != "true":
            logs = docker("logs", container, check=False)
            pytest.fail(f"the container exited before it was ready:\n{logs.stdout}{logs.stderr}")
        if _answers(f"{url}/ready"):
            return container, url
        time.sleep(0.2)
    pytest.fail("the container was not ready in 180 s")


def test_the_image_holds_the_cpu_torch_build_and_reports_its_size(project):
    probe = "import torch; print(torch.__version__, torch.nn.Linear(4, 2)(torch.ones(1, 4)).shape)"
    out = docker("run", "--rm", "--entrypoint", "python", TAG, "-c", probe).stdout.split()
    assert out[0].endswith("+cpu") and out[1] == "torch.Size([1,", out
    assert docker("run", "--rm", "--entrypoint", "id", TAG, "-u").stdout.strip() == "10001"
    report = json.loads((project / "reports" / "image.json").read_text())
    assert report["size"]["bytes"] > 0
    assert report["size"]["largest_packages"][0][0] == "torch"
    assert "image_report" not in (project / "reports" / "image.md").read_text()  # rendered
    layers = [layer["created_by"] for layer in report["size"]["layers"]]
    assert layers[-1].startswith("COPY") and "/opt/venv/" in layers[-1], layers  # project last


def test_a_wrong_torch_build_fails_and_leaves_the_tag_as_it_was(project):
    before = image_id()
    built = nox_docker(project, torch_index(), "--build-arg=TORCH_BACKEND=cu128")
    output = built.stdout + built.stderr
    assert built.returncode != 0
    failure = (
        "image build failed: torch 2.13.0+cpu (CPU build) is installed, but this image is for cu128"
    )
    assert failure in output, output[-3000:]
    assert image_id() == before


def test_an_unreachable_torch_index_fails_within_a_minute_naming_it(project):
    started = time.monotonic()
    built = nox_docker(project, UNREACHABLE)
    seconds = time.monotonic() - started
    output = built.stdout + built.stderr
    assert built.returncode != 0
    last = output.strip().splitlines()[-1]  # nox's own line; ours is the one before it
    ours = [line for line in output.splitlines() if line.startswith("error: image build failed")]
    assert ours and f"the index {UNREACHABLE} cannot be reached" in ours[-1], output[-3000:]
    assert "TORCH_INDEX_URL" in ours[-1] and "Session docker failed" in last
    assert seconds < 60, f"took {seconds:.0f} s"


def test_serves_the_openai_client_and_drains_on_docker_stop(tiny_model):
    import openai

    container, url = serve(tiny_model, "limits.max_tokens_cap=480")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason
        chunks: list = []
        failures: list[Exception] = []
        streaming = threading.Event()

        def consume() -> None:
            try:
                stream = client.completions.create(
                    model="tiny", prompt="Tell", max_tokens=480, temperature=0, stream=True
                )
                for chunk in stream:
                    chunks.append(chunk)
                    streaming.set()
            except Exception as error:  # the test reads it below
                failures.append(error)

        reader = threading.Thread(target=consume)
        reader.start()
        assert streaming.wait(30)
        at_stop = len(chunks)
        docker("stop", container, timeout=30)  # SIGTERM, then SIGKILL after Docker's 10 s
        reader.join(30)
        assert not failures, failures
        assert len(chunks) > at_stop, "the stream had ended before the stop"
        assert chunks[-1].choices[0].finish_reason in {"stop", "length"}, "the stream was cut"
        state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state
        logs = docker("logs", container)
        assert "Traceback" not in logs.stdout + logs.stderr
        assert "draining" in logs.stdout + logs.stderr
    finally:
        docker("rm", "-f", container, check=False)


def test_a_request_cut_off_by_the_grace_gets_an_openai_error(tiny_model):
    import openai

    container, url = serve(tiny_model, "limits.max_tokens_cap=480", "server.shutdown_grace_s=0")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        caught: list[Exception] = []

        def ask() -> None:
            try:
                client.completions.create(
                    model="tiny", prompt="Tell", max_tokens=480, temperature=0
                )
            except Exception as error:  # the test reads it below
                caught.append(error)

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "llm_requests_in_flight 1.0" not in _metrics(url):
            time.sleep(0.05)
        docker("stop", container, timeout=30)
        asker.join(30)
        assert caught and isinstance(caught[0], openai.APIStatusError), caught
        assert caught[0].status_code == 503 and "grace" in str(caught[0])
        state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
        assert state["ExitCode"] == 0, state
    finally:
        docker("rm", "-f", container, check=False)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        return answer.read().decode()


def test_unreadable_weights_are_named(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    model.chmod(0o755)
    (model / "model.safetensors").chmod(0o600)  # owned by this user, not by uid 10001
    run = ["run", "--rm", "-v", f"{model}:/models/tiny:ro", TAG]
    done = docker(*run, PACKAGE, "serve", "model.name_or_path=/models/tiny", check=False)
    assert done.returncode != 0
    assert "/models/tiny/model.safetensors cannot be read" in done.stderr, done.stderr[-2000:]
    assert "uid 10001" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="no docker-registry binary to start a local registry (Debian: docker-registry)",
)
def test_cold_start_is_measured_by_phase_and_a_code_change_pulls_little(project, tiny_model):
    # The template's code-change check first, as bench.py runs it: the cold start's pulls
    # remove the image, and with it the build cache that the rebuild reuses.
    change = [sys.executable, str(TEMPLATE / "benchmarks" / "code_change.py"), "--project",
              str(project), "--tag", TAG, "--network", "host",
              f"--build-arg=TORCH_INDEX_URL={torch_index()}"]  # fmt: skip
    done = subprocess.run(change, cwd=project, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    changed = json.loads(done.stdout)
    assert changed["changed_file"] == f"src/{PACKAGE}/__init__.py"
    assert changed["new_layers"] >= 1 and changed["new_compressed_bytes"] < 5e6, changed
    measure = [sys.executable, "tools/image_report.py", "measure", "--tag", TAG, "--cold-start",
               "--runs", "1", "--model-dir", str(tiny_model)]  # fmt: skip
    done = subprocess.run(measure, cwd=project, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cold = json.loads((project / "reports" / "image.json").read_text())["cold_start"]
    fresh = cold["from_registry"]
    for phase in ("pull_s", "create_start_s", "ready_s", "first_token_s"):
        assert fresh[phase]["median"] > 0
    assert {"imports", "weights", "warmup"} <= set(fresh["server_phases_s"])
    if os.geteuid() == 0:  # only root may drop the page cache
        assert fresh["page_cache_dropped"] and cold["already_pulled"]["page_cache_dropped"]
    # The template's layer_codecs.py, as bench.py runs it after the cold start: each pushed
    # layer in gzip and zstd, decompressed here; the floors of the container phases.
    codecs_run = [sys.executable, str(TEMPLATE / "benchmarks" / "layer_codecs.py"), "--project",
                  str(project), "--tag", TAG]  # fmt: skip
    done = subprocess.run(codecs_run, cwd=project, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cold = json.loads((project / "reports" / "image.json").read_text())["cold_start"]
    codecs = cold["layer_codecs"]
    assert codecs["layers"] and codecs["total"]["zstd_bytes"] > 0
    assert all(r["gzip_decompress_s"] > 0 and r["zstd_decompress_s"] > 0 for r in codecs["layers"])
    floors = cold["floors"]
    assert floors["create_start_s"] > 0 and floors["pulled_layers"] >= 1
    assert floors["pull_s"]["zstd"] > 0 and floors["pull_s"]["pulled_bytes"] > 0
    assert cold["dockerd_uses_unpigz"] in (True, False)
