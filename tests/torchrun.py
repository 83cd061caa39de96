"""Launch florence commands in 2 real Gloo processes through torchrun, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2


def torchrun_main(*arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node 2 -m florence.cli.main ARGUMENTS`` from the repository root.

    Each process uses one thread. The caller checks ``returncode`` and reads ``stdout`` and ``stderr``.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "-m",
        "florence.cli.main",
        *arguments,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, check=False, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def torchrun_train(*arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``florence train ARGUMENTS`` in 2 processes under torchrun (see :func:`torchrun_main`)."""
    return torchrun_main("train", *arguments, timeout=timeout)
