# SLaK-T (51x51, 300-epoch ImageNet model) + UperNet, ADE20K 512x512, 160k iterations.
# README table: 47.6 mIoU (single scale).
_base_ = ['./_base_/upernet_slak_ade20k.py']

checkpoint_file = None  # path or URL of the SLaK-T ImageNet checkpoint
model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
