"""Behaviours that follow the original release: optimizer groups and layer decay, resuming the
original's own checkpoints (optimizer state, EMA), --finetune with --model_prefix, evaluation
resizing. See docs/fidelity.md."""
import argparse

import pytest
import torch
import timm
from PIL import Image

import SLaK  # noqa: F401 - registers the family
from conftest import SYNTHETIC, TINY_MODEL, run_main
from datasets import build_transform
from checkpoint import restore_training_state
from optim_factory import create_optimizer, layer_id

COMMON = [*TINY_MODEL, *SYNTHETIC, "--batch_size", "16", "--synthetic_train_size", "32",
          "--synthetic_val_size", "16", "--warmup_epochs", "0", "--mixup", "0", "--cutmix", "0",
          "--reprob", "0", "--aa", "None"]


def tiny():
    return timm.create_model("SLaK_tiny", num_classes=4, width_factor=0.25, Decom=True,
                             kernel_size=[13, 11, 9, 7, 3])


def optimizer_args(**kwargs):
    base = dict(opt="adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, layer_decay=1.0,
                opt_eps=1e-8, opt_betas=None, device="cpu")
    base.update(kwargs)
    return argparse.Namespace(**base)


def test_layer_ids_and_groups_are_the_originals():
    ids = {"downsample_layers.0.0.weight": 0, "stages.0.2.gamma": 1, "downsample_layers.1.1.weight": 2,
           "stages.1.0.pwconv1.bias": 2, "downsample_layers.2.0.weight": 3, "stages.2.0.gamma": 3,
           "stages.2.2.pwconv2.weight": 3, "stages.2.3.norm.weight": 4, "stages.2.8.gamma": 5,
           "stages.2.26.gamma": 11, "downsample_layers.3.1.bias": 12, "stages.3.2.gamma": 12,
           "norm.weight": 13, "head.weight": 13}
    assert {k: layer_id(k) for k in ids} == ids
    model = tiny()
    names = {id(p): n for n, p in model.named_parameters()}
    # No layer decay: [decay, no decay], parameters in named_parameters order.
    decay, no_decay = create_optimizer(optimizer_args(), model).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith(".bias")}
    assert any(names[id(p)].endswith("gamma") for p in no_decay["params"])
    # Layer decay above 1 too: scale layer_decay ** (13 - id).
    for value in (0.7, 1.3):
        for group in create_optimizer(optimizer_args(layer_decay=value), model).param_groups:
            for p in group["params"]:
                assert group["lr_scale"] == pytest.approx(value ** (13 - layer_id(names[id(p)])))
                assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def write_original_checkpoint(path, steps=2):
    """A mid-training checkpoint as the original wrote it: weights, an AdamW over the groups
    [decay, no decay] built the original's way, epoch and args; no EMA, no masks."""
    torch.manual_seed(3)
    model = tiny()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05, "lr_scale": 1.0},
                                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}],
                                  lr=1e-3)
    for _ in range(steps):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                "args": argparse.Namespace(model="SLaK_tiny"), "scaler": {}}, path)
    return model


def test_resume_original_checkpoint_continues_optimizer_and_starts_ema_from_it(tmp_path):
    original = write_original_checkpoint(tmp_path / "original.pth")
    result = run_main(*COMMON, "--epochs", "2", "--resume", tmp_path / "original.pth",
                      "--model_ema", "true", "--model_ema_decay", "0.99999",
                      "--output_dir", tmp_path / "out")
    assert "Resuming training at epoch 1" in result.stdout
    ckpt = torch.load(tmp_path / "out" / "checkpoint-1.pth", weights_only=False)
    steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {2.0 + 2}  # the original's 2 steps, then 2 of this epoch (32 images / 16)
    # The EMA started from the checkpoint's weights (decay ~1: it has barely moved from them).
    ema, start = ckpt["model_ema"], original.state_dict()
    num = sum(float((ema[k] - start[k]).pow(2).sum()) for k in start if start[k].is_floating_point())
    den = sum(float(start[k].pow(2).sum()) for k in start if start[k].is_floating_point())
    assert (num / den) ** 0.5 < 1e-3


def test_finetune_strips_model_prefix_and_rejects_no_match(tmp_path):
    model = tiny()
    torch.save({"model": {"backbone." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "prefixed.pth")
    result = run_main(*COMMON, "--eval", "true", "--finetune", tmp_path / "prefixed.pth",
                      "--model_prefix", "backbone.")
    assert "missing keys []" in result.stdout
    bad = run_main(*COMMON, "--eval", "true", "--finetune", tmp_path / "prefixed.pth",
                   check=False)
    assert bad.returncode == 2 and "pass --model_prefix backbone." in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("size", [224, 384])
def test_eval_resize_as_the_original(size):
    image = Image.new("RGB", (3 * size // 2, size))
    image.paste((255, 0, 0), (0, 0, 3 * size // 16, size))  # a red band on the left eighth
    args = argparse.Namespace(input_size=size, crop_pct=None, imagenet_default_mean_and_std=True,
                              prefetcher=False)
    out = build_transform(False, args)(image)
    assert out.shape == (3, size, size)
    red_left = out[0, size // 2, 0] > out[0, size // 2, size // 2]
    # From 384 px the whole (non-square) image is warped to the square: the red band stays in
    # view; below 384 px the centre crop cuts it away.
    assert bool(red_left) == (size >= 384)


def test_main_accepts_the_originals_sparse_flags(tmp_path):
    result = run_main(*COMMON, "--epochs", "1", "--sparse", "--sparse_init", "uniform",
                      "--growth", "momentum_neuron", "--redistribution", "magnitude", "-u", "1",
                      "--prune_rate", "0.5", "--sparse_zero_state", "true")
    assert "[sparse] step 1:" in result.stdout and "[sparse] step 2:" in result.stdout
    help_text = run_main("--help").stdout
    assert "never redistributed" in help_text and "--sparse_zero_state" in help_text


def test_resuming_an_unfused_optimizer_keeps_this_runs_fused_step(tmp_path):
    """The original's AdamW (or ours on the CPU) was unfused; on CUDA ours is fused, and
    GradScaler, told so at construction, leaves the unscaling to the fused step. Resuming must
    keep the step fused, or the first scaled step fails; and a checkpoint written without
    float16 AMP has no loss scale to restore."""
    write_original_checkpoint(tmp_path / "original.pth")  # its scaler state is empty: no AMP
    checkpoint = torch.load(tmp_path / "original.pth", weights_only=False)
    model = tiny()
    args = argparse.Namespace(eval=False, start_epoch=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # float16 AMP in this run
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    # Fused, as ours on CUDA (the CPU has a fused AdamW too).
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay}], lr=1e-3, fused=True)
    start = restore_training_state(checkpoint, "original.pth", args=args, model=model,
                                   optimizer=optimizer, scaler=scaler)[0]
    assert start == 1 and all(group["fused"] for group in optimizer.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 3, 32, 32)).float().sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
