"""Build the serving image, and measure what a start of it costs: `nox -s docker` runs this.

    python tools/image_report.py build  --tag IMAGE [docker build args...]
    python tools/image_report.py measure --tag IMAGE [--cold-start] [--registry HOST:PORT]
                                        [--model-dir DIR] [--runs 3]
                                        [--engine vllm [--compile-cache]]

`measure` writes the image's size by layer and its 10 largest packages. --cold-start pushes the
image to a registry on this machine (Debian's `docker-registry` is started on 127.0.0.1
when none is given), removes it locally, and times each start by phase, with the page
cache dropped: pull, create and start, the server's own phases (imports, weights, warm-up)
and the first streamed token; then the same with the image already pulled. It also projects
the pull at 1 and 10 Gbit/s from the compressed layer sizes. With --engine vllm
(the image of Dockerfile.vllm) a start is ready when /health says 200, and --compile-cache
times two more starts with torch.compile on (engine.vllm_compile=true), the first with an
empty compile cache volume and the second with what the first left in it. Results go to
reports/image.json and reports/image.md; the cost card can price serverless billing on them
(token_cost's serverless.container_cold_start).

Standard library and the docker CLI only: it drives the engine from the host, and
`nox -s docker` runs it on nox's own Python, so a host with Docker and nox needs nothing
more. That is why it polls readiness and times the first token itself rather than with the
meter's httpx client (cost/coldstart.py), which it mirrors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = next((ROOT / "src").iterdir()).name
REPORTS = ROOT / "reports"
SERVER_PORT = 8000  # the image's EXPOSE
METRIC = "llm_cold_start_seconds"
# Where each engine's server says it is ready: ours /ready, vLLM's /health (it has no /ready).
READY = {"transformers": "/ready", "vllm": "/health"}
DOCKERFILE = {"transformers": "Dockerfile", "vllm": "Dockerfile.vllm"}
# vLLM's processes share a 160 MiB ring buffer in /dev/shm; Docker's default is 64 MiB.
VLLM_SHM = "1g"
VLLM_SERVE = {
    "transformers": [],
    "vllm": ["engine.kind=vllm", "engine.vllm_python=/opt/venv/bin/python"],
}
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# Per-distribution sizes inside the image, from each distribution's RECORD.
PACKAGE_SIZES = """
import importlib.metadata as m, json, os
sizes = {}
for dist in m.distributions():
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    sizes[dist.metadata["Name"]] = total
print(json.dumps(sizes))
"""


class ImageError(Exception):
    """One line for the user: what failed and what to do."""


def docker(*args: str, capture: bool = True, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=capture, text=True)
    if check and done.returncode:
        detail = (done.stderr or "").strip().splitlines()[-1:] if capture else []
        raise ImageError(f"docker {args[0]} failed: {' '.join(detail) or done.returncode}")
    return done.stdout if capture else ""


def require_engine() -> None:
    if shutil.which("docker") is None:
        raise ImageError("no docker CLI on PATH: install Docker (or run where it is)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode:
        raise ImageError(
            "no Docker engine here (`docker info` failed): start Docker and rerun, or push "
            "a v* tag to build the image in CI (image.yml)"
        )


# --------------------------------------------------------------------------- build
def build(tag: str, build_args: list[str]) -> None:
    """`docker build`, its log shown as it runs; a failure of our build steps is reported
    as their one line (tools/image_build.py), not as the engine's exit code."""
    command = ["docker", "build", "-t", tag, *build_args, str(ROOT)]
    print("$", " ".join(command), flush=True)
    reason = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        for line in p.stdout:
            sys.stdout.write(line)
            found = line.find("image build failed:")  # after the builder's colour codes
            if found >= 0:
                reason = line[found:].strip()
    if p.returncode:
        raise ImageError(reason or f"docker build failed (exit {p.returncode}); see above")


# --------------------------------------------------------------------------- size
@dataclass
class Layer:
    created_by: str
    bytes: int
    compressed_bytes: int | None = None
    digest: str | None = None


def layers(tag: str) -> list[Layer]:
    """The image's layers bottom-up (steps that only set metadata are left out)."""
    history = docker("history", "--no-trunc", "--human=false", "--format", "{{json .}}", tag)
    rows = [json.loads(line) for line in history.splitlines()]
    found = []
    for row in reversed(rows):
        created_by = row["CreatedBy"].replace("/bin/sh -c ", "").replace("#(nop) ", "").strip()
        # Legacy builder: a RUN has no "#(nop)"; BuildKit names RUN, COPY and ADD outright.
        legacy_run = "#(nop)" not in row["CreatedBy"] and not row["CreatedBy"].startswith(
            ("ENV", "CMD", "USER", "WORKDIR", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "ARG", "LABEL")
        )
        if legacy_run or created_by.startswith(("RUN", "COPY", "ADD")):
            label = " ".join(created_by.split())[:160] or "(base image)"
            found.append(Layer(label, int(row["Size"])))
    return found


def package_sizes(tag: str, top: int = 10) -> list[tuple[str, int]]:
    out = docker("run", "--rm", "--entrypoint", "python", tag, "-c", PACKAGE_SIZES)
    sizes = json.loads(out.strip().splitlines()[-1])
    return sorted(sizes.items(), key=lambda item: -item[1])[:top]


def size_report(tag: str) -> dict[str, Any]:
    """The image's bytes, its layers and its largest packages."""
    total = int(docker("image", "inspect", "-f", "{{.Size}}", tag).strip())
    found = [asdict(layer) for layer in layers(tag)]
    return {"image": tag, "bytes": total, "layers": found, "largest_packages": package_sizes(tag)}


# --------------------------------------------------------------------------- registry
class Registry:
    """A registry on 127.0.0.1: the given one, or Debian's docker-registry started here
    (no auth, loopback only, storage in a temporary folder) for as long as it is needed."""

    def __init__(self, address: str | None) -> None:
        self.address, self.process, self.folder = address, None, None

    def __enter__(self) -> Registry:
        if self.address is None:
            binary = shutil.which("docker-registry") or shutil.which("registry")
            if binary is None:
                raise ImageError(
                    "no registry given and none to start: pass --registry HOST:PORT, or install "
                    "one (Debian: apt-get install docker-registry)"
                )
            self.folder = Path(tempfile.mkdtemp(prefix="registry-"))
            port = free_port()
            config = self.folder / "config.yml"
            config.write_text(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                f"{self.folder / 'data'}\n  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{port}\n"
            )
            log = (self.folder / "registry.log").open("w")
            self.process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
            self.address = f"127.0.0.1:{port}"
            try:
                wait_for(
                    lambda: http_status(f"http://{self.address}/v2/") == 200, 30, "the registry"
                )
            except ImageError:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            shutil.rmtree(self.folder, ignore_errors=True)

    def manifest(self, repository: str, tag: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://{self.address}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)


# --------------------------------------------------------------------------- cold start
@dataclass
class Start:
    """One container start, in seconds from the start of `docker pull` (or of `docker run`
    when the image was already pulled)."""

    pulled: bool
    page_cache_dropped: bool
    pull_s: float
    create_start_s: float
    ready_s: float
    first_token_s: float
    server_phases_s: dict[str, float] = field(default_factory=dict)
    pulled_layers: list[str] = field(default_factory=list)  # short ids `docker pull` fetched


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise ImageError(f"{what} did not come up within {timeout_s:.0f} s")


def drop_page_cache() -> bool:
    """So that a start reads the image and the weights from disk, as a fresh node does."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def first_token(base_url: str, model: str) -> None:
    """One streamed chat request; returns when its first content chunk arrives."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "stream": True,
    }
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        for raw in answer:
            line = raw.decode().strip()
            if line.startswith("data: {") and '"content": ""' not in line and "content" in line:
                return
    raise ImageError("the first request streamed no token")


def served_model(base_url: str) -> str:
    """The first model the server lists (the base model of the image's own command)."""
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as answer:
        return json.load(answer)["data"][0]["id"]


def server_phases(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    phases = {}
    for line in text.splitlines():
        if line.startswith(METRIC + "{"):
            labels, _, value = line.rpartition(" ")
            phases[labels.split('"')[1]] = round(float(value), 3)
    return phases


def one_start(
    image: str,
    serve_args: list[str],
    mounts: list[str],
    pull: bool,
    model: str | None,
    engine: str = "transformers",
) -> Start:
    dropped = drop_page_cache()
    t0 = time.perf_counter()
    fetched = []
    if pull:
        # Not -q: its progress lines name each layer it fetched ("<id>: Pull complete") and
        # each it already had ("Already exists").
        for line in docker("pull", image).splitlines():
            layer, _, status = line.partition(": ")
            if status.strip() == "Pull complete":
                fetched.append(layer.strip())
    pulled = time.perf_counter()
    port = free_port()
    shm = ["--shm-size", VLLM_SHM] if engine == "vllm" else []
    run = ["run", "-d", "-p", f"127.0.0.1:{port}:{SERVER_PORT}", *shm, *mounts, image]
    container = docker(*run, *serve_args).strip()
    started = time.perf_counter()
    base = f"http://127.0.0.1:{port}"

    def answers_ready() -> bool:
        if docker("inspect", "-f", "{{.State.Running}}", container).strip() != "true":
            raise ImageError("the container exited before it was ready")
        return http_status(f"{base}{READY[engine]}") == 200

    try:
        wait_for(answers_ready, 900, "the server in the container")
        ready_at = time.perf_counter()
        first_token(base, model or served_model(base))
        first = time.perf_counter()
        phases = server_phases(base) if engine == "transformers" else {}
    except (ImageError, OSError) as error:  # urllib's HTTP and connection errors are OSErrors
        done = subprocess.run(
            ["docker", "logs", "--tail", "20", container], capture_output=True, text=True
        )
        raise ImageError(f"{error}; container log:\n{done.stdout}{done.stderr}") from None
    finally:
        docker("rm", "-f", container, check=False)
    return Start(
        pull,
        dropped,
        round(pulled - t0, 3),
        round(started - pulled, 3),
        round(ready_at - t0, 3),
        round(first - t0, 3),
        phases,
        fetched,
    )


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# --------------------------------------------------------------------------- report
def host(engine: str) -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "docker": docker("version", "--format", "{{.Server.Version}}").strip(),
        "base_image": base_image(engine),
    }


def base_image(engine: str) -> str:
    """The Dockerfile's default PYTHON_IMAGE (what the runtime stage is built on)."""
    for line in (ROOT / DOCKERFILE[engine]).read_text().splitlines():
        if line.startswith("ARG PYTHON_IMAGE="):
            return line.partition("=")[2]
    return "unknown"


def split(tag: str) -> tuple[str, str]:
    repository, _, version = tag.rpartition(":")
    return (repository, version) if repository else (tag, "latest")


def serving(args: argparse.Namespace, *settings: str) -> tuple[list[str], list[str], str | None]:
    """A start's command, mounts and the model to ask for. --model-dir: that folder, mounted
    read-only and served as --served-name; none, and no settings: the image's own command
    and model (None: asked of the server)."""
    if not args.model_dir and not settings:
        return [], [], None
    command = [PACKAGE, "serve", "server.host=0.0.0.0", f"server.port={SERVER_PORT}"]
    command += [*VLLM_SERVE[args.engine], *settings]
    if not args.model_dir:
        return command, [], None
    command += ["model.name_or_path=/models/served", f"model.served_name={args.served_name}"]
    mounts = ["-v", f"{Path(args.model_dir).resolve()}:/models/served:ro"]
    return command, mounts, args.served_name


def cold_start(args: argparse.Namespace) -> dict[str, Any]:
    repository, version = split(args.tag)
    serve_args, mounts, model = serving(args)
    with Registry(args.registry) as registry:
        remote = f"{registry.address}/{repository}:{version}"
        docker("tag", args.tag, remote)
        print(f"pushing {remote}", flush=True)
        docker("push", "-q", remote)
        manifest = registry.manifest(repository, version)
        starts = []
        try:
            for pull in (True, False):
                for run in range(args.runs):
                    if pull:  # every tag of the image, so that the pull is a real one
                        docker("rmi", "-f", args.tag, remote)
                    start = one_start(remote, serve_args, mounts, pull, model, args.engine)
                    print(
                        f"start {run + 1}/{args.runs} ({'pull' if pull else 'pulled'}): "
                        f"first token after {start.first_token_s:.2f} s",
                        flush=True,
                    )
                    starts.append(start)
        finally:  # the user's tag back, even after a failed start (pulled again if need be)
            if subprocess.run(
                ["docker", "image", "inspect", remote], capture_output=True
            ).returncode:
                docker("pull", "-q", remote, check=False)
            docker("tag", remote, args.tag, check=False)
            docker("rmi", remote, check=False)
    compressed = sum(layer["size"] for layer in manifest["layers"])
    return {
        "registry": "local registry on 127.0.0.1 (pull over loopback: no network transfer; the "
        "base image's layers stay on the host, as on a node that already has the base)",
        "compressed_bytes": compressed,
        "compressed_layers": [
            {"digest": layer["digest"], "bytes": layer["size"]} for layer in manifest["layers"]
        ],
        "projected_pull_transfer_s": {  # a projection, not a measurement
            "1_gbit": round(compressed * 8 / 1e9, 2),
            "10_gbit": round(compressed * 8 / 1e10, 2),
        },
        "model": args.model_dir or "the image's default (HF_HOME=/models)",
        "runs": [asdict(start) for start in starts],
        "from_registry": phases_summary([s for s in starts if s.pulled]),
        "already_pulled": phases_summary([s for s in starts if not s.pulled]),
    }


def compile_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Two starts of the vLLM image with torch.compile on, on one new volume at /cache: the
    first compiles into it, the second reads it. The image is already pulled."""
    volume = f"{split(args.tag)[0].replace('/', '-')}-compile-cache-{os.getpid()}"
    command, mounts, model = serving(args, "engine.vllm_compile=true")
    mounts = ["-v", f"{volume}:/cache", *mounts]
    # torch's CUDA version ("None": a CPU build), then the C++ compilers on the PATH, if any.
    probe = "python -c 'import torch; print(torch.version.cuda)' && { command -v c++ g++ || :; }"
    torch_cuda, *compiler = docker(
        "run", "--rm", "--entrypoint", "sh", args.tag, "-c", probe
    ).split()
    if torch_cuda == "None" and not compiler:
        raise ImageError(
            "--compile-cache: this is a CPU image without a C++ compiler, which torch.compile "
            "needs on a CPU, so it serves eager and has no compile cache to time"
        )
    docker("volume", "create", volume)
    try:
        starts = {}
        for label in ("empty_cache", "warm_cache"):
            start = one_start(args.tag, command, mounts, False, model, "vllm")
            print(f"compile, {label}: first token after {start.first_token_s:.2f} s", flush=True)
            starts[label] = asdict(start)
        du = ["run", "--rm", "-v", f"{volume}:/cache", "--entrypoint", "du", args.tag]
        cache_bytes = int(docker(*du, "-sb", "/cache/vllm").split()[0])
    finally:
        docker("volume", "rm", "-f", volume, check=False)
    return {
        "where": "/cache/vllm (VLLM_CACHE_ROOT); mount a volume there to keep it",
        "settings": "engine.vllm_compile=true",
        "cache_bytes": cache_bytes,
        **starts,
    }


def phases_summary(starts: list[Start]) -> dict[str, Any]:
    keys = ("pull_s", "create_start_s", "ready_s", "first_token_s")
    out = {key: summary([getattr(s, key) for s in starts]) for key in keys}
    names = sorted({name for s in starts for name in s.server_phases_s})
    out["server_phases_s"] = {
        name: summary([s.server_phases_s[name] for s in starts if name in s.server_phases_s])
        for name in names
    }
    out["page_cache_dropped"] = all(s.page_cache_dropped for s in starts)
    return out


def markdown(report: dict[str, Any]) -> str:
    mb = 1e6
    size = report["size"]
    lines = [
        f"# Image {size['image']}: {size['bytes'] / mb:.0f} MB",
        "",
        f"Measured {report['measured_at']} on {report['host']['machine']}, "
        f"{report['host']['cpus']} CPUs, Docker {report['host']['docker']}, base "
        f"{report['host']['base_image']}.",
        "",
        "| layer | MB | compressed MB |",
        "| --- | ---: | ---: |",
    ]
    for layer in size["layers"]:
        packed = layer["compressed_bytes"]
        packed_text = f"{packed / mb:.1f}" if packed is not None else "-"
        lines.append(
            f"| `{layer['created_by'][:90]}` | {layer['bytes'] / mb:.1f} | {packed_text} |"
        )
    lines += ["", "| largest packages | MB |", "| --- | ---: |"]
    lines += [f"| {name} | {nbytes / mb:.1f} |" for name, nbytes in size["largest_packages"]]
    cold = report.get("cold_start")
    if cold:
        lines += [
            "",
            f"## Cold start ({len(cold['runs']) // 2} runs each; min / median / max, seconds)",
            "",
            f"Model: {cold['model']}. {cold['registry']}. Page cache dropped before each start: "
            f"{cold['from_registry']['page_cache_dropped']}.",
            "",
            "| phase | from the registry | already pulled |",
            "| --- | ---: | ---: |",
        ]
        fresh, warm = cold["from_registry"], cold["already_pulled"]
        rows = [
            ("pull", "pull_s"),
            ("create + start", "create_start_s"),
            (f"ready ({READY[report.get('engine', 'transformers')]} 200)", "ready_s"),
            ("first token", "first_token_s"),
        ]
        for label, key in rows:
            lines.append(f"| {label} | {triple(fresh[key])} | {triple(warm[key])} |")
        for name, values in fresh["server_phases_s"].items():
            other = warm["server_phases_s"].get(name)
            lines.append(f"| server: {name} | {triple(values)} | {triple(other)} |")
        projection = cold["projected_pull_transfer_s"]
        lines += [
            "",
            f"Compressed: {cold['compressed_bytes'] / mb:.0f} MB. Projected transfer of a pull "
            f"(a projection from the compressed bytes, not measured): "
            f"{projection['1_gbit']} s at 1 Gbit/s, {projection['10_gbit']} s at 10 Gbit/s.",
        ]
    compiled = report.get("compile_cache")
    if compiled:
        empty, warm = compiled["empty_cache"], compiled["warm_cache"]
        lines += [
            "",
            f"## Compile cache ({compiled['settings']}, image already pulled, seconds)",
            "",
            f"Where: {compiled['where']}; {compiled['cache_bytes'] / mb:.1f} MB after one start.",
            "",
            "| start | ready | first token |",
            "| --- | ---: | ---: |",
            f"| empty cache | {empty['ready_s']:.2f} | {empty['first_token_s']:.2f} |",
            f"| warm cache | {warm['ready_s']:.2f} | {warm['first_token_s']:.2f} |",
        ]
    return "\n".join(lines) + "\n"


def triple(values: dict[str, float] | None) -> str:
    if not values:
        return "-"
    return " / ".join(f"{values[k]:.2f}" for k in ("min", "median", "max"))


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def measure(args: argparse.Namespace) -> None:
    size = size_report(args.tag)
    report: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host(args.engine),
        "engine": args.engine,
        "size": size,
    }
    if args.cold_start:
        cold = cold_start(args)
        report["cold_start"] = cold
        if len(cold["compressed_layers"]) == len(size["layers"]):  # pair them bottom-up
            for layer, packed in zip(size["layers"], cold["compressed_layers"], strict=True):
                layer["compressed_bytes"], layer["digest"] = packed["bytes"], packed["digest"]
    if args.compile_cache and args.engine == "vllm":
        report["compile_cache"] = compile_cache(args)
    write(report, Path(args.out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["build", "measure"])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--cold-start", action="store_true", help="push, pull and time starts")
    parser.add_argument("--registry", help="HOST:PORT of a registry (default: start one here)")
    parser.add_argument("--model-dir", help="a model folder to serve, mounted read-only")
    parser.add_argument("--served-name", default="served")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engine", choices=list(READY), default="transformers")
    parser.add_argument(
        "--compile-cache", action="store_true", help="vllm: torch.compile starts, cold and warm"
    )
    parser.add_argument("--out", default=str(REPORTS / "image"))
    args, build_args = parser.parse_known_args(argv)
    try:
        require_engine()
        if args.step == "build":
            build(args.tag, build_args)
        else:
            measure(args)
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
