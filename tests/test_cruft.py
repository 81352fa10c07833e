"""The update path the README promises: a project made with `cruft create` takes a later
template change with `cruft update`, and keeps its own edits."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TEMPLATE

pytestmark = pytest.mark.skipif(
    shutil.which("cruft") is None or shutil.which("git") is None, reason="needs cruft and git"
)
NEW_FILE = "{{cookiecutter.project_slug}}/docs/upgrading.md"


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def git(cwd: Path, *args: str) -> str:
    result = run(["git", *args], cwd)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.fixture
def git_identity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Commits without the machine's git configuration (identity, signing, hooks)."""
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Template Test")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "template-test@example.com")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def template_repository(target: Path) -> Path:
    """The template as it is in this checkout (committed or not, ignored files left out),
    committed as the first commit of a new repository."""
    listed = git(TEMPLATE, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        source = TEMPLATE / name
        if source.is_file():  # a file deleted but not yet committed is still listed
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    git(target, "init", "-q", "-b", "main")
    git(target, "add", "-A")
    git(target, "commit", "-q", "-m", "template v1")
    return target


@pytest.mark.usefixtures("git_identity")
def test_cruft_update_brings_a_template_change_into_a_project(tmp_path: Path):
    template = template_repository(tmp_path / "template")
    created = run(["cruft", "create", "--no-input", str(template), "--output-dir", "out"], tmp_path)
    assert created.returncode == 0, created.stdout + created.stderr
    project = tmp_path / "out" / "lora-chat"
    assert (project / ".cruft.json").is_file()
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")
    check = run(["cruft", "check"], project)
    assert check.returncode == 0, check.stdout + check.stderr

    # The project's own edit, then a template release that changes a file and adds one.
    config = project / "configs" / "train.yaml"
    config.write_text(config.read_text() + "# our own note\n")
    git(project, "commit", "-q", "-am", "our edit")
    readme = template / "{{cookiecutter.project_slug}}" / "README.md"
    readme.write_text(readme.read_text() + "\nA line added by template v2.\n")
    (template / NEW_FILE).parent.mkdir()
    (template / NEW_FILE).write_text("# Upgrading {{ cookiecutter.project_name }}\n")
    git(template, "add", "-A")
    git(template, "commit", "-q", "-m", "template v2")

    stale = run(["cruft", "check"], project)
    assert stale.returncode != 0
    assert "out of date" in stale.stdout + stale.stderr

    update = run(["cruft", "update", "--skip-apply-ask"], project)
    assert update.returncode == 0, update.stdout + update.stderr
    assert (project / "README.md").read_text().endswith("A line added by template v2.\n")
    assert (project / "docs/upgrading.md").read_text() == "# Upgrading LoRA Chat\n"
    assert config.read_text().endswith("# our own note\n"), "the update undid our edit"
    assert not list(project.rglob("*.rej")), "the update left conflicts behind"
    changed = git(project, "status", "--porcelain", "--untracked-files=all").split("\n")
    assert sorted(line[3:] for line in changed if line) == [
        ".cruft.json",
        "README.md",
        "docs/upgrading.md",
    ]
    uptodate = run(["cruft", "check"], project)
    assert uptodate.returncode == 0, uptodate.stdout + uptodate.stderr
