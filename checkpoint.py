"""Checkpoint files: atomic writes, rotation, and finding the newest one to resume from."""
import argparse
import glob
import os
import re

import numpy as np
import torch

from distributed import is_main_process
from utils import ConfigError

# Checkpoints of the original release pickle their argparse.Namespace and NumPy scalars (its
# schedules are NumPy arrays); allow exactly those on top of torch's weights-only set.
torch.serialization.add_safe_globals([argparse.Namespace, np._core.multiarray.scalar, np.dtype,
                                      type(np.dtype(np.float64))])

_EPOCH_FILE = re.compile(r"checkpoint-(\d+)\.pth$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read; the message names the file and the fix."""


def load_checkpoint(path):
    """Load a checkpoint file on the CPU without executing arbitrary pickled code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path given to "
                              f"--resume/--finetune")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); point --resume/--finetune at a "
                              f"complete .pth file") from None


def save_atomic(obj, path):
    """Write ``obj`` to ``path`` so that a crash at any moment leaves the old file intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_on_master(obj, path):
    if is_main_process():
        save_atomic(obj, path)


def epoch_checkpoints(output_dir):
    """``[(epoch, path)]`` of the ``checkpoint-<epoch>.pth`` files in ``output_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        match = _EPOCH_FILE.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir):
    found = epoch_checkpoints(output_dir) if output_dir else []
    return found[-1][1] if found else None


def remove_old_checkpoints(output_dir, keep):
    """Keep only the newest ``keep`` numbered checkpoints (best/EMA-best are never removed)."""
    if not is_main_process() or keep <= 0:
        return
    for _, path in epoch_checkpoints(output_dir)[:-keep]:
        os.remove(path)
