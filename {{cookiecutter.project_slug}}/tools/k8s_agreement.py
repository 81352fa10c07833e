"""Do the rendered manifests agree with the image and the server? (used by tools/k8s.py)

Each side is read from its own source, never restated here: the Dockerfile through the
`dockerfile` package (Docker's own parser), the serving config as the container gets it (the
ConfigMap and the arguments, read by the CLI's parser and config loader), the server's GET
routes and Prometheus series from the package. A disagreement is a Problem naming the file,
the field and both values.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dockerfile

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PACKAGE = "{{ cookiecutter.package_name }}"
# The server's contract: loading and draining are "not ready"; only a dead engine is
# "unhealthy", so a liveness probe on /ready would kill every replica that is loading.
PROBE_PATHS = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
DRAIN_SIGNALS = {"TERM", "INT", "15", "2"}  # the signals uvicorn drains on
ALL_INTERFACES = {"0.0.0.0", "::"}
INIT_CONTAINER_WRITES = ["/tmp"]
PROMQL_WORDS = {"sum", "avg", "max", "min", "rate", "irate", "increase", "count", "by"}
Doc = dict[str, Any]


class K8sError(Exception):
    """Manifests that cannot be rendered or read, a tool that is missing: said without a
    traceback."""


@dataclass(frozen=True)
class Problem:
    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Image:
    """What the runtime stage of the Dockerfile promises a container."""

    ports: frozenset[int]
    env: dict[str, str]
    user: str = "root"
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    stop_signal: str | None = None
    ready_path: str | None = None  # from the HEALTHCHECK's URL
    ready_port: int | None = None
    start_period_s: float | None = None


def read_image(root: Path) -> Image:
    """The runtime stage's facts, Docker's defaults where it sets none."""
    commands = dockerfile.parse_file(str(root / "Dockerfile"))
    last_from = max(i for i, c in enumerate(commands) if c.cmd.upper() == "FROM")
    facts: dict[str, Any] = {"ports": set(), "env": {}}
    for command in commands[last_from + 1 :]:
        kind, value = command.cmd.upper(), list(command.value)
        if kind in ("USER", "WORKDIR", "STOPSIGNAL"):
            facts[{"STOPSIGNAL": "stop_signal"}.get(kind, kind.lower())] = value[0]
        elif kind == "EXPOSE":
            facts["ports"] |= {int(port.split("/")[0]) for port in value}
        elif kind == "ENV":
            facts["env"].update(zip(value[::2], value[1::2], strict=True))
        elif kind in ("ENTRYPOINT", "CMD"):
            argv = value if command.json else ["/bin/sh", "-c", " ".join(value)]
            if kind == "ENTRYPOINT":
                facts["cmd"] = []  # a new ENTRYPOINT resets CMD
            facts[kind.lower()] = argv
        elif kind == "HEALTHCHECK" and value[:1] != ["NONE"]:
            facts |= _healthcheck(value, command.flags)
    facts["ports"] = frozenset(facts["ports"])
    return Image(**facts)


def _healthcheck(value: list[str], flags: Iterable[str]) -> dict[str, Any]:
    """The readiness URL's path and port, and the start period, of a HEALTHCHECK."""
    facts: dict[str, Any] = {}
    url = re.search(r"https?://[^\s'\"]+", " ".join(value))
    if url:
        parsed = urlparse(url.group())
        facts["ready_path"], facts["ready_port"] = parsed.path, parsed.port or 80
    for flag in flags:
        if flag.startswith("--start-period="):
            facts["start_period_s"] = duration_s(flag.partition("=")[2])
    return facts


def duration_s(text: str) -> float:
    """A Docker duration (90s, 3m, 1m30s, 500ms) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise K8sError(f"Dockerfile: HEALTHCHECK --start-period={text} is not a duration")
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass(frozen=True)
class Server:
    """What the server code answers: its GET routes and its Prometheus series."""

    get_routes: frozenset[str]
    metrics: frozenset[str]


def read_server() -> Server:
    # fastapi and the package, never torch: models load only once serving starts.
    from {{ cookiecutter.package_name }}.serving.app import create_app
    from {{ cookiecutter.package_name }}.serving.config import ServeConfig
    from {{ cookiecutter.package_name }}.serving.metrics import Metrics

    app = create_app(ServeConfig())
    routes = {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    series = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }
    return Server(frozenset(routes), frozenset(series))


def expected_image(root: Path) -> str:
    """ghcr.io/<owner>/<name>: the name and the Homepage owner of pyproject.toml."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    owner = urlparse(project["urls"]["Homepage"]).path.strip("/").split("/")[0]
    return f"ghcr.io/{owner.lower()}/{project['name']}"


class Checker:
    """The disagreements of one rendered variant (tools.k8s.Manifests: its documents, and
    where each comes from) with the image and the server."""

    def __init__(self, manifests: Any, image: Image, server: Server, image_name: str) -> None:
        self.manifests, self.of_kind = manifests, manifests.of_kind
        self.image, self.server, self.image_name = image, server, image_name
        self.problems: list[Problem] = []

    def fail(self, doc: Doc, field: str, message: str) -> None:
        self.problems.append(Problem(self.manifests.where(doc), field, message))

    def run(self) -> list[Problem]:
        deployments = self.of_kind("Deployment")
        if len(deployments) != 1:
            kinds = [doc["kind"] for doc in self.manifests.documents]
            raise K8sError(f"expected one Deployment among the manifests, got {kinds}")
        for doc in self.of_kind("Deployment") + self.of_kind("Job"):
            self.pod(doc)
        (deployment,) = deployments
        server = self.server_container(deployment)
        if server is not None:
            self.serving(deployment, server)
        self.autoscaling(deployment)
        return self.problems

    # ------------------------------------------------------------ every pod of the image
    def pod(self, doc: Doc) -> None:
        spec = doc["spec"]["template"]["spec"]
        uid, _, gid = self.image.user.partition(":")
        pod_security = spec.get("securityContext", {})
        claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        if not uid.isdigit():
            self.fail(doc, "Dockerfile USER", f"{self.image.user!r}: runAsNonRoot needs a uid")
        for group in ("initContainers", "containers"):
            for container in spec.get(group, []):
                at = f"spec.template.spec.{group}[{container['name']}]"
                self.image_of(doc, at, container.get("image", ""))
                security = pod_security | container.get("securityContext", {})
                self.security(doc, f"{at}.securityContext", security, uid, gid)
                self.writable(doc, at, container, claims, group == "initContainers")
                self.resources(doc, f"{at}.resources", container.get("resources", {}))

    def image_of(self, doc: Doc, at: str, image: str) -> None:
        name, _, tag = image.partition(":")
        if name != self.image_name:
            self.fail(doc, f"{at}.image", f"{image!r}, but the image is {self.image_name}:<tag> "
                      "(pyproject.toml: name, and the owner in urls.Homepage)")  # fmt: skip
        elif tag in ("", "latest"):
            self.fail(doc, f"{at}.image", f"{image!r} has no release tag: set newTag "
                      "in deploy/k8s/base/kustomization.yaml")  # fmt: skip

    def security(self, doc: Doc, at: str, security: Doc, uid: str, gid: str) -> None:
        for key in ("runAsNonRoot", "readOnlyRootFilesystem"):
            if security.get(key) is not True:
                self.fail(doc, f"{at}.{key}", f"{security.get(key)}, must be true")
        for key, want in (("runAsUser", uid), ("runAsGroup", gid)):
            if want and str(security.get(key)) != want:
                self.fail(doc, f"{at}.{key}", f"{security.get(key)}, but the Dockerfile's "
                          f"USER is {self.image.user}")  # fmt: skip

    def writable(self, doc: Doc, at: str, container: Doc, claims: set[str], init: bool) -> None:
        """The weights volume at HF_HOME (none: weights baked into the image); with a
        read-only root, volumes where a container writes."""
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        models = env.get("HF_HOME", self.image.env.get("HF_HOME"))
        on_claims = sorted(path for path, m in mounts.items() if m["name"] in claims)
        if on_claims and models not in on_claims:
            self.fail(doc, f"{at}.volumeMounts", f"the models volume is at {on_claims}, but "
                      f"HF_HOME={models} (the Dockerfile's ENV): mount it there")  # fmt: skip
        for path in INIT_CONTAINER_WRITES if init else ["/tmp", self.image.workdir]:
            mount = mounts.get(path)
            if mount is None or mount.get("readOnly"):
                state = "read-only" if mount else "not mounted"
                self.fail(doc, f"{at}.volumeMounts", f"{path} is {state}, but the container "
                          "writes there (temporary files; home and caches at the Dockerfile's "
                          f"WORKDIR {self.image.workdir})")  # fmt: skip

    def resources(self, doc: Doc, at: str, resources: Doc) -> None:
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for kind, values, key in (("requests", requests, "cpu"), ("requests", requests, "memory"),
                                  ("limits", limits, "memory")):  # fmt: skip
            if key not in values:
                self.fail(doc, f"{at}.{kind}.{key}", "missing: the scheduler and the OOM "
                          "killer need it")  # fmt: skip
        memory = [quantity(values["memory"]) for values in (requests, limits) if "memory" in values]
        if len(memory) == 2 and memory[1] < memory[0]:
            self.fail(doc, f"{at}.limits.memory", f"{limits['memory']} is below the request "
                      f"{requests['memory']}")  # fmt: skip

    # ------------------------------------------------------------ the server container
    def argv(self, container: Doc) -> list[str]:
        """What a container runs, by Kubernetes' rules for command, args and the image."""
        if "command" in container:
            return [*container["command"], *container.get("args", [])]
        return [*self.image.entrypoint, *container.get("args", self.image.cmd)]

    def server_container(self, deployment: Doc) -> Doc | None:
        containers = deployment["spec"]["template"]["spec"]["containers"]
        for container in containers:
            if PACKAGE in self.argv(container):
                return container
        names = [c["name"] for c in containers]
        self.fail(deployment, "spec.template.spec.containers", f"none of {names} runs "
                  f"`{PACKAGE} serve` (ENTRYPOINT: {self.image.entrypoint})")  # fmt: skip
        return None

    def served_config(self, deployment: Doc, container: Doc) -> Any:
        from {{ cookiecutter.package_name }}.cli import build_parser
        from {{ cookiecutter.package_name }}.errors import UserError
        from {{ cookiecutter.package_name }}.serving.config import load_serve_config

        at = f"spec.template.spec.containers[{container['name']}].args"
        argv = self.argv(container)
        rest = argv[argv.index(PACKAGE) + 1 :]
        if rest[:1] != ["serve"]:
            self.fail(deployment, at, f"{argv} does not run `{PACKAGE} serve`")
            return None
        try:
            args = build_parser().parse_args(rest)
        except SystemExit:
            self.fail(deployment, at, f"{argv}: `{PACKAGE} serve` refuses these arguments")
            return None
        with tempfile.TemporaryDirectory() as folder:
            path = None
            if args.config is not None:
                text = self.mounted_file(deployment, container, args.config)
                if text is None:
                    return None
                path = Path(folder) / "serve.yaml"
                path.write_text(text, encoding="utf-8")
            try:
                return load_serve_config(path, args.overrides, args.model, args.adapter)
            except UserError as error:
                self.fail(deployment, at, f"the server would refuse its config: {error}")
                return None

    def mounted_file(self, deployment: Doc, container: Doc, path: str) -> str | None:
        """The text a container sees at `path`, when a ConfigMap volume provides it."""
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in self.of_kind("ConfigMap")}
        for mount in container.get("volumeMounts", []):
            base = mount["mountPath"].rstrip("/") + "/"
            source = volumes.get(mount["name"], {}).get("configMap")
            if source is None or not path.startswith(base):
                continue
            key = path[len(base) :]
            items = {item["path"]: item["key"] for item in source.get("items", [])}
            data = config_maps.get(source["name"], {})
            if items.get(key, key) in data:
                return data[items.get(key, key)]
        self.fail(deployment, "spec.template.spec.volumes", f"--config {path}: no ConfigMap "
                  "of these manifests is mounted there")  # fmt: skip
        return None

    def serving(self, deployment: Doc, container: Doc) -> None:
        config = self.served_config(deployment, container)
        if config is None:
            return
        at = f"spec.template.spec.containers[{container['name']}]"
        port = config.server.port
        if config.server.host not in ALL_INTERFACES:
            self.fail(deployment, f"{at}.args", f"server.host is {config.server.host}, but "
                      "probes and the Service need 0.0.0.0: add server.host=0.0.0.0")  # fmt: skip
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        if port not in ports.values():
            self.fail(deployment, f"{at}.ports", f"{sorted(ports.values())}, but "
                      f"server.port is {port} (configs/serve.yaml and args)")  # fmt: skip
        if port not in self.image.ports:
            self.fail(deployment, f"{at}.ports", f"server.port {port}, but the Dockerfile "
                      f"EXPOSEs {sorted(self.image.ports)}")  # fmt: skip
        if self.image.ready_port not in (None, port):
            self.fail(deployment, f"{at}.ports", f"server.port {port}, but the Dockerfile's "
                      f"HEALTHCHECK asks port {self.image.ready_port}")  # fmt: skip
        self.probes(deployment, at, container, ports, port)
        self.stop(deployment, at, container, config.server.shutdown_grace_s)
        env = container.get("env", [])
        secrets = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
        if config.server.api_key_env not in secrets:
            self.fail(deployment, f"{at}.env", f"no {config.server.api_key_env} from a "
                      f"secretKeyRef, but server.api_key_env is {config.server.api_key_env}: "
                      "the API would be open")  # fmt: skip
        self.service(deployment, ports, port)

    def probes(self, deployment: Doc, at: str, container: Doc, ports: dict, port: int) -> None:
        for name, path in PROBE_PATHS.items():
            get = container.get(name, {}).get("httpGet")
            if get is None:
                self.fail(deployment, f"{at}.{name}", f"missing: an httpGet on {path}")
                continue
            if get.get("path") != path or path not in self.server.get_routes:
                self.fail(deployment, f"{at}.{name}.httpGet.path", f"{get.get('path')}, but "
                          f"it must be {path} (the server's GET routes: "
                          f"{sorted(self.server.get_routes)})")  # fmt: skip
            probe_port = ports.get(get.get("port"), get.get("port"))
            if probe_port != port:
                self.fail(deployment, f"{at}.{name}.httpGet.port", f"{get.get('port')} "
                          f"({probe_port}), but server.port is {port}")  # fmt: skip
        if self.image.ready_path not in (None, PROBE_PATHS["readinessProbe"]):
            self.fail(deployment, f"{at}.readinessProbe", f"{PROBE_PATHS['readinessProbe']}, "
                      f"but the Dockerfile's HEALTHCHECK asks {self.image.ready_path}")  # fmt: skip
        startup = container.get("startupProbe", {})
        period, failures = startup.get("periodSeconds", 10), startup.get("failureThreshold", 3)
        budget = startup.get("initialDelaySeconds", 0) + period * failures
        if self.image.start_period_s and budget < self.image.start_period_s:
            self.fail(deployment, f"{at}.startupProbe", f"{budget} s for a cold start "
                      "(initialDelaySeconds + periodSeconds x failureThreshold), but the "
                      f"Dockerfile's HEALTHCHECK allows --start-period "
                      f"{self.image.start_period_s:g} s")  # fmt: skip

    def stop(self, deployment: Doc, at: str, container: Doc, drain_s: float) -> None:
        """Endpoints drop the pod during preStop, then SIGTERM and the drain, then the kill."""
        grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        pause = prestop_s(container)
        if pause is None:
            self.fail(deployment, f"{at}.lifecycle.preStop", "missing: on SIGTERM the server "
                      "stops accepting connections at once, so a pause (sleep: {seconds: 10}) "
                      "must let the endpoints and proxies drop the pod first")  # fmt: skip
            pause = 0.0
        if grace <= pause + drain_s:
            self.fail(deployment, "spec.template.spec.terminationGracePeriodSeconds",
                      f"{grace}, but preStop {pause:g} s + server.shutdown_grace_s {drain_s:g} s"
                      f" = {pause + drain_s:g} s: set it above that, or requests in flight are "
                      "killed")  # fmt: skip
        signal = (self.image.stop_signal or "SIGTERM").upper().removeprefix("SIG")
        if signal not in DRAIN_SIGNALS:
            self.fail(deployment, f"{at}.lifecycle", f"the Dockerfile's STOPSIGNAL "
                      f"{self.image.stop_signal} is not SIGTERM or SIGINT, which the server "
                      "drains on")  # fmt: skip

    def service(self, deployment: Doc, ports: dict, port: int) -> None:
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        services = [
            s for s in self.of_kind("Service") if selects(s["spec"].get("selector"), labels)
        ]
        if not services:
            self.fail(deployment, "spec.template.metadata.labels", f"{labels}: no Service "
                      "selects these pods")  # fmt: skip
        names = set()
        for service in services:
            for item in service["spec"]["ports"]:
                names.add(item.get("name"))
                target = item.get("targetPort", item["port"])
                if ports.get(target, target) != port:
                    self.fail(service, f"spec.ports[{item.get('name')}].targetPort",
                              f"{target} ({ports.get(target, target)}), but server.port is "
                              f"{port}")  # fmt: skip
        self.budgets(labels)
        self.monitors(services, names)
        self.recording_rules()

    def budgets(self, labels: dict) -> None:
        for budget in self.of_kind("PodDisruptionBudget"):
            if not selects(budget["spec"]["selector"].get("matchLabels"), labels):
                self.fail(budget, "spec.selector.matchLabels", f"{budget['spec']['selector']},"
                          f" but the pods are labelled {labels}")  # fmt: skip

    def monitors(self, services: list[Doc], names: set) -> None:
        for monitor in self.of_kind("ServiceMonitor"):
            wanted = monitor["spec"]["selector"].get("matchLabels", {})
            if not any(selects(wanted, s["metadata"].get("labels", {})) for s in services):
                self.fail(monitor, "spec.selector.matchLabels", f"{wanted}, but no Service "
                          "in front of the pods has these labels")  # fmt: skip
            for i, endpoint in enumerate(monitor["spec"]["endpoints"]):
                if endpoint.get("port") not in names:
                    self.fail(monitor, f"spec.endpoints[{i}].port", f"{endpoint.get('port')}, "
                              f"but the Service's ports are {sorted(map(str, names))}")  # fmt: skip
                if endpoint.get("path", "/metrics") not in self.server.get_routes:
                    self.fail(monitor, f"spec.endpoints[{i}].path", f"{endpoint.get('path')}, "
                              "but that is no GET route of the server")  # fmt: skip

    def recording_rules(self) -> None:
        """Every series a rule reads is one the server exports, or one a rule records."""
        from {{ cookiecutter.package_name }}.serving.metric_names import PREFIX

        for doc in self.of_kind("PrometheusRule"):
            rules = [r for group in doc["spec"]["groups"] for r in group["rules"]]
            recorded = {rule["record"] for rule in rules if "record" in rule}
            for i, rule in enumerate(rules):
                for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", str(rule["expr"])):
                    ours = name.startswith(PREFIX + "_")
                    if (ours and name not in self.server.metrics) or (
                        ":" in name and name not in recorded
                    ):
                        self.fail(doc, f"spec.groups[].rules[{i}].expr", f"{name}, which "
                                  "neither the server exports nor a rule records")  # fmt: skip

    # ------------------------------------------------------------ autoscaling
    def autoscaling(self, deployment: Doc) -> None:
        name = deployment["metadata"]["name"]
        scalers = self.of_kind("HorizontalPodAutoscaler") + self.of_kind("ScaledObject")
        if len(scalers) != 1:
            self.fail(deployment, "(autoscaling)", f"{len(scalers)} autoscalers; want "
                      "exactly one HorizontalPodAutoscaler or ScaledObject")  # fmt: skip
        for scaler in scalers:
            target = scaler["spec"]["scaleTargetRef"]["name"]
            if target != name:
                self.fail(scaler, "spec.scaleTargetRef.name", f"{target}, but the Deployment "
                          f"is {name}")  # fmt: skip
            if scaler["kind"] == "HorizontalPodAutoscaler":
                field = "spec.metrics[].pods.metric.name"
                specs = scaler["spec"].get("metrics", [])
                metrics = [m["pods"]["metric"]["name"] for m in specs if m["type"] == "Pods"]
            else:
                field = "spec.triggers[].metadata.query"
                triggers = scaler["spec"]["triggers"]
                queries = " ".join(t["metadata"].get("query", "") for t in triggers)
                names = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[])", queries)
                metrics = [metric for metric in names if metric not in PROMQL_WORDS]
            if not metrics:
                self.fail(scaler, field, "no metric of the server to scale on")
            for metric in metrics:
                if metric not in self.server.metrics:
                    self.fail(scaler, field, f"{metric}, but the server exports "
                              f"{sorted(self.server.metrics)}")  # fmt: skip


def selects(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def prestop_s(container: Doc) -> float | None:
    """Seconds the preStop hook pauses: `sleep: {seconds: N}`, or an exec of `sleep N`."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return None
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = " ".join(hook.get("exec", {}).get("command", []))
    found = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", command)
    return float(found.group(1)) if found else 0.0


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (512Mi, 4Gi, 2G, 500m) as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9,
             "T": 1e12, "m": 1e-3}  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    if match is None or match.group(2) not in {*units, ""}:
        raise K8sError(f"{text!r} is not a Kubernetes quantity")
    return float(match.group(1)) * units.get(match.group(2), 1)
