"""The template's benchmark scripts (benchmarks/) against a baked project: found by --project,
with the project's own helpers loaded from their files. What needs torch or Docker is run by
`nox -s bench` and tests/test_image.py; here only what the template's test tools can check."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import TEMPLATE, bake

BENCHMARKS = TEMPLATE / "benchmarks"
SCRIPTS = (
    "train_throughput.py", "meter_accuracy.py", "env_size.py", "code_change.py", "gpu_carry.py",
    "layer_codecs.py",
)  # fmt: skip


@pytest.fixture(scope="module")
def benchmarks():
    """baked.py, code_change.py, gpu_carry.py and layer_codecs.py, imported as the scripts
    import them (their folder on sys.path, as when one of them runs)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield (
            importlib.import_module("baked"),
            importlib.import_module("code_change"),
            importlib.import_module("gpu_carry"),
            importlib.import_module("layer_codecs"),
        )
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def baked(benchmarks):
    return benchmarks[0]


@pytest.fixture(scope="module")
def code_change(benchmarks):
    return benchmarks[1]


@pytest.fixture(scope="module")
def gpu_carry(benchmarks):
    return benchmarks[2]


@pytest.fixture(scope="module")
def layer_codecs(benchmarks):
    return benchmarks[3]


@pytest.fixture(scope="module")
def other_project(tmp_path_factory) -> Path:
    """A bake whose package is not the default's."""
    return bake(tmp_path_factory.mktemp("other"), project_name="Ticket Bot")


def test_the_scripts_are_not_baked(default_project: Path):
    assert not (default_project / "benchmarks").exists()
    for script in SCRIPTS:
        assert (BENCHMARKS / script).is_file()


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_takes_the_project_folder(script: str, default_project: Path, tmp_path):
    run = [sys.executable, str(BENCHMARKS / script)]
    done = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--project PROJECT" in done.stdout
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--project" in done.stderr
    done = subprocess.run([*run, "--project", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a baked project" in done.stderr


def test_the_package_is_found_per_bake(baked, default_project: Path, other_project: Path):
    assert baked.package_name(default_project) == "lora_chat"
    assert baked.package_name(other_project) == "ticket_bot"
    assert baked.project_folder(str(other_project)) == other_project.resolve()


def test_the_projects_helpers_load_from_their_files(baked, other_project: Path):
    path = list(sys.path)
    helpers = baked.project_conftest(other_project)
    assert callable(helpers.build_tiny_model) and callable(helpers.build_tiny_tokenizer)
    assert Path(helpers.__file__) == other_project / "tests" / "conftest.py"
    tools = baked.image_tools(other_project)
    assert tools.PACKAGE == "ticket_bot"
    assert tools.split("ticket-bot:local") == ("ticket-bot", "local")
    assert sys.path == path  # nothing of the project's is put on the import path


def test_the_code_change_is_one_comment_line_in_a_copy(code_change, other_project: Path, tmp_path):
    (other_project / ".venv" / "lib").mkdir(parents=True)  # an environment is not copied
    copy = tmp_path / "context"
    changed = code_change.changed_copy(other_project, copy)
    assert changed == Path("src/ticket_bot/__init__.py")
    before = (other_project / changed).read_text()
    assert (copy / changed).read_text() == before + code_change.CHANGE
    assert not (copy / ".venv").exists() and (copy / "Dockerfile").is_file()


def test_only_the_layers_the_registry_lacks_are_counted(code_change):
    before = {"layers": [{"digest": "a", "size": 900}, {"digest": "b", "size": 50}]}
    after = {"layers": [{"digest": "a", "size": 900}, {"digest": "c", "size": 7}]}
    assert code_change.new_layers(before, after) == [{"digest": "c", "size": 7}]


def test_carry_set_takes_its_versions_from_the_lock(gpu_carry, default_project: Path):
    lock = default_project / "requirements" / "dev.txt"
    locking = default_project / "tools" / "locking.py"
    pins = dict(line.split("==") for line in gpu_carry.carry_pins(lock, locking))
    locked = {line.split("==")[0]: line.split("==")[1] for line in lock.read_text().splitlines()
              if "==" in line and not line.startswith("#")}  # fmt: skip
    assert pins == {name: locked[name] for name in gpu_carry.CARRY}
    assert "torch" not in pins  # the machine's own CUDA build stays


def test_carry_wheel_repack_drops_members_and_their_record_rows(gpu_carry, tmp_path):
    wheel, slim = tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "slim.whl"
    rows = ["pkg/__init__.py,sha256=a,1", "pkg/tests/x.py,sha256=b,1", "pkg-1.0.dist-info/RECORD,,"]
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("pkg/__init__.py", "x = 1\n")
        out.writestr("pkg/tests/x.py", "")
        out.writestr("pkg-1.0.dist-info/RECORD", "".join(f"{row}\n" for row in rows))
    assert gpu_carry.repack(wheel, slim, ("pkg/tests/*",)) == 1
    with zipfile.ZipFile(slim) as repacked:
        assert repacked.namelist() == ["pkg/__init__.py", "pkg-1.0.dist-info/RECORD"]
        assert {i.compress_type for i in repacked.infolist()} == {zipfile.ZIP_STORED}
        record = repacked.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
    assert record == [rows[0], rows[2]]


def test_the_gpu_run_script_wants_a_project(tmp_path):
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_run.sh"), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage:" in done.stdout


def test_the_pull_floor_counts_only_the_layers_the_pulls_fetched(layer_codecs):
    def row(digest: str, seconds: float) -> dict:
        return {"digest": f"sha256:{digest}", "bytes": 100, "gzip_bytes": 40, "zstd_bytes": 30,
                "gzip_decompress_s": 4 * seconds, "zstd_decompress_s": seconds}  # fmt: skip

    codecs = {"layers": [row("a" * 64, 0.5), row("b" * 64, 0.25), row("c" * 64, 9.0)]}
    runs = [{"pulled_layers": ["a" * 12, "b" * 12]}, {"pulled_layers": ["a" * 12]}]
    floors = layer_codecs.container_floors(codecs, runs, 0.4)
    assert floors["create_start_s"] == 0.4 and floors["pulled_layers"] == 2
    assert floors["pull_s"] == {"zstd": 0.75, "gzip": 3.0, "pulled_bytes": 200,
                                "gzip_bytes": 80, "zstd_bytes": 60}  # fmt: skip
    assert "pull_s" not in layer_codecs.container_floors(codecs, [{"pulled_layers": []}], 0.4)


def test_layer_codecs_wants_a_cold_start_report(default_project: Path, tmp_path):
    report = tmp_path / "image.json"
    report.write_text('{"size": {}}')
    run = [sys.executable, str(BENCHMARKS / "layer_codecs.py"), "--project", str(default_project)]
    done = subprocess.run([*run, "--tag", "x:y", "--report", str(report)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and f"{report} holds no cold start" in done.stderr


def test_the_polling_observer_takes_the_polls_at_its_window_edges(benchmarks):
    """Busy at the first or the last poll: that poll is the window's edge; busy at none: said."""
    observer = importlib.import_module("meter_accuracy").Observer("http://x", None)
    # (time, requests in flight, completion tokens); busy from the 2nd poll to the 3rd.
    observer.samples = [(0.0, 0, 0), (1.0, 2, 10), (2.0, 1, 30), (3.0, 0, 40)]
    assert observer.tokens_per_s() == 40 / (2.5 - 0.5)
    observer.samples = [(0.0, 2, 0), (1.0, 1, 30), (2.0, 0, 40)]  # busy from the start
    assert observer.tokens_per_s() == 40 / (1.5 - 0.0)
    observer.samples = [(0.0, 0, 0), (1.0, 2, 30), (2.0, 1, 40)]  # still busy at the end
    assert observer.tokens_per_s() == 40 / (2.0 - 0.5)
    observer.samples = [(0.0, 0, 0), (1.0, 0, 40)]  # the whole level between two polls
    with pytest.raises(ValueError, match="no poll of /metrics"):
        observer.tokens_per_s()
