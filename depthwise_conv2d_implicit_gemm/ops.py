"""``slak::`` custom ops around the Triton kernels: dispatch, autograd, fake implementations.

Public entry point: ``depthwise_conv2d(x, weight, bias)``. It applies autocast the way
``F.conv2d`` does. Under ``torch.compile`` it calls ``torch.ops.slak.dwconv2d``, whose autograd
formula calls ``slak::dwconv2d_backward`` (input and weight gradients in one op, so that they
share their inputs' transposing copies); both have fake implementations, so
``torch.compile(fullgraph=True)`` traces forward and backward without graph breaks, the kernels
themselves staying opaque to the compiler. Eager calls go through an
``autograd.Function`` running the same two computations with less dispatch overhead.

Where the work runs:

* CUDA tensors in float32/float16/bfloat16: the Triton kernels of ``kernels.py``, launched
  through ``plans.py`` in the strategy that ``heuristics.choose_strategy`` picks.
* CPU tensors: ``F.conv2d`` (the reference), unless ``TRITON_INTERPRET=1`` is set, in which
  case the same Triton kernels run in Triton's interpreter (this is how CI tests them).
* ``LARGE_KERNEL_CONV_IMPL=<folder>``: the original release's extension (``external.py``).
"""
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .heuristics import PLANES, TRANSPOSED, choose_strategy, output_format
from .reference import depthwise_conv2d_reference

try:
    from . import plans
except ImportError:   # CPU-only torch builds come without Triton: F.conv2d everywhere
    plans = None

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x):
    if plans is None:
        if x.is_cuda:
            warnings.warn("Triton is not installed: DepthWiseConv2dImplicitGEMM falls back to "
                          "the much slower F.conv2d; install triton to use its kernels")
        return False
    return x.dtype in _TRITON_DTYPES and (x.is_cuda or (x.device.type == "cpu" and _interpret()))


def _transposed(t):
    """``(N, C, H, W)`` -> contiguous ``(N, C, W, H)``."""
    return t.transpose(2, 3).contiguous()


def kernel_layout(t, kernel):
    """``t`` in the memory layout that the kernels for ``kernel`` read without a copy of their
    own: contiguous NCHW, or with H fastest for the ``transposed`` strategy (a ``(N, C, H, W)``
    view of a contiguous ``(N, C, W, H)`` tensor).

    Called outside the custom ops on output gradients and on inputs, so that under
    ``torch.compile`` the change of layout is Inductor's: the kernel producing the tensor (a
    BatchNorm backward, say) writes it in this layout directly, where inside an op it would be
    an eager copy per branch and pass. See ``input_layout`` for the one exception."""
    if choose_strategy(t.shape, kernel) == TRANSPOSED:
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


def input_layout(x, kernel, saved):
    """The forward input as the op should receive it: ``kernel_layout``, except that an input
    autograd keeps for the backward pass (``saved``) stays contiguous NCHW even for the
    transposed strategy, whose op then transposes a copy of its own: the unit's other branches
    keep the NCHW image, so a transposed one would be a second saved copy of it."""
    return x.contiguous() if saved else kernel_layout(x, kernel)


def needs_autograd(*tensors):
    """Whether an op on ``tensors`` records an autograd node (and so keeps its inputs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _convolve(x, weight, bias, flip):
    """The forward pass (``flip=False``) or the input gradient (``flip=True``, ``x`` the output
    gradient), in the layout of ``x``."""
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    strategy = choose_strategy(x.shape, weight.shape[2:])
    if strategy == PLANES:
        plans.plane_conv(x, weight, bias, flip, y)
    elif strategy == TRANSPOSED:
        plans.conv(_transposed(x), weight.transpose(2, 3), bias, flip, y.transpose(2, 3))
    else:
        plans.conv(x, weight, bias, flip, y)
    return y.contiguous(memory_format=output_format(x))


def pad_kernel_to(weight, shape):
    """Zero-pad a ``(C, 1, kh, kw)`` kernel symmetrically to ``(C, 1, *shape)``: the same
    convolution, with "same" padding, as a larger kernel."""
    dh, dw = shape[0] - weight.shape[2], shape[1] - weight.shape[3]
    return F.pad(weight, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


def check_odd_kernel(kh, kw):
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel {(kh, kw)} must be odd on both axes for 'same' padding")


def check_args(x, weight, bias):
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise conv expects x (N, C, H, W) and weight (C, 1, kh, kw), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    check_odd_kernel(*weight.shape[-2:])
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"input ({x.dtype}), weight ({weight.dtype}) and bias must share a dtype; "
                        f"cast them, or run under autocast")


# The two computations, shared by the custom ops (traced by torch.compile) and by the eager
# autograd.Function below.

def conv_forward(x, weight, bias):
    """x ``(N, C, H, W)``, weight ``(C, 1, kh, kw)``, bias ``(C,)`` or None -> ``(N, C, H, W)``."""
    check_args(x, weight, bias)
    if use_triton(x):
        return _convolve(x, weight, bias, flip=False)
    return depthwise_conv2d_reference(x, weight, bias).contiguous(memory_format=output_format(x))


def conv_backward(grad, x, weight, need_input, need_weight):
    """``(dx, dw)`` from the output gradient: the input gradient ``(N, C, H, W)`` (the same
    convolution with the kernel rotated by 180 degrees) and the weight gradient
    ``(C, 1, kh, kw)`` in the dtype of ``x``; each is None unless asked for."""
    # Autograd hands back the output's dtype, which is the input's: casts only for direct calls.
    grad = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    kh, kw = weight.shape[2:]
    if use_triton(x):
        grad = kernel_layout(grad, (kh, kw))   # once, for both gradients
    else:
        dx, dw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [kh // 2, kw // 2], [1, 1], False,
            [0, 0], x.shape[1], [need_input, need_weight, False])
        return (dx.contiguous(memory_format=output_format(grad)) if need_input else None,
                dw.contiguous() if need_weight else None)
    strategy = choose_strategy(x.shape, (kh, kw))
    dx = dw = None
    if strategy == TRANSPOSED:
        # Both gradients read the output gradient along transposed lines: transpose it once.
        grad_t = _transposed(grad)
        if need_input:
            dx = torch.empty(grad.shape, device=grad.device, dtype=grad.dtype)
            plans.conv(grad_t, weight.transpose(2, 3), None, True, dx.transpose(2, 3))
            dx = dx.contiguous(memory_format=output_format(grad))
        if need_weight:
            dw = plans.grad_weight(grad_t, _transposed(x), kw, kh).transpose(2, 3).contiguous()
        return dx, dw
    if need_input:
        dx = _convolve(grad, weight, None, flip=True)
    if need_weight:
        dw = (plans.plane_grad_weight if strategy == PLANES else plans.grad_weight)(
            grad, x, kh, kw)
    return dx, dw


def as_parameter_grad(dw, weight):
    """``dw`` in the dtype and strides of its parameter: a gradient laid out like its
    parameter (e.g. a channels-last model's weights) is one DDP can reduce in place, without
    the "grad strides do not match" copy and warning."""
    if dw is None:
        return None
    dw = dw if dw.dtype == weight.dtype else dw.to(weight.dtype)
    return dw if dw.stride() == weight.stride() else torch.empty_like(weight).copy_(dw)


def _backward_impl(grad, x, weight, has_bias, needs, backward):
    need_x, need_w, need_b = needs
    dx, dw = backward(grad, x, weight, need_x, need_w)
    db = grad.sum((0, 2, 3)).to(weight.dtype) if (has_bias and need_b) else None
    return dx, as_parameter_grad(dw, weight), db


@torch.library.custom_op("slak::dwconv2d", mutates_args=())
def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise conv, stride 1, same padding: x ``(N, C, H, W)``, weight ``(C, 1, kh, kw)``,
    bias ``(C,)`` or None -> ``(N, C, H, W)``."""
    return conv_forward(x, weight, bias)


@dwconv2d.register_fake
def _(x, weight, bias):
    check_args(x, weight, bias)
    return torch.empty_like(x, memory_format=output_format(x))


@torch.library.custom_op("slak::dwconv2d_backward", mutates_args=())
def dwconv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, need_input: bool,
                      need_weight: bool) -> tuple[Tensor, Tensor]:
    """See ``conv_backward``; a gradient not asked for comes back empty (custom ops return
    tensors only)."""
    dx, dw = conv_backward(grad, x, weight, need_input, need_weight)
    return (x.new_empty(0) if dx is None else dx), (x.new_empty(0) if dw is None else dw)


@dwconv2d_backward.register_fake
def _(grad, x, weight, need_input, need_weight):
    # The kernels take the gradient in their own layout (``kernel_layout``), in which
    # ``output_format`` is the contiguous one.
    fmt = torch.contiguous_format if use_triton(x) else output_format(grad)
    dx = torch.empty_like(grad, memory_format=fmt) if need_input else x.new_empty(0)
    dw = x.new_empty(weight.shape) if need_weight else x.new_empty(0)
    return dx, dw


def _compiled_backward(grad, x, weight, need_input, need_weight):
    dx, dw = torch.ops.slak.dwconv2d_backward(grad, x, weight, need_input, need_weight)
    return (dx if need_input else None), (dw if need_weight else None)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    if use_triton(x):
        grad = kernel_layout(grad, weight.shape[2:])
    return _backward_impl(grad, x, weight, ctx.has_bias, ctx.needs_input_grad,
                          _compiled_backward)


dwconv2d.register_autograd(_backward, setup_context=_setup_context)


class _EagerConv(torch.autograd.Function):
    """The same op for eager mode: a custom op's dispatch costs more CPU time per
    forward+backward than the GPU time of a small SLaK stage, so eager calls skip it (the kernels and formulas are the ones above)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        _setup_context(ctx, (x, weight, bias), None)
        return conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _backward_impl(grad, x, weight, ctx.has_bias, ctx.needs_input_grad,
                              conv_backward)


def autocast_inputs(x, *tensors):
    """``x`` and ``tensors`` (None kept) cast as autocast casts conv2d's inputs: every floating
    tensor but float64 ones to the autocast dtype when autocast is on for ``x``'s device.
    Autocast does not see custom ops."""
    if x.is_cuda and torch.is_autocast_enabled("cuda") or (
            x.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        dtype = torch.get_autocast_dtype(x.device.type)
        return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype)
                     for t in (x, *tensors))
    return (x, *tensors)


def depthwise_conv2d(x, weight, bias=None):
    """Depthwise conv, stride 1, same padding, any odd ``(kh, kw)``; the drop-in ``F.conv2d``.

    Args:
        x: ``(N, C, H, W)``, any strides.
        weight: ``(C, 1, kh, kw)``.
        bias: ``(C,)`` or None.
    Returns:
        ``(N, C, H, W)``, channels-last when ``x`` is.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    folder = os.environ.get("LARGE_KERNEL_CONV_IMPL")
    if folder and x.is_cuda:
        from .external import external_conv
        return external_conv(x, weight, bias, folder)
    needs_grad = needs_autograd(x, weight, bias)
    if not use_triton(x):
        return _dispatch(x, weight, bias, needs_grad)
    out_format = output_format(x)
    y = _dispatch(input_layout(x, weight.shape[2:], needs_grad), weight, bias, needs_grad)
    return y.contiguous(memory_format=out_format)


def _dispatch(x, weight, bias, needs_grad):
    if torch.compiler.is_compiling():
        return torch.ops.slak.dwconv2d(x, weight, bias)
    if not needs_grad:
        return conv_forward(x, weight, bias)   # inference: no autograd node to build
    return _EagerConv.apply(x, weight, bias)
