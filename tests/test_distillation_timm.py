"""Distillation between any timm models and the SLaK family, as the ICML 2023 paper pairs them
(ViT/Swin/SLaK teachers, ResNet/ConvNeXt students): last-stage maps of every layout, feature
distillation across widths and sizes against a float64 reference, the original's defaults, and
runs through main.py and main_KD.py on the synthetic data that train, save and resume.
"""
import argparse
import json

import pytest
import timm
import torch

import SLaK  # noqa: F401 - registers the SLaK models
from conftest import REPO, run_main
from distillation import FeatureDistillLoss, LastStageTap, as_feature_map, build_distillation_loss
from test_distillation import fd_reference, kd_reference, logits_and_targets, nkd_reference

SYNTHETIC_CPU = ["--data_set", "synthetic", "--device", "cpu", "--input_size", "32",
                 "--nb_classes", "4", "--synthetic_train_size", "32", "--synthetic_val_size", "16",
                 "--num_workers", "0", "--pin_mem", "false", "--batch_size", "8"]


def test_vit_tokens_become_a_map_without_the_class_token():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=64).eval()
    tokens = []
    vit.blocks[-1].register_forward_hook(lambda module, inputs, output: tokens.append(output))
    tap = LastStageTap(vit)
    with torch.no_grad(), tap:
        vit(torch.randn(2, 3, 64, 64))
    feature_map = tap.take()
    assert tokens[0].shape == (2, 1 + 16, 192)  # class token + a 4x4 grid of patches
    expected = tokens[0][:, 1:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
    torch.testing.assert_close(feature_map, expected)


def test_swin_and_resnet_maps_are_channels_first():
    swin_like = torch.randn(2, 7, 7, 768)  # Swin stages return NHWC
    resnet_like = torch.randn(2, 512, 1, 1)
    assert as_feature_map(swin_like, None, 768).shape == (2, 768, 7, 7)
    torch.testing.assert_close(as_feature_map(swin_like, None, 768), swin_like.permute(0, 3, 1, 2))
    assert as_feature_map(resnet_like, None, 512) is resnet_like
    with pytest.raises(ValueError, match="cannot read a 100-channel feature map"):
        as_feature_map(resnet_like, None, 100)


@pytest.mark.parametrize("loss_type", ["smoothL1", "MSE"])
def test_feature_loss_resizes_the_student_map_to_the_teachers(loss_type):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 8, 1, 1), torch.randn(2, 6, 2, 2)  # ResNet 1x1, ViT 2x2
    loss = FeatureDistillLoss(8, 6, loss_type)
    weight, bias = loss.projector.weight.detach(), loss.projector.bias.detach()
    # A 1x1 map resized bilinearly is that value everywhere.
    expected = fd_reference(student.expand(2, 8, 2, 2), teacher, weight, bias,
                            "MSE" if loss_type == "MSE" else "SmoothL1")
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_kd_supervises_with_plain_cross_entropy_without_mixup():
    from timm.loss import LabelSmoothingCrossEntropy
    student, teacher, target = logits_and_targets(soft=False)
    args = argparse.Namespace(distill_type="KD", T=2.0, alpha=0.1, hard=False, lr_fd=1.0,
                              compile=False)
    loss_fn = build_distillation_loss(args, None, torch.nn.Identity(),
                                      LabelSmoothingCrossEntropy(smoothing=0.1))
    got = loss_fn.logit_loss(student, teacher, target).item()
    assert got == pytest.approx(kd_reference(student, teacher, target, 2.0, 0.1), rel=1e-6)


def test_the_original_distillation_defaults():
    import main
    import main_KD
    args = main_KD.get_args_parser().parse_args([])
    assert (args.alpha, args.lr_fd, args.model_s, args.FDLoss_type, args.distill_type,
            args.nkd_honour_T) == (0.1, 1.0, "SLaK_small", "smoothL1", "KD", False)
    assert main.get_args_parser().parse_args([]).distill_type is None  # main.py trains alone
    # main_KD.py without --distill_type distils with KD, so it needs the teacher.
    result = run_main(*SYNTHETIC_CPU, script=REPO / "main_KD.py", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --distill_type KD needs the teacher's weights: pass --resume")


def test_nkd_runs_at_temperature_1_unless_nkd_honour_T():
    """The original's NKD ran at temperature 1 whatever --T said; --nkd_honour_T true uses --T."""
    import main
    student, teacher, target = logits_and_targets(soft=False)

    def nkd(*flags):
        args = main.get_args_parser().parse_args(["--distill_type", "NKD", *flags])
        loss_fn = build_distillation_loss(args, None, torch.nn.Identity(),
                                          torch.nn.functional.cross_entropy)
        return loss_fn.logit_loss(student, teacher, target).item()

    at_1, at_3 = (nkd_reference(student, teacher, target, T) for T in (1.0, 3.0))
    assert at_3 != pytest.approx(at_1, rel=1e-3)
    assert nkd() == pytest.approx(at_1, rel=1e-6)
    assert nkd("--T", "3.0") == pytest.approx(at_1, rel=1e-6)
    assert nkd("--T", "3.0", "--nkd_honour_T", "true") == pytest.approx(at_3, rel=1e-6)
    assert nkd("--T", "3.0", "--nkd_honour_T") == pytest.approx(at_3, rel=1e-6)


@pytest.mark.parametrize("teacher,nb_classes,classes", [
    ("resnet18", "4", 1000), ("vit_tiny_patch16_224.augreg_in21k", "1000", 21843)])
def test_pretrained_teacher_of_other_classes_is_one_line(tmp_path, teacher, nb_classes, classes):
    """timm's weights for other classes would come with a random classifier to distil; the
    classes are read from timm's pretrained configuration, nothing is downloaded."""
    result = run_main(*SYNTHETIC_CPU, "--model", teacher, "--teacher_pretrained", "true",
                      "--distill_type", "KD", "--model_s", "resnet18", "--nb_classes", nb_classes,
                      "--output_dir", tmp_path / "out", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (f"error: --teacher_pretrained true: timm's {teacher} weights classify "
                        f"{classes} classes and this run has {nb_classes}, so the teacher's "
                        f"classifier would be random; give its weights for these classes with "
                        f"--resume, or a data set of {classes} classes")
    assert not (tmp_path / "out").exists()


def log_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vit_teacher_into_resnet_student_through_main_kd(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")  # a plain state dict
    out = tmp_path / "student"
    command = [*SYNTHETIC_CPU, "--model", "vit_tiny_patch16_224", "--model_s", "resnet18",
               "--resume", tmp_path / "vit.pth", "--distill_type", "NKD_FD", "--T", "2",
               "--output_dir", out, "--alpha_mgd", "0.5", "--flag"]
    first = run_main(*command, "--epochs", "1", script=REPO / "main_KD.py")
    assert "--alpha_mgd has no effect" in first.stdout and "--flag has no effect" in first.stdout
    assert "Note: NKD runs at temperature 1" in first.stdout  # --T 2 is not NKD's, as the original
    assert "Teacher vit_tiny_patch16_224 loaded" in first.stdout
    saved = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert "fc.weight" in saved["model"] and "distill" in saved  # the student and its projection
    second = run_main(*command, "--epochs", "2", "--distill_resume", script=REPO / "main_KD.py")
    assert "Resuming training at epoch 1" in second.stdout
    assert [row["epoch"] for row in log_lines(out / "log.txt")] == [0, 1]


@pytest.mark.parametrize("distill_type", ["KD", "NKD"])
def test_slak_teacher_into_resnet_student_through_main(tmp_path, distill_type):
    torch.manual_seed(0)
    teacher = timm.create_model("SLaK_tiny", num_classes=4, width_factor=0.25, Decom=True,
                                kernel_size=[13, 11, 9, 7, 3])
    torch.save({"model": teacher.state_dict()}, tmp_path / "slak.pth")
    run_main(*SYNTHETIC_CPU, "--model", "SLaK_tiny", "--width_factor", "0.25", "--Decom", "true",
             "--kernel_size", "13", "11", "9", "7", "3", "--model_s", "resnet18",
             "--resume", tmp_path / "slak.pth", "--distill_type", distill_type, "--epochs", "1",
             "--model_ema", "true", "--output_dir", tmp_path / "out")
    saved = torch.load(tmp_path / "out" / "checkpoint-0.pth", map_location="cpu", weights_only=False)
    assert "fc.weight" in saved["model"] and "fc.weight" in saved["model_ema"]


def test_unknown_student_is_one_line(tmp_path):
    result = run_main(*SYNTHETIC_CPU, "--model_s", "no_such_net", "--distill_type", "None",
                      "--epochs", "1", "--output_dir", tmp_path / "o", check=False)
    assert result.returncode == 2 and "unknown model" in result.stderr
    assert "Traceback" not in result.stderr


def test_only_L_with_a_student_without_large_kernels_is_one_line(tmp_path):
    result = run_main(*SYNTHETIC_CPU, "--model_s", "resnet18", "--distill_type", "None",
                      "--sparse", "--only-L", "--epochs", "1", "--output_dir", tmp_path / "o",
                      check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --only-L sparsifies the large-kernel branches (lkb_origin, LoRA1/LoRA2), and the "
        "student --model_s resnet18 has none; drop --only-L")
    assert not (tmp_path / "o").exists()  # rejected before anything is written


def test_only_L_with_a_model_without_large_kernels_is_one_line(tmp_path):
    result = run_main(*SYNTHETIC_CPU, "--model", "resnet18", "--sparse", "--only-L",
                      "--epochs", "1", "--output_dir", tmp_path / "o", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "and --model resnet18 has none; drop --only-L")
    assert not (tmp_path / "o").exists()
