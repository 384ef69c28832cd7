"""Gradient checkpointing (``set_grad_checkpointing`` / ``--grad_checkpointing true``): the same
gradients, BatchNorm statistics and DropPath draws as the plain forward, eagerly, compiled and
through main.py with dynamic sparsity."""
import copy

import pytest
import timm
import torch

import SLaK  # noqa: F401 - registers the SLaK models
from conftest import SYNTHETIC, TINY_MODEL, run_main, torchrun


def tiny_slak(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("SLaK_tiny", width_factor=0.25, kernel_size=[13, 11, 9, 7, 3],
                             Decom=True, num_classes=4, depths=[1, 1, 2, 1], **kwargs)


def train_step(model, x, compile_model=False):
    """Gradients and buffers after one forward + backward in train mode (DropPath seeded)."""
    forward = torch.compile(model) if compile_model else model
    torch.manual_seed(5)
    forward(x).square().sum().backward()
    return ({n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("bn", [True, False])
def test_checkpointed_gradients_and_statistics_equal_plain(bn):
    plain = tiny_slak(drop_path_rate=0.3, bn=bn)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    calls = []
    checkpointed.stages[2][1].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 3, 32, 32)
    grads, buffers = train_step(plain, x)
    grads_ckpt, buffers_ckpt = train_step(checkpointed, x)
    assert len(calls) == 2  # the block ran again in the backward pass
    # DropPath drew the same samples in the recomputation (a different draw changes the grads),
    # and BatchNorm counted the batch once.
    assert all(torch.equal(grads[k], grads_ckpt[k]) for k in grads)
    assert all(torch.equal(buffers[k], buffers_ckpt[k]) for k in buffers)


def test_checkpointed_compiled_gradients_equal_plain_eager():
    plain = tiny_slak(drop_path_rate=0.3)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(2, 3, 32, 32)
    grads, buffers = train_step(plain, x)
    grads_ckpt, buffers_ckpt = train_step(checkpointed, x, compile_model=True)
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-4, atol=1e-5)
    for k in buffers:
        torch.testing.assert_close(buffers_ckpt[k], buffers[k])


def test_main_grad_checkpointing_sparse_run_equals_plain_run(tmp_path):
    common = [*TINY_MODEL, *SYNTHETIC, "--epochs", "1", "--batch_size", "16",
              "--synthetic_train_size", "96", "--disable_eval", "true", "--warmup_epochs", "0",
              "--drop_path", "0.2", "--sparse", "--sparsity", "0.4", "--growth", "gradient",
              "-u", "2", "--auto_resume", "false"]
    run_main(*common, "--output_dir", tmp_path / "plain")
    result = run_main(*common, "--grad_checkpointing", "true", "--output_dir", tmp_path / "ckpt")
    assert "pin_memory" not in result.stderr  # no pin-memory warning on a CPU-only run
    plain, ckpt = (torch.load(tmp_path / d / "checkpoint-0.pth", map_location="cpu",
                              weights_only=True) for d in ("plain", "ckpt"))
    assert plain["model"].keys() == ckpt["model"].keys()
    for k in plain["model"]:
        torch.testing.assert_close(ckpt["model"][k], plain["model"][k], rtol=1e-5, atol=1e-6)


def test_ddp_grad_checkpointing_run_equals_plain_ddp_run(tmp_path):
    # Two processes (gloo on the CPU): DDP's gradient hooks fire once per parameter although the
    # blocks run twice.
    common = [*TINY_MODEL, *SYNTHETIC, "--epochs", "1", "--batch_size", "8",
              "--synthetic_train_size", "64", "--disable_eval", "true", "--warmup_epochs", "0",
              "--drop_path", "0.2", "--sparse", "-u", "2", "--auto_resume", "false"]
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        run_main(*common, "--grad_checkpointing", flag, "--output_dir", tmp_path / name,
                 launcher=torchrun(2))
    plain, ckpt = (torch.load(tmp_path / d / "checkpoint-0.pth", map_location="cpu",
                              weights_only=True)["model"] for d in ("plain", "ckpt"))
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6)
