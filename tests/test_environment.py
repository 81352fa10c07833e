"""environment.yml (for working on the template) agrees with noxfile.py's TEST_DEPS and CI."""

from __future__ import annotations

import ast

import yaml
from conftest import TEMPLATE
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def noxfile_test_deps() -> dict[str, Requirement]:
    """noxfile.py's TEST_DEPS, read without importing the noxfile."""
    tree = ast.parse((TEMPLATE / "noxfile.py").read_text())
    (value,) = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "TEST_DEPS"
    ]
    requirements = map(Requirement, ast.literal_eval(value))
    return {canonicalize_name(r.name): r for r in requirements}


def environment() -> dict:
    return yaml.safe_load((TEMPLATE / "environment.yml").read_text())


def test_environment_pins_exactly_the_test_deps():
    dependencies = environment()["dependencies"]
    (pip,) = [item["pip"] for item in dependencies if isinstance(item, dict)]
    pins = {canonicalize_name(r.name): r for r in map(Requirement, pip)}
    wanted = noxfile_test_deps()
    assert sorted(pins) == sorted(wanted), "environment.yml's pip list != noxfile.py's TEST_DEPS"
    for name, requirement in wanted.items():
        (pin,) = pins[name].specifier
        assert pin.operator == "==", f"environment.yml: pin {name} exactly (==)"
        assert requirement.specifier.contains(pin.version), (
            f"environment.yml pins {name}=={pin.version}, outside TEST_DEPS' {requirement}"
        )


def test_environment_is_conda_forge_with_the_python_ci_uses():
    env = environment()
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda = [item for item in env["dependencies"] if isinstance(item, str)]
    assert {"pip", "make", "git"} <= set(conda)
    (python,) = [item for item in conda if item.startswith("python")]
    workflow = yaml.safe_load((TEMPLATE / ".github/workflows/ci.yml").read_text())
    versions = {
        step["with"]["python-version"]
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if "setup-python" in step.get("uses", "")
    }
    assert {f"python={version}" for version in versions} == {python}
