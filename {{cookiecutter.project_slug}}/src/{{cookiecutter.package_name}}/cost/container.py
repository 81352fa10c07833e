"""The cold start that serverless billing pays: the container's (pull to first token) when
`nox -s docker -- --cold-start` measured it, else our server process's.

The container's is read from the report tools/image_report.py writes (reports/image.json):
under per-second billing the pull and the container start are billed too, and they are
most of a cold start (README "Image").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .config import ServerlessSection
from .schema import ColdStartKind


@dataclass(frozen=True)
class ContainerColdStart:
    """Median seconds from `docker pull` (from a registry) to the first streamed token."""

    first_token_s: float
    pull_s: float
    pulled: bool  # each start pulled the image from a registry
    runs: int
    image: str
    measured_at: str
    host: str

    @classmethod
    def read(cls, path: str | Path, start: str = "registry") -> ContainerColdStart:
        path = Path(path)
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(
                f"serverless.container_cold_start: cannot read {path} ({error}); write it "
                "with `nox -s docker -- --cold-start`, or set the key to null"
            ) from None
        cold = report.get("cold_start")
        if not cold:
            raise UserError(
                f"serverless.container_cold_start: {path} has no cold_start section (it was "
                "written without --cold-start); rerun `nox -s docker -- --cold-start`"
            )
        pulled = start == "registry"
        try:
            fresh, host = cold["from_registry" if pulled else "already_pulled"], report["host"]
            return cls(
                first_token_s=float(fresh["first_token_s"]["median"]),
                pull_s=float(fresh["pull_s"]["median"]) if pulled else 0.0,
                pulled=pulled,
                runs=sum(1 for run in cold["runs"] if run["pulled"] == pulled),
                image=report["size"]["image"],
                measured_at=report["measured_at"],
                host=f"{host['machine']}, {host['cpus']} CPUs, Docker {host['docker']}",
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(
                f"serverless.container_cold_start: {path} is not a report of "
                f"tools/image_report.py (missing or bad {error}); rerun "
                "`nox -s docker -- --cold-start`"
            ) from None

    def describe(self, path: str | Path) -> str:
        if self.pulled:
            how = f"pulled from a registry to first token, median of {self.runs} (pull "
            how += f"{self.pull_s:.1f} s, base layers already on the host"
        else:
            how = f"already on the node, `docker run` to first token, median of {self.runs} ("
        return f"container: {self.image} {how}; {path}, {self.measured_at}, {self.host})"

    @property
    def kind(self) -> ColdStartKind:
        return "container, from a registry" if self.pulled else "container, already pulled"


def serverless_cold_start(
    spec: ServerlessSection, measured_ready_s: float | None
) -> tuple[float, str, ColdStartKind] | None:
    """(seconds, where they come from, which cold start) for the serverless profiles, or
    None when unknown. In order: serverless.cold_start_s, the container's (from a registry
    or already pulled: serverless.container_start), our server process's measured spawn to
    ready (`measured_ready_s`); serverless.extra_cold_start_s is added to each."""
    kind: ColdStartKind
    if spec.cold_start_s is not None:
        seconds, source, kind = spec.cold_start_s, "serverless.cold_start_s", "configured"
    elif spec.container_cold_start:
        container = ContainerColdStart.read(spec.container_cold_start, spec.container_start)
        seconds, source = container.first_token_s, container.describe(spec.container_cold_start)
        kind = container.kind
    elif measured_ready_s is not None:
        seconds, source, kind = measured_ready_s, "measured: process spawn to ready", "process"
    else:
        return None
    if spec.extra_cold_start_s:
        source += f" + {spec.extra_cold_start_s:g} s serverless.extra_cold_start_s"
    return seconds + spec.extra_cold_start_s, source, kind
