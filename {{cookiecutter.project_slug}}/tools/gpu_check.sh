#!/usr/bin/env bash
# Run the GPU suite once on a GPU machine and print what it measured:
#   bash tools/gpu_check.sh                  # nox -s gpu_tests: installs the lock, runs pytest -m gpu
#   bash tools/gpu_check.sh -k "not vllm"    # arguments go to pytest
# Needs: python{{ cookiecutter.python_version }} and network access to PyPI and the torch index, or
# an environment made earlier: NOX_REUSE=1 reuses the nox environment of an earlier run,
# NO_VENV=1 runs on python{{ cookiecutter.python_version }}'s own packages (`nox -s gpu_tests --no-venv`);
# neither installs anything. The suite is sized to a few minutes; GPU_CHECK_TIMEOUT (seconds,
# default 900) stops it if it hangs.
# Figures: reports/gpu_tests.json (copy them into the README's "Measured on GPU" table).
set -euo pipefail
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python=python{{ cookiecutter.python_version }}
if ! "$python" -m nox --version > /dev/null 2>&1; then
    "$python" -m pip install --quiet "$(grep '^nox==' requirements/dev.txt)"
fi
options=()
if [[ "${NOX_REUSE:-0}" == "1" ]]; then options=(--reuse-existing-virtualenvs --no-install); fi
if [[ "${NO_VENV:-0}" == "1" ]]; then options=(--no-venv); fi
status=0
timeout "${GPU_CHECK_TIMEOUT:-900}" "$python" -m nox -s gpu_tests "${options[@]}" -- "$@" || status=$?
if [[ -f reports/gpu_tests.json ]]; then cat reports/gpu_tests.json; fi
exit "$status"
