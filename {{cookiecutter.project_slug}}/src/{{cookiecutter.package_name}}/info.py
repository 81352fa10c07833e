"""What this environment will run on: package versions, device and precision.

Package versions need nothing; the device needs torch, imported only by `describe`, so the
cost meter (which reports versions) runs where torch is not installed.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe() -> dict[str, str]:
    import torch

    from .device import device_name, pick_precision

    precision = pick_precision()
    device = precision.device
    if device.startswith("cuda"):
        device = f"{device} ({device_name(device)})"
    return {
        "python": platform.python_version(),
        **package_versions(),
        "device": device,
        "dtype": precision.dtype_name,
        "cpu threads": str(torch.get_num_threads()),
    }
