"""Register SLaK in MMSegmentation 1.x: backbone ``type='SLaK'`` in ``mmseg.registry.MODELS`` and
``constructor='SLaKLayerDecayOptimizerConstructor'`` in ``mmseg.registry.OPTIM_WRAPPER_CONSTRUCTORS``.

Configs load this module with ``custom_imports = dict(imports=['segmentation.slak'])``; the
classes themselves live in :mod:`segmentation.backbone`, shared with MMDetection.
"""
from mmseg.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

from segmentation.backbone import LayerDecayOptimizerConstructor, SLaKBackbone

MODELS.register_module(name="SLaK", module=SLaKBackbone)
OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="SLaKLayerDecayOptimizerConstructor",
                                           module=LayerDecayOptimizerConstructor)

__all__ = ["SLaKBackbone", "LayerDecayOptimizerConstructor"]
