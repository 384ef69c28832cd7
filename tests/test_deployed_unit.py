"""The deployed large-kernel unit (two biased convolutions summed, ``depthwise_conv2d_sum``) in
one pass, against the two convolutions in float64.

On a machine without CUDA the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``
per test, as in test_lk_conv.py); each test checks which kernels actually ran.
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the kernels under test are Triton kernels")

from conftest import CUDA, DEVICE, KERNEL_TOL as TOL, rel_err  # noqa: E402
from depthwise_conv2d_implicit_gemm import depthwise_conv2d_sum, heuristics  # noqa: E402
from depthwise_conv2d_implicit_gemm.reference import depthwise_conv2d_reference  # noqa: E402
from SLaK import LargeKernelUnit  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_kernels")


def reference_sum(x, weight_a, bias_a, weight_b, bias_b):
    x = x.double()
    return (depthwise_conv2d_reference(x, weight_a.double(), bias_a.double()) +
            depthwise_conv2d_reference(x, weight_b.double(), bias_b.double()))


def random_operands(shape, kernel_a, kernel_b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    tensors = (torch.randn(shape, generator=g), torch.randn(c, 1, *kernel_a, generator=g) * 0.1,
               torch.randn(c, generator=g), torch.randn(c, 1, *kernel_b, generator=g) * 0.1,
               torch.randn(c, generator=g))
    return tuple(t.to(DEVICE, dtype) for t in tensors)


CROSS_CASES = [
    ((2, 3, 20, 24), (13, 5), (5, 13)),    # SLaK's tall + wide pair, on a non-square map
    ((3, 2, 9, 17), (51, 3), (3, 51)),     # kernels far larger than the image
    ((5, 2, 12, 10), (5, 13), (13, 5)),    # wide kernel first: the op orders them itself
    ((1, 1, 40, 33), (51, 5), (5, 51)),    # one image, one channel, 64-wide tiles
    ((2, 2, 16, 64), (7, 7), (1, 9)),      # square and one-row kernels
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,kernel_a,kernel_b", CROSS_CASES)
def test_one_pass_matches_the_two_convolutions(shape, kernel_a, kernel_b, dtype, launched):
    x, wa, ba, wb, bb = random_operands(shape, kernel_a, kernel_b, dtype, seed=sum(shape))
    with torch.no_grad():
        y = depthwise_conv2d_sum(x, wa, ba, wb, bb)
    assert launched.count("dwconv_cross_kernel") == 1
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, reference_sum(x, wa, ba, wb, bb)) < TOL[dtype]


def test_image_groups_with_a_partial_last_group(launched, monkeypatch):
    """Programs take several whole images; the last one gets fewer than the rest."""
    monkeypatch.setattr(heuristics, "TUNING",
                        dataclasses.replace(heuristics.TUNING, cross_tile_elements=4 * 16 * 16))
    x, wa, ba, wb, bb = random_operands((7, 2, 11, 13), (13, 3), (3, 13), torch.float32, seed=1)
    with torch.no_grad():
        y = depthwise_conv2d_sum(x, wa, ba, wb, bb)
    assert launched.count("dwconv_cross_kernel") == 1
    assert rel_err(y, reference_sum(x, wa, ba, wb, bb)) < TOL[torch.float32]


@pytest.mark.parametrize("shape,expected", [
    ((3, 4, 7, 7), ["dwconv_plane_fwd_kernel"]),                      # added kernels, one plane pass
    ((1, 2, 3, 70), ["dwconv_fwd_kernel", "dwconv_fwd_kernel"]),       # lines over 64: separate
])
def test_small_and_long_maps(shape, expected, launched):
    x, wa, ba, wb, bb = random_operands(shape, (13, 5), (5, 13), torch.float32, seed=2)
    with torch.no_grad():
        y = depthwise_conv2d_sum(x, wa, ba, wb, bb)
    assert [n for n in launched if n != "dwconv_toeplitz_kernel"] == expected
    assert rel_err(y, reference_sum(x, wa, ba, wb, bb)) < TOL[torch.float32]


def test_channels_last_input_gives_channels_last_output(launched):
    x, wa, ba, wb, bb = random_operands((2, 3, 20, 24), (13, 5), (5, 13), torch.float32, seed=3)
    with torch.no_grad():
        y = depthwise_conv2d_sum(x.to(memory_format=torch.channels_last), wa, ba, wb, bb)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert "dwconv_cross_kernel" in launched
    assert rel_err(y, reference_sum(x, wa, ba, wb, bb)) < TOL[torch.float32]


def test_with_autograd_it_is_two_differentiable_convolutions(launched):
    x, wa, ba, wb, bb = random_operands((2, 3, 20, 24), (13, 5), (5, 13), torch.float32, seed=4)
    wa.requires_grad_()
    y = depthwise_conv2d_sum(x, wa, ba, wb, bb)
    y.sum().backward()
    assert "dwconv_cross_kernel" not in launched and wa.grad is not None
    assert rel_err(y, reference_sum(x, wa, ba, wb, bb)) < TOL[torch.float32]


def deployed_unit(channels, kernel):
    torch.manual_seed(5)
    unit = LargeKernelUnit(channels, kernel, 5, Decom=True).to(DEVICE)
    for bn in (m for m in unit.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    trained = unit.eval()
    deployed = LargeKernelUnit(channels, kernel, 5, Decom=True).to(DEVICE).eval()
    deployed.load_state_dict(trained.state_dict())
    deployed.reparameterize()
    return trained, deployed


def test_deployed_unit_runs_one_pass_and_matches_the_trained_form(launched):
    trained, deployed = deployed_unit(3, 13)
    x = torch.randn(2, 3, 18, 20, device=DEVICE)
    with torch.no_grad():
        ref = trained.double()(x.double())
        launched.clear()
        y = deployed(x)
    assert launched.count("dwconv_cross_kernel") == 1
    assert rel_err(y, ref) < 1e-5


def test_hooks_on_the_deployed_convolutions_still_fire(launched):
    """The FLOPs counter counts convolutions through forward hooks: a hooked unit runs its
    convolutions as modules."""
    _, deployed = deployed_unit(3, 13)
    seen = []
    deployed.LoRA1.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    deployed.LoRA2.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # a branch's
    with torch.no_grad():
        deployed(torch.randn(1, 3, 18, 20, device=DEVICE))
    assert len(seen) == 2 and "dwconv_cross_kernel" not in launched
    seen.clear()
    _, deployed = deployed_unit(3, 13)
    deployed.LoRA2.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape))
    with torch.no_grad():
        deployed(torch.randn(1, 3, 18, 20, device=DEVICE))
    assert len(seen) == 1 and "dwconv_cross_kernel" not in launched


def test_compiled_deployed_unit_traces_the_sum_op_without_graph_breaks(launched):
    _, deployed = deployed_unit(3, 13)
    compiled = torch.compile(deployed, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    x = torch.randn(2, 3, 18, 20, device=DEVICE)
    with torch.no_grad():
        y = compiled(x)
        launched_compiled = list(launched)
        ref = deployed(x)
    assert "dwconv_cross_kernel" in launched_compiled
    assert rel_err(y, ref) < 1e-6


def test_the_sum_op_called_directly_refuses_maps_it_does_not_cover(launched):
    """``depthwise_conv2d_sum`` sends maps over 64x64 pixels to two convolutions; the custom op
    itself, reachable as ``torch.ops.slak.dwconv2d_sum``, says so instead of misusing a kernel."""
    x = torch.randn(1, 2, 65, 40, device=DEVICE)
    weight_a = torch.randn(2, 1, 5, 1, device=DEVICE)
    weight_b = torch.randn(2, 1, 1, 5, device=DEVICE)
    with pytest.raises(ValueError, match="at most 64x64 pixels, not 65x40"):
        torch.ops.slak.dwconv2d_sum(x, weight_a, None, weight_b, None)
    assert launched == []
    reference = depthwise_conv2d_reference(x, weight_a) + depthwise_conv2d_reference(x, weight_b)
    assert rel_err(depthwise_conv2d_sum(x, weight_a, None, weight_b, None), reference) < 1e-5
