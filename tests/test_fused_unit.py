"""The large-kernel unit with its wide and small branches in one pass (``depthwise_conv2d_pair``)
against the same unit with separate convolutions, evaluated in float64.

On a machine without CUDA the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``
per test, as in test_lk_conv.py); each test checks that the pair kernel actually ran.
"""
import copy

import pytest
import torch

pytest.importorskip("triton", reason="the kernels under test are Triton kernels")

from conftest import CUDA, DEVICE, KERNEL_TOL as TOL, rel_err  # noqa: E402
from depthwise_conv2d_implicit_gemm import can_pair, depthwise_conv2d_pair  # noqa: E402
from depthwise_conv2d_implicit_gemm.reference import depthwise_conv2d_reference  # noqa: E402
from SLaK import LargeKernelUnit  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel,small", [
    ((2, 3, 9, 12), (5, 13), (5, 5)),      # SLaK's (s, K) + (s, s), kernel wider than the image
    ((1, 1, 10, 12), (7, 7), (3, 3)),      # one image, one channel; (K, K) + (s, s)
    ((2, 2, 12, 9), (3, 31), (3, 1)),      # small kernel narrower than tall
    ((2, 2, 11, 70), (5, 51), (5, 5)),     # lines longer than one 64-wide tile
])
def test_pair_matches_two_single_convolutions(shape, kernel, small, dtype, launched):
    torch.manual_seed(sum(shape) + kernel[1])
    x = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
    w = torch.randn(shape[1], 1, *kernel, device=DEVICE).to(dtype).requires_grad_()
    ws = torch.randn(shape[1], 1, *small, device=DEVICE).to(dtype).requires_grad_()
    assert can_pair(x, w, ws)
    y, ys = depthwise_conv2d_pair(x, w, ws)
    g, gs = torch.randn_like(y), torch.randn_like(ys)
    torch.autograd.backward((y, ys), (g, gs))
    assert "dwconv_pair_kernel" in launched and y.dtype == ys.dtype == dtype

    xr, wr, wsr = (t.detach().double().requires_grad_() for t in (x, w, ws))
    yr, ysr = depthwise_conv2d_reference(xr, wr), depthwise_conv2d_reference(xr, wsr)
    torch.autograd.backward((yr, ysr), (g.double(), gs.double()))
    errors = dict(y=rel_err(y, yr), y_small=rel_err(ys, ysr), dx=rel_err(x.grad, xr.grad),
                  dw=rel_err(w.grad, wr.grad), dw_small=rel_err(ws.grad, wsr.grad))
    assert all(e < TOL[dtype] for e in errors.values()), errors


def test_pair_with_one_output_unused(launched):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 12, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 1, 5, 13, device=DEVICE, requires_grad=True)
    ws = torch.randn(3, 1, 5, 5, device=DEVICE, requires_grad=True)
    y, _ = depthwise_conv2d_pair(x, w, ws)
    y.square().sum().backward()
    xr = x.detach().double().requires_grad_()
    depthwise_conv2d_reference(xr, w.detach().double()).square().sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-5
    assert ws.grad is None or not ws.grad.any()


def test_only_wide_line_kernels_pair():
    x = torch.randn(2, 3, 9, 12, device=DEVICE)
    w = lambda *k: torch.randn(3, 1, *k, device=DEVICE)  # noqa: E731
    assert can_pair(x, w(5, 13), w(5, 5))
    assert not can_pair(x, w(13, 5), w(5, 5))          # tall: its own (transposed) path
    assert not can_pair(x, w(5, 13), w(7, 7))          # small kernel taller than the big one
    assert not can_pair(x[:, :, :7, :7], w(5, 13), w(5, 5))   # 49 pixels: whole-plane kernels


def units(Decom, bn, memory_format):
    torch.manual_seed(11)
    fused = LargeKernelUnit(3, 13, 3, Decom=Decom, bn=bn)
    fused.fuse_small = True
    for m in fused.modules():   # non-trivial BatchNorm parameters and statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.normal_()
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    separate = copy.deepcopy(fused).double()
    separate.fuse_small = False
    return fused.to(DEVICE, memory_format=memory_format), separate.to(DEVICE)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("Decom,bn", [(True, True), (False, True), (True, False)])
def test_unit_matches_the_separate_branches_in_float64(Decom, bn, memory_format, launched):
    """Output, input gradient, every weight and BatchNorm gradient and the running statistics
    in training mode, then the output in eval mode."""
    fused, separate = units(Decom, bn, memory_format)
    x = torch.randn(2, 3, 9, 11, device=DEVICE).contiguous(memory_format=memory_format)
    x.requires_grad_()
    xr = x.detach().double().requires_grad_()
    out, ref = fused(x), separate(xr)
    assert "dwconv_pair_kernel" in launched
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(x.grad, xr.grad) < 1e-5
    for (name, p), q in zip(fused.named_parameters(), separate.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5, name
    for (name, b), r in zip(fused.named_buffers(), separate.buffers()):
        assert rel_err(b, r) < 1e-6, name
    fused.eval(), separate.eval()
    with torch.no_grad():
        assert rel_err(fused(x), separate(xr)) < 1e-5


def test_compiled_unit_traces_the_pair_op_without_graph_breaks(launched):
    fused, separate = units(True, True, torch.contiguous_format)
    compiled = torch.compile(fused, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    x = torch.randn(2, 3, 9, 11, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.square().sum().backward()
    assert "dwconv_pair_kernel" in launched
    xr = x.detach().double().requires_grad_()
    ref = separate(xr)
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5 and rel_err(x.grad, xr.grad) < 1e-5


def test_model_with_fuse_small_trains_like_the_plain_model(launched):
    """``timm.create_model(..., fuse_small=True)``: the same outputs and gradients as the
    default model with the same weights (stage 1, 9x9, runs the pair kernel; the smaller
    stages fall back to the separate whole-plane kernels)."""
    import timm
    kwargs = dict(width_factor=0.1, kernel_size=[13, 11, 9, 7, 3], Decom=True, num_classes=4,
                  depths=[1, 1, 1, 1])
    torch.manual_seed(0)
    fused = timm.create_model("SLaK_tiny", fuse_small=True, **kwargs).to(DEVICE)
    plain = timm.create_model("SLaK_tiny", **kwargs).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 36, 36, device=DEVICE)
    out = fused(x)
    assert "dwconv_pair_kernel" in launched
    ref = plain(x)
    assert rel_err(out, ref) < 1e-5
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name
