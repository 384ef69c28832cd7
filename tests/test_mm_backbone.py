"""SLaK's OpenMMLab backbone switches, through the real MMSegmentation / MMDetection registries.

Each test builds the shipped configs with ``MODELS.build`` at tiny widths and kernels (set as
``--cfg-options`` would set them) and trains a step or two on random 64x64 batches:
``frozen_stages`` (frozen weights and statistics unchanged, the rest trained), ``norm_eval``
(BatchNorm statistics unchanged), ``with_cp`` (same outputs, gradients and statistics, with the
blocks actually recomputed), ``init_cfg`` loading checkpoints of the original release and of this
project, and the deprecated ``pretrained=``. Tests skip where OpenMMLab does not import.
"""
import argparse
import json

import pytest
import timm
import torch

import SLaK  # noqa: F401 - registers the family in timm
from conftest import REPO
from test_dense_prediction import (build, cpu_optim_wrapper, det_batch, import_or_skip,
                                   seg_batch)
from utils import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
SEG_CONFIG = REPO / "segmentation/configs/upernet_slak_tiny_512_80k_ade20k_ss.py"
DET_CONFIG = REPO / "detection/configs/cascade_mask_rcnn_slak_tiny_mstrain_480-800_adamw_3x_coco.py"
SIZE = 64
# One block per stage, width 0.25 (24/48/96/192 channels), small kernels; the rest as shipped
# (Decom, drop path 0.4, layer scale 1.0).
TINY_BACKBONE = ["model.backbone.depths=[1,1,1,1]", "model.backbone.width_factor=0.25",
                 "model.backbone.kernel_size=[7,5,5,3,3]"]
TINY_UPERNET = ["model.decode_head.in_channels=[24,48,96,192]", "model.decode_head.channels=16",
                "model.auxiliary_head.in_channels=96", "model.auxiliary_head.channels=8"]
# Cascade Mask R-CNN with 16-channel FPN, RPN and RoI heads and 16 sampled RoIs per stage.
TINY_CASCADE = ["model.neck.in_channels=[24,48,96,192]", "model.neck.out_channels=16",
                "model.rpn_head.in_channels=16", "model.rpn_head.feat_channels=16",
                "model.roi_head.bbox_roi_extractor.out_channels=16",
                "model.roi_head.mask_roi_extractor.out_channels=16",
                "model.roi_head.mask_head.in_channels=16",
                "model.roi_head.mask_head.conv_out_channels=16",
                "model.train_cfg.rpn.sampler.num=32", "model.train_cfg.rpn_proposal.nms_pre=64",
                "model.train_cfg.rpn_proposal.max_per_img=32"]
for _stage in range(3):
    TINY_CASCADE += [f"model.roi_head.bbox_head.{_stage}.in_channels=16",
                     f"model.roi_head.bbox_head.{_stage}.conv_out_channels=16",
                     f"model.roi_head.bbox_head.{_stage}.fc_out_channels=16",
                     f"model.train_cfg.rcnn.{_stage}.sampler.num=16"]
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# The original release's parameter names (tests/data: the original's SLaK-T, Decom, BatchNorm).
ORIGINAL_KEYS = list(json.loads((REPO / "tests/data/official_state_dict_keys.json").read_text())
                     ["SLaK_tiny_w1.3_decom"]["state_dict"])


# In the training tests: with stochastic depth a block may drop out of every sample of a short
# run and receive no gradient.
NO_DROP_PATH = ["model.backbone.drop_path_rate=0.0"]


def segmentor(*options):
    return build(SEG_CONFIG, "mmseg", size=SIZE,
                 cfg_options=[*TINY_BACKBONE, *NO_DROP_PATH, *TINY_UPERNET, *options])


def detector(*options):
    return build(DET_CONFIG, "mmdet",
                 cfg_options=[*TINY_BACKBONE, *NO_DROP_PATH, *TINY_CASCADE, *options])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def steps(model, optim_wrapper, batch, count):
    """``count`` training steps (loss-mode forward, backward, the config's optimizer)."""
    model.train()
    for _ in range(count):
        losses = model(**model.data_preprocessor(batch, True), mode="loss")
        loss, _ = model.parse_losses(losses)
        assert torch.isfinite(loss)
        optim_wrapper.update_params(loss)


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# (frozen_stages, norm_eval, the parameter prefixes that frozen_stages freezes)
SWITCHES = [(-1, False, ()), (0, True, ("downsample_layers.0.",)),
            (2, False, ("downsample_layers.0.", "downsample_layers.1.", "stages.0.", "stages.1."))]


@pytest.mark.parametrize("frozen_stages,norm_eval,frozen", SWITCHES,
                         ids=[f"frozen{s}-norm_eval{e}" for s, e, _ in SWITCHES])
def test_frozen_stages_and_norm_eval_in_a_segmentor(frozen_stages, norm_eval, frozen):
    cfg, model = segmentor(f"model.backbone.frozen_stages={frozen_stages}",
                           f"model.backbone.norm_eval={norm_eval}")
    backbone = model.backbone
    assert (backbone.frozen_stages, backbone.norm_eval) == (frozen_stages, norm_eval)
    is_frozen = {name: name.startswith(frozen) for name, _ in backbone.named_parameters()}
    assert {n for n, p in backbone.named_parameters() if not p.requires_grad} == \
        {n for n, f in is_frozen.items() if f}
    optim_wrapper = cpu_optim_wrapper(cfg, model)
    optimized = {id(p) for group in optim_wrapper.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for n, p in backbone.named_parameters() if is_frozen[n])

    before = snapshot(backbone)
    steps(model, optim_wrapper, seg_batch(150, torch.Generator().manual_seed(0), SIZE), 2)
    assert model.training and model.decode_head.training
    for name, module in backbone.named_modules():
        inside_frozen = f"{name}.".startswith(frozen)
        batchnorm = isinstance(module, torch.nn.BatchNorm2d)
        assert module.training == (not inside_frozen and not (norm_eval and batchnorm)), name

    moved = changed(before, snapshot(backbone))
    statistics = {k for k in before if k.endswith(STATISTICS)}
    for key in before:
        frozen_key = key.startswith(frozen)
        if key in statistics:
            # Every stage has BatchNorms (its large-kernel branches): they update unless frozen
            # or under norm_eval.
            assert (key in moved) == (not frozen_key and not norm_eval), key
        elif key.endswith(".weight") and ".bn." not in key:
            assert (key in moved) == (not frozen_key), key
    # norm_eval keeps the statistics, not the BatchNorms' affine weights.
    assert "stages.3.0.large_kernel.LoRA1.bn.weight" in moved


def test_detector_with_cp_frozen_and_norm_eval_in_one_step():
    cfg, model = detector("model.backbone.frozen_stages=1", "model.backbone.norm_eval=True",
                          "model.backbone.with_cp=True")
    backbone = model.backbone
    assert backbone.with_cp and backbone.grad_checkpointing
    calls = {}
    for i, stage in enumerate(backbone.stages):
        stage[0].register_forward_pre_hook(lambda *_, i=i: calls.update({i: calls.get(i, 0) + 1}))
    before = snapshot(backbone)
    steps(model, cpu_optim_wrapper(cfg, model), det_batch(80, torch.Generator().manual_seed(0),
                                                          SIZE), 1)
    # Checkpointed blocks run again in the backward pass; the frozen stage needs no backward.
    assert calls == {0: 1, 1: 2, 2: 2, 3: 2}
    moved = changed(before, snapshot(backbone))
    assert not any(k.startswith(("downsample_layers.0.", "stages.0.")) for k in moved)
    assert not any(k.endswith(STATISTICS) for k in moved)
    assert {"downsample_layers.1.1.weight", "stages.1.0.pwconv1.weight",
            "stages.3.0.large_kernel.LoRA2.conv.weight", "norm0.weight"} <= moved


def test_with_cp_gives_the_same_outputs_and_gradients_and_keeps_fewer_tensors():
    import_or_skip("mmseg.models")
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from segmentation.launch import load_config

    init_default_scope("mmseg")
    config = load_config(str(SEG_CONFIG), TINY_BACKBONE).model.backbone
    inputs = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def run(with_cp, weights=None):
        torch.manual_seed(0)
        backbone = MODELS.build(dict(config, with_cp=with_cp)).train()
        if weights is not None:
            backbone.load_state_dict(weights)
        start = snapshot(backbone)
        calls, saved = [0], [0]
        block = backbone.stages[2][0]
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

        def count(tensor):
            saved[0] += 1
            return tensor

        torch.manual_seed(1)  # the same DropPath samples in both runs
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            outs = backbone(inputs)
        sum((o ** 2).mean() for o in outs).backward()
        grads = {n: p.grad for n, p in backbone.named_parameters()}
        return start, outs, grads, snapshot(backbone), calls[0], saved[0]

    plain = run(False)
    checkpointed = run(True, plain[0])
    assert checkpointed[1][0].requires_grad
    for a, b in zip(plain[1], checkpointed[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert plain[2].keys() == checkpointed[2].keys()
    for name in plain[2]:
        torch.testing.assert_close(plain[2][name], checkpointed[2][name], rtol=1e-6, atol=1e-7)
    # BatchNorm statistics counted once per step, as without checkpointing.
    assert plain[3].keys() == checkpointed[3].keys()
    for key in plain[3]:
        assert torch.equal(plain[3][key], checkpointed[3][key]), key
    assert (plain[4], checkpointed[4]) == (1, 2)
    # Autograd keeps the blocks' inputs only, not their intermediate activations.
    assert checkpointed[5] < plain[5] / 2


# A SLaK-T classifier at width 0.25 with small kernels (each stage's above the small one, so
# every block has all three branches as in the original's SLaK-T), and its backbone arguments.
TINY_KERNELS = [7, 5, 5, 5, 3]
TINY_CLASSIFIER = ["model.backbone.depths=[3,3,9,3]", "model.backbone.width_factor=0.25",
                   "model.backbone.kernel_size=[7,5,5,5,3]"]


def tiny_classifier():
    # Layer scales of 1, as a trained model's are of that order: at the 1e-6 of a fresh one the
    # first fine-tuning step moves the weights inside the blocks below float32's resolution.
    torch.manual_seed(3)
    return timm.create_model("SLaK_tiny", num_classes=4, width_factor=0.25, Decom=True,
                             kernel_size=TINY_KERNELS, layer_scale_init_value=1.0)


def write_checkpoint(model, path, layout):
    """``model`` saved as the original release saved it, or as this project's main.py does."""
    state_dict = model.state_dict()
    if layout == "original":
        assert list(state_dict) == ORIGINAL_KEYS  # the original's names, in its order
        torch.save({"model": state_dict, "optimizer": {}, "epoch": 299, "scaler": {},
                    "args": argparse.Namespace(model="SLaK_tiny", kernel_size=TINY_KERNELS,
                                               width_factor=0.25, Decom=True, bn=True,
                                               nb_classes=4, sparse=True)}, path)
    elif layout == "original DDP":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    else:
        from checkpoint import save_training_state
        from slak_config import model_config

        args = argparse.Namespace(model="SLaK_tiny", kernel_size=TINY_KERNELS)
        save_training_state(
            path, args=args, epoch=0, model=model,
            optimizer=torch.optim.AdamW(model.parameters()),
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            model_config=model_config("SLaK_tiny", TINY_KERNELS, True, 0.25, True, 4))
    return state_dict


def assert_backbone_holds(backbone, state_dict):
    """Every tensor of the classifier's but its head and final norm is in ``backbone``; only the
    output norms ``norm{i}`` are new."""
    own = backbone.state_dict()
    assert own.keys() - state_dict.keys() == {f"norm{i}.{p}" for i in range(4)
                                              for p in ("weight", "bias")}
    assert state_dict.keys() - own.keys() == {"head.weight", "head.bias", "norm.weight",
                                              "norm.bias"}
    for key in own.keys() & state_dict.keys():
        assert torch.equal(own[key], state_dict[key]), key


@pytest.mark.parametrize("layout", ["original", "original DDP", "main.py"])
def test_init_cfg_loads_a_classification_checkpoint_into_a_detector(layout, tmp_path):
    state_dict = write_checkpoint(tiny_classifier(), tmp_path / "imagenet.pth", layout)
    # The launchers' command-line form, on the shipped config's init_cfg.
    _, model = detector(*TINY_CLASSIFIER, "model.backbone.frozen_stages=1",
                        f"model.backbone.init_cfg.checkpoint={tmp_path / 'imagenet.pth'}")
    assert model.backbone.init_cfg == dict(type="Pretrained",
                                           checkpoint=str(tmp_path / "imagenet.pth"))
    assert_backbone_holds(model.backbone, state_dict)
    assert not model.backbone.stages[0][0].pwconv1.weight.requires_grad


def test_init_cfg_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    write_checkpoint(tiny_classifier(), tmp_path / "imagenet.pth", "main.py")
    with pytest.raises(ConfigError, match="was trained with --width_factor 0.25; this run has "
                                          "--width_factor 0.5"):
        segmentor(*TINY_CLASSIFIER, "model.backbone.width_factor=0.5",
                  "model.decode_head.in_channels=[48,96,192,384]",
                  "model.auxiliary_head.in_channels=192",
                  f"model.backbone.init_cfg.checkpoint={tmp_path / 'imagenet.pth'}")


def test_pretrained_is_deprecated_and_read_as_init_cfg(tmp_path):
    path = str(tmp_path / "imagenet.pth")
    state_dict = write_checkpoint(tiny_classifier(), path, "original")
    with pytest.warns(FutureWarning, match=r"pretrained= is deprecated .* "
                                           r"model.backbone.init_cfg.checkpoint=PATH"):
        _, model = segmentor(*TINY_CLASSIFIER, f"model.backbone.pretrained={path}")
    # It fills the shipped configs' init_cfg placeholder (checkpoint=None).
    assert model.backbone.init_cfg == dict(type="Pretrained", checkpoint=path)
    assert_backbone_holds(model.backbone, state_dict)
    # MMSegmentation's EncoderDecoder hands its own pretrained= (MMSeg 0.x commands'
    # model.pretrained=PATH) to the backbone.
    with pytest.warns(FutureWarning, match="pretrained= is deprecated"):
        _, model = segmentor(*TINY_CLASSIFIER, f"model.pretrained={path}")
    assert_backbone_holds(model.backbone, state_dict)

    with pytest.raises(ConfigError, match="not both"):
        segmentor(f"model.backbone.pretrained={path}",
                  f"model.backbone.init_cfg.checkpoint={path}")
    with pytest.raises(ConfigError, match="pretrained must be a path or URL"):
        segmentor("model.backbone.pretrained=[1]")


def test_switches_that_do_not_exist_are_one_clear_error():
    with pytest.raises(ConfigError, match="frozen_stages must be -1"):
        segmentor("model.backbone.frozen_stages=5")
    with pytest.raises(ConfigError, match="init_cfg must be a dict with a type"):
        segmentor("model.backbone.init_cfg.type=None")


def write_ade20k(root, generator):
    """A two-image training split and a one-image validation split in ADE20K's layout."""
    from PIL import Image

    for split, count in (("training", 2), ("validation", 1)):
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True)
        for i in range(count):
            image = torch.randint(0, 256, (SIZE, SIZE, 3), dtype=torch.uint8, generator=generator)
            labels = torch.randint(0, 151, (SIZE, SIZE), dtype=torch.uint8, generator=generator)
            Image.fromarray(image.numpy()).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(labels.numpy()).save(root / "annotations" / split / f"{i}.png")


def test_train_command_fine_tunes_an_original_checkpoint_with_the_switches(tmp_path):
    """docs/dense_prediction.md's training command, with its backbone keys, one iteration."""
    import_or_skip("mmseg.models")
    from conftest import run_main

    data = tmp_path / "ADEChallengeData2016"
    write_ade20k(data, torch.Generator().manual_seed(0))
    checkpoint = tmp_path / "SLaK_tiny.pth"
    state_dict = write_checkpoint(tiny_classifier(), checkpoint, "original")
    result = run_main(
        SEG_CONFIG, "--work-dir", tmp_path / "work", "--cfg-options",
        f"model.backbone.init_cfg.checkpoint={checkpoint}", "model.backbone.frozen_stages=1",
        "model.backbone.norm_eval=True", "model.backbone.with_cp=True",
        *TINY_CLASSIFIER, *TINY_UPERNET, f"model.data_preprocessor.size=({SIZE},{SIZE})",
        f"train_dataloader.dataset.data_root={data}", f"val_dataloader.dataset.data_root={data}",
        f"train_dataloader.dataset.pipeline.2.scale=({SIZE},{SIZE})",
        f"train_dataloader.dataset.pipeline.3.crop_size=({SIZE},{SIZE})",
        "train_dataloader.batch_size=2", "train_dataloader.num_workers=0",
        "train_dataloader.persistent_workers=False", "val_dataloader.num_workers=0",
        f"val_dataloader.dataset.pipeline.1.scale=({SIZE},{SIZE})",
        "val_dataloader.persistent_workers=False", "train_cfg.max_iters=1",
        # Full learning rate from the first step (no warm-up), no stochastic depth: every
        # trainable weight moves.
        "param_scheduler.0.start_factor=1.0", *NO_DROP_PATH, "randomness.seed=0",
        script=REPO / "segmentation/train.py")
    assert f"SLaK backbone: loaded 466 tensors from {checkpoint}" in result.stdout + result.stderr
    trained = torch.load(tmp_path / "work" / "iter_1.pth", map_location="cpu",
                         weights_only=False)["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in trained.items() if k.startswith("backbone.")}
    for key in backbone.keys() & state_dict.keys():
        frozen = key.startswith(("downsample_layers.0.", "stages.0.")) or key.endswith(STATISTICS)
        assert torch.equal(backbone[key], state_dict[key]) == frozen, key


def test_train_command_with_a_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    import_or_skip("mmseg.models")
    from conftest import run_main

    missing = tmp_path / "SLaK_tiny.pth"
    result = run_main(SEG_CONFIG, "--work-dir", tmp_path / "work", "--cfg-options",
                      f"model.backbone.init_cfg.checkpoint={missing}",
                      script=REPO / "segmentation/train.py", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model.backbone.init_cfg.checkpoint {missing}: file not found; check the path")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists()
