"""Optimizer with ConvNeXt's parameter groups and layer-wise LR decay, through timm.optim.

Weights of rank >= 2 get weight decay; biases, norms and layer scales do not. With
``--layer_decay < 1`` each block gets ``lr_scale = layer_decay ** (num_layers - layer_id)``
(from the model's ``group_matcher``); the training loop multiplies the scheduled LR by it.
"""
import torch
from timm.optim import create_optimizer_v2


def create_optimizer(args, model):
    kwargs = {}
    if args.opt_eps is not None:
        kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    # PyTorch's fused AdamW is one kernel for all parameters on CUDA.
    if args.opt.lower() == "adamw" and torch.device(args.device).type == "cuda":
        kwargs["fused"] = True
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay if args.layer_decay < 1.0 else None, **kwargs)
    for group in optimizer.param_groups:  # decided once: a schedule reaching 0 must not flip it
        group["scheduled_weight_decay"] = group["weight_decay"] > 0
    return optimizer


def set_schedule(optimizer, lr, weight_decay):
    """Apply this iteration's LR (times each group's ``lr_scale``) and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * group.get("lr_scale", 1.0)
        if group["scheduled_weight_decay"]:
            group["weight_decay"] = float(weight_decay)
