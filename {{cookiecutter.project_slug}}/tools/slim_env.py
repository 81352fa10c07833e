"""Remove from an environment what serving never runs: torch's C++ unit-test executables.

    python tools/slim_env.py /opt/venv

torch wheels ship their native test binaries (`torch/test/`, `torch/bin/*test*`), about
90 MB that nothing imports or executes. The image's builder stage runs this script, and
benchmarks/env_size.py runs it on the serving environment it measures, so the number
reported is the environment the image ships. Standard library only.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# Relative to site-packages. Only native test executables: nothing here is imported.
PRUNE = ("torch/test", "torch/bin/*Test", "torch/bin/test_*")


def slim(prefix: Path) -> int:
    """Delete the PRUNE paths under every site-packages of prefix; return the bytes freed."""
    freed = 0
    for site_packages in prefix.glob("lib/python*/site-packages"):
        for pattern in PRUNE:
            for path in site_packages.glob(pattern):
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                freed += sum(p.lstat().st_size for p in files)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    return freed


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python tools/slim_env.py ENV_PREFIX")
    print(f"slim_env: removed {slim(Path(sys.argv[1])) / 2**20:.0f} MiB of test executables")
