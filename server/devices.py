"""Which torch device the server's engine (and `driftsync replay`'s references) compute on."""
from __future__ import annotations

import re

import torch

TORCH_DEVICES = "cpu, cuda, cuda:N or auto"


def resolve_torch_device(spec: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N', or 'auto' (cuda when torch sees one, else cpu). Asking for a
    CUDA device that is not there fails here, at start-up, not in the first adaptation step."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ValueError(f"--torch-device must be {TORCH_DEVICES}, not {spec!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--torch-device {spec}: torch.cuda.is_available() is False (a CPU build of torch?)")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ValueError(f"--torch-device {spec}: torch sees {count} CUDA device(s), numbered from 0")
    return torch.device(spec)
