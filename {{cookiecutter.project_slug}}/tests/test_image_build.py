"""tools/image_build.py: the image build's checks, without a Docker engine."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from tools import image_build


@pytest.fixture
def index_server():
    """A PEP 503 index on 127.0.0.1 that has only the torch project."""

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == "/torch/"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(b"<a href='torch-2.13.0+cpu.whl'>torch</a>" if found else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def test_a_reachable_index_with_torch_passes(index_server):
    image_build.probe(index_server, "torch", "TORCH_INDEX_URL")


def test_an_index_without_the_project_is_named(index_server):
    with pytest.raises(image_build.BuildError, match=r"has no 'pip' project .*404.*PIP_INDEX_URL"):
        image_build.probe(index_server, "pip", "PIP_INDEX_URL")


def test_an_unreachable_index_fails_at_once_naming_it_and_the_fix():
    started = time.monotonic()
    with pytest.raises(image_build.BuildError) as caught:
        image_build.probe("http://127.0.0.1:9/", "torch", "TORCH_INDEX_URL")
    assert time.monotonic() - started < image_build.PROBE_TIMEOUT_S
    message = str(caught.value)
    assert "http://127.0.0.1:9/ cannot be reached" in message
    assert "--build-arg TORCH_INDEX_URL=URL" in message


@pytest.mark.parametrize(
    ("version", "cuda", "backend"),
    [("2.13.0+cpu", None, "cpu"), ("2.13.0+cu128", "12.8", "cu128"), ("2.13.0", "13.0", "cu130")],
)
def test_the_backends_own_build_passes(version, cuda, backend):
    image_build.check_build(version, cuda, backend)


@pytest.mark.parametrize(
    ("version", "cuda", "backend", "found"),
    [
        ("2.13.0", "13.0", "cpu", "CUDA 13.0 build"),  # PyPI's default torch in a cpu image
        ("2.13.0", "13.0", "cu126", "CUDA 13.0 build"),  # too new for an older driver
        ("2.13.0+cpu", None, "cu128", "CPU build"),
    ],
)
def test_another_build_fails_naming_both(version, cuda, backend, found):
    with pytest.raises(image_build.BuildError) as caught:
        image_build.check_build(version, cuda, backend)
    message = str(caught.value)
    assert f"torch {version} ({found}) is installed, but this image is for {backend}" in message
    assert f"whl/{backend}" in message


def test_a_ca_bundle_that_is_not_there_is_named(index_server, tmp_path):
    missing = str(tmp_path / "certs" / "proxy-ca.pem")
    with pytest.raises(
        image_build.BuildError, match=r"CA_BUNDLE=.*proxy-ca.pem is not a file.*certs/"
    ):
        image_build.probe(index_server, "torch", "TORCH_INDEX_URL", missing)
