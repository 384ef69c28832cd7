"""Checkpoint files (atomic writes, rotation, finding the newest), the training state they hold
(``save_training_state`` writes what ``restore_training_state`` continues from, ``--resume``) and
the lock of the output folder a run writes them to."""
import errno
import fcntl
import glob
import json
import os
import re
import struct
import sys

import torch

import SLaK  # also lets torch's weights-only loading read the original release's checkpoints
from distributed import is_main_process
from slak_config import checkpoint_model_config, flag_text, mismatched_flags
from utils import ConfigError, WriteFailed

_EPOCH_FILE = re.compile(r"checkpoint-(\d+)\.pth$")
_TEMPORARY_FILE = re.compile(r"\.tmp-\d+$")  # what write_atomic writes before its rename
LOG_FILE = "log.txt"
LOCK_FILE = ".run.lock"  # OutputDirLock's; empty, and left in place when the run ends


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read; the message names the file and the fix."""


def check_checkpoint_path(path, flag="--resume"):
    """Raise ``CheckpointError`` unless ``path`` (given by ``flag``) is a file; a folder is told
    which checkpoint file in it to pass."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        inside = [p for _, p in epoch_checkpoints(path)][-1:] + \
            sorted(glob.glob(os.path.join(path, "checkpoint-best*.pth"))) + \
            sorted(glob.glob(os.path.join(path, "*.pth")))
        if inside:
            raise CheckpointError(f"{flag} {path} is a folder; pass a checkpoint file in it, e.g. "
                                  f"{inside[0]}")
        raise CheckpointError(f"{flag} {path} is a folder without checkpoints (checkpoint-<epoch>"
                              f".pth); pass a checkpoint file")
    raise CheckpointError(f"{flag} {path}: file not found; check the path")


# main.py's --model_key: the entries that hold a checkpoint's weights, the first present wins.
DEFAULT_MODEL_KEY = "model|module"


def load_checkpoint(path, flag="--resume", model_key=""):
    """Load a checkpoint file on the CPU without executing arbitrary pickled code.

    A folder, an empty, truncated, non-dict or tensor-less file (its weights looked for under
    ``model_key``, as ``select_weights``), or weights with NaN or infinite values, is a
    ``CheckpointError`` naming ``flag`` and the fix.
    """
    check_checkpoint_path(path, flag)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{flag} {path} is an empty file (a save that never finished?); "
                              f"point {flag} at a complete .pth file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        lines = str(exc).strip().splitlines() or [""]
        raise CheckpointError(f"{flag} {path} cannot be read ({type(exc).__name__}: "
                              f"{lines[0][:160]}); point {flag} at a complete .pth file") from None
    weights = select_weights(checkpoint, model_key) if isinstance(checkpoint, dict) else {}
    nested = [k for k, v in checkpoint.items() if isinstance(v, dict)
              and SLaK.checkpoint_filter_fn(v)] if isinstance(checkpoint, dict) else []
    named = [k for k in model_key.split("|") if k]
    if weights and nested and named and model_key != DEFAULT_MODEL_KEY and \
            not any(k in nested for k in named):
        # The weights were found elsewhere: a --model_key asked for by name (model_ema, say)
        # would silently become the checkpoint's other weights.
        raise CheckpointError(f"{flag} {path} has no weights under --model_key {model_key}; it "
                              f"holds them under {', '.join(repr(k) for k in nested)}: pass "
                              f"--model_key {nested[0]}")
    if not weights:
        if nested and flag == "--finetune":
            raise CheckpointError(f"{flag} {path} holds its weights under '{nested[0]}', not "
                                  f"under --model_key {model_key}: pass --model_key {nested[0]}")
        if nested:
            raise CheckpointError(f"{flag} {path} holds weights only under '{nested[0]}' (e.g. "
                                  f"an EMA-only checkpoint), which {flag} does not read; start "
                                  f"from them with main.py --finetune {path} --model_key "
                                  f"{nested[0]}")
        raise CheckpointError(f"{flag} {path} holds no model weights (a {type(checkpoint).__name__}"
                              f" without tensors); point {flag} at a checkpoint saved by main.py "
                              f"or the original release")
    broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{flag} {path} holds NaN or infinite values in {len(broken)} of its "
                              f"{len(weights)} tensors (e.g. {broken[0]}): the run that saved it "
                              f"diverged; point {flag} at an earlier checkpoint")
    return checkpoint


def select_weights(checkpoint, model_key="", prefix=""):
    """The model weights of ``checkpoint``: under the first of the ``|``-separated ``model_key``
    names it holds (else where ``SLaK.checkpoint_filter_fn`` finds them), keys starting with
    ``prefix`` only, the prefix stripped."""
    for key in filter(None, model_key.split("|")):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = SLaK.checkpoint_filter_fn(checkpoint)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _is_timm_convnext(state_dict):
    """Whether ``state_dict`` is in timm's ConvNeXt layout (``stem``, ``stages.N.blocks.M``)."""
    return "stem.0.weight" in state_dict and any(".blocks." in k and ".conv_dw." in k
                                                 for k in state_dict)


def open_checkpoint(path, flag, expected, ignore=(), model_key="", prefix=""):
    """Load ``path`` (given by ``flag``) and check its model against ``expected`` (a model_config).

    Every loader goes through here (``load_checkpoint``, then ``check_checkpoint``); returns
    ``(checkpoint, state_dict)``.
    """
    checkpoint = load_checkpoint(path, flag, model_key)
    return checkpoint, check_checkpoint(checkpoint, path, flag, expected, ignore, model_key, prefix)


def check_checkpoint(checkpoint, path, flag, expected, ignore=(), model_key="", prefix=""):
    """The weights of ``checkpoint`` (read from ``path``, given by ``flag``) once they are checked
    against ``expected`` (a model_config).

    A checkpoint of another layout, or of a model of another configuration, is one
    ``CheckpointError`` naming the flags that differ and the values the checkpoint needs.
    ``ignore``: configuration keys this loader does not need to match (e.g. ``nb_classes`` when
    the classifier is dropped); ``model_key``, ``prefix``: where the weights are
    (``select_weights``).
    """
    state_dict = select_weights(checkpoint, model_key, prefix)
    if expected.get("model") not in (None, *SLaK.MODEL_DEPTHS_DIMS):  # another timm model
        return state_dict
    found, source = checkpoint_model_config(checkpoint, expected.get("model"), state_dict)
    if found is None:
        if _is_timm_convnext(state_dict):
            raise CheckpointError(f"{flag} {path} is a timm ConvNeXt checkpoint (stem.*, "
                                  f"stages.N.blocks.M.conv_dw.* keys), not in SLaK's layout: load "
                                  f"it into timm's model (main.py --model convnext_tiny, or the "
                                  f"ConvNeXt it came from), or point {flag} at a checkpoint of "
                                  f"SLaK or of the original ConvNeXt release")
        nested = next((k[:k.index("stages.")] for k in state_dict if "stages." in k), "")
        if nested and flag == "--finetune":
            raise CheckpointError(f"{flag} {path} holds its weights under '{nested}': pass "
                                  f"--model_prefix {nested}")
        raise CheckpointError(f"{flag} {path} holds no SLaK/ConvNeXt weights (no stages or stem); "
                              f"point {flag} at a checkpoint of this model family")
    differ = mismatched_flags(expected, found, ignore)
    if differ:
        how = "was trained with" if source != "shapes" else "holds a model of"
        raise CheckpointError(
            f"{flag} {path} {how} {' '.join(flag_text(k, found[k]) for k in differ)}; this run "
            f"has {' '.join(flag_text(k, expected[k]) for k in differ)}: pass the checkpoint's "
            f"flags")
    return state_dict


def load_state_dict_checked(model, state_dict, flag, path, strict=True):
    """``model.load_state_dict`` whose failure (a shape no flag explains) is one line."""
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{flag} {path} does not fit this model ({lines[1 if len(lines) > 1 else 0][:200]}); "
                              f"pass the flags it was trained with") from None


def write_atomic(path, write, mode="wb", what="checkpoint"):
    """``write(file)`` into a temporary file beside ``path``, then renamed over it: a crash at any
    moment leaves the old file intact. A failed write (a full disk, the folder gone) is a
    ``WriteFailed`` naming ``what`` and ``path``; the temporary file is removed, the old file
    stays."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteFailed(_write_failure(what, path, exc)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_failure(what, path, exc):
    return (f"could not write {what} {path}: {exc.strerror or exc}; free space or choose another "
            f"--output_dir")


def save_atomic(obj, path):
    """``torch.save(obj, path)`` through ``write_atomic``."""
    write_atomic(path, lambda f: torch.save(obj, f))


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


def prepare_output_dir(output_dir, start_epoch, keep):
    """Make ``output_dir`` the folder of a run that continues at ``start_epoch`` (main process).

    A run killed at any instant leaves at most: a ``*.tmp-<pid>`` of an unfinished save, log
    lines and best checkpoints of epochs after its newest epoch checkpoint, and one epoch
    checkpoint too many (killed before the rotation). The temporaries and the log lines of epochs
    ``>= start_epoch`` are removed and the rotation is redone; the epochs are then re-run exactly,
    so the folder ends as that of an uninterrupted run.
    """
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        if _TEMPORARY_FILE.search(name):
            os.remove(os.path.join(output_dir, name))
    log = os.path.join(output_dir, LOG_FILE)
    if os.path.isfile(log):
        with open(log) as f:
            lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if _log_epoch(line) < start_epoch]
        if kept != lines:
            write_atomic(log, lambda f: f.write("".join(kept)), mode="w", what="the log")
    remove_old_checkpoints(output_dir, keep)


def _log_epoch(line):
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a half-written last line of a killed run: dropped


def append_log(output_dir, stats):
    """Append one epoch's stats as a JSON line to ``log.txt`` (main process)."""
    if not is_main_process():
        return
    path = os.path.join(output_dir, LOG_FILE)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(stats) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a partial last line is dropped when the run resumes
        raise WriteFailed(_write_failure("the log", path, exc)) from None


class OutputDirLock:
    """An advisory lock on the output folder of a run, held by its main process while it runs, so
    that a second run started into the same folder is refused instead of both writing there.

    A POSIX record lock (``fcntl.lockf``) on ``LOCK_FILE``: it belongs to the process, so the
    DataLoader workers forked from it never hold it (a ``flock`` lock would be shared with them
    through the inherited descriptor and outlive a killed run until they exit), and the OS
    releases it when the process ends, however it ends: a killed run leaves nothing stuck. The
    descriptor is opened once and closed only by ``release`` (closing any descriptor of the file
    would drop the lock) and is not inherited across ``exec`` (``O_CLOEXEC``).
    """

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE) if output_dir else None
        self.fd = None

    def acquire(self, create=True):
        """Take the lock (main process; the others' is their main process's); ``create=False``
        takes it only where the lock file already exists (so that nothing is written yet).
        ``ConfigError`` while another process holds it."""
        if self.fd is not None or self.path is None or not is_main_process():
            return
        if create:
            os.makedirs(self.output_dir, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            if create:
                raise
            return
        except OSError as exc:
            raise ConfigError(f"--output_dir {self.output_dir}: its lock file {self.path} cannot "
                              f"be opened ({exc.strerror}); pass a folder you can write to") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(f"--output_dir {self.output_dir} is in use by another run"
                                  f"{holder}; wait for it to end, or pass another --output_dir") from None
            # A file system without locks (some network mounts): the run goes on unguarded.
            print(f"Note: --output_dir {self.output_dir} cannot be locked here ({exc.strerror}); "
                  f"make sure no other run writes to it")
            return
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _lock_holder(fd):
    """`` (pid N)`` of the process holding the lock on ``fd``, where the OS tells (Linux)."""
    if not sys.platform.startswith("linux"):
        return ""
    try:  # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    except (OSError, struct.error):
        return ""
    return f" (pid {pid})" if l_type != fcntl.F_UNLCK and pid > 0 else ""


# --------------------------------------------------------------------------------------------
# Training state: everything a run saves and what --resume restores, in one place.
# --------------------------------------------------------------------------------------------

def save_training_state(path, *, args, epoch, model, optimizer, scaler, model_ema=None,
                        feature_loss=None, masking=None, max_accuracy=0.0, max_accuracy_ema=0.0,
                        model_config=None):
    """Write the state that ``restore_training_state`` continues from (main process only).

    ``model_config`` (``slak_config.model_config``) says what the weights are, for every loader to check.
    """
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "model_config": model_config,
             "scaler": scaler.state_dict(), "args": vars(args).copy(),
             "max_accuracy": max_accuracy, "max_accuracy_ema": max_accuracy_ema}
    if model_ema is not None:
        state["model_ema"] = model_ema.module.state_dict()
    if feature_loss is not None:
        state["distill"] = feature_loss.state_dict()
    if masking is not None:
        state["masks"] = masking.masks
        state["sparse_state"] = masking.state_dict()
    save_on_master(state, path)
    return path


def resumed_epoch(checkpoint):
    """The epoch a run continuing from ``checkpoint`` starts at, or None for a checkpoint without
    training state (weights only: the run starts at ``--start_epoch``)."""
    if "optimizer" in checkpoint and "epoch" in checkpoint:
        return int(checkpoint["epoch"]) + 1
    return None


# Flags whose values a checkpoint's masks were made with; another value would contradict them.
MASK_FLAGS = ("sparsity", "only_L")


def check_sparse_resume(checkpoint, path, flag, args):
    """Refuse to continue ``checkpoint`` with sparsity flags its masks contradict: a sparse run
    continued without ``--sparse`` (the pruned weights would silently grow back), or with
    another ``--sparsity``/``--only-L`` than the run that made the masks."""
    if not checkpoint.get("masks") or args.eval:
        return
    if not args.sparse:
        raise ConfigError(f"{flag} {path} continues a sparse run: add --sparse with the run's "
                          f"sparsity flags, or start a dense run from its weights with "
                          f"--finetune in another --output_dir")
    saved = checkpoint.get("args")
    saved = vars(saved) if hasattr(saved, "__dict__") else saved if isinstance(saved, dict) else {}
    differ = [k for k in MASK_FLAGS if k in saved and saved[k] != getattr(args, k)]
    if differ:
        def text(k, value):
            return f"--sparsity {value}" if k == "sparsity" else "--only-L" if value else "no --only-L"
        fix = " and ".join(f"with --sparsity {saved[k]}" if k == "sparsity" else
                           "with --only-L" if saved[k] else "without --only-L" for k in differ)
        raise ConfigError(f"{flag} {path} continues a run of "
                          f"{' '.join(text(k, saved[k]) for k in differ)} (its masks); this run "
                          f"has {' '.join(text(k, getattr(args, k)) for k in differ)}: continue "
                          f"it {fix}, or start a new sparse run from its weights with "
                          f"--finetune {path} in another --output_dir")


# Optimizer group entries that belong to this run, not to the checkpoint it continues.
OWN_GROUP_SETTINGS = ("lr_scale", "scheduled_weight_decay", "fused", "foreach", "capturable",
                      "differentiable")


def restore_training_state(checkpoint, path, *, args, model, optimizer, scaler, model_ema=None,
                           feature_loss=None, masking=None, flag="--resume"):
    """Continue from ``checkpoint`` (read from ``path``, given by ``flag``).

    Restores the weights, the EMA, the distillation projection, and unless ``args.eval`` the
    optimizer, the loss scaler, the epoch and the best accuracies, and the masks with their
    schedule. Returns ``(start_epoch, max_accuracy, max_accuracy_ema, masks_restored)``;
    ``start_epoch`` is ``args.start_epoch`` when the checkpoint holds no training state.
    """
    load_state_dict_checked(model, SLaK.checkpoint_filter_fn(checkpoint), flag, path)
    print(f"Resumed {'student' if flag == '--distill_resume' else 'model'} weights from {path}")
    if feature_loss is not None and "distill" in checkpoint:
        feature_loss.load_state_dict(checkpoint["distill"])
    if model_ema is not None:
        if "model_ema" in checkpoint:
            model_ema.module.load_state_dict(SLaK.checkpoint_filter_fn(checkpoint["model_ema"]))
        else:  # the EMA starts from the weights continued from, not from the random init
            model_ema.set(model)
    start_epoch, max_accuracy, max_accuracy_ema = args.start_epoch, 0.0, 0.0
    if not args.eval and resumed_epoch(checkpoint) is not None:
        # The original's groups ([decay, no decay], or per layer id) are ours in the same order,
        # so its state loads as ours. Our per-group settings are kept over the saved ones, and so
        # is this run's implementation of the step: a checkpoint of an unfused AdamW (the
        # original's, or one written on the CPU) must not unfuse the step on CUDA, where
        # GradScaler was told at construction that the fused one unscales the gradients itself.
        ours = [{k: g[k] for k in OWN_GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            for group, settings in zip(optimizer.param_groups, ours):
                group.update(settings)
        except ValueError as exc:
            raise ConfigError(f"{flag} {path}: its optimizer state does not match this run's "
                              f"parameter groups ({exc}); use --finetune to start from its "
                              f"weights with a fresh optimizer") from None
        if checkpoint.get("scaler") and scaler.is_enabled():  # empty: saved without float16 AMP
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = resumed_epoch(checkpoint)
        max_accuracy = checkpoint.get("max_accuracy", 0.0)
        max_accuracy_ema = checkpoint.get("max_accuracy_ema", 0.0)
        print(f"Resuming training at epoch {start_epoch}")
    masks_restored = False
    if masking is not None and checkpoint.get("masks"):
        try:
            masking.load_masks(checkpoint["masks"])
        except ValueError as exc:
            raise CheckpointError(f"{flag} {path}: {exc}") from None
        if "sparse_state" in checkpoint:
            masking.load_state_dict(checkpoint["sparse_state"])
        masks_restored = True
    return start_epoch, max_accuracy, max_accuracy_ema, masks_restored
