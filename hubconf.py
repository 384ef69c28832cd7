"""torch.hub entry points: the four SLaK families, with weights from a checkpoint file.

    model = torch.hub.load("/path/to/this/checkout", "SLaK_tiny", source="local",
                           checkpoint="/path/to/checkpoint-best.pth",
                           Decom=True, width_factor=1.3, kernel_size=[51, 49, 47, 13, 5])

(or ``torch.hub.load("<owner>/<repo>", ...)`` for a copy on GitHub). Keyword arguments are those
of ``timm.create_model`` for the SLaK models (``kernel_size``, ``width_factor``, ``Decom``,
``bn``, ``num_classes``, ``drop_path_rate``, ``deploy``, ...). ``checkpoint`` is loaded as
``main.py --finetune`` loads it: a checkpoint of main.py or of the original release, or a bare
state dict, checked against the model's configuration; a classifier of another ``num_classes``
is left at its initialisation. ``model_key`` and ``model_prefix`` are main.py's flags of those
names. No weights are hosted, so ``pretrained=True`` needs ``checkpoint``.
"""
dependencies = ["torch", "timm"]


def _load(name, pretrained=False, checkpoint=None, model_key=None, model_prefix="", **kwargs):
    if pretrained and not checkpoint:
        raise ValueError(f"{name}: no weights are hosted for torch.hub; pass a checkpoint file, "
                         f"e.g. torch.hub.load(..., '{name}', checkpoint='/path/to/checkpoint.pth', "
                         f"Decom=True, width_factor=1.3) with the flags it was trained with")
    import inspect
    from types import SimpleNamespace

    import timm

    import SLaK
    from checkpoint import DEFAULT_MODEL_KEY
    from main import load_finetune_weights
    from slak_config import model_config

    model = timm.create_model(name, **kwargs)
    if checkpoint:
        defaults = {k: p.default for k, p in inspect.signature(SLaK.SLaK).parameters.items()}
        setting = {k: kwargs.get(k, defaults[k]) for k in ("Decom", "width_factor", "bn", "deploy")}
        config = model_config(name, model.kernel_size, nb_classes=model.num_classes, **setting)
        flags = SimpleNamespace(finetune=checkpoint, model_key=model_key or DEFAULT_MODEL_KEY,
                                model_prefix=model_prefix)
        load_finetune_weights(model, flags, config)
    return model


def SLaK_tiny(pretrained=False, checkpoint=None, **kwargs):
    """SLaK-T (depths 3, 3, 9, 3; dims 96, 192, 384, 768 times ``width_factor``)."""
    return _load("SLaK_tiny", pretrained, checkpoint, **kwargs)


def SLaK_small(pretrained=False, checkpoint=None, **kwargs):
    """SLaK-S (depths 3, 3, 27, 3; dims 96, 192, 384, 768 times ``width_factor``)."""
    return _load("SLaK_small", pretrained, checkpoint, **kwargs)


def SLaK_base(pretrained=False, checkpoint=None, **kwargs):
    """SLaK-B (depths 3, 3, 27, 3; dims 128, 256, 512, 1024 times ``width_factor``)."""
    return _load("SLaK_base", pretrained, checkpoint, **kwargs)


def SLaK_large(pretrained=False, checkpoint=None, **kwargs):
    """SLaK-L (depths 3, 3, 27, 3; dims 192, 384, 768, 1536 times ``width_factor``)."""
    return _load("SLaK_large", pretrained, checkpoint, **kwargs)
