# SLaK-B (51x51, 300-epoch ImageNet model) + UperNet, ADE20K 512x512, 160k iterations.
# README table: 50.0 mIoU (single scale).
_base_ = ['./_base_/upernet_slak_ade20k.py']

checkpoint_file = None  # path or URL of the SLaK-B ImageNet checkpoint
model = dict(
    backbone=dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024], drop_path_rate=0.4,
                  init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[166, 332, 665, 1331]),  # int(d * 1.3) for 128, 256, 512, 1024
    auxiliary_head=dict(in_channels=665))

optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
