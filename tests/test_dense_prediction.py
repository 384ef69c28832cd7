"""SLaK inside the real MMSegmentation 1.x and MMDetection 3.x (``bash ci/install_openmmlab.sh``).

Every shipped config is built through its framework's own registry (backbone depths cut to keep
the CPU run short; widths, kernels and heads as shipped, the detectors sampling fewer RoIs),
trained for one step on a random 2x3x128x128 batch (random label maps / boxes and masks) with the
optimizer its config builds, and run in inference. ``init_cfg`` loads a checkpoint that this
project's ``main.py`` writes. The backbone's OpenMMLab switches (``frozen_stages``,
``norm_eval``, ``with_cp``, ``init_cfg`` formats) are tests/test_mm_backbone.py's. Tests skip,
naming the install command, where a framework is not importable.
"""
import importlib

import numpy as np
import pytest
import torch

from conftest import REPO, SYNTHETIC, TINY_MODEL, run_main

SEG_CONFIGS = sorted((REPO / "segmentation" / "configs").glob("*.py"))
DET_CONFIGS = sorted((REPO / "detection" / "configs").glob("*.py"))
SIZE = 128
pytestmark = pytest.mark.usefixtures("one_thread")
SHORT_DEPTHS = [1, 1, 2, 1]  # stage 2 keeps two blocks so layer-wise decay sees two groups

# Detection: the heads as shipped, but 64 RoIs sampled per cascade stage and 128 proposals per
# image instead of 512 and 2000 (the RoI heads' cost grows with them, not their coverage).
FEWER_ROIS = ["model.train_cfg.rpn.sampler.num=64", "model.train_cfg.rpn_proposal.nms_pre=256",
              "model.train_cfg.rpn_proposal.max_per_img=128", "model.test_cfg.rpn.nms_pre=256",
              "model.test_cfg.rpn.max_per_img=128"] + [
    f"model.train_cfg.rcnn.{stage}.sampler.num=64" for stage in range(3)]

# The model main.py trains with TINY_MODEL, as backbone arguments.
TINY_BACKBONE = dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], width_factor=0.25,
                     kernel_size=[13, 11, 9, 7, 3])
TINY_WIDTHS = [24, 48, 96, 192]


def import_or_skip(module):
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or mmcv's compiled ops missing (mmcv-lite)
        pytest.skip(f"{module} is not importable ({type(error).__name__}: {error}); "
                    f"`bash ci/install_openmmlab.sh` installs MMSegmentation and MMDetection")


def build(config, framework, backbone=None, size=SIZE, cfg_options=(), **heads):
    """``(cfg, model)`` of ``config`` (with ``KEY=VALUE`` ``cfg_options``, as on the launchers'
    command line) built by ``framework``'s MODELS registry, weights initialised."""
    import_or_skip(f"{framework}.models")
    from mmengine.registry import init_default_scope

    from segmentation.launch import load_config

    cfg = load_config(str(config), cfg_options)
    assert cfg.default_scope == framework
    init_default_scope(framework)
    cfg.model.backbone.update(backbone or {})
    for name, value in heads.items():
        cfg.model[name].in_channels = value
    if framework == "mmseg":
        cfg.model.data_preprocessor.size = (size, size)
    registry = importlib.import_module(f"{framework}.registry")
    torch.manual_seed(0)
    model = registry.MODELS.build(cfg.model)
    model.init_weights()
    return cfg, model


def cpu_optim_wrapper(cfg, model):
    """The config's optimizer (with its layer-decay constructor) in float32 for the CPU."""
    from mmengine.optim import build_optim_wrapper

    optim_cfg = cfg.optim_wrapper.copy()
    optim_cfg.type = "OptimWrapper"
    optim_cfg.pop("loss_scale", None)
    return build_optim_wrapper(model, optim_cfg)


def seg_batch(num_classes, generator, size=SIZE):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, size, size), generator=generator))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def det_batch(num_classes, generator, size=SIZE):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))
        corner = torch.randint(0, size // 2, (3, 2), generator=generator).float()
        extent = torch.randint(16, size // 2, (3, 2), generator=generator).float()
        boxes = torch.cat([corner, corner + extent], dim=1)
        masks = np.zeros((3, size, size), dtype=np.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=boxes, labels=torch.randint(0, num_classes, (3,), generator=generator),
            masks=BitmapMasks(masks, size, size))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def check_features(model, cfg, inputs, widths):
    features = model.backbone(inputs)
    assert [f.shape[1] for f in features] == widths == model.backbone.dims
    assert [f.shape[2:] for f in features] == [(SIZE // 4 // 2 ** i,) * 2 for i in range(4)]
    assert cfg.model.backbone.type == "SLaK"


def train_step(model, optim_wrapper, batch):
    """One loss-mode forward, backward and optimizer step; returns the loss dict."""
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode="loss")
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    before = model.backbone.stages[0][0].pwconv1.weight.detach().clone()
    optim_wrapper.backward(loss)
    grads = {name: p.grad for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [name for name, g in grads.items() if g is None]
    assert any(g.abs().sum() > 0 for g in grads.values())
    optim_wrapper.step()
    optim_wrapper.zero_grad()
    assert not torch.equal(before, model.backbone.stages[0][0].pwconv1.weight)
    return losses


@pytest.mark.parametrize("config", SEG_CONFIGS, ids=lambda p: p.stem)
def test_segmentation_config(config):
    cfg, model = build(config, "mmseg", dict(depths=SHORT_DEPTHS))
    head = cfg.model.decode_head
    assert head.in_channels == [int(d * cfg.model.backbone.width_factor)
                                for d in cfg.model.backbone.dims]
    assert cfg.model.auxiliary_head.in_channels == head.in_channels[2]
    generator = torch.Generator().manual_seed(0)
    batch = seg_batch(head.num_classes, generator)

    losses = train_step(model, cpu_optim_wrapper(cfg, model), batch)
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        check_features(model, cfg, data["inputs"], head.in_channels)
        results = model(**data, mode="predict")
    for result in results:
        prediction = result.pred_sem_seg.data
        assert prediction.shape == (1, SIZE, SIZE)
        assert 0 <= prediction.min() and prediction.max() < head.num_classes


@pytest.mark.parametrize("config", DET_CONFIGS, ids=lambda p: p.stem)
def test_detection_config(config):
    cfg, model = build(config, "mmdet", dict(depths=SHORT_DEPTHS), cfg_options=FEWER_ROIS)
    assert cfg.model.neck.in_channels == [int(d * cfg.model.backbone.width_factor)
                                          for d in cfg.model.backbone.dims]
    num_classes = cfg.model.roi_head.bbox_head[0].num_classes
    generator = torch.Generator().manual_seed(0)
    batch = det_batch(num_classes, generator)

    losses = train_step(model, cpu_optim_wrapper(cfg, model), batch)
    assert {"loss_rpn_cls", "s0.loss_cls", "s2.loss_bbox", "s2.loss_mask"} <= set(losses)

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(batch, False)
        check_features(model, cfg, data["inputs"], cfg.model.neck.in_channels)
        results = model(**data, mode="predict")
    for result in results:
        found = result.pred_instances
        assert found.bboxes.shape == (len(found), 4) and found.scores.shape == (len(found),)
        assert found.masks.shape[1:] == (SIZE, SIZE)
        assert (found.labels < num_classes).all()


def layer_scales(model, optim_wrapper):
    """``{parameter name: (lr, weight decay)}`` as the optimizer holds them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: (group["lr"], group.get("weight_decay"))
            for group in optim_wrapper.optimizer.param_groups for p in group["params"]}


def test_stage_wise_decay_of_the_segmentation_config():
    config = REPO / "segmentation/configs/upernet_slak_tiny_512_160k_ade20k_ss.py"
    cfg, model = build(config, "mmseg")
    scales = layer_scales(model, cpu_optim_wrapper(cfg, model))
    assert len(scales) == sum(p.requires_grad for p in model.parameters())
    lr, wd = 1e-4, 0.05
    # num_layers=6: the head is layer 7, stage i layer i + 1, the stem layer 0.
    expected = {
        "backbone.downsample_layers.0.0.weight": (lr * 0.9 ** 7, wd),
        "backbone.downsample_layers.0.0.bias": (lr * 0.9 ** 7, 0.0),
        "backbone.stages.0.2.pwconv1.weight": (lr * 0.9 ** 6, wd),
        "backbone.downsample_layers.1.1.weight": (lr * 0.9 ** 5, wd),
        "backbone.stages.2.8.large_kernel.LoRA1.conv.weight": (lr * 0.9 ** 4, wd),
        "backbone.stages.2.8.gamma": (lr * 0.9 ** 4, 0.0),
        "backbone.stages.3.0.norm.weight": (lr * 0.9 ** 3, 0.0),
        "backbone.norm3.weight": (lr, 0.0),
        "decode_head.conv_seg.weight": (lr, wd),
        "auxiliary_head.convs.0.conv.weight": (lr, wd),
    }
    for name, (want_lr, want_wd) in expected.items():
        assert scales[name][0] == pytest.approx(want_lr) and scales[name][1] == want_wd, name


def test_layer_wise_decay_of_the_detection_config():
    config = REPO / "detection/configs/cascade_mask_rcnn_slak_tiny_mstrain_480-800_adamw_3x_coco.py"
    cfg, model = build(config, "mmdet")
    scales = layer_scales(model, cpu_optim_wrapper(cfg, model))
    lr = 2e-4
    # num_layers=6: stem 0, stages 0 and 1 layers 1 and 2, stage 2 one layer per three blocks
    # from 3, stage 3 layer 6, the rest 7.
    expected = {
        "backbone.downsample_layers.0.1.weight": 0.7 ** 7,
        "backbone.stages.0.0.pwconv2.weight": 0.7 ** 6,
        "backbone.stages.1.2.pwconv2.weight": 0.7 ** 5,
        "backbone.downsample_layers.2.1.weight": 0.7 ** 4,
        "backbone.stages.2.2.pwconv1.weight": 0.7 ** 4,
        "backbone.stages.2.3.pwconv1.weight": 0.7 ** 3,
        "backbone.stages.2.8.pwconv1.weight": 0.7 ** 2,
        "backbone.downsample_layers.3.1.weight": 0.7,
        "backbone.stages.3.2.pwconv1.weight": 0.7,
        "neck.lateral_convs.0.conv.weight": 1.0,
        "roi_head.mask_head.2.conv_logits.weight": 1.0,
    }
    for name, scale in expected.items():
        assert scales[name][0] == pytest.approx(lr * scale), name


def test_backbone_arguments():
    import_or_skip("mmengine")
    from segmentation.backbone import SLaKBackbone

    backbone = SLaKBackbone(depths=[1, 1, 1, 1], width_factor=1.3, kernel_size=[7, 7, 7, 7, 3],
                            LoRA=True, out_indices=(3, 1), sparse=True)
    assert backbone.dims == [124, 249, 499, 998]
    assert hasattr(backbone.stages[0][0].large_kernel, "LoRA1")  # LoRA is Decom
    assert not hasattr(backbone, "head") and not hasattr(backbone, "norm")
    assert not hasattr(backbone, "norm0") and hasattr(backbone, "norm3")
    outs = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 998, 2, 2), (1, 249, 8, 8)]
    from utils import ConfigError
    with pytest.raises(ConfigError, match="give only one"):
        SLaKBackbone(depths=[1, 1, 1, 1], Decom=True, LoRA=False)
    with pytest.raises(ConfigError, match="not both"):
        SLaKBackbone(depths=[1, 1, 1, 1], pretrained="a.pth",
                     init_cfg=dict(type="Pretrained", checkpoint="a.pth"))


@pytest.fixture(scope="module")
def main_checkpoint(tmp_path_factory):
    """A checkpoint written by ``main.py`` after one epoch of SLaK_tiny on synthetic data."""
    out = tmp_path_factory.mktemp("classification")
    run_main(*TINY_MODEL, *SYNTHETIC, "--epochs", "1", "--batch_size", "16",
             "--synthetic_train_size", "32", "--warmup_epochs", "0", "--disable_eval", "true",
             "--output_dir", out)
    path = out / "checkpoint-0.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "epoch"} <= set(checkpoint)
    return path, checkpoint["model"]


def assert_loaded(backbone, state_dict):
    """Every backbone tensor equals the classification model's; only ``norm{i}`` are new."""
    own = backbone.state_dict()
    new = {k for k in own if k not in state_dict}
    assert new == {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    for key in own.keys() - new:
        assert torch.equal(own[key], state_dict[key]), key


def test_segmentor_loads_a_main_py_checkpoint(main_checkpoint):
    path, state_dict = main_checkpoint
    config = REPO / "segmentation/configs/upernet_slak_tiny_512_80k_ade20k_ss.py"
    # As the docs' commands give it: --cfg-options model.backbone.init_cfg.checkpoint=PATH
    cfg, model = build(config, "mmseg", TINY_BACKBONE, decode_head=TINY_WIDTHS,
                       auxiliary_head=TINY_WIDTHS[2],
                       cfg_options=[f"model.backbone.init_cfg.checkpoint={path}"])
    assert_loaded(model.backbone, state_dict)
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(seg_batch(150, torch.Generator().manual_seed(1)), False)
        check_features(model, cfg, data["inputs"], TINY_WIDTHS)


def test_detector_loads_a_main_py_checkpoint(main_checkpoint):
    path, state_dict = main_checkpoint
    config = REPO / "detection/configs/cascade_mask_rcnn_slak_tiny_mstrain_480-800_adamw_1x_coco.py"
    backbone = dict(TINY_BACKBONE, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    _, model = build(config, "mmdet", backbone, neck=TINY_WIDTHS)
    assert_loaded(model.backbone, state_dict)


def test_checkpoint_formats_and_mismatch(main_checkpoint, tmp_path):
    import_or_skip("mmengine")
    from segmentation.backbone import SLaKBackbone, load_classification_checkpoint

    _, state_dict = main_checkpoint
    # The original release: DDP-wrapped names under 'state_dict', and a segmentation checkpoint
    # whose backbone sits under 'backbone.'.
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, ddp)
    backbone = SLaKBackbone(**TINY_BACKBONE, Decom=True)
    missing, unexpected = load_classification_checkpoint(backbone, str(ddp))
    assert sorted(missing) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert unexpected == []
    assert_loaded(backbone, state_dict)

    segmentor = tmp_path / "segmentor.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
               segmentor)
    fresh = SLaKBackbone(**TINY_BACKBONE, Decom=True,
                         init_cfg=dict(type="Pretrained", checkpoint=str(segmentor),
                                       prefix="backbone."))
    fresh.init_weights()
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in fresh.state_dict().items())

    from utils import ConfigError
    wider = SLaKBackbone(**dict(TINY_BACKBONE, width_factor=0.5), Decom=True)
    with pytest.raises(ConfigError, match="holds a model of --width_factor 0.25; this run has "
                                          "--width_factor 0.5"):
        load_classification_checkpoint(wider, str(ddp))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="is an empty file"):
        load_classification_checkpoint(backbone, str(empty))
