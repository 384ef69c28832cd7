"""Distillation: each loss against a float64 reference written here, no gradient into the teacher,
feature distillation across widths, and the README's two distillation commands run through
main.py on the synthetic data (save a student checkpoint, then continue with --distill_resume).

The GPU memory check of the issue (a distillation step needs at most the student's training step
plus the teacher's inference) is ``python benchmarks/distill_memory.py`` on a GPU.
"""
import argparse
import json
import math
import shlex

import pytest
import torch
import torch.nn.functional as F

import SLaK
from conftest import run_main, torchrun
from distillation import (DISTILL_MODES, STUDENT_OVERRIDES, DistillationLoss, FeatureDistillLoss,
                          KDLoss, NKDLoss, build_distillation_loss, freeze)

# ---------------------------------------------------------------------------------------------
# float64 references, written from the definitions (explicit sums over classes, per sample)


def softmax64(row, T=1.0):
    exps = [math.exp(v / T) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kd_reference(student, teacher, target, T, alpha, hard=False):
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(s, target), or the hard-label variant."""
    total = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), target.tolist()):
        y = y if isinstance(y, list) else [1.0 if k == y else 0.0 for k in range(len(s))]
        ce = -sum(yk * math.log(pk) for yk, pk in zip(y, softmax64(s)))
        if hard:
            teacher_class = max(range(len(t)), key=lambda k: t[k])
            total += 0.5 * ce - 0.5 * math.log(softmax64(s)[teacher_class])
            continue
        p_s, p_t = softmax64(s, T), softmax64(t, T)
        kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        total += alpha * T * T * kl + (1 - alpha) * ce
    return total / len(student)


def nkd_reference(student, teacher, target, T, gamma=1.0):
    total = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), target.tolist()):
        if isinstance(y, list):  # class probabilities: the most probable class
            y = max(range(len(y)), key=lambda k: y[k])
        target_term = -softmax64(t)[y] * math.log(softmax64(s)[y])
        others = [k for k in range(len(s)) if k != y]
        q_s = softmax64([s[k] for k in others], T)
        q_t = softmax64([t[k] for k in others], T)
        non_target = -sum(qt * math.log(qs) for qt, qs in zip(q_t, q_s))
        total += target_term + gamma * T * T * non_target
    return total / len(student)


def fd_reference(student, teacher, weight, bias, loss_type, beta=2.0):
    """1x1 projection as an explicit channel sum, then SmoothL1(beta) or MSE averaged."""
    s, t = student.double(), teacher.double()
    projected = torch.einsum("nchw,oc->nohw", s, weight.double()[:, :, 0, 0]) + \
        bias.double().view(1, -1, 1, 1)
    diffs = (projected - t).abs().flatten().tolist()
    if loss_type == "MSE":
        return sum(d * d for d in diffs) / len(diffs)
    return sum(0.5 * d * d / beta if d < beta else d - 0.5 * beta for d in diffs) / len(diffs)


def logits_and_targets(soft, n=6, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, c, generator=g)
    teacher = 3 * torch.randn(n, c, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    if soft:  # a Mixup-style target: two classes mixed, label smoothing
        other = torch.randint(0, c, (n,), generator=g)
        lam = 0.7
        target = (lam * F.one_hot(target, c) + (1 - lam) * F.one_hot(other, c)).float() * 0.9 + 0.1 / c
    return student, teacher, target


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_kd_matches_reference(T, alpha, soft):
    student, teacher, target = logits_and_targets(soft)
    got = KDLoss(T, alpha)(student, teacher, target).item()
    assert got == pytest.approx(kd_reference(student, teacher, target, T, alpha), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("soft", [False, True])
def test_kd_hard_matches_reference(soft):
    student, teacher, target = logits_and_targets(soft)
    got = KDLoss(3.0, hard=True)(student, teacher, target).item()
    assert got == pytest.approx(kd_reference(student, teacher, target, 3.0, 1.0, hard=True), rel=1e-5)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("T,gamma", [(1.0, 1.0), (3.0, 1.0), (3.0, 1.5)])
def test_nkd_matches_reference(T, gamma, soft):
    student, teacher, target = logits_and_targets(soft)
    got = NKDLoss(T, gamma)(student, teacher, target).item()
    assert got == pytest.approx(nkd_reference(student, teacher, target, T, gamma), rel=1e-5)


def test_nkd_honours_temperature():
    student, teacher, target = logits_and_targets(False)
    assert NKDLoss(1.0)(student, teacher, target) != pytest.approx(NKDLoss(3.0)(student, teacher, target))


@pytest.mark.parametrize("loss_type", ["SmoothL1", "MSE"])
def test_feature_loss_matches_reference(loss_type):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 3, 3, generator=g), 2 * torch.randn(2, 8, 3, 3, generator=g)
    loss = FeatureDistillLoss(5, 8, loss_type)
    expected = fd_reference(student, teacher, loss.projector.weight.detach(),
                            loss.projector.bias.detach(), loss_type)
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_feature_loss_without_projection_when_widths_match():
    loss = FeatureDistillLoss(6, 6)
    assert not list(loss.parameters())
    a, b = torch.randn(2, 6, 2, 2), torch.randn(2, 6, 2, 2)
    assert loss(a, b).item() == pytest.approx(F.smooth_l1_loss(a, b, beta=2.0).item())


@pytest.mark.parametrize("make_loss", [
    lambda: KDLoss(3.0, 0.5), lambda: KDLoss(3.0, hard=True), lambda: NKDLoss(3.0),
    lambda: FeatureDistillLoss(7, 7)], ids=["KD", "KD-hard", "NKD", "FD"])
def test_no_gradient_reaches_the_teacher_outputs(make_loss):
    student, teacher, target = logits_and_targets(True)
    if isinstance(make_loss(), FeatureDistillLoss):
        student, teacher = student.view(6, 7, 1, 1), teacher.view(6, 7, 1, 1)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    make_loss()(student, teacher, target).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the training loss with real models: SLaK-T width 1.3 teacher, ConvNeXt-T width 1.0 student

TEACHER_KERNELS = [13, 11, 9, 7, 3]  # SLaK-style (large stage kernels, small 3) but CPU-sized


def small_teacher_and_student(num_classes=5):
    torch.manual_seed(0)
    teacher = SLaK.SLaK(depths=(1, 1, 1, 1), num_classes=num_classes, kernel_size=TEACHER_KERNELS,
                        width_factor=1.3, Decom=True)
    student = SLaK.SLaK(depths=(1, 1, 1, 1), num_classes=num_classes, **STUDENT_OVERRIDES)
    return teacher, student


@pytest.mark.parametrize("distill_type,logit_loss,features", [
    ("None", None, False), ("KD", KDLoss, False), ("NKD", NKDLoss, False), ("FD", None, True),
    ("KD_FD", KDLoss, True), ("NKD_FD", NKDLoss, True)])
def test_each_distill_type_builds_its_logit_loss_and_feature_term(distill_type, logit_loss,
                                                                  features):
    """The original's six --distill_type values, from main.py's flags: which logit loss (None:
    the supervised loss alone), whether last-stage features are distilled too."""
    import main
    args = main.get_args_parser().parse_args(["--distill_type", distill_type, "--T", "2"])
    teacher, student = small_teacher_and_student()
    feature_loss = FeatureDistillLoss(768, 998) if features else None
    loss_fn = build_distillation_loss(args, student, teacher, F.cross_entropy, feature_loss)
    assert type(loss_fn.logit_loss) is logit_loss if logit_loss else loss_fn.logit_loss is None
    if logit_loss is KDLoss:
        assert loss_fn.logit_loss.temperature == 2.0
    assert (loss_fn.teacher is None) == (distill_type == "None")
    samples, targets = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    loss, _ = loss_fn(student, samples, targets)
    with torch.no_grad():
        expected = F.cross_entropy(student(samples), targets) if logit_loss is None else \
            loss_fn.logit_loss(student(samples), teacher(samples), targets)
        if features:
            expected = expected + args.lr_fd * feature_loss(student.forward_stages(samples)[-1],
                                                            teacher.forward_stages(samples)[-1])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match=f"distill_type {distill_type} takes "
                                         f"{'a' if features else 'no'} feature_loss"):
        DistillationLoss(distill_type, student, teacher, F.cross_entropy, loss_fn.logit_loss,
                         None if features else FeatureDistillLoss(768, 998))


@pytest.mark.parametrize("distill_type", ["KD", "NKD", "FD", "KD_FD", "NKD_FD"])
def test_distillation_step_trains_only_the_student(distill_type):
    teacher, student = small_teacher_and_student()
    assert teacher.num_features == 998 and student.num_features == 768
    grad_modes = []
    teacher.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    mode = DISTILL_MODES[distill_type]
    feature_loss = FeatureDistillLoss(768, 998) if mode.features else None
    flags = argparse.Namespace(T=3.0, alpha=1.0, hard=False, nkd_honour_T=True)
    logit_loss = mode.logit_loss(flags, F.cross_entropy) if mode.logit_loss else None
    loss_fn = DistillationLoss(distill_type, student, freeze(teacher), F.cross_entropy, logit_loss,
                               feature_loss, feature_weight=3e-5)
    student.train()
    samples, targets = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    loss, logits = loss_fn(student, samples, targets)
    assert logits.shape == (4, 5) and logits.requires_grad and torch.isfinite(loss)
    loss.backward()
    assert grad_modes == [False] and not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    if feature_loss is not None:
        assert feature_loss.projector.weight.shape == (998, 768, 1, 1)
        assert feature_loss.projector.weight.grad.abs().sum() > 0


def test_distill_type_none_is_supervised_training_of_the_student():
    teacher, student = small_teacher_and_student()
    student.eval()
    samples, targets = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    loss, logits = DistillationLoss("None", student, teacher, F.cross_entropy)(student, samples, targets)
    with torch.no_grad():
        assert loss.item() == pytest.approx(F.cross_entropy(student(samples), targets).item(), rel=1e-6)


def test_feature_distillation_term_is_weighted_by_lr_fd():
    teacher, student = small_teacher_and_student()
    freeze(teacher)
    student.eval()  # no drop path or BN statistics updates: two calls see the same network
    samples, targets = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    feature_loss = FeatureDistillLoss(768, 998)
    plain = DistillationLoss("NKD", student, teacher, F.cross_entropy, NKDLoss(3.0))
    with_fd = DistillationLoss("NKD_FD", student, teacher, F.cross_entropy, NKDLoss(3.0),
                               feature_loss, feature_weight=0.5)
    with torch.no_grad():
        fd = feature_loss(student.forward_stages(samples)[-1], teacher.forward_stages(samples)[-1])
        assert with_fd(student, samples, targets)[0].item() == pytest.approx(
            plain(student, samples, targets)[0].item() + 0.5 * fd.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the README's distillation commands through main.py

README_COMMANDS = {  # verbatim from the original README (after main.py), placeholders in caps
    "SLaK_small": """--resume TEACHER --Decom True --T 3.0 --width_factor 1.3 -u 2000 --distill_resume
        --lr_fd 3e-5 --epochs 300 --model SLaK_small --distill_type NKD --model_s SLaK_small
        --drop_path 0.1 --batch_size 64 --lr 4e-3 --update_freq 16 --model_ema true
        --model_ema_eval false --data_path /path/to/imagenet-1k --num_workers 40
        --kernel_size 51 49 47 13 5 --output_dir OUTPUT""",
    "SLaK_tiny": """--resume TEACHER --Decom True --T 3.0 --width_factor 1.3 -u 2000 --lr_fd 3e-5
        --epochs 300 --model SLaK_tiny --distill_resume --distill_type NKD --model_s SLaK_tiny
        --drop_path 0.1 --batch_size 64 --lr 4e-3 --update_freq 8 --model_ema true
        --model_ema_eval false --data_path /path/to/imagenet-1k --num_workers 40
        --kernel_size 51 49 47 13 5 --output_dir OUTPUT""",
}
SHRINK = {"--width_factor": "0.25", "--batch_size": "8", "--update_freq": "1", "--num_workers": "0"}
SYNTHETIC_CPU = ["--data_set", "synthetic", "--device", "cpu", "--input_size", "32",
                 "--nb_classes", "10", "--synthetic_train_size", "64", "--synthetic_val_size", "32",
                 "--pin_mem", "false"]


def shrink(command, teacher, output_dir, epochs):
    """The README command on the synthetic data at CPU size: small width and batch, no ImageNet."""
    words = shlex.split(command.replace("TEACHER", str(teacher)).replace("OUTPUT", str(output_dir)))
    values = dict(SHRINK, **{"--epochs": str(epochs)})
    out, i = [], 0
    while i < len(words):
        if words[i] == "--data_path":
            i += 2
            continue
        out.append(words[i])
        if words[i] in values:
            out.append(values[words[i]])
            i += 1
        i += 1
    return out + SYNTHETIC_CPU


def train_teacher(model, output_dir):
    """A few iterations of ordinary training give a checkpoint of this project to distil from."""
    run_main("--model", model, "--Decom", "true", "--kernel_size", "51", "49", "47", "13", "5",
             "--width_factor", "0.25", *SYNTHETIC_CPU, "--synthetic_train_size", "16",
             "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--output_dir", output_dir)
    return output_dir / "checkpoint-0.pth"


@pytest.mark.parametrize("teacher_model", ["SLaK_small", "SLaK_tiny"])
def test_readme_distillation_command_runs_saves_and_resumes(tmp_path, teacher_model):
    teacher = train_teacher(teacher_model, tmp_path / "teacher")
    out = tmp_path / "student"
    first = run_main(*shrink(README_COMMANDS[teacher_model], teacher, out, epochs=1))
    assert "Teacher accuracy on 32 test images" in first.stdout
    assert "Student accuracy on 32 test images at the start" in first.stdout
    assert "Resum" not in first.stdout  # --distill_resume with an empty output folder starts afresh

    saved = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    student = SLaK.SLaK(depths=SLaK.MODEL_DEPTHS_DIMS[teacher_model][0], num_classes=10,
                        **STUDENT_OVERRIDES)
    student.load_state_dict(saved["model"])  # the checkpoint holds the student (ConvNeXt, width 1)
    student.load_state_dict(saved["model_ema"])
    assert not any("LoRA" in key for key in saved["model"]) and "distill" not in saved

    second = run_main(*shrink(README_COMMANDS[teacher_model], teacher, out, epochs=2),
                      "--synthetic_train_size", "32")  # a shorter second epoch: 4 iterations
    assert f"Resumed student weights from {out / 'checkpoint-0.pth'}" in second.stdout
    assert "Resuming training at epoch 1" in second.stdout
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in logs] == [0, 1]
    assert all(math.isfinite(entry["train_loss"]) and "test_acc1" in entry for entry in logs)


def test_feature_distillation_across_widths_through_main(tmp_path):
    """NKD_FD from a SLaK-T width 1.3 teacher (a bare state dict, as the original released) into a
    ConvNeXt-T width 1.0 student; the 1x1 projection is trained, saved, and resumed by two torchrun
    processes (gloo), which average its gradients as they do the student's."""
    torch.manual_seed(0)
    teacher = SLaK.SLaK(depths=SLaK.MODEL_DEPTHS_DIMS["SLaK_tiny"][0], num_classes=10,
                        kernel_size=TEACHER_KERNELS, width_factor=1.3, Decom=True)
    teacher_path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), teacher_path)
    out = tmp_path / "student"
    command = ["--resume", teacher_path, "--model", "SLaK_tiny", "--Decom", "true", "--kernel_size",
               *map(str, TEACHER_KERNELS), "--width_factor", "1.3", "--model_s", "SLaK_tiny",
               "--distill_type", "NKD_FD", "--FDLoss_type", "SmoothL1", "--lr_fd", "3e-5",
               "--T", "3.0", "--distill_resume", "--batch_size", "8", "--num_workers", "0",
               "--output_dir", out, *SYNTHETIC_CPU, "--synthetic_train_size", "16"]
    run_main(*command, "--epochs", "1")
    first = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    assert first["distill"]["projector.weight"].shape == (998, 768, 1, 1)
    assert len(first["optimizer"]["param_groups"]) == 4  # student (decay, no decay), projector x2

    second = run_main(*command, "--epochs", "2", launcher=torchrun(2))
    assert "Resuming training at epoch 1" in second.stdout and "2 processes" in second.stdout
    resumed = torch.load(out / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    moved = (resumed["distill"]["projector.weight"] - first["distill"]["projector.weight"]).abs()
    assert 0 < moved.max() < 0.01  # trained on from the saved projection, not re-initialised


@pytest.mark.parametrize("teacher_decom,extra", [
    (True, ["--sparse_init", "snip"]),  # every conv and linear weight of the student
    (False, ["--only-L", "--sparse_init", "ERK"]),  # the student's 7x7 depthwise weights only
])
def test_sparse_distillation_masks_the_student_only(tmp_path, teacher_decom, extra):
    """--sparse in distillation sparsifies the student (the teacher is loaded as it is): masks keyed
    by the student's weights, applied to its weights and its EMA, saved in the checkpoint."""
    torch.manual_seed(0)
    teacher = SLaK.SLaK(depths=(3, 3, 9, 3), num_classes=10, kernel_size=TEACHER_KERNELS,
                        width_factor=0.25, Decom=teacher_decom)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    out = tmp_path / "student"
    result = run_main("--resume", tmp_path / "teacher.pth", "--model", "SLaK_tiny", "--Decom",
                      str(teacher_decom), "--kernel_size", *map(str, TEACHER_KERNELS),
                      "--width_factor", "0.25", "--distill_type", "KD", "--T", "3.0",
                      "--model_s", "SLaK_tiny", "--sparse", "--sparsity", "0.4", "-u", "2",
                      *extra, "--model_ema", "true", "--batch_size", "8", "--epochs", "1",
                      "--num_workers", "0", "--disable_eval", "true", "--output_dir", out,
                      *SYNTHETIC_CPU, "--synthetic_train_size", "32")
    assert "[sparse] init" in result.stdout and "[sparse] step 2" in result.stdout

    saved = torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    student = SLaK.SLaK(depths=(3, 3, 9, 3), num_classes=10, **STUDENT_OVERRIDES)
    student.load_state_dict(saved["model"])
    masks = saved["masks"]
    assert masks and set(masks) <= set(saved["model"])
    if "--only-L" in extra:
        assert all(k.endswith(".lkb_origin.conv.weight") for k in masks) and len(masks) == 18
    else:
        assert any(k.endswith("pwconv1.weight") for k in masks)
    for key, mask in masks.items():
        assert mask.shape == saved["model"][key].shape and 0 < mask.float().mean() < 0.99
        assert not saved["model"][key][~mask].any() and not saved["model_ema"][key][~mask].any()


@pytest.mark.parametrize("extra,message", [
    (["--distill_type", "NKD"], "needs the teacher's weights: pass --resume"),
    (["--distill_type", "KD", "--resume", "/nonexistent/teacher.pth"], "teacher's checkpoint not found"),
    (["--distill_type", "None", "--model_s", "no_such_net"], "--model_s no_such_net: unknown model"),
    (["--distill_type", "None", "--distill_resume", "--sparse", "--sparse_init", "resume"],
     "--sparse_init resume takes the masks from the zeros of a checkpoint"),
])
def test_bad_distillation_flags_fail_in_one_line(tmp_path, extra, message):
    result = run_main("--model", "SLaK_tiny", *SYNTHETIC_CPU, "--num_workers", "0",
                      "--output_dir", tmp_path / "out", *extra, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_teacher_checkpoint_of_other_flags_is_one_line(tmp_path):
    teacher = SLaK.SLaK(depths=(3, 3, 9, 3), num_classes=10, kernel_size=TEACHER_KERNELS,
                        width_factor=0.25, Decom=True)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    result = run_main("--model", "SLaK_tiny", "--kernel_size", *map(str, TEACHER_KERNELS),
                      "--width_factor", "0.5", "--Decom", "true", "--distill_type", "KD",
                      "--resume", tmp_path / "teacher.pth", *SYNTHETIC_CPU, "--num_workers", "0",
                      check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "--width_factor 0.25" in lines[0] and "--width_factor 0.5" in lines[0], \
        result.stderr
