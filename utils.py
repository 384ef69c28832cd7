"""Small helpers for training: the one-line errors of every entry point, argument parsing and
checking, seeding, schedules and experiment logs (progress lines: ``metric_logger.py``)."""
import argparse
import math
import random
import sys

import numpy as np
import torch


class RunStopped(Exception):
    """A run that ends early on purpose; ``run_cli`` prints the message as one line."""

    exit_code = 1


class ConfigError(RunStopped):
    """Bad user input (a flag, a path, a file); the message names the problem and the fix."""

    exit_code = 2


class WriteFailed(RunStopped):
    """A file of the run could not be written (a full disk, a folder gone); the message names
    the file, the reason and the fix. Whatever was written before is intact."""


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


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as one line instead of the whole usage text."""

    help_command = None  # default: ``python <the script run> --help``

    def error(self, message):
        default = f"python {sys.argv[0]} --help" if sys.argv[0].endswith(".py") else "--help"
        self.exit(2, f"error: {message} (see {self.help_command or default})\n")


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


# --------------------------------------------------------------------------------------------
# Flag ranges: every numeric flag of every entry point with a natural range, by its argparse
# ``dest``. An entry is (predicate, what the value must be); ``check_flag_ranges`` checks those
# that the entry point's namespace has, before anything is built. None (unset) always passes.
# --------------------------------------------------------------------------------------------

def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low):
    return lambda v: _number(v) and v >= low, f"must be at least {low}"


def _in(low, high, *, high_open=True, low_open=False):
    def predicate(v):
        return _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    text = f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return predicate, text


def _each(rule):
    predicate, text = rule
    return lambda values: all(map(predicate, values)), text.replace("must be", "must each be")


_FRACTION = _in(0, 1)  # [0, 1)
_PROBABILITY = _in(0, 1, high_open=False)  # [0, 1]
_POSITIVE = (lambda v: _number(v) and v > 0), "must be a positive number"
_NON_NEGATIVE = (lambda v: _number(v) and v >= 0), "must be a finite number >= 0"
_FINITE = _number, "must be a finite number"


def _reaches_last_stage(size):
    import SLaK
    return size >= SLaK.TOTAL_STRIDE


def _min_width():
    import SLaK
    return 1 / min(dims[0] for _, dims in SLaK.MODEL_DEPTHS_DIMS.values())


def _newest_opset():
    import onnx
    return onnx.defs.onnx_opset_version()


FLAG_RANGES = {
    # run and data
    "batch_size": _at_least(1),
    "update_freq": _at_least(1),
    "epochs": _at_least(0),
    "start_epoch": _at_least(0),
    "save_ckpt_freq": _at_least(1),
    "save_ckpt_num": _at_least(0),
    "num_workers": _at_least(0),
    "world_size": _at_least(1),
    "synthetic_train_size": _at_least(1),
    "synthetic_val_size": _at_least(1),
    "seed": (lambda v: _number(v) and 0 <= v < 2 ** 32, "must be in [0, 2**32)"),
    "ddp_bucket_cap_mb": (_POSITIVE[0], "must be a positive size in MB (PyTorch's default is 25)"),
    # model
    "input_size": (_reaches_last_stage, "is below 32, the network's total stride; pass "
                                        "--input_size 32 or more"),
    "nb_classes": _at_least(1),
    "drop_path": _FRACTION,
    "width_factor": (lambda v: _number(v) and v >= _min_width(),
                     "must be a positive number that leaves every stage a channel (at least "
                     "1/96, e.g. 1.0 or 1.3)"),
    "layer_scale_init_value": _FINITE,
    "head_init_scale": _FINITE,
    "depths": _each(_at_least(1)),
    # EMA, optimizer and schedule
    "model_ema_decay": _PROBABILITY,
    "opt_eps": _NON_NEGATIVE,
    "opt_betas": _each(_FRACTION),
    "clip_grad": (_POSITIVE[0], "must be a positive gradient norm (or leave it out: no clipping)"),
    "momentum": _FRACTION,
    "weight_decay": _NON_NEGATIVE,
    "weight_decay_end": _NON_NEGATIVE,
    "lr": _NON_NEGATIVE,
    "min_lr": _NON_NEGATIVE,
    "layer_decay": _in(0, 1, low_open=True, high_open=False),
    "warmup_epochs": _at_least(0),
    # augmentation
    "color_jitter": _NON_NEGATIVE,
    "smoothing": _FRACTION,
    "crop_pct": _in(0, 1, low_open=True, high_open=False),
    "reprob": _PROBABILITY,
    "recount": _at_least(1),
    "mixup": _NON_NEGATIVE,
    "cutmix": _NON_NEGATIVE,
    "cutmix_minmax": (lambda v: len(v) == 2 and all(map(_number, v)) and 0 <= v[0] < v[1] <= 1,
                      "must be two fractions of the image side, min < max, in [0, 1] (e.g. 0.2 "
                      "0.8)"),
    "mixup_prob": _PROBABILITY,
    "mixup_switch_prob": _PROBABILITY,
    # dynamic sparsity
    "sparsity": _FRACTION,
    "prune_rate": _PROBABILITY,
    "update_frequency": _at_least(1),
    # distillation
    "T": (_POSITIVE[0], "must be a positive temperature"),
    "alpha": _PROBABILITY,
    "lr_fd": _NON_NEGATIVE,
    # run_with_submitit.py (through main.check_args), FLOPs_counter.py, export_onnx.py,
    # erf/visualize_erf.py
    "ngpus": _at_least(1),
    "nodes": _at_least(1),
    "timeout": _at_least(1),
    "cpus_per_task": _at_least(1),
    "mem_gb_per_gpu": _at_least(1),
    "master_port": _in(1, 65535, high_open=False),
    "snip_batch": _at_least(1),
    "opset": (lambda v: 18 <= v <= _newest_opset(),
              "must be an ONNX opset from 18 (the exporter's oldest) to the installed onnx "
              "package's newest (above it the exporter silently writes 18)"),
    "num_images": _at_least(1),
}


def flag_value_text(value):
    """A parsed flag value as it is written on the command line."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_flag_ranges(args, ranges=FLAG_RANGES):
    """Raise ``ConfigError`` for the first flag of ``args`` outside its range in ``ranges``:
    ``--<flag> <value> must be ...``, one line naming the range to pass."""
    for dest, (predicate, text) in ranges.items():
        value = getattr(args, dest, None)
        if value is not None and not predicate(value):
            raise ConfigError(f"--{dest} {flag_value_text(value)} {text}")


def check_device(value, flag="--device"):
    """Raise ``ConfigError`` unless ``value`` names a device present here: ``cpu``, ``cuda``,
    ``cuda:N`` with N below the GPU count (or another type whose PyTorch backend is available)."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {value} is not a device PyTorch knows; pass cuda, cuda:N or "
                          f"cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {value} but no GPU is visible; pass {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            which = "cuda:0" if count == 1 else f"one of cuda:0 to cuda:{count - 1}"
            raise ConfigError(f"{flag} {value} but {count} GPU{'s are' if count > 1 else ' is'} "
                              f"visible; pass {flag} {which}")
    elif device.type != "cpu":
        backends = (getattr(torch.backends, device.type, None), getattr(torch, device.type, None))
        if not any(getattr(b, "is_available", lambda: False)() for b in backends):
            raise ConfigError(f"{flag} {value}: no such device here; pass cuda or cpu")


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

