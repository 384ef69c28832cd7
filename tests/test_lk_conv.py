"""Large-kernel depthwise convolution: the Triton kernels against a float64 ``F.conv2d``.

On a machine without CUDA every test runs the real Triton kernels in Triton's interpreter
(``TRITON_INTERPRET=1`` is set per test, so other test modules keep the plain CPU fallback);
each numerical test asserts that kernels were launched, so a silent fallback cannot pass.
With CUDA the same tests run the compiled kernels on the GPU.
"""
import dataclasses
import random
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton", reason="the kernels under test are Triton kernels")

from conftest import CUDA, DEVICE, KERNEL_TOL as TOL, rel_err  # noqa: E402
from depthwise_conv2d_implicit_gemm import DepthWiseConv2dImplicitGEMM, depthwise_conv2d
from depthwise_conv2d_implicit_gemm import external, heuristics, plans
from depthwise_conv2d_implicit_gemm.heuristics import TRANSPOSED, choose_strategy
from depthwise_conv2d_implicit_gemm.reference import (depthwise_conv2d_reference,
                                                      depthwise_conv2d_reference_grads)

TOL_TF32 = 2e-3


pytestmark = pytest.mark.usefixtures("triton_kernels")


@contextmanager
def launches(**tuning):
    """The launch plans run inside the block, in order (a spy on ``plans.launch``), with the
    heuristic's ``Tuning`` fields changed as given."""
    launched = []
    real_launch, real_tuning = plans.launch, heuristics.TUNING

    def spy(plan, tensors):
        launched.append(plan)
        real_launch(plan, tensors)
    plans.launch = spy
    heuristics.TUNING = dataclasses.replace(real_tuning, **tuning)
    try:
        yield launched
    finally:
        plans.launch, heuristics.TUNING = real_launch, real_tuning


def ran_forward_and_both_gradients(launched):
    names = [p.name for p in launched]
    return sum(n.endswith("fwd_kernel") for n in names) >= 2 and any("wgrad" in n for n in names)



def check_against_reference(x, weight, bias, dtype, tol=None, tuning=None):
    """Forward, input/weight/bias gradients of ``depthwise_conv2d`` vs float64 ``F.conv2d``.

    ``x`` may be any view; the reference sees the same values rounded to ``dtype``."""
    tol = tol or TOL[dtype]
    x = x.to(dtype).requires_grad_()
    w = weight.to(DEVICE, dtype).requires_grad_()
    b = bias.to(DEVICE, dtype).requires_grad_() if bias is not None else None
    with launches(**(tuning or {})) as launched:
        y = depthwise_conv2d(x, w, b)
        gy = torch.randn(y.shape, device=DEVICE, dtype=torch.float64)
        y.backward(gy.to(dtype))
    assert ran_forward_and_both_gradients(launched), "Triton path did not run"
    assert y.dtype == dtype and y.shape == x.shape

    xr, wr = x.detach().double(), w.detach().double()
    br = b.detach().double() if b is not None else None
    yr = depthwise_conv2d_reference(xr, wr, br)
    dxr, dwr, dbr = depthwise_conv2d_reference_grads(xr, wr, br, gy.to(dtype).double())
    errors = {"y": rel_err(y, yr), "dx": rel_err(x.grad, dxr), "dw": rel_err(w.grad, dwr)}
    if b is not None:
        errors["db"] = rel_err(b.grad, dbr)
    assert all(e < tol for e in errors.values()), f"{tuple(x.shape)} {tuple(w.shape)}: {errors}"
    return y


def random_cases(count, seed):
    """Shapes from the issue's ranges: batch 1..3, channels 1..17, sizes 1..40 (non-square,
    often smaller than the kernel), kernels (k, s) or (s, k) with k up to 51 and s in 1..7."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        k, s = rng.choice(range(1, 52, 2)), rng.choice(range(1, 8, 2))
        kernel = (k, s) if rng.random() < 0.5 else (s, k)
        cases.append(((rng.randint(1, 3), rng.randint(1, 17), rng.randint(1, 40),
                       rng.randint(1, 40)), kernel, rng.random() < 0.5))
    return cases


EDGE_CASES = [
    ((2, 5, 14, 14), (47, 5), False),    # SLaK stage-3 branch, kernel far larger than the image
    ((1, 3, 7, 7), (5, 13), True),       # stage-4 branch
    ((3, 4, 1, 1), (51, 3), True),       # one pixel
    ((2, 3, 33, 40), (5, 5), False),     # the small branch
    ((1, 2, 9, 24), (7, 7), True),       # square kernel
    ((2, 17, 40, 3), (1, 51), False),    # single-row kernel, three-wide image
]


@pytest.mark.parametrize("shape,kernel,bias", EDGE_CASES + random_cases(8, seed=4))
def test_float32_matches_reference(shape, kernel, bias):
    torch.manual_seed(sum(shape) + sum(kernel))
    x = torch.randn(shape, device=DEVICE)
    check_against_reference(x, torch.randn(shape[1], 1, *kernel),
                            torch.randn(shape[1]) if bias else None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel,bias", random_cases(3, seed=11) + [EDGE_CASES[0]])
def test_half_precision_matches_reference(shape, kernel, bias, dtype):
    torch.manual_seed(sum(shape) + sum(kernel))
    x = torch.randn(shape, device=DEVICE)
    check_against_reference(x, torch.randn(shape[1], 1, *kernel),
                            torch.randn(shape[1]) if bias else None, dtype)


@pytest.mark.skipif(not CUDA, reason="TF32 exists on the GPU only")
def test_float32_tf32_matches_reference(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x = torch.randn(2, 6, 28, 28, device=DEVICE)
    check_against_reference(x, torch.randn(6, 1, 5, 49), None, torch.float32, tol=TOL_TF32)


@pytest.mark.parametrize("kernel", [(5, 51), (51, 5), (5, 5)])
def test_lines_longer_than_one_tile(kernel):
    """16-wide tiles make a 40-pixel image span several output blocks and band chunks: the
    code path of segmentation and 1024-pixel ERF inputs, at interpreter-friendly sizes."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 37, 40, device=DEVICE)
    check_against_reference(x, torch.randn(2, 1, *kernel), torch.randn(2), torch.float32,
                            tuning=dict(max_block_a=16, narrow_tile_lines=16, wgrad_lines=16,
                                        wgrad_lines_fp32=16))


@pytest.mark.parametrize("transpose_tall", [True, False])
def test_tall_kernels_direct_and_transposed(transpose_tall):
    """Tall kernels run either along H directly or as wide ones on transposed images."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 12, 9, device=DEVICE)
    assert choose_strategy(x.shape, (13, 3)) == TRANSPOSED
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(x.clone(), torch.randn(3, 1, 13, 3), torch.randn(3), dtype,
                                tuning=dict(transpose_align=4 if transpose_tall else 0))


@pytest.mark.parametrize("kernel,transpose_tall", [((3, 51), True), ((51, 3), True),
                                                   ((51, 3), False), ((5, 5), True)])
@pytest.mark.parametrize("in_memory", [True, False])
def test_toeplitz_tiles_in_memory_or_gathered(kernel, transpose_tall, in_memory):
    """Lines of 33-64 pixels (one 64-wide tile) read each tap's Toeplitz tile from memory,
    written by its own kernel once per call, in the forward pass and the input gradient (the
    rotated kernel), wide, tall and transposed; or gather it from the weights."""
    torch.manual_seed(sum(kernel))
    x = torch.randn(1, 2, 36, 40, device=DEVICE)
    with launches() as launched:
        for dtype in (torch.float32, torch.bfloat16):
            check_against_reference(x.clone(), torch.randn(2, 1, *kernel), torch.randn(2), dtype,
                                    tuning=dict(toeplitz_in_memory=in_memory,
                                                transpose_align=4 if transpose_tall else 0))
    names = [p.name for p in launched]
    assert names.count("dwconv_toeplitz_kernel") == (4 if in_memory else 0)
    assert names.count("dwconv_fwd_kernel") == 4


@pytest.mark.parametrize("plane", [True, False])
@pytest.mark.parametrize("shape,kernel", [((2, 5, 7, 7), (13, 5)), ((2, 5, 7, 7), (5, 5)),
                                          ((70, 2, 5, 5), (5, 13)), ((3, 2, 3, 8), (51, 3))])
def test_small_maps_whole_planes_and_lines(shape, kernel, plane):
    """Maps of at most 64 pixels run through the whole-plane kernels (two image blocks for
    70 images); the line kernels, which they replace there, still compute the same."""
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, device=DEVICE)
    with launches() as launched:
        for dtype in (torch.float32, torch.bfloat16):
            check_against_reference(x.clone(), torch.randn(shape[1], 1, *kernel),
                                    torch.randn(shape[1]), dtype,
                                    tuning=dict(plane_pixels=64 if plane else 0))
    kinds = {p.name for p in launched}
    assert kinds == ({"dwconv_plane_fwd_kernel", "dwconv_plane_wgrad_kernel"} if plane else
                     {"dwconv_fwd_kernel", "dwconv_wgrad_kernel"})


def test_transposed_results_written_in_the_callers_layout():
    """A transposed tall kernel stores its output and input gradient straight into NCHW, as
    vectors across lines when every run of lines lies inside one image and is aligned (the
    hints promise no more than that), and without a line mask when the blocks divide the lines."""
    x = torch.randn(2, 3, 8, 16, device=DEVICE)
    assert choose_strategy(x.shape, (13, 3)) == TRANSPOSED
    g = heuristics.geometry(x.transpose(2, 3), (3, 13))

    def hints(y, block_m=32):
        return heuristics.store_hints(g, y.transpose(2, 3), block_m, x.shape[0] * g["LB"])
    assert hints(x.bfloat16()) == dict(Y_ALIGN=1, Y_M_CONTIG=8, EVEN_M=True)
    assert hints(x)["Y_M_CONTIG"] == 4
    assert hints(torch.randn(2, 3, 8, 24)[..., 1:17])["Y_M_CONTIG"] == 1   # start one element in
    assert hints(x, block_m=64)["EVEN_M"] is False
    torch.manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(x.clone(), torch.randn(3, 1, 13, 3), torch.randn(3), dtype)


@pytest.mark.parametrize("size", [(12, 16), (7, 7)])   # lines (transposed), whole planes
def test_repeated_calls_reuse_their_launch_plan(size):
    """A second call with the same signature launches from the cached plan (on the GPU the
    compiled binary directly) and computes the same; another alignment gets its own plan."""
    torch.manual_seed(9)
    x = torch.randn(2, 3, *size, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 1, 13, 5, device=DEVICE, requires_grad=True)
    gy = torch.randn(2, 3, *size, device=DEVICE)
    with launches() as launched_first:
        first = [depthwise_conv2d(x, w)]
        first += torch.autograd.grad(first[0], (x, w), gy)
    with launches() as launched_again:
        again = [depthwise_conv2d(x, w)]
        again += torch.autograd.grad(again[0], (x, w), gy)
    assert ran_forward_and_both_gradients(launched_again)
    assert [id(p) for p in launched_again] == [id(p) for p in launched_first]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    wide = w.detach().transpose(2, 3).contiguous()   # read in place, not through a copy
    with launches() as launched_aligned:
        aligned = depthwise_conv2d(x.detach(), wide)
    shifted = torch.randn(x.numel() + 1, device=DEVICE)[1:].view(x.shape)
    shifted.copy_(x.detach())
    with launches() as launched_shifted:
        assert torch.equal(depthwise_conv2d(shifted, wide), aligned)
    assert launched_shifted[0] is not launched_aligned[0]


def test_vector_width_follows_alignment():
    """The alignment hints promise only what holds: line starts divisible by the vector width,
    16 bytes at most, and no hint where the taps shift lines along the contiguous axis."""
    def width(t, kernel=(5, 31)):
        return heuristics.vector_width(heuristics.geometry(t, kernel), t)
    x = torch.randn(2, 3, 8, 56)
    assert width(x) == 4 and width(x.bfloat16()) == 8
    assert width(torch.randn(2, 3, 8, 6)) == 2                  # lines 24 bytes apart
    assert width(torch.randn(2, 3, 8, 64)[..., 1:57]) == 1      # start one element in
    assert width(x, kernel=(31, 5)) == 1                        # long axis H


@pytest.mark.skipif(not CUDA, reason="too slow for the interpreter; the tiling it exercises "
                                     "is covered by test_lines_longer_than_one_tile")
@pytest.mark.parametrize("kernel", [(51, 5), (5, 51)])
def test_large_image(kernel):
    x = torch.randn(1, 3, 1024, 1024, device=DEVICE)
    check_against_reference(x, torch.randn(3, 1, *kernel), None, torch.float32)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "channels_last"])
def test_non_contiguous_inputs(layout):
    torch.manual_seed(1)
    base = torch.randn(2, 6, 30, 26, device=DEVICE)
    x = {"sliced": base[:, ::2, 2:, 1:-2],
         "transposed": base.transpose(2, 3),
         "channels_last": base.contiguous(memory_format=torch.channels_last)}[layout]
    assert not x.is_contiguous()
    c = x.shape[1]
    y = check_against_reference(x, torch.randn(c, 1, 5, 31), torch.randn(c), torch.float32)
    if layout == "channels_last":   # like cuDNN, the output keeps the input's layout
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_module_is_a_drop_in_for_conv2d():
    torch.manual_seed(2)
    ours = DepthWiseConv2dImplicitGEMM(5, (13, 3), bias=True).to(DEVICE)
    plain = nn.Conv2d(5, 5, (13, 3), padding=(6, 1), groups=5, bias=True).to(DEVICE)
    plain.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 5, 11, 17, device=DEVICE)
    with launches() as launched:
        assert rel_err(ours(x), plain(x.double().float())) < 1e-5
    assert [p.name for p in launched] == ["dwconv_fwd_kernel"]
    with pytest.raises(ValueError, match="odd"):
        DepthWiseConv2dImplicitGEMM(5, (4, 3))


def test_weight_gradient_has_the_weights_layout():
    """A channels-last model's weights get gradients with their own strides (as DDP needs)."""
    conv = DepthWiseConv2dImplicitGEMM(4, (5, 13)).to(DEVICE).to(memory_format=torch.channels_last)
    assert conv.weight.stride() != torch.empty(conv.weight.shape).stride()
    x = torch.randn(2, 4, 9, 10, device=DEVICE).contiguous(memory_format=torch.channels_last)
    conv(x).sum().backward()
    assert conv.weight.grad.stride() == conv.weight.stride()


def test_autocast_casts_like_conv2d():
    torch.manual_seed(3)
    dtype = torch.float16 if CUDA else torch.bfloat16
    conv = DepthWiseConv2dImplicitGEMM(4, (5, 21), bias=True).to(DEVICE)
    x = torch.randn(2, 4, 12, 16, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=dtype):
        y = conv(x)
        ref = depthwise_conv2d_reference(x, conv.weight, conv.bias)
    assert y.dtype == ref.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    # Autocast leaves float64 alone, and so does the convolution under it.
    with torch.autocast(DEVICE, dtype=dtype):
        y64 = conv.double()(x.detach().double())
        ref64 = depthwise_conv2d_reference(x.detach().double(), conv.weight, conv.bias)
    assert y64.dtype == ref64.dtype == torch.float64 and rel_err(y64, ref64) < 1e-12


def test_torch_compile_fullgraph():
    """The custom ops trace without graph breaks, forward and backward (Inductor on the GPU;
    on a CPU ``aot_eager`` exercises the same fake and autograd registrations)."""
    torch.manual_seed(4)
    conv = DepthWiseConv2dImplicitGEMM(3, (5, 17), bias=True).to(DEVICE)

    def f(x):
        return (conv(x) * 2).relu()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    x = torch.randn(2, 3, 10, 19, device=DEVICE, requires_grad=True)
    with launches() as launched:
        y = compiled(x)
        y.sum().backward()
    assert ran_forward_and_both_gradients(launched)
    x_ref = x.detach().clone().requires_grad_()
    f(x_ref).sum().backward()
    assert rel_err(y, f(x_ref)) < 1e-5 and rel_err(x.grad, x_ref.grad) < 1e-5


def test_cpu_without_interpreter_uses_conv2d(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 2, 9, 9)
    w = torch.randn(2, 1, 3, 11)
    with launches() as launched:
        assert rel_err(depthwise_conv2d(x, w), depthwise_conv2d_reference(x, w)) < 1e-6
    assert launched == []


def test_external_build_missing_is_one_clear_error(tmp_path, monkeypatch):
    # No public way to forget an extension already imported: reset the private cache.
    monkeypatch.setattr(external, "_external", None)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    with pytest.raises(ImportError, match="LARGE_KERNEL_CONV_IMPL=.*unset the variable"):
        external.load_external(str(tmp_path))


def test_64_bit_offsets(monkeypatch):
    """The 64-bit addressing variant (for tensors of 2**31 elements or more, which no test
    can allocate) computes the same thing."""
    monkeypatch.setattr(heuristics, "needs_index_64", lambda *tensors: True)
    torch.manual_seed(5)
    x = torch.randn(2, 3, 11, 20, device=DEVICE)
    check_against_reference(x, torch.randn(3, 1, 5, 23), torch.randn(3), torch.float32)


def test_compiled_ops_receive_their_inputs_in_the_kernels_layout(monkeypatch):
    """Under ``torch.compile`` a channels-last input and its output gradient reach the kernels
    already in the layout they read (NCHW; with H fastest for transposed tall kernels, except an
    input autograd keeps): the traced graph changes the layout, where Inductor fuses it into the
    producing kernel, rather than an eager copy inside the op for every branch and pass."""
    from depthwise_conv2d_implicit_gemm import ops
    seen = []
    real_forward, real_backward = ops.conv_forward, ops.conv_backward

    def forward(x, weight, bias):
        seen.append(("x", weight.shape[2:], x.stride()))
        return real_forward(x, weight, bias)

    def backward(grad, x, weight, need_input, need_weight):
        seen.append(("grad", weight.shape[2:], grad.stride()))
        return real_backward(grad, x, weight, need_input, need_weight)
    monkeypatch.setattr(ops, "conv_forward", forward)
    monkeypatch.setattr(ops, "conv_backward", backward)
    torch.manual_seed(5)
    tall, wide = (DepthWiseConv2dImplicitGEMM(3, k).to(DEVICE) for k in [(13, 3), (3, 13)])
    x = torch.randn(2, 3, 8, 12, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    compiled = torch.compile(lambda t: (tall(t) * wide(t)).relu(), fullgraph=True,
                             backend="inductor" if CUDA else "aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert choose_strategy(x.shape, (13, 3)) == TRANSPOSED
    h_fastest = torch.empty(2, 3, 12, 8).transpose(2, 3).stride()
    nchw = torch.empty(2, 3, 8, 12).stride()
    expected = {("x", (13, 3)): nchw, ("x", (3, 13)): nchw,
                ("grad", (13, 3)): h_fastest, ("grad", (3, 13)): nchw}
    assert len(seen) == 4
    for what, kernel, stride in seen:
        assert stride == expected[what, tuple(kernel)], (what, tuple(kernel), stride)
    x_ref = x.detach().clone().requires_grad_()
    (tall(x_ref) * wide(x_ref)).relu().sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-5

    # Without autograd nothing is kept for a backward pass: the tall kernel's input comes
    # transposed (H fastest) from the traced graph too.
    seen.clear()
    with torch.no_grad():
        for p in [*tall.parameters(), *wide.parameters()]:
            p.requires_grad_(False)
        y = compiled(x.detach())
    assert sorted((what, tuple(k), st) for what, k, st in seen) == [
        ("x", (3, 13), nchw), ("x", (13, 3), h_fastest)]
    assert rel_err(y, (tall(x_ref) * wide(x_ref)).relu()) < 1e-5
