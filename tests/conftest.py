"""Shared test helpers: run the real CLI in a subprocess on the built-in synthetic data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A SLaK small enough for CPU tests: SLaK-T depths, width 0.25, 13/11/9/7 kernels, small 3.
TINY_MODEL = ["--model", "SLaK_tiny", "--width_factor", "0.25", "--Decom", "true",
              "--kernel_size", "13", "11", "9", "7", "3"]
SYNTHETIC = ["--data_set", "synthetic", "--device", "cpu", "--input_size", "32",
             "--nb_classes", "4", "--num_workers", "0", "--pin_mem", "false"]


def cli_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_main(*args, check=True, timeout=600, launcher=None, script=REPO / "main.py"):
    """Run ``python main.py *args`` (or ``script``, or under ``launcher``) in the repo root;
    returns the result."""
    command = (launcher or [sys.executable]) + [str(script), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def repo():
    return REPO
