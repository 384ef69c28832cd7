"""Checkpoint files (atomic writes, rotation, finding the newest) and the training state they hold:
``save_training_state`` writes what ``restore_training_state`` continues from (``--resume``)."""
import glob
import json
import os
import re

import torch

import SLaK  # also lets torch's weights-only loading read the original release's checkpoints
from distributed import is_main_process
from slak_config import checkpoint_model_config, flag_text, mismatched_flags
from utils import ConfigError

_EPOCH_FILE = re.compile(r"checkpoint-(\d+)\.pth$")
_TEMPORARY_FILE = re.compile(r"\.tmp-\d+$")  # what write_atomic writes before its rename
LOG_FILE = "log.txt"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read; the message names the file and the fix."""


def load_checkpoint(path, flag="--resume"):
    """Load a checkpoint file on the CPU without executing arbitrary pickled code.

    An empty, truncated, non-dict or tensor-less file is a ``CheckpointError`` naming ``flag``.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag} {path}: file not found; check the path")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{flag} {path} is an empty file (a save that never finished?); "
                              f"point {flag} at a complete .pth file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        lines = str(exc).strip().splitlines() or [""]
        raise CheckpointError(f"{flag} {path} cannot be read ({type(exc).__name__}: "
                              f"{lines[0][:160]}); point {flag} at a complete .pth file") from None
    if not isinstance(checkpoint, dict) or not SLaK.checkpoint_filter_fn(checkpoint):
        raise CheckpointError(f"{flag} {path} holds no model weights (a {type(checkpoint).__name__}"
                              f" without tensors); point {flag} at a checkpoint saved by main.py "
                              f"or the original release")
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


def open_checkpoint(path, flag, expected, ignore=(), model_key="", prefix=""):
    """Load ``path`` (given by ``flag``) and check its model against ``expected`` (a model_config).

    Every loader goes through here. A file that cannot be read, holds no weights or holds a
    model of another configuration is one ``CheckpointError`` naming the flags that differ and
    the values the checkpoint needs. ``ignore``: configuration keys this loader does not need to
    match (e.g. ``nb_classes`` when the classifier is dropped); ``model_key``, ``prefix``: where
    the weights are (``select_weights``). Returns ``(checkpoint, state_dict)``.
    """
    checkpoint = load_checkpoint(path, flag)
    state_dict = select_weights(checkpoint, model_key, prefix)
    if expected.get("model") not in (None, *SLaK.MODEL_DEPTHS_DIMS):  # another timm model
        return checkpoint, state_dict
    found, source = checkpoint_model_config(checkpoint, expected.get("model"), state_dict)
    if found is None:
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
    return checkpoint, state_dict


def load_state_dict_checked(model, state_dict, flag, path, strict=True):
    """``model.load_state_dict`` whose failure (a shape no flag explains) is one line."""
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{flag} {path} does not fit this model ({lines[1 if len(lines) > 1 else 0][:200]}); "
                              f"pass the flags it was trained with") from None


def write_atomic(path, write, mode="wb"):
    """``write(file)`` into a temporary file beside ``path``, then renamed over it: a crash at any
    moment leaves the old file intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
            write_atomic(log, lambda f: f.write("".join(kept)), mode="w")
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
    with open(os.path.join(output_dir, LOG_FILE), "a") as f:
        f.write(json.dumps(stats) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    if not args.eval and "optimizer" in checkpoint and "epoch" in checkpoint:
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
        start_epoch = int(checkpoint["epoch"]) + 1
        max_accuracy = checkpoint.get("max_accuracy", 0.0)
        max_accuracy_ema = checkpoint.get("max_accuracy_ema", 0.0)
        print(f"Resuming training at epoch {start_epoch}")
    masks_restored = False
    if masking is not None and checkpoint.get("masks"):
        masking.load_masks(checkpoint["masks"])
        if "sparse_state" in checkpoint:
            masking.load_state_dict(checkpoint["sparse_state"])
        masks_restored = True
    return start_epoch, max_accuracy, max_accuracy_ema, masks_restored
