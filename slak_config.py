"""What configuration a SLaK checkpoint's model has: the format knowledge beside the model.

A checkpoint of ``main.py`` records its model's flags (``model_config``); one of the original
release records its argparse namespace (``args``); any other state dict in SLaK's layout tells
its configuration by its keys and shapes (``infer_model_config``). ``checkpoint.open_checkpoint``
and the dense-prediction adapters check a file against the flags of the model that loads it.
"""
import argparse
import re

import SLaK

CONFIG_FLAGS = ("model", "kernel_size", "Decom", "width_factor", "bn", "nb_classes", "deploy")


def model_config(model, kernel_size, Decom, width_factor, bn, nb_classes, deploy=False,
                 sparse=False):
    """The configuration recorded as a checkpoint's ``model_config`` (flag names and values)."""
    return dict(model=model, kernel_size=list(kernel_size), Decom=bool(Decom),
                width_factor=float(width_factor), bn=bool(bn), nb_classes=int(nb_classes),
                deploy=bool(deploy), sparse=bool(sparse))


def args_model_config(args, name=None, **overrides):
    """``model_config`` of the model a run builds from its flags (``overrides`` as build_model)."""
    config = model_config(name or args.model, args.kernel_size, args.Decom, args.width_factor,
                          args.bn, args.nb_classes, sparse=getattr(args, "sparse", False))
    config.update(overrides)
    return config


_STAGE_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.")


def infer_model_config(state_dict, model=None):
    """A ``model_config`` read off tensor shapes; what cannot be read is ``None``.

    ``model``: the family name to report when its depths fit (SLaK_small at width 4/3 and
    SLaK_base have the same shapes).
    """
    depths = [0, 0, 0, 0]
    for key in state_dict:
        match = _STAGE_KEY.match(key)
        if match and int(match.group(1)) < 4:
            depths[int(match.group(1))] = max(depths[int(match.group(1))], int(match.group(2)) + 1)
    stem = state_dict.get("downsample_layers.0.0.weight")
    if stem is None or not all(depths):
        return None  # not a SLaK/ConvNeXt layout
    names = [n for n, (d, _) in SLaK.MODEL_DEPTHS_DIMS.items() if d == depths]
    name = model if model in names else (names[0] if names else None)
    width = stem.shape[0] / SLaK.MODEL_DEPTHS_DIMS[name][1][0] if name else None
    kernels, small, decom, deploy = [], None, None, None
    for i in range(4):
        unit = f"stages.{i}.0.large_kernel."
        for branch, is_decom in (("LoRA1", True), ("lkb_origin", False), ("dwconv", False)):
            weight = state_dict.get(f"{unit}{branch}.conv.weight",
                                    state_dict.get(f"stages.{i}.0.{branch}.weight"))
            if weight is not None:
                kernels.append(int(weight.shape[2]))
                decom = is_decom
                deploy = f"{unit}{branch}.conv.bias" in state_dict or branch == "dwconv"
                if is_decom:
                    small = int(weight.shape[3])
                break
        else:
            kernels.append(None)
        if f"{unit}small_conv.conv.weight" in state_dict:
            small = int(state_dict[f"{unit}small_conv.conv.weight"].shape[2])
    bn = None if deploy else any(".large_kernel." in k and ".bn." in k for k in state_dict)
    head = state_dict.get("head.weight")
    return dict(model=name, kernel_size=kernels + [small], Decom=decom, width_factor=width, bn=bn,
                nb_classes=int(head.shape[0]) if head is not None else 0, deploy=deploy,
                sparse=None)


def checkpoint_model_config(checkpoint, model=None, state_dict=None):
    """``(config, source)``: the checkpoint's model configuration and where it was read from.

    ``state_dict``: the checkpoint's weights when a loader selected them itself (a model key or
    prefix); by default those that ``SLaK.checkpoint_filter_fn`` finds.
    """
    if state_dict is None:
        state_dict = SLaK.checkpoint_filter_fn(checkpoint)
    inferred = infer_model_config(state_dict, model)
    recorded = checkpoint.get("model_config")
    if isinstance(recorded, dict):
        return {**(inferred or {}), **recorded}, "recorded"
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if isinstance(args, dict) and not args.get("distill_type") and inferred is not None:
        # The original's argparse namespace; its shapes still decide deploy (re-parameterised).
        from_args = {k: args[k] for k in CONFIG_FLAGS if k in args and k != "deploy"}
        if "kernel_size" in from_args:
            from_args["kernel_size"] = list(from_args["kernel_size"])
        return {**inferred, **from_args}, "args"
    return inferred, "shapes"


def _same(flag, wanted, found, model):
    if wanted is None or found is None:
        return True
    if flag == "kernel_size":
        return all(a is None or b is None or a == b for a, b in zip(wanted, found))
    if flag == "width_factor":  # stage widths are int(dim * width)
        dim = SLaK.MODEL_DEPTHS_DIMS.get(model, ([], [96]))[1][0]
        return int(dim * wanted + 1e-6) == int(dim * found + 1e-6)
    return wanted == found


def flag_text(flag, value):
    """``flag`` set to ``value`` as a user would pass it."""
    if flag == "kernel_size":
        return "--kernel_size " + " ".join("?" if k is None else str(k) for k in value)
    if flag == "width_factor":
        return f"--width_factor {round(value, 3):g}"
    if flag == "deploy":
        return "a re-parameterised (deploy) model" if value else "a training-form model"
    return f"--{flag} {value}"


def mismatched_flags(expected, found, ignore=()):
    """The ``CONFIG_FLAGS`` (less ``ignore``) whose value in the configuration ``found``
    contradicts ``expected``'s; a value either of them leaves open (None) contradicts nothing."""
    return [k for k in CONFIG_FLAGS if k not in ignore and
            not _same(k, expected.get(k), found.get(k), expected.get("model"))]
