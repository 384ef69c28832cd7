"""Optimizer with the original's ConvNeXt parameter groups and layer-wise LR decay.

Weights of rank >= 2 get weight decay; biases, norms and layer scales (``gamma``, all 1-D) do
not. Parameters are grouped by (layer id, decay or not) in the order ``named_parameters`` first
meets each group, as the original's optimizer factory did, so its optimizer state dicts load
onto ours (without layer decay: [decay, no decay]). With ``--layer_decay`` != 1 each parameter
gets ``lr_scale = layer_decay ** (13 - layer_id)`` from the original's 14 layer ids
(``layer_id``); the training loop multiplies the scheduled LR by it.
"""
import re

import torch
from timm.optim import create_optimizer_v2

NUM_LAYERS = 14  # the original's ConvNeXt layer ids 0..13


def layer_id(name):
    """The original's layer id of a parameter: stem 0; stage-0 blocks 1; stage-1 blocks and the
    second downsample 2; the third downsample 3; stage-2 block b 3 + b // 3; stage 3 and the last
    downsample 12; everything else (final norm, head) 13."""
    match = re.match(r"(downsample_layers|stages)\.(\d+)(?:\.(\d+))?", name)
    if match is None:
        return NUM_LAYERS - 1
    kind, index = match.group(1), int(match.group(2))
    if kind == "downsample_layers":
        return (0, 2, 3, 12)[index]
    if index == 2:
        return 3 + int(match.group(3)) // 3
    return (1, 2, None, 12)[index]


def param_groups(model, weight_decay, layer_decay=1.0):
    """The original's parameter groups, in the order they are first met."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not name.endswith(".bias")
        lid = layer_id(name) if layer_decay != 1.0 else None
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (NUM_LAYERS - 1 - lid) if lid is not None else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": scale}
        groups[key]["params"].append(param)
    return list(groups.values())


def create_optimizer(args, model):
    kwargs = {}
    if args.opt_eps is not None:
        kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    # PyTorch's fused AdamW is one kernel for all parameters on CUDA.
    if args.opt.lower() == "adamw" and torch.device(args.device).type == "cuda":
        kwargs["fused"] = True
    groups = param_groups(model, args.weight_decay, float(args.layer_decay))
    optimizer = create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **kwargs)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * group["lr_scale"]
        # Decided once: a weight-decay schedule reaching 0 must not flip it.
        group["scheduled_weight_decay"] = group["weight_decay"] > 0
    return optimizer


def set_schedule(optimizer, lr, weight_decay):
    """Apply this iteration's LR (times each group's ``lr_scale``) and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * group.get("lr_scale", 1.0)
        if group["scheduled_weight_decay"]:
            group["weight_decay"] = float(weight_decay)
