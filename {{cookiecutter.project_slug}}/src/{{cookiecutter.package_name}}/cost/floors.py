"""The floor of each cold-start phase of our server: the least it could take on this machine.

Measured by the meter right after the server's own cold start, with the server's Python, on
the same machine:

    startup    the server's time before it starts loading (interpreter, CLI, config, HTTP
               server) against a bare `python -c pass`
    imports    against a bare process importing torch and the model's transformers code
               (and peft with adapters), nothing else
    tokenizer  against transformers' AutoTokenizer.from_pretrained in that bare process
    weights    against the weight files' bytes over their read speed, read once the server
               has loaded them (from the page cache, unless it was emptied since). A
               memory-mapped load can beat it: pages are read when first used, in warm-up
    adapters   against the adapter files' bytes over the same speed
    warmup     against one warm request's time to first token (another prompt of about the
               first's length): a warm-up is at least one forward pass
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .schema import ColdStart, PhaseFloor

PACKAGE = __package__.rpartition(".")[0]

# Run with the server's interpreter: prints one JSON line of timings.
BARE_PROCESS = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from {package}.modeling import resolve_model
source, adapters = resolve_model(sys.argv[1]), json.loads(sys.argv[2])
try:
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(source))]
except (KeyError, ValueError):
    pass
if adapters:
    import peft
imported = time.perf_counter()
AutoTokenizer.from_pretrained(source)
tokenized = time.perf_counter()

def files(folder, pattern):
    return sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []

def read(paths):
    buffer, size, start = bytearray(16 << 20), 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while chunk := file.readinto(buffer):
                size += chunk
    return size, time.perf_counter() - start

weights = read(files(source, "*.safetensors"))
adapter = read([f for a in adapters for f in files(a, "*.safetensors")])
print(json.dumps(dict(
    imports_s=imported - started, tokenizer_s=tokenized - imported,
    weights_bytes=weights[0], read_s=weights[1], adapter_bytes=adapter[0],
)))
"""


def bare_interpreter_s(python: str, repeats: int = 3) -> float:
    """The quickest of a few `python -c pass`: an interpreter's start and exit."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([python, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - start)
    return best


def measure_floors(
    cold: ColdStart, model: str, adapters: list[str], warm_ttft_s: float | None
) -> tuple[list[PhaseFloor], str | None]:
    """Each measured phase beside its floor, and a note when the bare process failed."""
    phases = cold.server_phases_s
    python = cold.command[0] if cold.command else sys.executable
    script = BARE_PROCESS.replace("{package}", PACKAGE)
    done = subprocess.run(
        [python, "-c", script, model, json.dumps(adapters)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return [], f"phase floors not measured: the bare process failed ({tail[0]})"
    bare = json.loads(done.stdout.strip().splitlines()[-1])
    speed = bare["weights_bytes"] / bare["read_s"] if bare["read_s"] > 0 else None
    gib_s = f"{speed / 2**30:.2f} GiB/s" if speed else "n/a"
    floors: list[tuple[str, float | None, str]] = [
        ("imports", bare["imports_s"], "a bare process importing torch and the model's code"),
        ("tokenizer", bare["tokenizer_s"], "AutoTokenizer.from_pretrained, bare"),
        (
            "weights",
            bare["weights_bytes"] / speed if speed else None,
            f"{bare['weights_bytes'] / 1e6:.0f} MB at their read speed here, {gib_s}",
        ),
        (
            "adapters",
            bare["adapter_bytes"] / speed if speed and adapters else None,
            f"{bare['adapter_bytes'] / 1e6:.1f} MB at {gib_s}",
        ),
        ("warmup", warm_ttft_s, "one warm request's time to first token"),
    ]
    if "ready" in phases:
        loading = sum(phases.get(name, 0.0) for name, _, _ in floors)
        phases = {"startup": phases["ready"] - loading, **phases}
        floors.insert(0, ("startup", bare_interpreter_s(python), "python -c pass"))
    rows = []
    for phase, floor, how in floors:
        measured = phases.get(phase)
        if measured is None or floor is None:
            continue
        ratio = measured / floor if floor > 0 else None
        rows.append(
            PhaseFloor(phase=phase, measured_s=measured, floor_s=floor, ratio=ratio, floor=how)
        )
    return rows, None
