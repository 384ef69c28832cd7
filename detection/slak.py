"""Register SLaK in MMDetection 3.x: backbone ``type='SLaK'`` in ``mmdet.registry.MODELS`` and
``constructor='SLaKLayerDecayOptimizerConstructor'`` in ``mmdet.registry.OPTIM_WRAPPER_CONSTRUCTORS``.

Configs load this module with ``custom_imports = dict(imports=['detection.slak'])``. The classes
live in :mod:`segmentation.backbone` (it needs only mmengine, not MMSegmentation), so there is one
definition for both frameworks.
"""
from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

from segmentation.backbone import LayerDecayOptimizerConstructor, SLaKBackbone

MODELS.register_module(name="SLaK", module=SLaKBackbone)
OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="SLaKLayerDecayOptimizerConstructor",
                                           module=LayerDecayOptimizerConstructor)

__all__ = ["SLaKBackbone", "LayerDecayOptimizerConstructor"]
