"""SLaK as a dense-prediction backbone, shared by MMSegmentation 1.x and MMDetection 3.x.

This module needs only PyTorch, timm and mmengine (the engine both frameworks run on); it does not
register anything. ``segmentation/slak.py`` registers its classes in MMSegmentation's registries
and ``detection/slak.py`` in MMDetection's, so either framework can be installed alone.

- :class:`SLaKBackbone` is the project's :class:`SLaK.SLaK` (imported, not copied) without its
  classifier, as an mmengine ``BaseModule``: it returns the stage outputs selected by
  ``out_indices``, each through its own channel LayerNorm ``norm{i}``; its ``init_cfg`` loads
  classification checkpoints of this project's ``main.py`` or of the original release; it takes
  OpenMMLab's ``frozen_stages``, ``norm_eval`` and ``with_cp``.
- :class:`LayerDecayOptimizerConstructor` gives every backbone layer (``layer_wise``) or stage
  (``stage_wise``) its own learning rate, decaying geometrically from the head to the stem.

Parameter names are the original release's (``backbone.downsample_layers.*``,
``backbone.stages.*``, ``backbone.norm0..3``), so its segmentation and detection checkpoints load
with ``load_from`` as well.
"""
import logging
import os
import re
import warnings

from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import initialize
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.runner import CheckpointLoader
from timm.layers import LayerNorm2d
from torch.nn.modules.batchnorm import _BatchNorm

from SLaK import SLaK, checkpoint_filter_fn
from checkpoint import CheckpointError, open_checkpoint
from slak_config import infer_model_config
from utils import ConfigError

__all__ = ["SLaKBackbone", "LayerDecayOptimizerConstructor", "load_classification_checkpoint"]

# Keys of a classification checkpoint that a backbone has no use for: the classifier and the
# LayerNorm applied to the pooled features before it.
CLASSIFIER_KEYS = re.compile(r"^(head|norm)\.")


class SLaKBackbone(SLaK, BaseModule):
    """SLaK feature extractor for MMSegmentation / MMDetection (registered as ``type='SLaK'``).

    An mmengine ``BaseModule`` (``init_cfg``, ``init_weights()``) with the usual OpenMMLab backbone
    switches ``frozen_stages``, ``norm_eval`` and ``with_cp``.

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
        frozen_stages: -1 freezes nothing; 0 the stem (``downsample_layers.0``); ``k`` in 1..4
            the stem and stages ``0..k-1`` with the downsampling layers in front of them. Frozen
            parameters get ``requires_grad=False`` and their modules stay in eval mode through
            ``train()`` (no DropPath, no BatchNorm statistics updates). The output norms
            ``norm{i}`` are new to every checkpoint and always train.
        norm_eval: keep every BatchNorm of the backbone (those of the large-kernel branches) in
            eval mode while the model trains: their running statistics stay those of the
            checkpoint; their affine weights still train unless frozen.
        with_cp: run each block under activation checkpointing (``set_grad_checkpointing``):
            its activations are recomputed in the backward pass instead of stored, for the same
            outputs, gradients and BatchNorm statistics.
        init_cfg: mmengine's initialisation config. ``dict(type='Pretrained',
            checkpoint=PATH_OR_URL, prefix=None)`` loads a classification checkpoint through
            :func:`load_classification_checkpoint` (``checkpoint=None``, the shipped configs'
            placeholder, keeps the random initialisation); other entries (``Kaiming``,
            ``Constant``...) go to mmengine's ``initialize`` before it.
        pretrained: deprecated spelling of ``init_cfg=dict(type='Pretrained',
            checkpoint=pretrained)``, converted into it with a ``FutureWarning``.

    ``forward(x)``: ``(N, in_chans, H, W)`` -> tuple, per ``i`` in ``out_indices``, of
    ``(N, dims[i], H / 2**(i+2), W / 2**(i+2))``.
    """

    def __init__(self, in_chans=3, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 drop_path_rate=0.0, layer_scale_init_value=1e-6, out_indices=(0, 1, 2, 3),
                 kernel_size=(51, 49, 47, 13, 5), width_factor=1.0, Decom=None, LoRA=None,
                 bn=True, sparse=False, deploy=False, frozen_stages=-1, norm_eval=False,
                 with_cp=False, init_cfg=None, pretrained=None):
        if Decom is not None and LoRA is not None and bool(Decom) != bool(LoRA):
            raise ConfigError(f"SLaK backbone: Decom={Decom} and LoRA={LoRA} disagree; LoRA is "
                              f"the original detection configs' name for Decom, give only one")
        decom = bool(Decom if Decom is not None else LoRA)
        # SLaK.__init__ reaches BaseModule.__init__ (init_cfg=None) through super(); init_cfg is
        # set below, once checked.
        super().__init__(in_chans=in_chans, num_classes=0, depths=depths, dims=dims,
                         drop_path_rate=drop_path_rate,
                         layer_scale_init_value=layer_scale_init_value, kernel_size=kernel_size,
                         width_factor=width_factor, Decom=decom, bn=bn, deploy=deploy)
        # A backbone has no classifier; removing it (rather than leaving it unused) keeps DDP from
        # complaining about parameters that receive no gradient.
        del self.head, self.norm

        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ConfigError(f"SLaK backbone: out_indices must be stage numbers 0..3, "
                              f"got {out_indices}")
        self.out_indices = out_indices
        for i in out_indices:
            self.add_module(f"norm{i}", LayerNorm2d(self.dims[i], eps=1e-6))
        self.sparse = sparse

        if frozen_stages not in range(-1, 5):
            raise ConfigError(f"SLaK backbone: frozen_stages must be -1 (none), 0 (the stem) or "
                              f"1..4 (the stem and that many stages), got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = bool(norm_eval)
        self.with_cp = with_cp
        self.init_cfg = _pretrained_into_init_cfg(pretrained, init_cfg)
        self._freeze_stages()

    @property
    def with_cp(self):
        """Whether each block runs under activation checkpointing (``grad_checkpointing``)."""
        return self.grad_checkpointing

    @with_cp.setter
    def with_cp(self, enable):
        self.set_grad_checkpointing(bool(enable))

    def frozen_modules(self):
        """The modules that ``frozen_stages`` freezes, stem first."""
        if self.frozen_stages < 0:
            return []
        count = max(self.frozen_stages, 1)  # 0 and 1 both freeze the stem
        return [*self.downsample_layers[:count], *self.stages[:self.frozen_stages]]

    def _freeze_stages(self):
        for module in self.frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        """``nn.Module.train``, with frozen stages (and, under ``norm_eval``, every BatchNorm)
        kept in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self):
        """Apply ``init_cfg``: mmengine's initialisers first, then the ``Pretrained`` checkpoint
        (the random initialisation is SLaK's own)."""
        if self.is_init:
            print_log("SLaK backbone: init_weights() was called again; the weights stay as they "
                      "are", logger="current", level=logging.WARNING)
            return
        configs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in configs if c and c.get("type") == "Pretrained"]
        others = [c for c in configs if c and c.get("type") != "Pretrained"]
        if others:
            initialize(self, others)
        for config in pretrained:
            if config.get("checkpoint") is None:
                print_log("SLaK backbone: init_cfg names no checkpoint, so the backbone starts "
                          "from its random initialisation; to fine-tune an ImageNet model set "
                          "model.backbone.init_cfg.checkpoint=PATH", logger="current",
                          level=logging.WARNING)
            else:
                load_classification_checkpoint(self, config["checkpoint"],
                                               prefix=config.get("prefix"))
        self.is_init = True

    def forward(self, x):
        outs = self.forward_stages(x)
        return tuple(getattr(self, f"norm{i}")(outs[i]) for i in self.out_indices)


def _pretrained_into_init_cfg(pretrained, init_cfg):
    """The backbone's ``init_cfg``, with the deprecated ``pretrained=PATH`` turned into its
    ``Pretrained`` entry (it may fill the shipped configs' ``checkpoint=None`` placeholder)."""
    configs = init_cfg if isinstance(init_cfg, list) else [init_cfg] if init_cfg else []
    if not all(isinstance(c, dict) and c.get("type") for c in configs):
        raise ConfigError(f"SLaK backbone: init_cfg must be a dict with a type (e.g. "
                          f"dict(type='Pretrained', checkpoint=PATH)) or a list of them, got "
                          f"{init_cfg}")
    entries = [c for c in configs if c["type"] == "Pretrained"]
    if len(entries) > 1:
        raise ConfigError(f"SLaK backbone: init_cfg has {len(entries)} Pretrained entries; keep "
                          f"one checkpoint")
    if pretrained is None:
        return init_cfg
    if not isinstance(pretrained, str):
        raise ConfigError(f"SLaK backbone: pretrained must be a path or URL, got "
                          f"{type(pretrained).__name__}; better, write "
                          f"init_cfg=dict(type='Pretrained', checkpoint=PATH)")
    if entries and entries[0].get("checkpoint") is not None:
        raise ConfigError("SLaK backbone: give the checkpoint either as pretrained=... or as "
                          "init_cfg=dict(type='Pretrained', checkpoint=...), not both")
    warnings.warn("SLaK backbone: pretrained= is deprecated and is read as "
                  "init_cfg=dict(type='Pretrained', checkpoint=...); set that instead (on the "
                  "command line: model.backbone.init_cfg.checkpoint=PATH)", FutureWarning,
                  stacklevel=3)
    entry = dict(entries[0] if entries else {}, type="Pretrained", checkpoint=pretrained)
    others = [c for c in configs if c["type"] != "Pretrained"]
    return [*others, entry] if others else entry


def check_checkpoint_file(checkpoint, key="model.backbone.init_cfg.checkpoint"):
    """Raise ``CheckpointError`` when ``checkpoint`` names a local file that is not there (URLs
    are left to mmengine's loader)."""
    if "://" not in str(checkpoint) and not os.path.isfile(str(checkpoint)):
        raise CheckpointError(f"{key} {checkpoint}: file not found; check the path")


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
    check_checkpoint_file(checkpoint)
    if prefix is None and os.path.isfile(str(checkpoint)):
        # A local classification checkpoint: checked like every other loader's (one line naming
        # what differs); the classifier is dropped below, so its class count does not matter.
        expected = infer_model_config(backbone.state_dict())
        raw, _ = open_checkpoint(str(checkpoint), "init_cfg checkpoint", expected,
                                 ignore=("nb_classes",))
    else:  # a URL, or a segmentation/detection checkpoint holding the backbone under prefix
        raw = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")
    state_dict = checkpoint_filter_fn(raw)
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise CheckpointError(f"{checkpoint} has no keys under prefix '{prefix}'; drop the "
                                  f"init_cfg prefix for a classification checkpoint")
    dropped = sorted(k for k in state_dict if CLASSIFIER_KEYS.match(k))
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}

    own = backbone.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointError(f"{checkpoint} does not fit this SLaK backbone ({len(mismatched)} "
                              f"shape mismatches, first {mismatched[0]}); set depths, dims, "
                              f"width_factor, kernel_size and Decom to those of the "
                              f"classification model")
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
            raise ConfigError(f"paramwise_cfg decay_type must be 'layer_wise' or 'stage_wise', "
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
            raise ConfigError("paramwise_cfg decay_type='layer_wise' needs num_layers when the "
                              "model has no SLaK backbone with depths; set num_layers")
        return 3 + (depths[2] - 1) // 3 + 1
