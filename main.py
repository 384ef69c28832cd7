"""Train, evaluate and distil SLaK models.

    python main.py --model SLaK_tiny --Decom True --kernel_size 51 49 47 13 5 --width_factor 1.3 \
        --data_path /path/to/imagenet-1k --output_dir /path/to/save_results

Single process, ``torchrun --nproc_per_node N main.py ...``, the deprecated
``python -m torch.distributed.launch --nproc_per_node N main.py ...`` and SLURM all work.
"""
import datetime
import importlib.util
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.backends.cudnn as cudnn
import torch.nn as nn
from timm.data import Mixup
from timm.data.loader import PrefetchLoader, fast_collate
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, DistributedSampler

import SLaK  # registers the SLaK family in timm
import sparse_core
from checkpoint import (DEFAULT_MODEL_KEY, OutputDirLock, append_log, check_checkpoint,
                        check_checkpoint_path, check_sparse_resume, epoch_checkpoints,
                        latest_checkpoint,
                        load_checkpoint, load_state_dict_checked, open_checkpoint,
                        prepare_output_dir, remove_old_checkpoints, restore_training_state,
                        resumed_epoch, save_training_state)
from datasets import build_dataset, check_same_classes, normalization
from distillation import DISTILL_MODES, DISTILL_TYPES, FD_LOSS_TYPES, build_distillation
from distributed import (all_reduce_sum, data_parallel, get_rank, get_world_size,
                         init_distributed_mode, is_main_process)
from engine import SupervisedLoss, evaluate, train_one_epoch
from model_factory import build_model
from optim_factory import create_optimizer
from slak_config import args_model_config
from utils import (ArgumentParser, ConfigError, RunStopped, TensorboardLogger, WandbLogger,
                   check_device, check_flag_ranges, cosine_scheduler, run_cli, seed_everything,
                   str2bool)


def get_args_parser():
    parser = ArgumentParser("SLaK training, evaluation and distillation", add_help=True)
    add = parser.add_argument

    group = parser.add_argument_group("run")
    group.add_argument("--batch_size", default=64, type=int, help="batch size per GPU")
    group.add_argument("--epochs", default=300, type=int)
    group.add_argument("--update_freq", default=1, type=int, help="gradient accumulation steps")

    group = parser.add_argument_group("model")
    add_model_args(group)
    group.add_argument("--grad_checkpointing", type=str2bool, default=False,
                       help="recompute each block in the backward pass (less memory, more time)")
    group.add_argument("--compile", type=str2bool, default=False, help="torch.compile the model")
    group.add_argument("--compile_mode", default="default",
                       choices=["default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"],
                       help="torch.compile mode; reduce-overhead replays each step as CUDA "
                            "graphs (fastest on one GPU, see BENCHMARKS.md)")
    group.add_argument("--channels_last", type=str2bool, default=False,
                       help="channels-last memory format for model and inputs")

    group = parser.add_argument_group("EMA")
    group.add_argument("--model_ema", type=str2bool, default=False)
    group.add_argument("--model_ema_decay", type=float, default=0.9999)
    group.add_argument("--model_ema_force_cpu", type=str2bool, default=False)
    group.add_argument("--model_ema_eval", type=str2bool, default=False, help="also evaluate the EMA")

    group = parser.add_argument_group("optimizer and schedule")
    group.add_argument("--opt", default="adamw", type=str, help="timm optimizer name")
    group.add_argument("--opt_eps", default=1e-8, type=float)
    group.add_argument("--opt_betas", default=None, type=float, nargs="+")
    group.add_argument("--clip_grad", type=float, default=None, help="max gradient norm")
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight_decay", type=float, default=0.05)
    group.add_argument("--weight_decay_end", type=float, default=None,
                       help="final weight decay of the cosine schedule (default: constant)")
    group.add_argument("--lr", type=float, default=4e-3)
    group.add_argument("--layer_decay", type=float, default=1.0)
    group.add_argument("--min_lr", type=float, default=1e-6)
    group.add_argument("--warmup_epochs", type=int, default=20)
    group.add_argument("--warmup_steps", type=int, default=-1, help="overrides --warmup_epochs if > 0")

    group = parser.add_argument_group("augmentation")
    group.add_argument("--color_jitter", type=float, default=0.4)
    group.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1",
                       help="timm auto-augment policy, or None")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--train_interpolation", type=str, default="bicubic")
    group.add_argument("--crop_pct", type=float, default=None)
    group.add_argument("--reprob", type=float, default=0.25, help="random erase probability")
    group.add_argument("--remode", type=str, default="pixel")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--resplit", type=str2bool, default=False,
                       help="accepted for the original's command lines; no effect there either "
                            "(no augmentation splits)")
    group.add_argument("--mixup", type=float, default=0.8)
    group.add_argument("--cutmix", type=float, default=1.0)
    group.add_argument("--cutmix_minmax", type=float, nargs="+", default=None)
    group.add_argument("--mixup_prob", type=float, default=1.0)
    group.add_argument("--mixup_switch_prob", type=float, default=0.5)
    group.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])

    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--finetune", default="", help="checkpoint to initialise the model from")
    group.add_argument("--model_key", default=DEFAULT_MODEL_KEY, type=str,
                       help="the checkpoint entries that hold --finetune's weights, '|'-separated")
    group.add_argument("--model_prefix", default="", type=str,
                       help="prefix of the checkpoint's keys, stripped before loading")

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None, type=str)
    group.add_argument("--eval_data_path", default=None, type=str)
    group.add_argument("--imagenet_default_mean_and_std", type=str2bool, default=True)
    group.add_argument("--data_set", default="IMNET",
                       choices=["CIFAR", "IMNET", "image_folder", "synthetic"])
    group.add_argument("--synthetic_train_size", default=1280, type=int)
    group.add_argument("--synthetic_val_size", default=256, type=int)
    group.add_argument("--num_workers", default=10, type=int)
    group.add_argument("--pin_mem", type=str2bool, default=True)
    group.add_argument("--prefetcher", type=str2bool, default=False,
                       help="the loader's workers hand over uint8 images, which are converted, "
                            "normalised and randomly erased on --device (timm's PrefetchLoader): "
                            "less work per image in the workers and a quarter of the bytes "
                            "through shared and pinned memory. The erasing draws other random "
                            "numbers than in the workers")
    group.add_argument("--check_images", type=str2bool, default=False,
                       help="decode every image once at start-up and drop unreadable ones "
                            "(otherwise each is skipped with a warning when met)")

    group = parser.add_argument_group("output, checkpoints and logging")
    group.add_argument("--output_dir", default="", help="where to save checkpoints and log.txt")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder")
    group.add_argument("--device", default="cuda", help="cuda or cpu")
    group.add_argument("--seed", default=0, type=int)
    group.add_argument("--resume", default="", help="checkpoint to resume from")
    group.add_argument("--auto_resume", type=str2bool, default=True)
    group.add_argument("--save_ckpt", type=str2bool, default=True)
    group.add_argument("--save_ckpt_freq", default=1, type=int)
    group.add_argument("--save_ckpt_num", default=3, type=int)
    group.add_argument("--start_epoch", default=0, type=int)
    group.add_argument("--eval", type=str2bool, default=False, help="evaluate only")
    group.add_argument("--dist_eval", type=str2bool, default=True)
    group.add_argument("--disable_eval", type=str2bool, default=False)
    group.add_argument("--use_amp", type=str2bool, default=False, help="automatic mixed precision")
    group.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"])
    group.add_argument("--enable_wandb", type=str2bool, default=False)
    group.add_argument("--project", default="SLaK", type=str, help="W&B project")
    group.add_argument("--wandb_ckpt", type=str2bool, default=False)

    group = parser.add_argument_group("distributed")
    group.add_argument("--world_size", default=1, type=int)
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int)
    group.add_argument("--dist_on_itp", type=str2bool, default=False,
                       help="processes started by mpirun (OpenMPI's OMPI_COMM_WORLD_* variables), "
                            "meeting at MASTER_ADDR:MASTER_PORT")
    group.add_argument("--dist_url", default="env://")
    group.add_argument("--ddp_bucket_cap_mb", type=float, default=None,
                       help="DistributedDataParallel's gradient bucket size in MB (default: "
                            "PyTorch's 25). Compiled, each bucket is a graph piece: larger "
                            "buckets launch fewer pieces per step and start the first "
                            "all-reduce later")

    group = parser.add_argument_group("dynamic sparsity")
    group.add_argument("--sparse", action="store_true", help="train a sparse model")
    group.add_argument("--sparsity", type=float, default=0.4, help="fraction of weights removed")
    group.add_argument("--sparse_init", type=str, default="snip", choices=list(sparse_core.INIT),
                       help="the initial masks; resume: the zeros of the loaded weights")
    group.add_argument("--growth", type=str, default="random",
                       choices=list(sparse_core.GROWTH),
                       help="how regrown weights are chosen; momentum: |Adam exp_avg / (sqrt(exp_avg_sq) "
                            "+ 1e-8)| or |SGD momentum|; momentum_neuron: that score, shared out "
                            "among output neurons by their mean score")
    group.add_argument("--prune", type=str, default="magnitude", choices=list(sparse_core.PRUNE))
    group.add_argument("--redistribution", type=str, default="none",
                       choices=["none", "momentum", "magnitude", "nonzeros"],
                       help="accepted for the original's command lines; its adaptation never "
                            "redistributed weights across layers, and neither does this one")
    group.add_argument("--sparse_zero_state", type=str2bool, default=False,
                       help="zero the optimizer state (Adam moments too) of pruned and regrown "
                            "weights whenever the masks change; default false: the original's "
                            "(Adam moments untouched, SGD momentum masked every step)")
    group.add_argument("--prune_rate", "--prune-rate", type=float, default=0.3,
                       help="fraction of active weights replaced at each adaptation")
    group.add_argument("-u", "--update-frequency", "--update_frequency", dest="update_frequency",
                       type=int, default=100, help="optimizer steps between mask adaptations")
    group.add_argument("--fix", action="store_true", help="keep the initial masks (static sparsity)")
    group.add_argument("--only-L", "--only_L", dest="only_L", action="store_true",
                       help="sparsify only the large-kernel (LoRA1/LoRA2) weights; in distillation "
                            "the 7x7 depthwise weights of a SLaK-family student")
    group.add_argument("--verbose", action="store_true", help="per-layer density reports")

    group = parser.add_argument_group("distillation")
    group.add_argument("--distill_type", default=None, choices=DISTILL_TYPES,
                       help="distil --model (teacher, from --resume) into --model_s "
                            "(default: %(default)s)")
    group.add_argument("--model_s", default="SLaK_small", type=str,
                       help="student: a SLaK-family name (built as a ConvNeXt: 7x7 kernels, width 1) "
                            "or any timm model (resnet50, convnext_tiny, ...)")
    group.add_argument("--teacher_pretrained", type=str2bool, default=False,
                       help="take the teacher --model's weights from timm's pretrained weights "
                            "(downloaded by timm where online) instead of --resume")
    group.add_argument("--T", type=float, default=1.0, help="distillation temperature")
    group.add_argument("--nkd_honour_T", type=str2bool, nargs="?", const=True, default=False,
                       help="run NKD at --T; default false: at temperature 1, as the original")
    group.add_argument("--alpha", type=float, default=0.1,
                       help="KD: weight of the distillation term (the labels' cross-entropy gets "
                            "1 - alpha)")
    group.add_argument("--hard", action="store_true", help="KD with the teacher's hard labels")
    group.add_argument("--lr_fd", type=float, default=1.0,
                       help="weight of feature distillation between the last-stage maps (a ViT's "
                            "tokens laid on their grid, class tokens dropped; a 1x1 projection to "
                            "the teacher's width; the student map resized bilinearly to the "
                            "teacher's)")
    group.add_argument("--FDLoss_type", default="smoothL1", choices=list(FD_LOSS_TYPES),
                       help="feature distillation loss (SmoothL1 is an alias of smoothL1)")
    group.add_argument("--distill_resume", action="store_true",
                       help="resume the student from --output_dir")
    del add
    return parser


def add_model_args(group):
    """The flags ``model_factory.build_model`` reads, shared by main.py and export_onnx.py."""
    group.add_argument("--model", default="SLaK_tiny", type=str, help="model name (timm registry)")
    group.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate")
    group.add_argument("--input_size", default=224, type=int, help="image size")
    group.add_argument("--layer_scale_init_value", default=1e-6, type=float)
    group.add_argument("--kernel_size", type=int, nargs="+", default=[51, 49, 47, 13, 5],
                       help="kernel of each of the 4 stages, then the small kernel")
    group.add_argument("--width_factor", type=float, default=1.0, help="stage widths multiplier")
    group.add_argument("--Decom", type=str2bool, default=False,
                       help="decompose each KxK kernel into (K, s) + (s, K)")
    group.add_argument("--bn", type=str2bool, default=True, help="BatchNorm in large-kernel branches")
    group.add_argument("--head_init_scale", default=1.0, type=float)
    group.add_argument("--nb_classes", default=1000, type=int, help="classifier outputs")


def check_args(args):
    """Reject contradictory or malformed flags before anything is built or written."""
    check_flag_ranges(args)
    try:
        SLaK.validate_kernel_size(args.kernel_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_optimizer_name(args.opt)
    if args.eval and args.disable_eval:
        raise ConfigError("--eval true with --disable_eval true leaves nothing to do; drop one")
    if args.eval and not (args.resume or args.finetune or args.distill_type or (
            args.auto_resume and latest_checkpoint(args.output_dir))):
        raise ConfigError("--eval true needs weights to evaluate: pass --resume /path/to/checkpoint.pth")
    if args.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--enable_wandb needs the wandb package; pip install wandb")
    if args.output_dir:
        check_output_dir(args.output_dir)
    if args.model_ema_eval and not args.model_ema:
        raise ConfigError("--model_ema_eval true needs --model_ema true")
    if args.batch_size % 2 and mixes_images(args) and not args.eval:
        raise ConfigError(f"--batch_size {args.batch_size} is odd, and mixup and cutmix pair each "
                          f"image with another of its batch: pass an even --batch_size, or "
                          f"--mixup 0 --cutmix 0")
    sparsified = args.model if args.distill_type is None else args.model_s
    if args.only_L and sparsified not in SLaK.MODEL_DEPTHS_DIMS:
        which = "--model" if args.distill_type is None else "the student --model_s"
        raise ConfigError(f"--only-L sparsifies the large-kernel branches (lkb_origin, "
                          f"LoRA1/LoRA2), and {which} {sparsified} has none; drop --only-L")
    if args.only_L and not args.Decom and args.distill_type is None:
        # (In distillation the student is sparsified: a SLaK-family student is a ConvNeXt, whose
        # large-kernel branch is its 7x7 lkb_origin whatever the teacher's --Decom.)
        raise ConfigError("--only-L sparsifies the LoRA1/LoRA2 branches, which exist only with --Decom True")
    if args.compile_mode != "default" and not args.compile:
        raise ConfigError(f"--compile_mode {args.compile_mode} applies to a compiled model: "
                          f"add --compile true")
    if args.compile and args.compile_mode in ("reduce-overhead", "max-autotune") and \
            args.distill_type and DISTILL_MODES[args.distill_type].features:
        raise ConfigError(f"--compile_mode {args.compile_mode} replays CUDA graphs, whose output "
                          f"buffers would overwrite the student features that {args.distill_type} "
                          f"taps; use --compile_mode default or max-autotune-no-cudagraphs")
    check_device(args.device)
    if args.resume and args.distill_type and not os.path.exists(args.resume):
        raise ConfigError(f"--resume {args.resume}: the teacher's checkpoint not found")
    if args.resume:
        check_checkpoint_path(args.resume, "--resume")
    if args.finetune:
        check_checkpoint_path(args.finetune, "--finetune")
    if args.resume and args.finetune and args.distill_type is None:
        raise ConfigError("--resume continues a run (weights, optimizer, epoch) and --finetune "
                          "starts a new one from a checkpoint's weights; pass one of them")
    if args.distill_type is not None:
        if DISTILL_MODES[args.distill_type].uses_teacher and not args.resume and \
                not args.teacher_pretrained:
            raise ConfigError(f"--distill_type {args.distill_type} needs the teacher's weights: pass "
                              f"--resume /path/to/teacher/checkpoint.pth (or --teacher_pretrained "
                              f"true for timm's weights)")
        if args.resume and args.teacher_pretrained:
            raise ConfigError("--resume and --teacher_pretrained true both give the teacher's "
                              "weights; pass one of them")
        if args.distill_resume and not args.output_dir:
            raise ConfigError("--distill_resume continues the student from --output_dir; pass "
                              "--output_dir")


def check_optimizer_name(name):
    """``--opt`` as timm reads it (``lookahead_`` prefix allowed); ``ConfigError`` otherwise."""
    from timm.optim import get_optimizer_info, list_optimizers
    try:
        get_optimizer_info(name.lower().split("_")[-1])
    except ValueError:
        raise ConfigError(f"--opt {name} is not an optimizer timm knows; pass one of adamw, sgd, "
                          f"momentum, lamb, ... (all {len(list_optimizers())}: "
                          f"timm.optim.list_optimizers())") from None


def check_output_dir(output_dir):
    """Fail now, before anything is built, if ``output_dir`` cannot become a writable folder."""
    path = Path(output_dir).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise ConfigError(f"--output_dir {output_dir} {where}; pass a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {output_dir} cannot be created or written ({existing} is "
                          f"not writable); pass a folder you can write to")


def load_finetune_weights(model, args, config):
    """Initialise ``model`` from ``--finetune``; only the classifier may differ (it is dropped).

    ``config``: this run's model_config; a checkpoint of another configuration, or one of which
    anything but the classifier does not load, is a ``ConfigError``.
    """
    # --model_prefix as the original: the checkpoint's keys carry the prefix, ours do not.
    _, state_dict = open_checkpoint(args.finetune, "--finetune", config, ignore=("nb_classes",),
                                    model_key=args.model_key, prefix=args.model_prefix)
    state_dict = SLaK.checkpoint_filter_fn(state_dict, model)
    result = load_state_dict_checked(model, state_dict, "--finetune", args.finetune, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys or len(result.missing_keys) == len(model.state_dict()):
        raise ConfigError(f"--finetune {args.finetune} does not fit the model beyond its "
                          f"classifier ({len(missing)} weights missing, e.g. "
                          f"{(missing or ['-'])[0]}; {len(result.unexpected_keys)} unexpected, e.g. "
                          f"{(result.unexpected_keys or ['-'])[0]}); pass the flags it was trained "
                          f"with, or --model_key/--model_prefix")
    print(f"Fine-tuning from {args.finetune}: missing keys {result.missing_keys}, "
          f"unexpected keys {result.unexpected_keys}")


def build_loaders(args, dataset_train, dataset_val):
    world_size, rank = get_world_size(), get_rank()
    # Pinned memory only speeds up copies to a GPU (and warns when there is none).
    pin_memory = args.pin_mem and args.device.startswith("cuda")
    # One sampler for 1 or N processes: the shuffle order is a function of (seed, epoch), which
    # is what makes a resumed epoch replay exactly.
    sampler_train = DistributedSampler(dataset_train, num_replicas=world_size, rank=rank,
                                       shuffle=True, seed=args.seed)
    # With --prefetcher the workers' images are uint8 (build_transform), batched by timm's
    # fast_collate and finished on the device.
    collate_fn = fast_collate if args.prefetcher else None
    data_loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                   num_workers=args.num_workers, pin_memory=pin_memory,
                                   drop_last=True, collate_fn=collate_fn)
    data_loader_val = None
    if dataset_val is not None:
        # Each process takes every world_size-th image (no padding), so accuracy is exact.
        shard = list(range(rank, len(dataset_val), world_size)) if args.dist_eval else \
            list(range(len(dataset_val))) if rank == 0 else []
        data_loader_val = DataLoader(torch.utils.data.Subset(dataset_val, shard),
                                     batch_size=int(1.5 * args.batch_size), shuffle=False,
                                     num_workers=args.num_workers, pin_memory=pin_memory,
                                     collate_fn=collate_fn)
    if args.prefetcher:
        mean, std = normalization(args)
        device = torch.device(args.device)
        data_loader_train = PrefetchLoader(data_loader_train, mean, std, device=device,
                                           re_prob=args.reprob, re_mode=args.remode,
                                           re_count=args.recount)
        if data_loader_val is not None:
            data_loader_val = PrefetchLoader(data_loader_val, mean, std, device=device)
    return data_loader_train, data_loader_val


def mixes_images(args):
    """Whether training batches go through timm's Mixup (mixup or cutmix)."""
    return args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None


def build_criterion(args, mixup_active):
    if mixup_active:
        return SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def main(args):
    init_distributed_mode(args)
    check_args(args)
    # Held by the main process from before the folder's checkpoints are read until the run ends.
    with OutputDirLock("" if args.eval else args.output_dir) as lock:
        return train_and_evaluate(args, lock)


def on_all_processes(action, args):
    """``action()``; a ``RunStopped`` raised by it on any process (the main process alone locks
    the folder and writes files) is raised on every process, instead of leaving the others to
    wait in their next collective. Other processes than the failing one stop with a short line
    (only rank 0 prints)."""
    error, result = None, None
    try:
        result = action()
    except RunStopped as exc:
        error = exc
    if args.distributed and all_reduce_sum([float(error is not None)], torch.device(args.device))[0]:
        raise error or RunStopped("stopped: another process failed")
    if error is not None:
        raise error
    return result


def resume_source(args):
    """``(path, flag)`` of the checkpoint this run continues from (path "" for none): the
    student's newest in --output_dir with --distill_resume, else --resume or, with --auto_resume,
    the newest in --output_dir."""
    if args.distill_type is not None:
        newest = latest_checkpoint(args.output_dir) if args.distill_resume else None
        return newest or "", "--distill_resume"
    if args.auto_resume and not args.resume and args.output_dir:
        args.resume = latest_checkpoint(args.output_dir) or ""
    return args.resume, "--resume"


def nothing_to_train(args, checkpoint, resume_path, resume_flag):
    """Why this run would train no epoch (a line to print), or None."""
    if args.eval:
        return None
    start_epoch = resumed_epoch(checkpoint) if checkpoint is not None else None
    if start_epoch is not None and start_epoch >= args.epochs:
        return (f"Nothing to train: {resume_flag} {resume_path} ends at epoch {start_epoch - 1}, "
                f"the last of --epochs {args.epochs}; raise --epochs to train on, or evaluate it "
                f"with --eval true")
    if start_epoch is None and args.start_epoch >= args.epochs:
        if args.epochs == 0:
            return "Nothing to train: --epochs 0; pass --epochs N to train, or --eval true to evaluate"
        return (f"Nothing to train: --start_epoch {args.start_epoch} is at or past --epochs "
                f"{args.epochs}; raise --epochs or lower --start_epoch")
    return None


def train_and_evaluate(args, lock):
    """``main`` once the flags are checked; ``lock``: the ``OutputDirLock`` of --output_dir."""
    device = torch.device(args.device)
    seed_everything(args.seed + get_rank())
    cudnn.benchmark = True
    amp_dtype = getattr(torch, args.amp_dtype) if args.use_amp else None

    # The checkpoint to continue from is read before anything is built: a run with nothing left
    # to train, or one whose sparsity flags contradict its masks, ends here.
    distilling = args.distill_type is not None
    on_all_processes(lambda: lock.acquire(create=False), args)
    resume_path, resume_flag = resume_source(args)
    checkpoint = load_checkpoint(resume_path, resume_flag) if resume_path else None
    if checkpoint is not None:
        check_sparse_resume(checkpoint, resume_path, resume_flag, args)
    reason = nothing_to_train(args, checkpoint, resume_path, resume_flag)
    if reason:
        print(reason)
        return None
    if args.sparse and sparse_core.INIT[args.sparse_init].needs_weights and checkpoint is None \
            and not args.finetune and not args.eval:
        what = "--distill_resume (the student's checkpoint in --output_dir)" if distilling else \
            "--resume, --auto_resume or --finetune"
        others = " or ".join(k for k, rule in sparse_core.INIT.items() if not rule.needs_weights)
        raise ConfigError(f"--sparse_init {args.sparse_init} takes the masks from the zeros of a "
                          f"checkpoint, and there is none to load ({what}); use --sparse_init {others}")

    if args.disable_eval:  # (with --eval refused above) no validation set to find or read
        dataset_train, nb_classes = build_dataset(True, args)
        dataset_val = None
    else:
        dataset_val, nb_classes = build_dataset(False, args)
        dataset_train = None if args.eval else build_dataset(True, args)[0]
        if dataset_train is not None:
            check_same_classes(dataset_train, dataset_val)
    args.nb_classes = nb_classes
    data_loader_train, data_loader_val = build_loaders(
        args, dataset_train if dataset_train is not None else dataset_val, dataset_val)

    # In distillation mode the model trained, checkpointed, EMA'd and evaluated is the student;
    # --resume holds the teacher's weights and --distill_resume continues the student.
    distillation, teacher, feature_loss = None, None, None
    if distilling:
        distillation = build_distillation(args, nb_classes, device)
        model, config = distillation.student, distillation.model_config
        teacher, feature_loss = distillation.teacher, distillation.feature_loss
    else:
        model = build_model(args, args.model, nb_classes)
        config = args_model_config(args)
    if args.finetune:
        load_finetune_weights(model, args, config)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model {args.model_s if distilling else args.model}: {n_parameters / 1e6:.2f}M parameters")

    if checkpoint is not None:
        check_checkpoint(checkpoint, resume_path, resume_flag, config)

    if args.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
    # Evaluation runs the bare model: with --dist_eval false only rank 0 evaluates, and a DDP
    # forward may broadcast buffers, a collective the other ranks would never join.
    model_without_ddp = model
    if args.distributed:
        model = data_parallel(model, device, args.ddp_bucket_cap_mb)
    train_model = torch.compile(model, mode=args.compile_mode) if args.compile else model

    total_batch_size = args.batch_size * args.update_freq * get_world_size()
    steps_per_epoch = len(data_loader_train) // args.update_freq
    if not args.eval and steps_per_epoch == 0:
        raise ConfigError(f"the training set ({len(dataset_train)} images) is smaller than one "
                          f"update ({total_batch_size} images); lower --batch_size or --update_freq")
    print(f"Batch size {total_batch_size} = {args.batch_size} per process x {args.update_freq} "
          f"accumulation x {get_world_size()} processes; {steps_per_epoch} updates per epoch")

    optimizer = create_optimizer(args, model_without_ddp)
    if distilling:
        distillation.add_param_groups(optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    masking = None
    if args.sparse and not args.eval:
        masking = sparse_core.Masking.from_args(model_without_ddp, optimizer, args,
                                                args.epochs * steps_per_epoch)
    max_accuracy, max_accuracy_ema, masks_restored = 0.0, 0.0, False
    if checkpoint is not None:
        args.start_epoch, max_accuracy, max_accuracy_ema, masks_restored = restore_training_state(
            checkpoint, resume_path, args=args, model=model_without_ddp, optimizer=optimizer,
            scaler=scaler, model_ema=model_ema, feature_loss=feature_loss, masking=masking,
            flag="--distill_resume" if distilling else "--resume")
    if args.output_dir and not args.eval:
        # A run over another run's epoch checkpoints would rewrite its log and best checkpoint,
        # have its own checkpoints rotated away as the older ones, and leave auto-resume to pick
        # the other run's newest.
        ahead = [path for epoch, path in epoch_checkpoints(args.output_dir)
                 if epoch >= args.start_epoch]
        if ahead:
            how = "--distill_resume" if distilling else "--auto_resume true and no --resume"
            raise ConfigError(f"--output_dir {args.output_dir} holds {os.path.basename(ahead[-1])}, "
                              f"of epochs this run would train again from epoch {args.start_epoch}: "
                              f"continue from it with {how}, or pass another --output_dir")

    if teacher is not None and data_loader_val is not None:
        teacher_stats = evaluate(data_loader_val, teacher, device, amp_dtype, args.channels_last)
        print(f"Teacher accuracy on {len(dataset_val)} test images: {teacher_stats['acc1']:.2f}%")
        student_stats = evaluate(data_loader_val, model_without_ddp, device, amp_dtype,
                                 args.channels_last)
        print(f"Student accuracy on {len(dataset_val)} test images"
              f"{'' if args.eval else ' at the start'}: {student_stats['acc1']:.2f}%")
        if args.eval:
            return student_stats

    if args.eval:
        test_stats = evaluate(data_loader_val, model_without_ddp, device, amp_dtype,
                              args.channels_last)
        print(f"Accuracy of the network on {len(dataset_val)} test images: {test_stats['acc1']:.5f}%")
        return test_stats

    # Everything is validated; only now is anything written.
    if args.output_dir:
        on_all_processes(lambda: lock.acquire(create=True), args)
        on_all_processes(lambda: prepare_output_dir(args.output_dir, args.start_epoch,
                                                    args.save_ckpt_num if args.save_ckpt else 0),
                         args)
    log_writer = TensorboardLogger(args.log_dir) if args.log_dir and is_main_process() else None
    wandb_logger = WandbLogger(args) if args.enable_wandb and is_main_process() else None

    mixup_fn = None
    mixup_active = mixes_images(args)
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=nb_classes)
    criterion = build_criterion(args, mixup_active)
    loss_fn = distillation.loss(criterion) if distilling else SupervisedLoss(criterion)

    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch,
                                   warmup_epochs=args.warmup_epochs, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)

    if masking is not None:
        if not masks_restored:
            images, targets = None, None
            if sparse_core.INIT[args.sparse_init].needs_batch:  # one training batch, before mixup
                images, targets = next(iter(data_loader_train))
                images, targets = images.to(device), targets.to(device)
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
            masking.init(images, targets, nn.CrossEntropyLoss())
            masking.steps = args.start_epoch * steps_per_epoch  # continue the prune-rate schedule
        if model_ema is not None:
            masking.mask_ema(model_ema.module)

    def save(name, epoch):
        return on_all_processes(lambda: save_training_state(
            os.path.join(args.output_dir, name), args=args, epoch=epoch, model=model_without_ddp,
            optimizer=optimizer, scaler=scaler, model_ema=model_ema, feature_loss=feature_loss,
            masking=masking, max_accuracy=max_accuracy, max_accuracy_ema=max_accuracy_ema,
            model_config=config), args)

    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        # Everything random in an epoch (order, augmentation, mixup, drop path) derives from
        # (seed, epoch, rank), so an epoch re-run after a crash is identical.
        seed_everything(args.seed + 1_000_003 * epoch + get_rank())
        data_loader_train.sampler.set_epoch(epoch)
        skipped_before = dataset_train.skipped.value if hasattr(dataset_train, "skipped") else 0
        train_stats = train_one_epoch(
            train_model, loss_fn, data_loader_train, optimizer, device, epoch, scaler,
            steps_per_epoch=steps_per_epoch, start_steps=epoch * steps_per_epoch,
            lr_schedule=lr_schedule, wd_schedule=wd_schedule, update_freq=args.update_freq,
            amp_dtype=amp_dtype, max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn,
            masking=masking, channels_last=args.channels_last, log_writer=log_writer)

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        if hasattr(dataset_train, "skipped"):  # unreadable images met this epoch, all processes
            log_stats["train_skipped_images"] = int(all_reduce_sum(
                [dataset_train.skipped.value - skipped_before], device)[0])
        if data_loader_val is not None:
            test_stats = evaluate(data_loader_val, model_without_ddp, device, amp_dtype,
                              args.channels_last)
            if test_stats["acc1"] > max_accuracy:
                max_accuracy = test_stats["acc1"]
                if args.output_dir and args.save_ckpt:
                    save("checkpoint-best.pth", epoch)
            print(f"Max accuracy: {max_accuracy:.2f}%")
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()}, max_accuracy=max_accuracy)
            if log_writer is not None:
                log_writer.update(head="perf", step=epoch, test_acc1=test_stats["acc1"],
                                  test_acc5=test_stats["acc5"], test_loss=test_stats["loss"])
            if model_ema is not None and args.model_ema_eval:
                ema_stats = evaluate(data_loader_val, model_ema.module, device, amp_dtype,
                                     args.channels_last)
                if ema_stats["acc1"] > max_accuracy_ema:
                    max_accuracy_ema = ema_stats["acc1"]
                    if args.output_dir and args.save_ckpt:
                        save("checkpoint-best-ema.pth", epoch)
                print(f"Max EMA accuracy: {max_accuracy_ema:.2f}%")
                log_stats.update({f"test_ema_{k}": v for k, v in ema_stats.items()},
                                 max_accuracy_ema=max_accuracy_ema)
                if log_writer is not None:
                    log_writer.update(head="perf", step=epoch, test_acc1_ema=ema_stats["acc1"])

        # The epoch checkpoint comes last, after the best checkpoints and the log line: a run
        # killed before it re-runs this epoch, one killed after it has nothing of it left to do.
        if log_writer is not None:
            log_writer.flush()
        if args.output_dir:
            on_all_processes(lambda: append_log(args.output_dir, log_stats), args)
        if args.output_dir and args.save_ckpt and (
                (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):
            path = save(f"checkpoint-{epoch}.pth", epoch)
            remove_old_checkpoints(args.output_dir, args.save_ckpt_num)
            if wandb_logger is not None and args.wandb_ckpt:
                wandb_logger.log_checkpoint(path)

        if wandb_logger is not None:
            wandb_logger.log_epoch(log_stats)

    if wandb_logger is not None:
        wandb_logger.finish()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def resume_hint(args, argv):
    """What to run to continue an interrupted run: its newest complete checkpoint and the command."""
    newest = latest_checkpoint(args.output_dir) if args.output_dir else None
    if newest is None:
        return "no complete epoch checkpoint was written; the same command starts over"
    script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "main.py"
    command = ["python", script, *argv]
    if args.distill_type is not None:
        if "--distill_resume" not in argv:
            command.append("--distill_resume")
    elif args.finetune and not args.auto_resume:  # (--resume with --finetune is refused)
        command += ["--auto_resume", "true"]
    elif any(a == "--resume" or a.startswith("--resume=") for a in argv) or not args.auto_resume:
        # Appended: a later --resume overrides an earlier one.
        command += ["--resume", newest]
    return f"newest complete checkpoint {newest}; resume with: {shlex.join(command)}"


def run_main(args, argv):
    """``main(args)`` with the command line's error handling (one line, exit 2)."""
    run_cli(main, args, on_interrupt=lambda: resume_hint(args, argv))


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    run_main(get_args_parser().parse_args(argv), argv)


if __name__ == "__main__":
    cli()
