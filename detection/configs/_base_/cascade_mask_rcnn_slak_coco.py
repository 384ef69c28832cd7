# Cascade Mask R-CNN with a SLaK-T backbone (51x51 kernels, decomposed, width x1.3) and FPN on
# COCO; box heads with 4 shared convs + 1 fc and GIoU loss, multi-scale training with random crops
# (480-800 short side), AdamW with layer-wise learning-rate decay. 16 images per iteration
# (8 GPUs x 2). Model, data, schedule and runtime skeletons are MMDetection's own base configs
# (resolved from the installed package through `mmdet::`).
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
# Registers type='SLaK' and the layer-decay constructor; needs this repository on PYTHONPATH
# (detection/train.py and detection/test.py put it there).
custom_imports = dict(imports=['detection.slak'], allow_failed_imports=False)

# An ImageNet checkpoint of SLaK.py's model (main.py writes {'model': state_dict, ...}); the
# classifier is dropped on load. Leave None to train from scratch.
checkpoint_file = None
norm_cfg = dict(type='SyncBN', requires_grad=True)


def _box_head(target_stds):
    return dict(
        type='ConvFCBBoxHead',
        num_shared_convs=4,
        num_shared_fcs=1,
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                        target_stds=target_stds),
        reg_class_agnostic=False,
        reg_decoded_bbox=True,
        norm_cfg=norm_cfg,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=10.0))


model = dict(
    backbone=dict(
        _delete_=True,
        type='SLaK',
        in_chans=3,
        depths=[3, 3, 9, 3],
        dims=[96, 192, 384, 768],
        width_factor=1.3,
        kernel_size=[51, 49, 47, 13, 5],
        LoRA=True,  # the original detection configs' name for Decom
        sparse=True,
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        out_indices=[0, 1, 2, 3],
        pretrained=checkpoint_file),
    neck=dict(in_channels=[124, 249, 499, 998]),  # int(d * 1.3) for the backbone dims
    # Each cascade stage regresses finer offsets, so its target std shrinks.
    roi_head=dict(bbox_head=[_box_head([0.1, 0.1, 0.2, 0.2]),
                             _box_head([0.05, 0.05, 0.1, 0.1]),
                             _box_head([0.033, 0.033, 0.067, 0.067])]))
del _box_head  # a config holds data only

# Multi-scale training: either resize the short side to 480..800, or resize, crop 384..600 and
# resize again (the DETR recipe that ConvNeXt and SLaK detection results use).
multi_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='RandomChoice', transforms=[
        [dict(type='RandomChoiceResize', scales=multi_scales, keep_ratio=True)],
        [dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
              keep_ratio=True),
         dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
              allow_negative_crop=True),
         dict(type='RandomChoiceResize', scales=multi_scales, keep_ratio=True)],
    ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    constructor='SLaKLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6),
    optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05))
