"""Shared test helpers: run the real CLI in a subprocess on the built-in synthetic data."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# A SLaK small enough for CPU tests: SLaK-T depths, width 0.25, 13/11/9/7 kernels, small 3.
TINY_MODEL = ["--model", "SLaK_tiny", "--width_factor", "0.25", "--Decom", "true",
              "--kernel_size", "13", "11", "9", "7", "3"]
SYNTHETIC = ["--data_set", "synthetic", "--device", "cpu", "--input_size", "32",
             "--nb_classes", "4", "--num_workers", "0", "--pin_mem", "false"]


# Under pytest-xdist (README: ``-n 2``) the workers share the cores: one worker's operators must not
# spread over all of them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# The large-kernel convolution tests: where their kernels run, and the limits of
# ||out - ref|| / ||ref|| against float64 (float32 without TF32, float16, bfloat16).
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    """``||out - ref|| / ||ref||`` in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


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
def one_thread():
    """Run the test's in-process operators on one thread: tiny convolutions on a machine whose
    cores other jobs share run many times faster than with threads that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def triton_kernels(monkeypatch):
    """Run the Triton kernels on this machine (their interpreter where there is no CUDA, set per
    test so that other tests keep the plain CPU fallback) in full float32 precision."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def launched(monkeypatch):
    """The names of the kernels the test launches, in order (a spy on the launch plans)."""
    from depthwise_conv2d_implicit_gemm import plans
    names = []
    real = plans.launch

    def spy(plan, tensors):
        names.append(plan.name)
        real(plan, tensors)
    monkeypatch.setattr(plans, "launch", spy)
    return names


def free_port():
    """A local TCP port that no process listens on now (the tests run in parallel processes, so a
    fixed or derived port could be taken by another test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc):
    """The launcher list for ``run_main``: ``torchrun --nproc_per_node nproc`` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())]


def spawn_gloo_processes(worker, out_dir, world=2):
    """Run ``worker(rank, world, port, out_dir)`` in ``world`` processes (each starts its gloo
    group on ``port``, a free local one) and wait for all of them."""
    torch.multiprocessing.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world,
                                join=True)


def one_line(result, message, code=2, stream="stderr"):
    """The single line of ``stream``, which holds ``message``; the process exited with ``code``
    and printed no traceback."""
    text = getattr(result, stream)
    lines = text.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and message in lines[0], text
    return lines[0]
