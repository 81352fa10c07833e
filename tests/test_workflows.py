"""GitHub workflows of the template and of a baked project: pinned actions, clean linters,
and a `nox -s lint` that names the file and line of a broken workflow."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TEMPLATE, bake, run_nox

# `uses: owner/repo@<commit>  # vX.Y.Z`: a commit cannot move, the tag says which release it is.
PINNED = re.compile(
    r"uses: (?P<action>[\w.-]+/[\w.-]+)@(?P<commit>[0-9a-f]{40})  # (?P<tag>v\d+\.\d+\.\d+)$",
    re.MULTILINE,
)
TOOLS = ("actionlint", "zizmor", "shellcheck", "check-jsonschema")
needs_tools = pytest.mark.skipif(
    not all(map(shutil.which, TOOLS)), reason=f"needs {', '.join(TOOLS)} (TEST_DEPS)"
)


def workflows_of(folder: Path) -> list[Path]:
    return sorted((folder / ".github/workflows").glob("*.yml"))


def lint_workflows(folder: Path, *actionlint_options: str) -> subprocess.CompletedProcess[str]:
    """actionlint (with shellcheck), then zizmor offline, as both lint sessions run them."""
    files = [path.relative_to(folder).as_posix() for path in workflows_of(folder)]
    run = {"cwd": folder, "capture_output": True, "text": True, "timeout": 120}
    result = subprocess.run(["actionlint", *actionlint_options, *files], **run)
    if result.returncode == 0:
        result = subprocess.run(["zizmor", "--offline", ".github"], **run)
    return result


@needs_tools
def test_template_workflows_are_lint_clean():
    result = lint_workflows(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout


@needs_tools
@pytest.mark.parametrize("labels", [None, "self-hosted,linux, a100 ,12.8"])
def test_baked_workflows_are_lint_clean(tmp_path: Path, labels: str | None):
    project = bake(tmp_path, **({"gpu_runner_labels": labels} if labels else {}))
    result = lint_workflows(project, "-config-file", ".github/actionlint.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout
    if labels:  # "12.8" stays a string label (not the number 12.8) in the config
        config = yaml.safe_load((project / ".github/actionlint.yaml").read_text())
        assert config["self-hosted-runner"]["labels"] == ["self-hosted", "linux", "a100", "12.8"]


@needs_tools
def test_workflows_and_dependabot_match_their_schemas(default_project: Path):
    for folder in (TEMPLATE, default_project):
        workflows = list(map(str, workflows_of(folder)))
        schema = ["check-jsonschema", "--builtin-schema"]
        subprocess.run([*schema, "vendor.github-workflows", *workflows], check=True)
        dependabot = str(folder / ".github/dependabot.yml")
        subprocess.run([*schema, "vendor.dependabot", dependabot], check=True)


def test_every_action_is_pinned_to_one_commit_everywhere(default_project: Path):
    """Pinned by commit with its tag, one release per action across both sets of workflows
    (Dependabot updates only the template's own; the generated ones must follow)."""
    releases: dict[str, set[tuple[str, str]]] = {}
    for workflow in workflows_of(TEMPLATE) + workflows_of(default_project):
        for number, line in enumerate(workflow.read_text().splitlines(), start=1):
            if "uses:" not in line:
                continue
            where = f"{workflow}:{number}"
            pin = PINNED.search(line)
            assert pin, f"{where}: pin the action by commit, `# vX.Y.Z` beside it: {line.strip()}"
            releases.setdefault(pin["action"], set()).add((pin["commit"], pin["tag"]))
    assert {"actions/checkout", "actions/setup-python", "docker/build-push-action"} <= set(releases)
    for action, pins in releases.items():
        assert len(pins) == 1, f"{action} is pinned to different releases: {sorted(pins)}"


def test_checkout_never_leaves_credentials_behind(default_project: Path):
    """No job pushes to git, so none keeps the checkout's token in .git/config."""
    checkouts = 0
    for workflow in workflows_of(TEMPLATE) + workflows_of(default_project):
        for name, job in yaml.safe_load(workflow.read_text())["jobs"].items():
            for step in job["steps"]:
                if step.get("uses", "").startswith("actions/checkout@"):
                    checkouts += 1
                    assert step["with"]["persist-credentials"] is False, f"{workflow}: {name}"
    assert checkouts


def test_dependabot_keeps_the_actions_current(default_project: Path):
    for folder in (TEMPLATE, default_project):
        config = yaml.safe_load((folder / ".github/dependabot.yml").read_text())
        (update,) = config["updates"]
        assert update["package-ecosystem"] == "github-actions"
        assert update["directory"] == "/"
        assert update["cooldown"]["default-days"] >= 1


def line_of(path: Path, text: str) -> int:
    """The 1-based number of the only line of `path` that contains `text`."""
    (number,) = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return number


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {path} exactly once"
    path.write_text(text.replace(old, new))


@pytest.mark.slow
def test_lint_names_the_file_and_line_of_a_broken_workflow(tmp_path: Path):
    project = bake(tmp_path)
    workflows = project / ".github/workflows"
    # An unknown runner label and a schema error (a misspelt key), both caught by actionlint.
    replace_once(workflows / "gpu.yml", '"gpu"]', '"gpu", "h100"]')
    replace_once(workflows / "ci.yml", "timeout-minutes: 5", "timeout-minute: 5")
    result = run_nox(project, "-s", "lint")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    label_line = line_of(workflows / "gpu.yml", '"h100"')
    assert f".github/workflows/gpu.yml:{label_line}:" in output
    assert 'label "h100" is unknown' in output
    key_line = line_of(workflows / "ci.yml", "timeout-minute:")
    assert f".github/workflows/ci.yml:{key_line}:" in output
    assert 'unexpected key "timeout-minute"' in output

    # Those fixed, an action by tag instead of commit: zizmor's unpinned-uses.
    replace_once(workflows / "gpu.yml", '"gpu", "h100"]', '"gpu"]')
    replace_once(workflows / "ci.yml", "timeout-minute: 5", "timeout-minutes: 5")
    pinned = PINNED.search((workflows / "image.yml").read_text())
    assert pinned
    replace_once(workflows / "image.yml", pinned[0], "uses: actions/checkout@v7")
    result = run_nox(project, "-R", "-s", "lint")  # -R: the same lint venv, no reinstall
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    unpinned_line = line_of(workflows / "image.yml", "actions/checkout@v7")
    assert f".github/workflows/image.yml:{unpinned_line}:" in output
    assert "unpinned-uses" in output
