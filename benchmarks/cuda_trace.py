"""What the CUDA serving environment carries that serving never loads, traced on a CPU.

    python benchmarks/cuda_trace.py --python /tmp/cudatrace/venv/bin/python \
        --project /tmp/cudatrace/bake/lora-chat --model /tmp/smolstand \
        --out benchmarks/cuda_trace.json

The venv holds a baked project's serving lock (requirements/serve.txt) with the CUDA build
of torch and the project. This script starts the project's real `serve` on the CPU under a
recorder that writes, on SIGUSR1 (sent once /ready answers 200) and at exit, the Python
modules imported (sys.modules) and the files mapped into the process (/proc/self/maps);
serves one chat request (streaming and not, through a random LoRA adapter), stops the server
with SIGTERM, and then joins the trace to the installed distributions (their RECORD files):
- which distributions serving imports or maps, and which it never loads, with their bytes;
- for the CUDA libraries (nvidia-*, cuda-*, triton): every shared library, whether it was
  mapped, and whether it is a link-time dependency (DT_NEEDED, transitively) of
  torch/lib/libtorch_cuda.so, which loads whenever torch is imported: those cannot be removed;
  the others are dlopen'ed lazily, if ever, and only a GPU run can say which.
Writes the JSON and a markdown summary next to it (same name, .md). Standard library only.
Everything a CPU trace cannot see is marked "needs a GPU to prove".
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PACKAGE = "lora_chat"
GPU = "needs a GPU to prove"
MB = 1e6
# The real `serve`, recording to <record>.ready.json on SIGUSR1 and to <record> at exit.
RECORDER = """
import atexit, json, runpy, signal, sys, traceback
record, sys.argv = sys.argv[1], ["{package}", *sys.argv[2:]]
WATCH, stacks = {watch!r}, {{}}
class FirstImport:  # the import stack of the first submodule of each watched package
    def find_spec(self, name, path=None, target=None):
        for top in WATCH:
            if name.startswith(top + ".") and top not in stacks:
                frames = traceback.extract_stack()[:-1]
                stacks[top] = [f"{{f.filename}}:{{f.lineno}} {{f.line}}" for f in frames
                               if "site-packages" in f.filename]
        return None
sys.meta_path.insert(0, FirstImport())
def mapped():
    with open("/proc/self/maps") as maps:
        found = {{line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}}
    return sorted(path for path in found if path.startswith("/"))
def memory():
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "Rss")))
    return {{k: int(v.split()[0]) * 1024 for k, v in fields.items()}}
def dump(path):
    modules = dict(sys.modules)
    files = {{n: getattr(m, "__file__", None) for n, m in modules.items()}}
    files = {{n: f for n, f in files.items() if isinstance(f, str)}}
    record = {{"modules": sorted(modules), "files": files, "mapped": mapped(),
               "memory": memory(), "first_import": stacks}}
    with open(path, "w") as sink:
        json.dump(record, sink)
signal.signal(signal.SIGUSR1, lambda *_: dump(record + ".ready.json"))
atexit.register(dump, record)
runpy.run_module("{package}", run_name="__main__")
"""
# Packages whose first import the recorder traces back to the code that triggered it.
WATCH = ("triton", "cuda.bindings", "torch._dynamo", "torch._inductor", "torch.cuda")
ADAPTER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from lora_adapters import random_adapter
random_adapter(Path(sys.argv[2]), Path(sys.argv[3]))
"""
SHARED = re.compile(r"\.so(\.[0-9][0-9A-Za-z.]*)?$")


def is_shared(name: str) -> bool:
    return bool(SHARED.search(name))


def is_cuda(name: str) -> bool:
    name = name.lower()
    return name.startswith(("nvidia-", "cuda-")) or name == "triton"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def serve_and_record(args: argparse.Namespace, work: Path) -> dict:
    """Serve one request under the recorder; return both records and what happened."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(f"{PACKAGE.upper()}_API_KEY", None)
    adapters: list[str] = []
    if args.adapter:
        adapter = work / "adapter"
        tests = str(args.project / "tests")
        command = [str(args.python), "-c", ADAPTER, tests, str(args.model), str(adapter)]
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
        adapters = [f"--adapter=tuned={adapter}"]
    port, record = free_port(), work / "record.json"
    command = [
        str(args.python), "-c", RECORDER.format(package=PACKAGE, watch=WATCH), str(record), "serve",
        "--model", str(args.model), *adapters, "model.device=cpu", f"server.port={port}",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    started = time.monotonic()
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if server.poll() is not None or time.monotonic() > started + args.timeout:
                raise RuntimeError(f"server never ready:\n{log.read_text()[-3000:]}")
            try:
                if http(f"{url}/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        ready_s = time.monotonic() - started
        server.send_signal(signal.SIGUSR1)
        at_ready = Path(f"{record}.ready.json")
        deadline = time.monotonic() + 60
        while not at_ready.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let the handler finish writing
        body = {
            "model": "tuned" if args.adapter else "base",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        requests = []
        for extra in ({"stream": True, "temperature": 0.8, "seed": 1}, {"temperature": 0}):
            status, text = http(f"{url}/v1/chat/completions", {**body, **extra})
            requests.append({**extra, "status": status, "response_bytes": len(text)})
            if status != 200:
                raise RuntimeError(f"chat request {extra} answered {status}: {text[:500]!r}")
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {
        "command": command,
        "ready_s": round(ready_s, 2),
        "requests": requests,
        "exit_code": exit_code,
        "at_ready": json.loads(at_ready.read_text()),
        "at_exit": json.loads(record.read_text()),
    }


def elf_needed_python(path: Path) -> list[str]:
    """DT_NEEDED of a 64-bit little-endian ELF file, read with struct (no binutils)."""
    data = path.read_bytes()
    shoff, shentsize, shnum = (
        struct.unpack_from("<Q", data, 0x28)[0],
        *struct.unpack_from("<HH", data, 0x3A),
    )
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    needed = []
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value : end].decode())
    return needed


def elf_needed(path: Path) -> tuple[list[str], str]:
    """DT_NEEDED of a shared library and the tool that read it."""
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
        return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out), "readelf -d"
    return elf_needed_python(path), "python ELF parser"


def closure(root: Path, by_name: dict[str, Path]) -> tuple[list[str], dict[str, list[str]], str]:
    """The venv libraries root needs at link time, transitively; the DT_NEEDED of each."""
    seen: dict[str, list[str]] = {}
    todo, tool = [root], ""
    while todo:
        lib = todo.pop()
        if lib.name in seen:
            continue
        seen[lib.name], tool = elf_needed(lib)
        todo += [by_name[name] for name in seen[lib.name] if name in by_name]
    return sorted(name for name in seen if name != root.name), seen, tool


def files_of(dist: importlib.metadata.Distribution) -> list[tuple[Path, int, str]]:
    """(resolved path, bytes, name in RECORD) of every installed file of dist."""
    found = []
    for entry in dist.files or []:
        path = Path(dist.locate_file(entry)).resolve()
        if path.is_file():
            size = int(entry.size) if entry.size else path.stat().st_size
            found.append((path, size, str(entry)))
    return found


def tree_bytes(root: Path) -> tuple[int, int]:
    """(all regular files, of which in __pycache__) under root, symlinks not followed."""
    total = cache = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
                cache += path.stat().st_size if "__pycache__" in path.parts else 0
    return total, cache


def pure_modules(names: list[str], site: Path) -> list[str]:
    """Library modules with Python source (the definition of the bake's test_slim_env)."""
    found = []
    for name in names:
        if name.startswith(PACKAGE):
            continue
        base = site.joinpath(*name.split("."))
        if (base / "__init__.py").is_file() or base.with_suffix(".py").is_file():
            found.append(name)
    return sorted(found)


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line),
        platform.processor(),
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(line.split()[1]) * 1024 for line in meminfo if "MemTotal" in line)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "gpu": "none (CPU-only machine)",
    }


def analyse(args: argparse.Namespace, trace: dict) -> dict:
    site = Path(
        subprocess.run(
            [str(args.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    ).resolve()
    venv = site.parents[2]
    ready, exit_ = trace["at_ready"], trace["at_exit"]
    module_files = {str(Path(f).resolve()) for rec in (ready, exit_) for f in rec["files"].values()}
    mapped_ready = {str(Path(p).resolve()) for p in ready["mapped"] if Path(p).exists()}
    mapped_exit = {str(Path(p).resolve()) for p in exit_["mapped"] if Path(p).exists()}
    mapped = mapped_ready | mapped_exit

    dists = sorted(
        importlib.metadata.distributions(path=[str(site)]), key=lambda d: d.metadata["Name"].lower()
    )
    libs_by_name: dict[str, Path] = {}
    for dist in dists:
        for path, _, _ in files_of(dist):
            if is_shared(path.name):
                libs_by_name.setdefault(path.name, path)
    torch_lib = site / "torch" / "lib"
    roots = {}
    for root in ("libtorch_cuda.so", "libtorch_global_deps.so"):
        if not (torch_lib / root).is_file():  # a CPU build of torch has no libtorch_cuda
            roots[root] = {"direct": [], "transitive_in_venv": [], "tool": "absent"}
            continue
        direct, every, tool = closure(torch_lib / root, libs_by_name)
        roots[root] = {"direct": every[root], "transitive_in_venv": direct, "tool": tool}
    hard = set(roots["libtorch_cuda.so"]["transitive_in_venv"]) | set(
        roots["libtorch_global_deps.so"]["transitive_in_venv"]
    )

    rows, cuda_libs = [], []
    for dist in dists:
        name, files = dist.metadata["Name"], files_of(dist)
        pyc = sum(size for path, size, _ in files if path.suffix == ".pyc")
        imported = sorted(
            entry for path, _, entry in files if str(path) in module_files and path.suffix != ".pyc"
        )
        libs = [(path, size, entry) for path, size, entry in files if is_shared(path.name)]
        maps = sorted(entry for path, _, entry in libs if str(path) in mapped)
        row = {
            "name": name,
            "version": dist.version,
            "cuda": is_cuda(name),
            "bytes": sum(size for _, size, _ in files) - pyc,
            "pyc_bytes_from_pip": pyc,
            "files": len(files),
            "python_modules_imported": len(imported),
            "shared_libraries": len(libs),
            "shared_libraries_mapped": maps,
            "loaded_on_cpu": bool(imported or maps),
        }
        rows.append(row)
        if row["cuda"]:
            for path, size, entry in libs:
                direct = path.name in roots["libtorch_cuda.so"]["direct"]
                link = "direct" if direct else "transitive" if path.name in hard else "no"
                cuda_libs.append({
                    "package": name,
                    "file": entry,
                    "bytes": size,
                    "dt_needed_by_libtorch_cuda": link,
                    "mapped_at_ready": str(path) in mapped_ready,
                    "mapped_at_exit": str(path) in mapped_exit,
                })  # fmt: skip
            other = {}
            for path, size, entry in files:
                if not is_shared(path.name) and path.suffix not in (".py", ".pyc"):
                    kind = (
                        "headers" if "include" in Path(entry).parts
                        else "static/bitcode" if path.suffix in (".a", ".bc")
                        else "other"
                    )  # fmt: skip
                    other[kind] = other.get(kind, 0) + size
            row["non_library_bytes"] = other
    mapped_venv = [Path(p) for p in sorted(mapped) if p.startswith(str(site)) and is_shared(p)]
    needs = {lib: elf_needed(lib)[0] for lib in mapped_venv}
    for lib in cuda_libs:
        name = Path(lib["file"]).name
        lib["needed_by_mapped"] = sorted(p.name for p, names in needs.items() if name in names)
        mapped_any = lib["mapped_at_ready"] or lib["mapped_at_exit"]
        if lib["dt_needed_by_libtorch_cuda"] != "no":
            lib["verdict"] = "link-time dependency: loaded whenever torch is imported; keep"
        elif mapped_any:
            by = ", ".join(lib["needed_by_mapped"]) or "dlopen or import"
            lib["verdict"] = f"mapped on CPU, not DT_NEEDED by libtorch_cuda (via {by}); keep"
        else:
            lib["verdict"] = f"never loaded on CPU; dlopen'ed lazily on a GPU or never: {GPU}"

    never = [r for r in rows if not r["loaded_on_cpu"]]
    cuda_never_libs = [
        lib for lib in cuda_libs if lib["verdict"].startswith("never") and lib["package"] not in
        {r["name"] for r in never}
    ]  # fmt: skip
    total, cache = tree_bytes(venv)
    at_ready_lib = pure_modules(ready["modules"], site)
    at_exit_lib = pure_modules(exit_["modules"], site)
    committed = {}
    listed = args.project / "tools" / "serving_modules.txt"
    budget = args.project / "tests" / "import_budget.json"
    if listed.is_file():
        names = set(listed.read_text().split())
        committed["serving_modules_txt"] = len(names)
        committed["cuda_build_only"] = sorted(set(at_exit_lib) - names)
        committed["cpu_list_only"] = sorted(names - set(at_exit_lib))
        tops = {name.split(".")[0] for name in committed["cpu_list_only"]}
        committed["listed_packages_not_in_this_venv"] = sorted(
            top for top in tops if not (site / top).exists() and not (site / f"{top}.py").exists()
        )
    if budget.is_file():
        committed["modules_before_ready"] = json.loads(budget.read_text())["modules_before_ready"]
    torch_version = (site / "torch" / "version.py").read_text()
    lock = (args.project / "requirements" / "serve.txt").read_text()
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "python": subprocess.run(
            [str(args.python), "-V"], capture_output=True, text=True
        ).stdout.strip(),
        "torch": re.search(r"__version__ = '([^']+)'", torch_version).group(1),
        "torch_cuda": re.search(r"\ncuda: [^=]*= '?([^'\n]+)", torch_version).group(1),
        "lock_input_hash": re.search(r"input-hash: (\S+)", lock).group(1),
        "venv": str(venv),
        "model": str(args.model),
        "server": {k: trace[k] for k in ("command", "ready_s", "requests", "exit_code")},
        "memory_bytes": {"at_ready": ready["memory"], "at_exit": exit_["memory"]},
        "first_import_stacks": {
            top: [frame.split("site-packages/", 1)[-1] for frame in stack]
            for top, stack in exit_["first_import"].items()
        },
        "modules": {
            "sys_modules_at_ready": len(ready["modules"]),
            "sys_modules_at_exit": len(exit_["modules"]),
            "library_modules_at_ready": len(at_ready_lib),
            "library_modules_at_exit": len(at_exit_lib),
            "committed_in_bake": committed,
            "names_at_ready": ready["modules"],
            "library_names_at_exit": at_exit_lib,
        },
        "venv_bytes": {"total": total, "pycache": cache, "without_pycache": total - cache},
        "mapped_shared_libraries": sorted(p for p in mapped if is_shared(Path(p).name)),
        "libtorch_needed": roots,
        "distributions": rows,
        "cuda_libraries": cuda_libs,
        "saving": {
            "never_loaded_non_cuda_bytes": sum(r["bytes"] for r in never if not r["cuda"]),
            "never_loaded_cuda_bytes": sum(r["bytes"] for r in never if r["cuda"]),
            "unmapped_libraries_in_loaded_cuda_packages_bytes": sum(
                lib["bytes"] for lib in cuda_never_libs
            ),
            "unmapped_libraries_by_package": {
                name: sum(lib["bytes"] for lib in cuda_never_libs if lib["package"] == name)
                for name in sorted({lib["package"] for lib in cuda_never_libs})
            },
            "non_library_files_in_loaded_cuda_packages_bytes": {
                kind: sum(
                    r.get("non_library_bytes", {}).get(kind, 0)
                    for r in rows
                    if r["cuda"] and r["loaded_on_cpu"]
                )
                for kind in ("headers", "static/bitcode", "other")
            },
        },
    }


def compare(base: dict, this: dict) -> dict:
    """This trace against a baseline trace of the same lock with another torch build."""
    ours, theirs = set(this["modules"]["names_at_ready"]), set(base["modules"]["names_at_ready"])
    tops: dict[str, int] = {}
    for name in sorted(ours - theirs):
        tops[name.split(".")[0]] = tops.get(name.split(".")[0], 0) + 1
    return {
        "torch": base["torch"],
        "venv_bytes_without_pycache": base["venv_bytes"]["without_pycache"],
        "sys_modules_at_ready": base["modules"]["sys_modules_at_ready"],
        "library_modules_at_exit": base["modules"]["library_modules_at_exit"],
        "mapped_shared_libraries": len(base["mapped_shared_libraries"]),
        "ready_s": base["server"]["ready_s"],
        "rss_at_ready_bytes": base["memory_bytes"]["at_ready"]["VmRSS"],
        "only_here_at_ready_by_top_level": tops,
        "only_in_baseline_at_ready": len(theirs - ours),
    }


def mb(value: int) -> str:
    return f"{value / MB:,.1f}"


def markdown(result: dict) -> str:
    m, s, mods = result["machine"], result["saving"], result["modules"]
    rows = result["distributions"]
    loaded = [r for r in rows if r["loaded_on_cpu"]]
    never = [r for r in rows if not r["loaded_on_cpu"]]
    out = [
        "# What the CUDA serving image carries that serving never loads (CPU trace)",
        "",
        f"Generated by `benchmarks/cuda_trace.py` on {result['date_utc']}. Machine: "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, {m['gpu']}. "
        f"{result['python']}, torch {result['torch']} (CUDA {result['torch_cuda']}), serve "
        f"lock {result['lock_input_hash'][:19]}..., model `{result['model']}` on the CPU. "
        "MB = 10^6 bytes; package bytes are the files in each wheel's RECORD (no .pyc).",
        "",
        "One served request (an adapter; streaming with sampling, then greedy), traced with "
        "`sys.modules` and `/proc/self/maps` at /ready and at exit. A CPU trace shows what CPU "
        f"serving loads; what a GPU serve loads besides is marked **{GPU}**.",
        "",
        *(f"- {note}" for note in result.get("notes", [])),
        f"- venv: {mb(result['venv_bytes']['without_pycache'])} MB "
        f"(+ {mb(result['venv_bytes']['pycache'])} MB of `__pycache__`)",
        f"- ready after {result['server']['ready_s']} s (shared 2-core machine, indicative); "
        f"RSS at ready {mb(result['memory_bytes']['at_ready']['VmRSS'])} MB, of which "
        f"{mb(result['memory_bytes']['at_ready'].get('RssFile', 0))} MB file-backed (mapped "
        "libraries' pages)",
        f"- modules in `sys.modules`: {mods['sys_modules_at_ready']} at /ready, "
        f"{mods['sys_modules_at_exit']} at exit; library modules with source: "
        f"{mods['library_modules_at_exit']} at exit",
    ]
    base = result.get("baseline")
    if base:
        tops = ", ".join(f"{k} {v}" for k, v in base["only_here_at_ready_by_top_level"].items())
        out.append(
            f"- against the same lock with torch {base['torch']} (same script, same machine): "
            f"venv {mb(base['venv_bytes_without_pycache'])} MB; sys.modules at /ready "
            f"{base['sys_modules_at_ready']} vs {mods['sys_modules_at_ready']} here (here only, "
            f"by top-level package: {tops}; there only: {base['only_in_baseline_at_ready']}); "
            f"{base['mapped_shared_libraries']} vs {len(result['mapped_shared_libraries'])} "
            f"shared libraries mapped; ready {base['ready_s']} s vs "
            f"{result['server']['ready_s']} s; RSS at ready {mb(base['rss_at_ready_bytes'])} vs "
            f"{mb(result['memory_bytes']['at_ready']['VmRSS'])} MB"
        )
    committed = mods["committed_in_bake"]
    if committed:
        only = sorted({n.split(".")[0] for n in committed.get("cuda_build_only", [])})
        out.append(
            f"- the bake's committed records (import budget: "
            f"{committed.get('modules_before_ready')} modules at /ready; "
            f"tools/serving_modules.txt: {committed.get('serving_modules_txt')} library "
            f"modules) were recorded in the template's CPU-build test environment, which has "
            f"packages this serve lock lacks "
            f"({', '.join(committed.get('listed_packages_not_in_this_venv', []))}): not a pure "
            f"CPU-vs-CUDA comparison. The CUDA build imports "
            f"{len(committed.get('cuda_build_only', []))} library modules the list lacks "
            f"(top-level: {', '.join(only)}), so the image's bytecode list misses them; "
            f"{len(committed.get('cpu_list_only', []))} listed modules were not imported here"
        )
    out += [
        "",
        "## Packages serving loads on the CPU",
        "",
        "| package | version | MB | modules imported | shared libs mapped |",
        "|---|---|---:|---:|---:|",
    ]
    for r in sorted(loaded, key=lambda r: -r["bytes"]):
        out.append(
            f"| {r['name']} | {r['version']} | {mb(r['bytes'])} | {r['python_modules_imported']} "
            f"| {len(r['shared_libraries_mapped'])}/{r['shared_libraries']} |"
        )
    out += [
        "",
        f"## Packages serving on the CPU never loads (a GPU run may: {GPU} for CUDA ones)",
        "",
        "| package | version | MB | CUDA |",
        "|---|---|---:|---|",
    ]
    for r in sorted(never, key=lambda r: -r["bytes"]):
        cuda = "yes" if r["cuda"] else ""
        out.append(f"| {r['name']} | {r['version']} | {mb(r['bytes'])} | {cuda} |")
    needed = result["libtorch_needed"]["libtorch_cuda.so"]
    out += [
        "",
        "## CUDA shared libraries",
        "",
        f"DT_NEEDED of torch/lib/libtorch_cuda.so ({needed['tool']}): "
        f"{', '.join(needed['direct'])}. In the venv, transitively: "
        f"{', '.join(needed['transitive_in_venv'])}. These load whenever torch is imported, on "
        "any machine: removing them breaks `import torch`.",
        "",
        "| package | library | MB | DT_NEEDED | mapped on CPU | verdict |",
        "|---|---|---:|---|---|---|",
    ]
    for lib in sorted(result["cuda_libraries"], key=lambda x: (x["package"], -x["bytes"])):
        seen = "yes" if lib["mapped_at_ready"] or lib["mapped_at_exit"] else "no"
        out.append(
            f"| {lib['package']} | {lib['file']} | {mb(lib['bytes'])} | "
            f"{lib['dt_needed_by_libtorch_cuda']} | {seen} | {lib['verdict']} |"
        )
    out += ["", "## Why CUDA-only Python packages load on the CPU (first import, traced)", ""]
    for top, stack in result["first_import_stacks"].items():
        ours = [i for i, frame in enumerate(stack) if frame.startswith(PACKAGE + "/")]
        frames = stack[ours[-1] if ours else 0 :][-10:]
        chain = " → ".join(f"`{frame.split(' ', 1)[0]}`" for frame in frames)
        out.append(f"- `{top}`: {chain}")
    out += [
        "",
        "Unmapped, not-DT_NEEDED libraries inside CUDA packages that are otherwise loaded "
        f"(MB; {GPU}): "
        + ", ".join(
            f"{name} {mb(size)}"
            for name, size in sorted(
                s["unmapped_libraries_by_package"].items(), key=lambda item: -item[1]
            )
        ),
    ]
    extra = s["non_library_files_in_loaded_cuda_packages_bytes"]
    out += [
        "",
        "## Expected saving",
        "",
        "| what | MB | proven by |",
        "|---|---:|---|",
        f"| non-CUDA packages CPU serving never loads | {mb(s['never_loaded_non_cuda_bytes'])} | "
        "this CPU trace (a GPU serve's Python imports: confirm with the same trace on a GPU) |",
        f"| CUDA packages CPU serving never loads | {mb(s['never_loaded_cuda_bytes'])} | {GPU} |",
        "| unmapped, not DT_NEEDED libraries inside loaded CUDA packages | "
        f"{mb(s['unmapped_libraries_in_loaded_cuda_packages_bytes'])} | {GPU} |",
        f"| headers in loaded CUDA packages | {mb(extra['headers'])} | {GPU} (an extension "
        "or torch.compile build may read them) |",
        f"| static libraries / bitcode in loaded CUDA packages | {mb(extra['static/bitcode'])} "
        f"| never mapped here; triton's libdevice and nvshmem's device bitcode are read by a "
        f"GPU kernel compile: {GPU} |",
        "",
        "A GPU run may dlopen any of the never-loaded CUDA libraries (cuDNN's engine and "
        "sub-libraries, cuBLASLt kernels, NCCL, nvshmem, cuSPARSELt, cuFile, cuFFT, cuRAND, "
        "cuSOLVER, NVRTC builtins, CUPTI, triton and an inductor compile): the CUDA rows above "
        f"are candidates only, and every CUDA saving {GPU} (run this script against a GPU "
        "serve with model.device=cuda).",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", type=Path, required=True, help="the venv's interpreter")
    parser.add_argument("--project", type=Path, required=True, help="the baked project")
    parser.add_argument("--model", type=Path, required=True, help="a model folder")
    parser.add_argument("--out", type=Path, required=True, help="the JSON; .md beside it")
    parser.add_argument("--no-adapter", dest="adapter", action="store_false")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to /ready")
    parser.add_argument("--work", type=Path, help="keep the adapter, log and records here")
    parser.add_argument("--note", action="append", default=[], help="a line for the .md")
    parser.add_argument(
        "--baseline", type=Path, help="this script's JSON from a CPU-build venv, to compare"
    )
    args = parser.parse_args(argv)
    args.project = args.project.resolve()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        trace = serve_and_record(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="cuda_trace.") as work:
            trace = serve_and_record(args, Path(work))
    result = analyse(args, trace)
    result["notes"] = args.note
    if args.baseline:
        result["baseline"] = compare(json.loads(args.baseline.read_text()), result)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"cuda_trace: wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
