# SLaK-T (51x51, 300-epoch ImageNet model) + Cascade Mask R-CNN, 36 epochs ("300epochs/36epochs").
# README table: 51.3 box AP, 44.3 mask AP.
_base_ = ['./_base_/cascade_mask_rcnn_slak_coco.py']

checkpoint_file = None  # path or URL of the 300-epoch SLaK-T ImageNet checkpoint
model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1),
]
