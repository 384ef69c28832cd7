"""Small helpers for training: the one-line errors of every entry point, argument parsing,
seeding, schedules and experiment logs (progress lines: ``metric_logger.py``)."""
import argparse
import math
import random

import numpy as np
import torch


class RunStopped(Exception):
    """A run that ends early on purpose; ``run_cli`` prints the message as one line."""

    exit_code = 1


class ConfigError(RunStopped):
    """Bad user input (a flag, a path, a file); the message names the problem and the fix."""

    exit_code = 2


class TrainingDiverged(RunStopped):
    """The loss became NaN or infinite; the message names the epoch, the step and what to try."""

    exit_code = 3


def run_cli(main, *args, on_interrupt=None):
    """Run an entry point's ``main(*args)``; a ``RunStopped`` ends the process with one line.

    Every command-line tool of the project goes through this, so bad input is ``error: ...`` on
    stderr and exit 2 everywhere, without a traceback. Ctrl-C and SIGTERM end with one line too
    (exit 130), followed by ``on_interrupt()``'s text when given (e.g. how to resume). SIGTERM is
    taken over only where nobody else handles it (submitit installs its own for SLURM requeue).
    Under torchrun the process group is destroyed on the way out, whatever the outcome.
    """
    import signal
    import sys

    def terminate(signum, frame):
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, terminate)
    try:
        return main(*args)
    except RunStopped as exc:
        message = str(exc)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker, and re-raised
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]  # with its traceback
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        hint = on_interrupt() if on_interrupt is not None else ""
        print(f"error: interrupted{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def str2bool(value):
    """``argparse`` type for flags written ``--flag true`` / ``--flag False``."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def seed_everything(seed):
    """Seed Python, NumPy and torch; called at every epoch start so a resumed epoch replays exactly."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     warmup_steps=-1):
    """Per-iteration values: linear warmup from 0, then cosine decay from ``base_value`` to
    ``final_value``.

    Used for both the learning rate and the weight decay (timm's schedulers cannot schedule weight
    decay on the decayed parameter groups only). ``warmup_steps > 0`` overrides ``warmup_epochs``.
    """
    total = epochs * niter_per_ep
    warmup = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = min(warmup, total)
    warmup_part = np.linspace(0.0, base_value, warmup, endpoint=False)
    steps = np.arange(total - warmup)
    cosine_part = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup_part, cosine_part))


class TensorboardLogger:
    """Scalars to TensorBoard under ``--log_dir``, each at the ``step`` given (the training
    curves count optimizer updates, the evaluation ones epochs)."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=log_dir)

    def update(self, head, step, **kwargs):
        for name, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{head}/{name}", value, step)

    def flush(self):
        self.writer.flush()


class WandbLogger:
    """Weights & Biases run for ``--enable_wandb true`` (the package is optional)."""

    def __init__(self, args):
        import wandb  # (main.py's flag checks made sure it is installed)
        self.wandb = wandb
        if wandb.run is None:
            wandb.init(project=args.project, config=vars(args))

    def log_epoch(self, stats):
        self.wandb.log({k: v for k, v in stats.items() if k != "epoch"}, step=stats["epoch"])

    def log_checkpoint(self, path):
        artifact = self.wandb.Artifact(f"{self.wandb.run.id}_model", type="model")
        artifact.add_file(path)
        self.wandb.log_artifact(artifact, aliases=["latest"])

    def finish(self):
        self.wandb.finish()

