# SLaK-S (51x51, 300-epoch ImageNet model) + UperNet, ADE20K 512x512, 160k iterations.
# README table: 49.4 mIoU (single scale).
_base_ = ['./_base_/upernet_slak_ade20k.py']

checkpoint_file = None  # path or URL of the SLaK-S ImageNet checkpoint
model = dict(
    backbone=dict(depths=[3, 3, 27, 3], drop_path_rate=0.3,
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[124, 249, 499, 998]),  # int(d * 1.3) for 96, 192, 384, 768
    auxiliary_head=dict(in_channels=499))

optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
