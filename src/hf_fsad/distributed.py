"""Process-group helpers shared by scoring (the CLI) and training, so scoring does not import `training`."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str, runtime: str = "torch") -> str:
    """`device` as torch names it: "auto" is CUDA when available, then Apple's MPS, else the CPU, and always
    the CPU when an exported runtime (`runtime` other than "torch") scores, since its graph runs there."""
    if device != "auto":
        return device
    if runtime != "torch":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def multi_process_cpu() -> bool:
    """True under a multi-process launcher (torchrun, mpirun) on a machine without CUDA: Accelerate then
    needs `cpu=True` to run the processes as a gloo group instead of as independent single runs."""
    world_size = max(
        int(os.environ.get(name, "1")) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    )
    return world_size > 1 and not torch.cuda.is_available()
