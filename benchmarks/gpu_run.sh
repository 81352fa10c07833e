#!/usr/bin/env bash
# A baked project's GPU suite in one call on a machine that has Python, a CUDA build of torch
# and no network (the template's GPU check):
#   bash benchmarks/gpu_run.sh PROJECT [ARCHIVE]   # default PROJECT/build/gpu_carry/carry_wheels.tar.xz
# 1. prints the device and saves the preinstalled packages;
# 2. installs the wheels of ARCHIVE (benchmarks/gpu_carry.py) with pip --no-deps --no-index, so
#    torch and its CUDA libraries stay the machine's;
# 3. takes the base model from the Hugging Face cache, or else writes the random-weight
#    stand-in of tools/stand_in_base.py (GPU_TESTS_BASE_MODEL set beforehand wins);
# 4. runs `pytest -m gpu` without the vLLM and two-GPU tests;
# 5. runs tools/gpu_probes.py.
# Everything goes to $OUT (default reports/gpu_run/): run.log, preinstalled.txt, pip_check.txt,
# pytest.txt, gpu_tests.json, gpu_probes.json. GPU_RUN_TEST_TIMEOUT and GPU_RUN_PROBE_TIMEOUT
# (seconds, default 330 and 150) bound steps 4 and 5, so that the whole run fits in ten
# minutes. Exits non-zero if a step failed.
set -uo pipefail
[[ $# -ge 1 && -f "$1/pyproject.toml" ]] || { echo "usage: $0 PROJECT [ARCHIVE]"; exit 2; }
cd "$1" || exit 2
archive="${2:-build/gpu_carry/carry_wheels.tar.xz}"
out="${OUT:-reports/gpu_run}"
mkdir -p "$out"
work="$(mktemp -d)"
exec > >(tee "$out/run.log") 2>&1
started=$SECONDS
step() { echo "== [$((SECONDS - started)) s] $*"; }
status=0

step "device and preinstalled packages"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python -m pip list --format=freeze > "$out/preinstalled.txt"
python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

step "install $archive"
[[ -f "$archive" ]] || { echo "error: no $archive: build it with benchmarks/gpu_carry.py"; exit 2; }
tar -xJf "$archive" -C "$work"
pip_install=(python -m pip install --no-deps --no-index --quiet --disable-pip-version-check)
"${pip_install[@]}" "$work"/wheels/*.whl || "${pip_install[@]}" --break-system-packages "$work"/wheels/*.whl || exit 2
python -m pip check > "$out/pip_check.txt" 2>&1 || echo "pip check found conflicts: $out/pip_check.txt"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python -c "import importlib.metadata as m; print({n: m.version(n) for n in \
('torch', 'transformers', 'peft', 'trl', 'accelerate', 'bitsandbytes', 'datasets')})"

step "base model"
if [[ -z "${GPU_TESTS_BASE_MODEL:-}" ]] && ! python - <<'EOF'
import importlib, sys
from pathlib import Path

from huggingface_hub import snapshot_download

package = next(Path("src").glob("*/__init__.py")).parent.name
config = importlib.import_module(f"{package}.config").load_config(Path("configs/train.yaml"))
name = config.model.name_or_path
if not Path(name).expanduser().is_dir():
    try:
        snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):
        sys.exit(f"{name} is not cached here: using a stand-in")
print(f"{name}: cached")
EOF
then
    python -m tools.stand_in_base "$work/stand-in-base" || status=1
    export GPU_TESTS_BASE_MODEL="$work/stand-in-base"
fi

# tests/test_gpu.py alone: the CPU suite's modules import tools (jsonschema, kubernetes) that
# the carried wheels leave out.
step "the GPU suite (without vLLM and the two-GPU tests)"
timeout "${GPU_RUN_TEST_TIMEOUT:-330}" python -m pytest -m gpu tests/test_gpu.py -k "not vllm and not ddp" \
    -q -rA -p no:cacheprovider --basetemp="$work/pytest" > "$out/pytest.txt" 2>&1 || status=1
tail -n 40 "$out/pytest.txt"
cp reports/gpu_tests.json "$out/" 2>/dev/null || echo "no reports/gpu_tests.json"
find "$work/pytest" -name "*.log" -exec cp --backup=numbered -t "$out" {} + 2>/dev/null

step "probes: CUDA graphs and async batching forced on; adapter engine dtypes"
timeout "${GPU_RUN_PROBE_TIMEOUT:-150}" python -m tools.gpu_probes --out "$out/gpu_probes.json" \
    || status=1
step "done (status $status)"
exit "$status"
