"""Process-group helpers shared by scoring (the CLI) and training, so scoring does not import `training`."""

from __future__ import annotations

import os

import torch


def multi_process_cpu() -> bool:
    """True under a multi-process launcher (torchrun, mpirun) on a machine without CUDA: Accelerate then
    needs `cpu=True` to run the processes as a gloo group instead of as independent single runs."""
    world_size = max(
        int(os.environ.get(name, "1")) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    )
    return world_size > 1 and not torch.cuda.is_available()
