"""Peak GPU memory of one distillation step against a student training step plus teacher inference.

The teacher runs without autograd, so a distillation step should need no more memory than the
student's own training step plus the teacher's inference. With the teacher, the student
and the optimizer state resident throughout, each case is measured as the peak allocated memory
above that common baseline:

    python benchmarks/distill_memory.py --batch 64 --dtype bf16 --distill_type NKD NKD_FD KD

Defaults: teacher SLaK-T width 1.3, kernels 51 49 47 13 5, Decom (the README's teacher); student
ConvNeXt-T width 1 (``--model_s SLaK_tiny``); 224x224. Prints one JSON line per distillation type
with ``within_bound: distill_step <= student_step + teacher_inference``. ``--device cpu`` only
runs the same steps (no memory figures), as a smoke test of this script.
"""
import argparse
import json
import sys
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F

import SLaK  # noqa: F401 - registers the SLaK models
from distillation import (DISTILL_MODES, STUDENT_OVERRIDES, FeatureDistillLoss,
                          DistillationLoss, add_param_groups, freeze)

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="SLaK_tiny", help="teacher")
    parser.add_argument("--kernel_size", type=int, nargs=5, default=[51, 49, 47, 13, 5])
    parser.add_argument("--width_factor", type=float, default=1.3)
    parser.add_argument("--model_s", default="SLaK_tiny", help="student (built as a ConvNeXt)")
    parser.add_argument("--distill_type", nargs="+", default=["NKD", "NKD_FD"],
                        choices=[t for t, mode in DISTILL_MODES.items() if mode.uses_teacher])
    parser.add_argument("--T", type=float, default=3.0, help="KD/NKD temperature")
    parser.add_argument("--alpha", type=float, default=1.0, help="KD: weight of the KD term")
    parser.add_argument("--hard", action="store_true", help="KD with the teacher's hard labels")
    parser.add_argument("--nb_classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="steps per case (peak over all)")
    return parser.parse_args()


def peak_above_baseline_mib(step, device, repeats):
    """Run ``step`` once to allocate lazily created state, then report the peak of ``repeats``
    more runs above the memory allocated before them (None on CPU)."""
    step()
    if device.type != "cuda":
        for _ in range(repeats):
            step()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2 ** 20


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/distill_memory.py: no CUDA GPU here; run it on one, or pass "
                 "--device cpu for a smoke test without memory figures")
    amp_dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    teacher = freeze(timm.create_model(args.model, num_classes=args.nb_classes,
                                       kernel_size=args.kernel_size, width_factor=args.width_factor,
                                       Decom=True).to(device))
    student = timm.create_model(args.model_s, num_classes=args.nb_classes, drop_path_rate=0.1,
                                **STUDENT_OVERRIDES).to(device).train()
    feature_loss = FeatureDistillLoss(student.num_features, teacher.num_features).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    add_param_groups(optimizer, feature_loss, 0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    images = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device)
    targets = torch.randint(0, args.nb_classes, (args.batch,), device=device)

    def train_step(loss_fn):
        with autocast:
            loss, _ = loss_fn(student, images, targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def teacher_inference():
        with torch.no_grad(), autocast:
            teacher(images)

    supervised = DistillationLoss("None", student, None, F.cross_entropy)
    student_mib = peak_above_baseline_mib(lambda: train_step(supervised), device, args.repeats)
    teacher_mib = peak_above_baseline_mib(teacher_inference, device, args.repeats)
    for distill_type in args.distill_type:
        mode = DISTILL_MODES[distill_type]
        logit_loss = mode.logit_loss(args, F.cross_entropy) if mode.logit_loss else None
        loss_fn = DistillationLoss(distill_type, student, teacher, F.cross_entropy, logit_loss,
                                   feature_loss if mode.features else None, 3e-5)
        distill_mib = peak_above_baseline_mib(lambda: train_step(loss_fn), device, args.repeats)
        for tap in (loss_fn.student_tap, loss_fn.teacher_tap):
            if tap is not None:
                tap.handle.remove()
        result = dict(distill_type=distill_type, batch=args.batch, input_size=args.input_size,
                      dtype=args.dtype, teacher=f"{args.model} w{args.width_factor} "
                      f"{args.kernel_size}", student=f"{args.model_s} (ConvNeXt)",
                      student_step_mib=student_mib, teacher_inference_mib=teacher_mib,
                      distill_step_mib=distill_mib,
                      device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        if distill_mib is not None:
            result["bound_mib"] = student_mib + teacher_mib
            result["within_bound"] = distill_mib <= student_mib + teacher_mib
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
