"""Train or evaluate a SLaK config of MMSegmentation or MMDetection without their source trees.

``segmentation/train.py``, ``segmentation/test.py``, ``detection/train.py`` and
``detection/test.py`` call :func:`main`; the config's ``default_scope`` (``mmseg`` / ``mmdet``)
picks the framework and its ``custom_imports`` registers SLaK. It does what the frameworks'
``tools/train.py`` / ``tools/test.py`` do for these configs: build an mmengine ``Runner`` from the
config and run it, single process or under ``torchrun`` (``--launcher pytorch``).
"""
import argparse
import os
from pathlib import Path


def get_args_parser(mode):
    parser = argparse.ArgumentParser(f"SLaK dense prediction: {mode}")
    parser.add_argument("config", help="config file, e.g. segmentation/configs/"
                                       "upernet_slak_tiny_512_160k_ade20k_ss.py")
    if mode == "test":
        parser.add_argument("checkpoint", help="checkpoint of the trained segmentor or detector")
    parser.add_argument("--work-dir", help="logs and checkpoints (default: work_dirs/CONFIG_NAME)")
    if mode == "train":
        parser.add_argument("--resume", action="store_true",
                            help="resume from the latest checkpoint in the work dir")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config entries, e.g. "
                             "model.backbone.init_cfg.checkpoint=/path/to/checkpoint-best.pth")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser


def load_config(path, cfg_options=(), work_dir=None):
    """The mmengine ``Config`` of ``path`` with ``KEY=VALUE`` overrides and a work dir set."""
    from mmengine.config import Config, DictAction

    cfg = Config.fromfile(path)
    if cfg_options:
        action = DictAction(option_strings=[], dest="cfg_options")
        namespace = argparse.Namespace()
        action(None, namespace, list(cfg_options))
        cfg.merge_from_dict(namespace.cfg_options)
    cfg.work_dir = work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(path).stem)
    return cfg


def named_checkpoints(cfg, mode):
    """``{config key: path}`` of the checkpoints a run of ``mode`` loads (None where unset)."""
    if mode == "test":
        return {"checkpoint": cfg.load_from}
    backbone = cfg.model.get("backbone") or {}
    init_cfg = backbone.get("init_cfg")
    entries = init_cfg if isinstance(init_cfg, list) else [init_cfg]
    named = {"model.backbone.init_cfg.checkpoint": entry.get("checkpoint") for entry in entries
             if isinstance(entry, dict) and entry.get("type") == "Pretrained"}
    named["model.backbone.pretrained"] = backbone.get("pretrained")
    named["model.pretrained"] = cfg.model.get("pretrained")
    named["load_from"] = cfg.get("load_from")
    return named


def main(mode, argv=None):
    args = get_args_parser(mode).parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch
    from mmengine.runner import Runner

    cfg = load_config(args.config, args.cfg_options, args.work_dir)
    from segmentation.backbone import check_checkpoint_file

    if mode == "test":
        cfg.load_from = args.checkpoint
    # A mistyped path stops here, before the Runner creates the work dir and its logs.
    for key, path in named_checkpoints(cfg, mode).items():
        if path is not None:
            check_checkpoint_file(path, key)
    cfg.launcher = args.launcher
    if not torch.cuda.is_available() and cfg.optim_wrapper.get("type") == "AmpOptimWrapper":
        # Mixed precision here is CUDA's; a CPU run trains in float32.
        print("no CUDA device: training in float32 (OptimWrapper instead of AmpOptimWrapper)")
        cfg.optim_wrapper.type = "OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale", None)
    if mode == "train":
        cfg.resume = args.resume
        Runner.from_cfg(cfg).train()
    else:
        Runner.from_cfg(cfg).test()
