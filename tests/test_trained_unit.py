"""The trained large-kernel unit in one pass (``fuse_unit``: ``depthwise_conv2d_unit`` and the
BatchNorms computed from its statistics) against the same unit's modules, in float64.

On a machine without CUDA the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``
per test); each test checks which kernels actually ran.
"""
import copy
import os

import pytest
import torch

pytest.importorskip("triton", reason="the kernels under test are Triton kernels")

from conftest import CUDA, DEVICE, KERNEL_TOL as TOL, rel_err, spawn_gloo_processes  # noqa: E402
from SLaK import LargeKernelUnit  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_kernels")


def trained_units(channels, kernel, small=5, momentum=0.1, seed=0):
    """A unit with non-trivial BatchNorm parameters and buffers, as the float64 reference and
    as a copy with ``fuse_unit`` on."""
    torch.manual_seed(seed)
    unit = LargeKernelUnit(channels, kernel, small, Decom=True)
    for bn in (m for m in unit.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = momentum
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(unit).double().to(DEVICE)
    fused = unit.to(DEVICE)
    fused.fuse_unit = True
    return fused, reference


def train_steps(unit, inputs, grads, dtype):
    """Forward and backward over each batch (no optimizer step); returns the last output and
    input gradient, the parameters' gradients accumulated over all batches."""
    autocast = torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32 and
                              next(unit.parameters()).dtype == torch.float32)
    for x, g in zip(inputs, grads):
        x = x.detach().requires_grad_()
        with autocast:
            y = unit(x)
        y.backward(g.to(y.dtype))
    return y, x.grad


def errors_against(unit, outputs, reference, reference_outputs):
    """Relative errors of the output, input gradient, parameter gradients and running
    statistics of ``unit`` against the float64 ``reference``."""
    (y, dx), (y_ref, dx_ref) = outputs, reference_outputs
    errors = {"y": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref)}
    for (name, p), p_ref in zip(unit.named_parameters(), reference.parameters()):
        errors[f"d{name}"] = rel_err(p.grad, p_ref.grad)
    for (name, b), b_ref in zip(unit.named_buffers(), reference.buffers()):
        if b.dtype.is_floating_point:
            errors[name] = rel_err(b, b_ref)
        else:
            assert torch.equal(b, b_ref), name
    return errors


def compare(fused, reference, shape, dtype, launched, channels_last=False, steps=2):
    inputs = [torch.randn(shape, device=DEVICE, dtype=torch.float64) for _ in range(steps)]
    grads = [torch.randn(shape, device=DEVICE, dtype=torch.float64) for _ in range(steps)]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    fused_in = [x.float().to(memory_format=layout) for x in inputs]
    if dtype == torch.float32 or not CUDA:
        # The interpreter has no half-precision autocast for these ops: cast the unit instead.
        fused_in = [x.to(dtype) for x in fused_in]
        fused.to(dtype)
    unfused = copy.deepcopy(fused)
    unfused.fuse_unit = False
    y, dx = train_steps(fused, fused_in, grads, dtype)
    assert launched.count("dwconv_cross_kernel") == 2 * steps   # forward, input gradient
    reference_out = train_steps(reference, inputs, grads, torch.float32)
    # In half precision, no less accurate than the modules themselves (with some slack).
    limits = errors_against(unfused, train_steps(unfused, fused_in, grads, dtype), reference,
                            reference_out)
    errors = errors_against(fused, (y, dx), reference, reference_out)
    tol = TOL[dtype]
    assert all(e < max(tol, 1.5 * limits[k]) for k, e in errors.items()), (errors, limits)
    # Eval mode: the running statistics, through the unfused path, agree too.
    with torch.no_grad():
        x = inputs[0].to(next(fused.parameters()).dtype)
        assert rel_err(fused.eval()(x), reference.eval()(inputs[0])) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_unit_trains_like_its_modules(dtype, channels_last, launched):
    fused, reference = trained_units(3, 13)
    compare(fused, reference, (2, 3, 12, 14), dtype, launched, channels_last)


@pytest.mark.parametrize("shape,kernel,small", [
    ((1, 2, 9, 7), 31, 5),      # one image, kernels larger than the map, non-square
    ((2, 1, 40, 33), 51, 5),    # one channel, 64-wide tiles
    ((3, 2, 11, 13), 13, 3),    # small kernel with fewer rows than the wide one
])
def test_fused_unit_on_odd_shapes(shape, kernel, small, launched):
    fused, reference = trained_units(shape[1], kernel, small, seed=sum(shape))
    compare(fused, reference, shape, torch.float32, launched)


def test_cumulative_average_without_momentum(launched):
    fused, reference = trained_units(2, 13, momentum=None)
    compare(fused, reference, (2, 2, 10, 12), torch.float32, launched, steps=3)


@pytest.mark.parametrize("change", ["no_bn", "no_decom", "eval", "long_map"])
def test_units_it_does_not_cover_run_their_modules(change, launched):
    torch.manual_seed(0)
    unit = LargeKernelUnit(2, 13, 5, Decom=change != "no_decom", bn=change != "no_bn",
                           fuse_unit=True).to(DEVICE)
    unit.train(change != "eval")
    x = torch.randn(2, 2, 10, 70 if change == "long_map" else 12, device=DEVICE,
                    requires_grad=True)
    reference = copy.deepcopy(unit).double()
    reference.fuse_unit = False
    y = unit(x)
    y.sum().backward()
    assert "dwconv_cross_kernel" not in launched
    assert rel_err(y, reference(x.detach().double())) < TOL[torch.float32]


def test_compiled_fused_unit_has_no_graph_breaks(launched):
    fused, reference = trained_units(3, 13)
    compiled = torch.compile(fused, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    x = torch.randn(2, 3, 12, 14, device=DEVICE, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    assert "dwconv_cross_kernel" in launched
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.square().sum().backward()
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(x.grad, x_ref.grad) < TOL[torch.float32]
    for b, b_ref in zip(fused.buffers(), reference.buffers()):
        assert rel_err(b, b_ref) < TOL[torch.float32]


# ------------------------------------------------------------------ SyncBatchNorm (gloo)
def _sync_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        fused, _ = trained_units(3, 13)
        fused = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fused)
        full = torch.randn(4, 3, 12, 14, generator=torch.Generator().manual_seed(7))
        grad = torch.randn(full.shape, generator=torch.Generator().manual_seed(8))
        x = full[2 * rank:2 * rank + 2].clone().requires_grad_()
        y = fused(x)
        y.backward(grad[2 * rank:2 * rank + 2])
        torch.save({"y": y.detach(), "dx": x.grad,
                    "grads": {n: p.grad for n, p in fused.named_parameters()},
                    "buffers": dict(fused.named_buffers())},
                   os.path.join(out_dir, f"rank{rank}.pth"))
        torch.distributed.barrier()   # no rank tears the group down while the other uses it
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(CUDA, reason="runs the kernels in the interpreter, on the CPU")
def test_synced_statistics_across_two_processes_match_one_batch(tmp_path):
    """SyncBatchNorm units on two ranks, each with half the batch, compute what one unit does
    on the whole batch: outputs, input gradients, the sum of the ranks' parameter gradients,
    and the running statistics."""
    spawn_gloo_processes(_sync_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]
    _, reference = trained_units(3, 13)
    full = torch.randn(4, 3, 12, 14, generator=torch.Generator().manual_seed(7)).double()
    grad = torch.randn(full.shape, generator=torch.Generator().manual_seed(8)).double()
    full.requires_grad_()
    y = reference(full)
    y.backward(grad)
    tol = TOL[torch.float32]
    assert rel_err(torch.cat([r["y"] for r in ranks]), y) < tol
    assert rel_err(torch.cat([r["dx"] for r in ranks]), full.grad) < tol
    for name, p in reference.named_parameters():
        assert rel_err(ranks[0]["grads"][name] + ranks[1]["grads"][name], p.grad) < tol, name
    for name, b in reference.named_buffers():
        for r in ranks:
            assert rel_err(r["buffers"][name], b) < tol, name


def test_main_trains_the_same_with_fuse_unit(tmp_path, monkeypatch, launched):
    """``main.py --fuse_unit true`` (every unit of a narrow SLaK-T fuses at 32x32 inputs) takes
    the same SGD step and keeps the same BatchNorm statistics as the run without it."""
    import main
    from conftest import SYNTHETIC, TINY_MODEL
    common = [*TINY_MODEL, *SYNTHETIC, "--device", DEVICE, "--width_factor", "0.05", "--warmup_epochs", "0",
              "--drop_path", "0", "--mixup", "0", "--cutmix", "0", "--aa", "None", "--reprob",
              "0", "--smoothing", "0", "--color_jitter", "0", "--epochs", "1", "--batch_size",
              "8", "--synthetic_train_size", "8", "--disable_eval", "true", "--opt", "momentum",
              "--momentum", "0", "--lr", "0.05", "--layer_scale_init_value", "1"]
    outputs = {fuse: tmp_path / fuse for fuse in ("false", "true")}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    main.cli([*common, "--output_dir", str(outputs["false"])])
    assert "dwconv_cross_kernel" not in launched
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    main.cli([*common, "--fuse_unit", "true", "--output_dir", str(outputs["true"])])
    assert launched.count("dwconv_cross_kernel") == 2 * 18  # one step: forward, input gradient

    def weights(fuse):
        return torch.load(outputs[fuse] / "checkpoint-0.pth", map_location="cpu",
                          weights_only=True)["model"]
    plain, fused = weights("false"), weights("true")
    torch.manual_seed(0)
    initial = main.build_model(main.get_args_parser().parse_args(common), "SLaK_tiny", 4).state_dict()
    assert plain.keys() == fused.keys()
    for key in plain:
        if not plain[key].dtype.is_floating_point:
            assert torch.equal(fused[key], plain[key]), key
            continue
        step, step_fused = plain[key] - initial[key], fused[key] - initial[key]
        assert step.norm() > 0, key   # every weight and BatchNorm statistic moved
        assert ((step_fused - step).norm() / step.norm()).item() < 1e-3, key
