"""What this environment will run on: package versions, device and precision."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from .device import pick_precision

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe() -> dict[str, str]:
    import torch

    precision = pick_precision()
    device = precision.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    return {
        "python": platform.python_version(),
        **package_versions(),
        "device": device,
        "dtype": str(precision.dtype).removeprefix("torch."),
        "cpu threads": str(torch.get_num_threads()),
    }
