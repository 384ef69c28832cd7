"""SLaK as a dense-prediction backbone, shared by MMSegmentation 1.x and MMDetection 3.x.

This module needs only PyTorch, timm and mmengine (the engine both frameworks run on); it does not
register anything. ``segmentation/slak.py`` registers its classes in MMSegmentation's registries
and ``detection/slak.py`` in MMDetection's, so either framework can be installed alone.

- :class:`SLaKBackbone` is the project's :class:`SLaK.SLaK` (imported, not copied) without its
  classifier: it returns the stage outputs selected by ``out_indices``, each through its own
  channel LayerNorm ``norm{i}``, and loads classification checkpoints of this project's ``main.py``
  or of the original release.
- :class:`LayerDecayOptimizerConstructor` gives every backbone layer (``layer_wise``) or stage
  (``stage_wise``) its own learning rate, decaying geometrically from the head to the stem.

Parameter names are the original release's (``backbone.downsample_layers.*``,
``backbone.stages.*``, ``backbone.norm0..3``), so its segmentation and detection checkpoints load
with ``load_from`` as well.
"""
import logging
import os
import re

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.runner import CheckpointLoader
from timm.layers import LayerNorm2d

from SLaK import SLaK, checkpoint_filter_fn

__all__ = ["SLaKBackbone", "LayerDecayOptimizerConstructor", "load_classification_checkpoint"]

# Keys of a classification checkpoint that a backbone has no use for: the classifier and the
# LayerNorm applied to the pooled features before it.
CLASSIFIER_KEYS = re.compile(r"^(head|norm)\.")


class SLaKBackbone(SLaK):
    """SLaK feature extractor for MMSegmentation / MMDetection (registered as ``type='SLaK'``).

    Args:
        in_chans: input image channels.
        depths: blocks per stage.
        dims: channels per stage before ``width_factor``; the outputs have
            ``int(d * width_factor)`` channels (124/249/499/998 for SLaK-T/S at 1.3).
        drop_path_rate: stochastic depth rate of the last block.
        layer_scale_init_value: initial layer scale; none when <= 0.
        out_indices: stages whose (normalised) output is returned, in this order.
        kernel_size: ``[K1, K2, K3, K4, s]``: a kernel per stage and the small kernel.
        width_factor: stage width multiplier.
        Decom: decompose each K x K kernel into (K, s) + (s, K). ``LoRA`` is the original
            detection configs' name for the same flag; give either.
        bn: BatchNorm in each large-kernel branch.
        sparse: the backbone was (or will be) trained sparse. Accepted for the original configs;
            masks belong to the sparsity code, so a sparse checkpoint simply loads with its zeros.
        deploy: build the re-parameterised inference form (checkpoints of the training form do
            not fit it; call ``reparameterize()`` after loading instead).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix=None)`` loads a
            classification checkpoint (see :func:`load_classification_checkpoint`); other init
            configs are not used by this backbone.
        pretrained: old spelling of ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.

    ``forward(x)``: ``(N, in_chans, H, W)`` -> tuple, per ``i`` in ``out_indices``, of
    ``(N, dims[i], H / 2**(i+2), W / 2**(i+2))``.
    """

    def __init__(self, in_chans=3, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 drop_path_rate=0.0, layer_scale_init_value=1e-6, out_indices=(0, 1, 2, 3),
                 kernel_size=(51, 49, 47, 13, 5), width_factor=1.0, Decom=None, LoRA=None,
                 bn=True, sparse=False, deploy=False, init_cfg=None, pretrained=None):
        if Decom is not None and LoRA is not None and bool(Decom) != bool(LoRA):
            raise ValueError(f"SLaK backbone: Decom={Decom} and LoRA={LoRA} disagree; LoRA is the "
                             f"original detection configs' name for Decom, give only one")
        decom = bool(Decom if Decom is not None else LoRA)
        super().__init__(in_chans=in_chans, num_classes=0, depths=depths, dims=dims,
                         drop_path_rate=drop_path_rate,
                         layer_scale_init_value=layer_scale_init_value, kernel_size=kernel_size,
                         width_factor=width_factor, Decom=decom, bn=bn, deploy=deploy)
        # A backbone has no classifier; removing it (rather than leaving it unused) keeps DDP from
        # complaining about parameters that receive no gradient.
        del self.head, self.norm

        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"SLaK backbone: out_indices must be stage numbers 0..3, "
                             f"got {out_indices}")
        self.out_indices = out_indices
        for i in out_indices:
            self.add_module(f"norm{i}", LayerNorm2d(self.dims[i], eps=1e-6))
        self.sparse = sparse

        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("SLaK backbone: give the checkpoint either as pretrained=... or "
                                 "as init_cfg=dict(type='Pretrained', checkpoint=...), not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        if init_cfg is not None and init_cfg.get("type") != "Pretrained":
            raise ValueError(f"SLaK backbone: init_cfg must be dict(type='Pretrained', "
                             f"checkpoint=...) or None, got {init_cfg}")
        self.init_cfg = init_cfg
        self.is_init = False

    def init_weights(self):
        """Load ``init_cfg``'s checkpoint, if any (the random initialisation is SLaK's own)."""
        if self.init_cfg is not None and not self.is_init:
            load_classification_checkpoint(self, self.init_cfg["checkpoint"],
                                           prefix=self.init_cfg.get("prefix"))
        self.is_init = True

    def forward(self, x):
        outs = self.forward_stages(x)
        return tuple(getattr(self, f"norm{i}")(outs[i]) for i in self.out_indices)


def load_classification_checkpoint(backbone, checkpoint, prefix=None, logger="current"):
    """Load a SLaK classification checkpoint into ``backbone`` and log what did not match.

    Args:
        backbone: a :class:`SLaKBackbone`.
        checkpoint: path or URL (anything mmengine's ``CheckpointLoader`` reads) of a checkpoint of
            this project's ``main.py`` (``{'model': state_dict, ...}``) or of the original release
            (``model`` / ``state_dict`` / ``module`` key, ``module.`` prefixes).
        prefix: keep only keys under this prefix and strip it (e.g. ``'backbone.'`` to take the
            backbone out of a segmentation checkpoint).

    Returns ``(missing, unexpected)`` key lists, as logged. The classifier (``head.*``) and its
    feature LayerNorm (``norm.*``) are dropped first; the per-stage ``norm{i}`` are new and so
    always missing from a classification checkpoint.
    """
    if prefix is None and os.path.isfile(str(checkpoint)):
        # A local classification checkpoint: checked like every other loader's (one line naming
        # what differs); the classifier is dropped below, so its class count does not matter.
        from checkpoint import open_checkpoint
        from slak_config import infer_model_config
        expected = infer_model_config(backbone.state_dict())
        raw, _ = open_checkpoint(str(checkpoint), "init_cfg checkpoint", expected,
                                 ignore=("nb_classes",))
    else:  # a URL, or a segmentation/detection checkpoint holding the backbone under prefix
        raw = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")
    state_dict = checkpoint_filter_fn(raw)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ValueError(f"{checkpoint} has no keys under prefix '{prefix}'; drop the "
                             f"init_cfg prefix for a classification checkpoint")
    dropped = sorted(k for k in state_dict if CLASSIFIER_KEYS.match(k))
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}

    own = backbone.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{checkpoint} does not fit this SLaK backbone ({len(mismatched)} shape "
                         f"mismatches, first {mismatched[0]}); set depths, dims, width_factor, "
                         f"kernel_size and Decom to those of the classification model")
    missing, unexpected = backbone.load_state_dict(state_dict, strict=False)
    loaded = len(state_dict) - len(unexpected)
    print_log(f"SLaK backbone: loaded {loaded} tensors from {checkpoint}; dropped classifier "
              f"keys {dropped}; missing keys {list(missing)}; unexpected keys {list(unexpected)}",
              logger=logger)
    new_norms = {k for k in missing if re.match(r"^norm\d\.", k)}
    if len(missing) > len(new_norms) or unexpected:
        print_log(f"SLaK backbone: {checkpoint} left {len(missing) - len(new_norms)} backbone "
                  f"tensors at their random initialisation and had {len(unexpected)} it could "
                  f"not place; check that it is a SLaK checkpoint of the same variant",
                  logger=logger, level=logging.WARNING)
    return list(missing), list(unexpected)


class LayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise learning-rate decay for a SLaK backbone (registered as
    ``SLaKLayerDecayOptimizerConstructor``).

    ``paramwise_cfg`` keys:
        decay_rate: factor between neighbouring layers (e.g. 0.9).
        decay_type: ``'stage_wise'``: the stem is layer 0 and stage ``i`` (with the downsampling
            layer in front of it) layer ``i + 1``; ``'layer_wise'``: stages 0 and 1 are layers 1
            and 2, stage 2 counts one layer per three blocks from layer 3 on (its downsampling
            layer is layer 3), and stage 3 is layer ``num_layers``.
        num_layers: the last backbone layer id; everything outside the backbone (neck, heads, the
            backbone's output norms ``norm{i}``) is layer ``num_layers + 1``. Default: 4 for
            ``stage_wise``; for ``layer_wise`` one more than stage 2's last layer (12 for 27
            blocks). ConvNeXt-style configs set it explicitly (6 or 12).

    Layer ``l`` trains with ``lr * decay_rate ** (num_layers + 1 - l)``, so the head keeps the
    base rate and the stem gets the smallest. Biases and other 1-D parameters (norms, layer
    scales) get no weight decay; every other parameter gets the optimizer's ``weight_decay``.
    """

    def add_params(self, params, module, **kwargs):
        cfg = self.paramwise_cfg
        decay_rate = cfg.get("decay_rate", 1.0)
        decay_type = cfg.get("decay_type", "stage_wise")
        if decay_type not in ("layer_wise", "stage_wise"):
            raise ValueError(f"paramwise_cfg decay_type must be 'layer_wise' or 'stage_wise', "
                             f"got '{decay_type}'")
        num_layers = cfg.get("num_layers")
        if num_layers is None:
            num_layers = 4 if decay_type == "stage_wise" else self._layer_wise_depth(module)

        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            layer = self.layer_id(name, decay_type, num_layers)
            no_decay = param.ndim == 1 or name.endswith(".bias")
            key = (layer, no_decay)
            if key not in groups:
                scale = decay_rate ** (num_layers + 1 - layer)
                groups[key] = dict(params=[], lr=self.base_lr * scale, lr_scale=scale,
                                   layer_id=layer)
                if no_decay or self.base_wd is not None:
                    groups[key]["weight_decay"] = 0.0 if no_decay else self.base_wd
            groups[key]["params"].append(param)
        params.extend(groups[key] for key in sorted(groups))
        print_log("SLaK layer decay: " + ", ".join(
            f"layer {g['layer_id']} lr x{g['lr_scale']:.4g} wd {g.get('weight_decay')} "
            f"({len(g['params'])} tensors)" for g in params), logger="current", level=logging.DEBUG)

    @staticmethod
    def layer_id(name, decay_type, num_layers):
        """The layer number of parameter ``name`` (e.g. ``backbone.stages.2.7.pwconv1.weight``)."""
        match = re.match(r"^(?:.*\.)?backbone\.(downsample_layers|stages)\.(\d+)\.(\d+)", name)
        if match is None:
            return num_layers + 1
        part, stage, index = match.group(1), int(match.group(2)), int(match.group(3))
        if part == "downsample_layers" and stage == 0:
            return 0
        if decay_type == "stage_wise" or stage in (0, 1):
            return min(stage + 1, num_layers)
        if stage == 3:
            return num_layers
        block = index if part == "stages" else 0
        return min(3 + block // 3, num_layers)

    @staticmethod
    def _layer_wise_depth(module):
        backbone = getattr(module, "backbone", module)
        depths = getattr(backbone, "depths", None)
        if depths is None:
            raise ValueError("paramwise_cfg decay_type='layer_wise' needs num_layers when the "
                             "model has no SLaK backbone with depths; set num_layers")
        return 3 + (depths[2] - 1) // 3 + 1
