"""Effective receptive field (ERF) of a ConvNet: the aggregated contribution score matrix.

For each image, resized to ``--input_size`` squared, the score is the input gradient of the summed
ReLU of the last stage's centre activation(s), ReLU'd and summed over colour channels; the matrix
saved to ``--save_path`` (``.npy``, shape ``(input_size, input_size)``) is its mean over
``--num_images`` images. Images whose gradient is not finite are skipped (and replaced by the next).

    python erf/visualize_erf.py --model SLaK --Decom true --kernel_size 51 49 47 13 5 \
        --width_factor 1.3 --weights SLaK_tiny.pth --data_path /path/to/imagenet \
        --save_path slak_tiny_erf.npy
    python erf/visualize_erf.py --model resnet101 --data_path ./my_photos --save_path r101.npy

``--data_path`` may be an ImageNet root (its ``val/`` is used), any ImageFolder, or a flat folder of
images. ``python erf/analyze_erf.py --source X.npy --heatmap_save X.png`` turns the matrix into the
high-contribution area table and a heatmap.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the repository's modules come from its installation (pip install -e .)
    from utils import (ArgumentParser, ConfigError, check_device, check_flag_ranges, run_cli,
                       str2bool)
except ModuleNotFoundError as exc:
    if exc.name != "utils":
        raise
    sys.exit(f"error: {__file__} imports this repository's modules ({exc.name} not found): "
             f"install the repository first (pip install -e . in its root)")

__all__ = ["centre_indices", "erf_scores", "compute_erf", "find_images", "build_model",
           "LastStage", "get_args_parser", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# SLaK-T layouts of the two SLaK-family choices of --model: (kernel_size, width_factor, Decom).
FAMILY_DEFAULTS = {"SLaK": ([51, 49, 47, 13, 5], 1.3, True),
                   "ConvNeXt": ([7, 7, 7, 7, 100], 1.0, False)}
RESNETS = ("resnet101", "resnet152")


class ERFError(ConfigError):
    """Bad user input (a flag, a path, a weights file); the message names the fix."""


# ----------------------------------------------------------------------------------------------
# The score
# ----------------------------------------------------------------------------------------------

def centre_indices(size):
    """Indices of the centre of an axis of ``size``: the middle one if odd, the middle two if even.

    Two for an even axis keeps the ERF symmetric about the image centre instead of shifting it
    by half a feature-map cell.
    """
    return [size // 2] if size % 2 else [size // 2 - 1, size // 2]


def erf_scores(model, images):
    """Per-image contribution maps of the input pixels to the centre of ``model``'s output.

    Args:
        model: maps ``(N, 3, H, W)`` to a feature map ``(N, C, h, w)``; must treat the images of
            a batch independently (call ``.eval()`` on models with BatchNorm first).
        images: ``(N, 3, H, W)`` float tensor.

    Returns:
        ``(N, H, W)`` float tensor: ``relu(d/dx sum relu(centre activations))`` summed over the
        input channels, one map per image (non-finite where the gradient is).
    """
    x = images.detach().clone().requires_grad_(True)
    features = model(x)
    if features.dim() != 4:
        raise ERFError(f"the model must return a (N, C, h, w) feature map, got shape "
                       f"{tuple(features.shape)}; wrap it so that it returns its last stage")
    rows, cols = centre_indices(features.shape[2]), centre_indices(features.shape[3])
    centre = features[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    (grad,) = torch.autograd.grad(F.relu(centre).sum(), x)
    return F.relu(grad).sum(1).detach()


def compute_erf(model, images):
    """Mean contribution map of a batch: ``(H, W)`` float64 NumPy array.

    Images whose map has a non-finite value are left out of the mean; raises ``ValueError`` when
    none is finite.
    """
    scores = erf_scores(model, images).double()
    finite = torch.isfinite(scores).flatten(1).all(1)
    if not finite.any():
        raise ValueError("no image of the batch has a finite input gradient")
    return scores[finite].mean(0).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

class LastStage(nn.Module):
    """Wrap a SLaK-family model so that ``forward`` returns its last stage's feature map."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_stages(x)[-1]


def _load_checkpoint(path):
    from checkpoint import load_checkpoint
    return load_checkpoint(str(path), "--weights")


def _from_official_convnext(state_dict):
    """Rename facebookresearch/ConvNeXt keys (``dwconv``) to the deploy-form SLaK names."""
    return {k.replace(".dwconv.", ".large_kernel.lkb_origin.conv."): v for k, v in state_dict.items()}


def _load_into(model, state_dict, what):
    own = model.state_dict()
    # The classifier is not used for the ERF: one of another class count is dropped.
    state_dict = {k: v for k, v in state_dict.items() if not (
        k.startswith(("head.", "fc.")) and (k not in own or own[k].shape != v.shape))}
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    state_dict = {k: v for k, v in state_dict.items() if k in own and k not in mismatched}
    # The classifier is not used for the ERF; everything else must be there.
    missing = [k for k in own if k not in state_dict and not k.startswith(("head.", "fc."))
               and not k.endswith("num_batches_tracked")]
    if mismatched or missing:
        example = (mismatched or missing)[0]
        raise ERFError(f"--weights do not fit {what} ({len(mismatched)} tensors of another shape, "
                       f"{len(missing)} missing, e.g. {example}); pass the --model, --kernel_size, "
                       f"--width_factor, --Decom and --depths the checkpoint was trained with")
    model.load_state_dict(state_dict, strict=False)


def _resnet(name, weights_path, random_init):
    import torchvision

    if weights_path:
        from SLaK import checkpoint_filter_fn
        state_dict, source = checkpoint_filter_fn(_load_checkpoint(weights_path)), "--weights"
    elif random_init:
        state_dict, source = None, None
    else:
        # torchvision's own download cache; never download here, so that offline runs say why.
        enum = getattr(torchvision.models, {"resnet101": "ResNet101_Weights",
                                            "resnet152": "ResNet152_Weights"}[name])
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        files = [cache / Path(w.url).name for w in (enum.IMAGENET1K_V1, enum.IMAGENET1K_V2)]
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            raise ERFError(f"{name}: torchvision's ImageNet weights are not in {cache} and are not "
                           f"downloaded here; pass --weights FILE (e.g. {enum.IMAGENET1K_V1.url}), "
                           f"put that file in {cache}, or use --random_init")
        state_dict, source = torch.load(found, map_location="cpu", weights_only=True), "torchvision weights"
        weights_path = found
    model = getattr(torchvision.models, name)(weights=None)
    if state_dict is None:
        print(f"{name}: randomly initialised (--random_init); the ERF is not that of a trained model")
    else:
        _load_into(model, state_dict, name)
        print(f"{name}: loaded {source} {weights_path}")
    # Everything up to (not including) the global pooling and the classifier.
    return nn.Sequential(*list(model.children())[:-2])


def _slak_family(args):
    import SLaK
    import timm

    kernel_size, width_factor, decom = FAMILY_DEFAULTS[args.model]
    kernel_size = args.kernel_size or kernel_size
    width_factor = args.width_factor if args.width_factor is not None else width_factor
    decom = args.Decom if args.Decom is not None else decom
    try:
        SLaK.validate_kernel_size(kernel_size)
    except ValueError as err:
        raise ERFError(str(err)) from err
    kwargs = dict(kernel_size=kernel_size, width_factor=width_factor, Decom=decom,
                  layer_scale_init_value=args.layer_scale_init_value)
    if args.depths:
        kwargs["depths"] = args.depths
    what = (f"{args.model} (kernel_size {' '.join(map(str, kernel_size))}, width_factor "
            f"{width_factor}, Decom {decom})")

    state_dict = None
    if args.weights:
        from checkpoint import open_checkpoint
        from slak_config import checkpoint_model_config, model_config
        depths = args.depths or SLaK.MODEL_DEPTHS_DIMS["SLaK_tiny"][0]
        family = next((n for n, (d, _) in SLaK.MODEL_DEPTHS_DIMS.items() if d == list(depths)), None)
        expected = model_config(family, kernel_size, decom, width_factor, True, 0)
        # The classifier is not used (any class count); BatchNorm and the deployed form are
        # taken from the checkpoint.
        checkpoint, state_dict = open_checkpoint(str(args.weights), "--weights", expected,
                                                 ignore=("nb_classes", "bn", "deploy"))
        found, _ = checkpoint_model_config(checkpoint, family)
        if any(".dwconv." in k for k in state_dict):
            state_dict = _from_official_convnext(state_dict)
        # A re-parameterised checkpoint has biased large-kernel convolutions and no BatchNorm.
        kwargs["deploy"] = bool(found["deploy"])
        kwargs["bn"] = found["bn"] if found["bn"] is not None else True
    model = timm.create_model("SLaK_tiny", **kwargs)
    if state_dict is None:
        print(f"{what}: randomly initialised (no --weights given); the ERF is not that of a "
              f"trained model")
    else:
        _load_into(model, state_dict, what)
        print(f"{what}: loaded --weights {args.weights}")
    return LastStage(model)


def build_model(args):
    """The model named by ``args.model`` as a module returning its last feature map."""
    if args.model in RESNETS:
        return _resnet(args.model, args.weights, args.random_init)
    if args.model in FAMILY_DEFAULTS:
        return _slak_family(args)
    raise ERFError(f"--model {args.model} is not one of {', '.join(RESNETS + tuple(FAMILY_DEFAULTS))}")


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

def find_images(data_path):
    """Sorted image files under ``data_path`` (its ``val/`` when there is one), any depth.

    Covers an ImageNet root, an ImageFolder (``class/image``) and a flat folder of images.
    """
    root = Path(data_path)
    if not root.is_dir():
        raise ERFError(f"--data_path {root} is not a folder; pass a folder of images, an "
                       f"ImageFolder or an ImageNet root")
    if (root / "val").is_dir():
        root = root / "val"
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ERFError(f"--data_path {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                       f"pass a folder that does")
    return files


def image_transform(input_size):
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((input_size, input_size),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def get_args_parser():
    parser = ArgumentParser(
        "ERF contribution score matrix", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet101", choices=RESNETS + tuple(FAMILY_DEFAULTS))
    parser.add_argument("--weights", default=None,
                        help="checkpoint file (bare state dict, or under 'model'/'state_dict')")
    parser.add_argument("--data_path", required=True,
                        help="ImageNet root (val/ is used), ImageFolder or flat folder of images")
    parser.add_argument("--save_path", default="erf_matrix.npy", help="where to save the matrix")
    parser.add_argument("--num_images", type=int, default=50, help="images to average over")
    parser.add_argument("--input_size", type=int, default=1024, help="images are resized to this square")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the image order and random init")
    parser.add_argument("--random_init", action="store_true",
                        help="resnets: use random weights instead of torchvision's")
    group = parser.add_argument_group("SLaK and ConvNeXt (SLaK-T layout)")
    group.add_argument("--kernel_size", type=int, nargs=5, default=None,
                       metavar=("K1", "K2", "K3", "K4", "SMALL"),
                       help="K1 K2 K3 K4 small; default 51 49 47 13 5 (SLaK), 7 7 7 7 100 (ConvNeXt)")
    group.add_argument("--width_factor", type=float, default=None,
                       help="stage width multiplier; default 1.3 (SLaK), 1.0 (ConvNeXt)")
    group.add_argument("--Decom", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                       help="decompose K x K kernels into K x s + s x K; default true (SLaK), "
                            "false (ConvNeXt)")
    group.add_argument("--depths", type=int, nargs=4, default=None, metavar="D",
                       help="blocks per stage; default SLaK-T's 3 3 9 3")
    group.add_argument("--layer_scale_init_value", type=float, default=1e-6,
                       help="initial layer scale, for random init only (1 makes blocks contribute)")
    return parser


def main(args):
    check_flag_ranges(args)
    check_device(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    files = find_images(args.data_path)
    model = build_model(args).to(args.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the input gradient is needed
    transform = image_transform(args.input_size)

    from datasets import UNREADABLE, load_image

    # A seeded shuffle spreads the images over an ImageFolder's classes; later files stand in for
    # images that cannot be read or whose gradient is not finite.
    order = list(files)
    random.Random(args.seed).shuffle(order)
    total, used, skipped = None, 0, []
    start = time.time()
    print(f"ERF of {args.model} over {min(args.num_images, len(files))} of {len(files)} images "
          f"at {args.input_size}x{args.input_size} on {args.device}")
    for path in order:
        if used == args.num_images:
            break
        try:
            x = transform(load_image(path)).unsqueeze(0).to(args.device)
        except UNREADABLE as err:
            print(f"skipping {path}: cannot read it ({err})")
            skipped.append(str(path))
            continue
        score = erf_scores(model, x)[0].double()
        if not torch.isfinite(score).all():
            print(f"skipping {path}: the input gradient is not finite")
            skipped.append(str(path))
            continue
        total = score if total is None else total + score
        used += 1
        print(f"[{used}/{args.num_images}] {path.name}  {time.time() - start:.1f}s", flush=True)
    if used == 0:
        raise ERFError(f"no image under {args.data_path} gave a finite gradient ({len(skipped)} "
                       f"skipped); check the images and the weights")
    if used < args.num_images:
        print(f"only {used} usable images under {args.data_path} (asked for {args.num_images})")
    matrix = (total / used).cpu().numpy().astype(np.float32)
    save_path = Path(args.save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(save_path, matrix)
    print(f"saved the {matrix.shape[0]}x{matrix.shape[1]} contribution matrix averaged over {used} "
          f"images to {save_path} ({len(skipped)} skipped); next: python erf/analyze_erf.py "
          f"--source {save_path} --heatmap_save {save_path.with_suffix('.png')}")
    return matrix


def cli(argv=None):
    run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
