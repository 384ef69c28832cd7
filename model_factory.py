"""Models by registry name, from the model flags (``main.add_model_args``).

Used by main.py, distillation.py (teacher and student) and export_onnx.py; a module of its own so
that distillation.py builds models without importing the training script.
"""
import timm

import SLaK  # also registers the SLaK family in timm
from utils import ConfigError


def build_model(args, name, num_classes, pretrained=False, flag="--model", **overrides):
    """A model by registry name (given by ``flag``); SLaK models get the kernel/width/
    decomposition flags, other timm models that take an image size (ViT, Swin) get
    ``--input_size``."""
    kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path)
    if name in SLaK.MODEL_DEPTHS_DIMS:
        kwargs.update(layer_scale_init_value=args.layer_scale_init_value,
                      head_init_scale=args.head_init_scale, kernel_size=args.kernel_size,
                      width_factor=args.width_factor, Decom=args.Decom, bn=args.bn)
    elif not timm.is_model(name):
        raise ConfigError(f"{flag} {name}: unknown model; use one of "
                          f"{', '.join(SLaK.MODEL_DEPTHS_DIMS)} or a timm model name "
                          f"(timm.list_models())")
    kwargs.update(overrides)
    if name not in SLaK.MODEL_DEPTHS_DIMS:
        try:  # ViT, Swin and other token models are built for the run's image size
            return timm.create_model(name, pretrained=pretrained, img_size=args.input_size,
                                     **kwargs)
        except TypeError as exc:  # CNNs take any size and no img_size argument
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)
