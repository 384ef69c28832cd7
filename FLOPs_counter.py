"""Count the parameters and multiply-accumulates of a (sparse) SLaK model, unmasked weights only.

    python FLOPs_counter.py --model SLaK_tiny --width_factor 1.3 --kernel_size 51 49 47 13 5 \\
        --Decom True --sparse --sparsity 0.4 --sparse_init snip
    python FLOPs_counter.py --model SLaK_tiny --kernel_size 7 7 7 7 100        # ConvNeXt-T
    python FLOPs_counter.py --model SLaK_tiny ... --resume checkpoint.pth      # a trained model

Masks come from ``--resume`` (its ``masks``, or else the zeros of its weights) or, with
``--sparse``, from ``sparse_core.Masking.init`` exactly as training builds them (SNIP on one
seeded random batch). What is counted:

* parameters: every parameter of the model (weights, biases, norm affine parameters, layer
  scales), minus the masked-out entries of sparse weights; buffers (BN statistics) are not counted;
* multiply-accumulates of one forward pass of one ``input_size`` image: convolutions and linear
  layers only, each scaled by its weight's density (a masked-out weight does no work). Bias
  additions, normalisations, activations, pooling and residual additions are not counted (they
  are < 1% of the total here), the convention of the ConvNeXt and SLaK papers' tables.

The summary is human-readable; the last line is JSON: ``{"params_M": ..., "gmacs": ...}``.
"""
import json

import timm
import torch
import torch.nn as nn

import SLaK  # noqa: F401  (registers the SLaK models with timm)
import sparse_core
from utils import ArgumentParser, ConfigError, check_flag_ranges, run_cli, str2bool


def get_args_parser():
    p = ArgumentParser("SLaK parameter and MAC counter", add_help=True)
    p.add_argument("--model", default="SLaK_tiny", type=str)
    p.add_argument("--width_factor", default=1.0, type=float)
    p.add_argument("--kernel_size", nargs=5, type=int, default=[51, 49, 47, 13, 5])
    p.add_argument("--Decom", type=str2bool, default=False)
    p.add_argument("--bn", type=str2bool, default=True)
    p.add_argument("--sparse", nargs="?", const=True, default=False, type=str2bool,
                   help="build masks as training does (bare flag or true/false)")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--sparse_init", default="snip", choices=["snip", "ERK", "uniform", "resume"])
    p.add_argument("--only-L", "--only_L", dest="only_L", nargs="?", const=True, default=False,
                   type=str2bool)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--nb_classes", default=1000, type=int)
    p.add_argument("--resume", default="", type=str, help="checkpoint whose masks (or zeros) to count")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--snip_batch", default=8, type=int, help="random images for SNIP")
    return p


def build_masks(model, args):
    """``{param name: bool mask}`` for the counted model, or ``{}`` for a dense one."""
    if args.resume:
        from checkpoint import load_state_dict_checked, open_checkpoint
        from slak_config import model_config
        expected = model_config(args.model, args.kernel_size, args.Decom, args.width_factor,
                                args.bn, args.nb_classes)
        checkpoint, state_dict = open_checkpoint(args.resume, "--resume", expected)
        load_state_dict_checked(model, state_dict, "--resume", args.resume)
        if isinstance(checkpoint, dict) and checkpoint.get("masks"):
            return {k: v.bool() for k, v in checkpoint["masks"].items()}
        sparse_init = "resume"  # no masks stored: the zeros of the weights are the masks
    elif not args.sparse:
        return {}
    else:
        sparse_init = args.sparse_init
    masking = sparse_core.Masking(model, None, 1, sparsity=args.sparsity, sparse_init=sparse_init,
                                  fix=True, only_L=args.only_L, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.snip_batch, 3, args.input_size, args.input_size, generator=generator)
    # Channels-last: the CPU's depthwise weight gradient is ~20x faster in that layout.
    model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, args.nb_classes, (args.snip_batch,), generator=generator)
    masking.init(images, targets, nn.CrossEntropyLoss())
    return masking.masks


@torch.no_grad()
def count(model, masks, input_size):
    """``(params, macs, per-layer rows)`` counting only unmasked weights."""
    names = {id(p): n for n, p in model.named_parameters()}
    density = {}
    for n, p in model.named_parameters():
        density[n] = masks[n].float().mean().item() if n in masks else 1.0
    params = sum(p.numel() * density[n] for n, p in model.named_parameters())
    rows = []

    def hook(module, inputs, output):
        w = module.weight
        d = density[names[id(w)]]
        if isinstance(module, nn.Conv2d):
            per_output = w.shape[1] * w.shape[2] * w.shape[3]  # (in / groups) * kh * kw
            dense_macs = output.numel() * per_output
        else:  # nn.Linear: one dot product of in_features per output element
            dense_macs = output.numel() * w.shape[1]
        rows.append((names[id(w)], dense_macs, dense_macs * d, d))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    model(torch.zeros(1, 3, input_size, input_size))
    for h in handles:
        h.remove()
    macs = sum(r[2] for r in rows)
    return params, macs, rows


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_flag_ranges(args)
    if args.model not in SLaK.MODEL_DEPTHS_DIMS:
        raise ConfigError(f"--model {args.model}: FLOPs_counter.py counts SLaK-family models; "
                          f"pass one of {', '.join(SLaK.MODEL_DEPTHS_DIMS)}")
    try:
        SLaK.validate_kernel_size(args.kernel_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, kernel_size=args.kernel_size, width_factor=args.width_factor,
                              Decom=args.Decom, bn=args.bn, num_classes=args.nb_classes)
    masks = build_masks(model, args)
    params, macs, rows = count(model, masks, args.input_size)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = sum(r[1] for r in rows)
    ks = " ".join(map(str, args.kernel_size))
    print(f"model {args.model}  width {args.width_factor}  kernels {ks}  Decom {args.Decom}  "
          f"bn {args.bn}  input {args.input_size}x{args.input_size}")
    if masks:
        source = f"checkpoint {args.resume}" if args.resume else f"--sparse_init {args.sparse_init}"
        print(f"masks: {len(masks)} sparse weights from {source}")
    else:
        print("masks: none (dense)")
    print(f"{'layer':58s} {'density':>8s} {'MMACs':>10s}")
    for name, _, sparse, d in rows:
        print(f"{name:58s} {d:8.4f} {sparse / 1e6:10.2f}")
    print(f"parameters: {params / 1e6:.2f}M unmasked of {dense_params / 1e6:.2f}M")
    print(f"MACs: {macs / 1e9:.3f}G unmasked of {dense_macs / 1e9:.3f}G (conv + linear, one image)")
    print(json.dumps({"params_M": round(params / 1e6, 3), "gmacs": round(macs / 1e9, 3)}))
    return params, macs


if __name__ == "__main__":
    run_cli(main)
