import subprocess
import sys

import pytest

from {{ cookiecutter.package_name }} import __version__
from {{ cookiecutter.package_name }}.cli import main


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys\n"
        "from {{ cookiecutter.package_name }}.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'importing the CLI pulled in torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "info" in result.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_info_reports_cpu_and_fp32_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is about a CPU-only machine")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out
    assert "dtype: float32" in out
    assert f"torch: {torch.__version__}" in out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["merge", "push", "export gguf"])
def test_run_folder_commands_name_a_folder_that_is_not_a_run(capsys, tmp_path, command):
    folder = tmp_path / "nope"
    code = main([*command.split(), str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {folder} " in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["train"], ["merge", "r"], ["export", "gguf", "r"], ["push", "r"],
     ["generate", "--model", "m"], ["token-cost"], ["demo"]],
)  # fmt: skip
def test_every_options_field_has_its_argument(argv):
    """The CLI fills each options field from the argument of its name, so a renamed
    argument would silently leave its field at the default."""
    import dataclasses

    from {{ cookiecutter.package_name }}.cli import build_parser

    parsed = vars(build_parser().parse_args(argv))
    fields = {field.name for field in dataclasses.fields(parsed["handler"].options_class())}
    not_on_the_command_line = {"samples"}  # DemoOptions: how many answers the summary shows
    assert fields - parsed.keys() <= not_on_the_command_line
