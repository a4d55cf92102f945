"""Checks of values a user passes to the API and the command line: torch device names and cosine thresholds.

Each returns the checked value or raises a one-line FacemetaError, so that a bad ``--device`` or
``--threshold`` never surfaces as a torch traceback or a silent wrong decision (a NaN threshold
would decide "different" for every pair).
"""

from __future__ import annotations

import math
import re

from facemeta.errors import FacemetaError

_DEVICE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


def check_device(device: str) -> str:
    """A torch device name that exists on this machine: cpu, cuda, cuda:N (N below the GPU count) or mps."""
    name = str(device).strip().lower()
    if not _DEVICE.match(name):
        raise FacemetaError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")
    if name == "cpu":
        return name
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FacemetaError(f"device {device!r} asked for, but torch sees no CUDA GPU here: use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise FacemetaError(f"device {device!r} asked for, but this machine has "
                                f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)")
        return name
    if not torch.backends.mps.is_available():  # the pattern admits only mps here
        raise FacemetaError(f"device {device!r} asked for, but MPS is not available here: use --device cpu")
    return name


def check_threshold(value: float | None, what: str = "threshold") -> float | None:
    """A cosine-similarity threshold: a finite number in [-1, 1] (None passes through)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FacemetaError(f"{what} must be a number in [-1, 1], got {value!r}") from None
    if not math.isfinite(number) or not -1.0 <= number <= 1.0:
        raise FacemetaError(f"{what} must be a cosine similarity in [-1, 1], got {value!r}")
    return number
