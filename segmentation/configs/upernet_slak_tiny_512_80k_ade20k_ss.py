# SLaK-T (51x51) + UperNet, ADE20K 512x512, 80k iterations (the short schedule).
_base_ = ['./_base_/upernet_slak_ade20k.py']

checkpoint_file = None  # path or URL of the SLaK-T ImageNet checkpoint
model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))

max_iters = 80000
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=8000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000))
