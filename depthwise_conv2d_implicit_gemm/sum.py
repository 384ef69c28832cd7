"""A deployed large-kernel unit in one pass: ``slak::dwconv2d_sum``.

After ``reparameterize()`` a SLaK unit is two biased depthwise convolutions of one image, a
``(K, s)`` and an ``(s, K)`` one, summed. ``depthwise_conv2d_sum`` computes that sum without
an intermediate: on maps of at most 64x64 pixels one kernel reads each image once and applies
both (``kernels.dwconv_cross_kernel``); on maps of at most ``Tuning.plane_pixels`` pixels the
two kernels are added into one, which the whole-plane kernel applies. It is an inference op:
with autograd, or where the Triton kernels do not run, it is the two convolutions and a sum.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .heuristics import CROSS, CROSS_MAX_SIDE, PLANES, choose_sum_strategy


def _added_kernels(weight_a, weight_b):
    """One ``(C, 1, kh, kw)`` kernel equal to the two centred kernels summed."""
    shape = (max(weight_a.shape[2], weight_b.shape[2]), max(weight_a.shape[3], weight_b.shape[3]))
    return ops.pad_kernel_to(weight_a, shape) + ops.pad_kernel_to(weight_b, shape)


def _added_biases(bias_a, bias_b):
    if bias_a is None or bias_b is None:
        return bias_b if bias_a is None else bias_a
    return bias_a + bias_b


def sum_forward(x, weight_a, bias_a, weight_b, bias_b):
    """``conv(x, weight_a) + bias_a + conv(x, weight_b) + bias_b`` for a contiguous ``x`` whose
    strategy is ``planes`` or ``cross``."""
    ops.check_args(x, weight_a, bias_a)
    ops.check_args(x, weight_b, bias_b)
    strategy = choose_sum_strategy(x.shape)
    if strategy not in (PLANES, CROSS):
        raise ValueError(f"slak::dwconv2d_sum runs on maps of at most {CROSS_MAX_SIDE}x"
                         f"{CROSS_MAX_SIDE} pixels, not "
                         f"{x.shape[2]}x{x.shape[3]}; depthwise_conv2d_sum takes any map")
    bias = _added_biases(bias_a, bias_b)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if strategy == PLANES:
        ops.plans.plane_conv(x, _added_kernels(weight_a, weight_b), bias, False, y)
        return y
    # The kernel with the fewer rows runs along W (as rows of the image), the other along H.
    if weight_a.shape[2] > weight_b.shape[2]:
        weight_a, weight_b = weight_b, weight_a
    ops.plans.cross_conv(x, weight_b, weight_a, bias, y)
    return y


@torch.library.custom_op("slak::dwconv2d_sum", mutates_args=())
def dwconv2d_sum(x: Tensor, weight_a: Tensor, bias_a: Optional[Tensor], weight_b: Tensor,
                 bias_b: Optional[Tensor]) -> Tensor:
    """See ``sum_forward``."""
    return sum_forward(x, weight_a, bias_a, weight_b, bias_b)


@dwconv2d_sum.register_fake
def _(x, weight_a, bias_a, weight_b, bias_b):
    ops.check_args(x, weight_a, bias_a)
    ops.check_args(x, weight_b, bias_b)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def runs_in_one_pass(x, *tensors):
    """Whether ``depthwise_conv2d_sum`` computes its sum in one op for these tensors: the
    Triton kernels run, no external build is selected, no autograd is needed, and the map
    is small enough (``choose_sum_strategy``)."""
    return (ops.use_triton(x) and not os.environ.get("LARGE_KERNEL_CONV_IMPL") and
            x.dim() == 4 and not ops.needs_autograd(x, *tensors) and
            choose_sum_strategy(x.shape) in (PLANES, CROSS))


def depthwise_conv2d_sum(x, weight_a, bias_a, weight_b, bias_b):
    """``depthwise_conv2d(x, weight_a, bias_a) + depthwise_conv2d(x, weight_b, bias_b)``.

    Args:
        x: ``(N, C, H, W)``, any strides.
        weight_a, weight_b: ``(C, 1, kh, kw)`` each, odd sizes (a deployed SLaK unit's
            ``(K, s)`` and ``(s, K)`` kernels).
        bias_a, bias_b: ``(C,)`` or None.
    Returns:
        ``(N, C, H, W)``, channels-last when ``x`` is; in one pass where ``runs_in_one_pass``.
    """
    x, weight_a, bias_a, weight_b, bias_b = ops.autocast_inputs(x, weight_a, bias_a, weight_b,
                                                                bias_b)
    if not runs_in_one_pass(x, weight_a, bias_a, weight_b, bias_b):
        return ops.depthwise_conv2d(x, weight_a, bias_a) + ops.depthwise_conv2d(x, weight_b, bias_b)
    out_format = ops.output_format(x)
    x = x.contiguous()
    if torch.compiler.is_compiling():
        y = torch.ops.slak.dwconv2d_sum(x, weight_a, bias_a, weight_b, bias_b)
    else:
        y = sum_forward(x, weight_a, bias_a, weight_b, bias_b)
    return y.contiguous(memory_format=out_format)
