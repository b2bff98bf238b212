"""Checks that turn bad input into one clear message before any expensive work."""

from __future__ import annotations

import re

import torch


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints its message without a traceback."""


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def resolve_device(name: str) -> torch.device:
    """`device=auto` picks CUDA when present, else CPU; `cuda`/`cuda:N`/`cpu`/`mps` are taken as given."""
    name = str(name)
    if not _DEVICE.match(name):
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


def validate_targets(num_classes: int, *attacks) -> None:
    for attack in attacks:
        try:
            attack.validate(num_classes)
        except ValueError as e:
            raise ConfigError(str(e)) from e
