"""A unit's wide branch and its small branch in one pass: ``slak::dwconv2d_pair``.

SLaK's ``(s, K)`` branch and its ``(s, s)`` branch convolve the same input along the same
lines, and the small kernel sits inside the big one's band, so one kernel
(``kernels.dwconv_pair_kernel``) computes both outputs from one read of each input tile, and
their input gradients in one pass summed in its accumulator (no second gradient tensor, no
separate sum). Each output stays a tensor of its own: the branches' BatchNorms need their own
statistics. The weight gradients are the single kernels' (``ops.conv_backward``).

Public entry point: ``depthwise_conv2d_pair(x, weight, weight_small)``, for the pairs
``can_pair(x, weight, weight_small)`` accepts; the op, its backward op, their fake
implementations and autograd follow ``ops.py``'s pattern (custom ops under ``torch.compile``,
an ``autograd.Function`` in eager mode).
"""
import os

import torch
from torch import Tensor

from . import ops
from .heuristics import LINES, choose_strategy


def can_pair(x, weight, weight_small):
    """Whether ``depthwise_conv2d_pair`` runs the pair kernel for these tensors: the Triton
    kernels run (CUDA, or the interpreter on the CPU), no external build is selected, the big
    kernel is wide (``kh <= kw``) and runs as lines along W (maps over 64 pixels), and the small
    kernel fits inside it."""
    (kh, kw), (sh, sw) = weight.shape[2:], weight_small.shape[2:]
    return (ops.use_triton(x) and not os.environ.get("LARGE_KERNEL_CONV_IMPL") and
            x.dim() == 4 and kh <= kw and sh <= kh and sw <= kw and sh % 2 == sw % 2 == 1 and
            choose_strategy(x.shape, (kh, kw)) == LINES)


def pair_forward(x, weight, weight_small):
    ops.check_args(x, weight, None)
    ops.check_args(x, weight_small, None)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    y_small = torch.empty_like(y)
    ops.plans.pair_conv(x, x, weight, weight_small, False, y, y_small)
    return y, y_small


def pair_backward(grad, grad_small, x, weight, weight_small, need_input, need_weight,
                  need_weight_small):
    """``(dx, dw, dw_small)``; each None unless asked for."""
    grad, grad_small = grad.to(x.dtype).contiguous(), grad_small.to(x.dtype).contiguous()
    dx = None
    if need_input:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        ops.plans.pair_conv(grad, grad_small, weight.to(x.dtype), weight_small.to(x.dtype),
                            True, dx, dx)
    dw = ops.conv_backward(grad, x, weight, False, True)[1] if need_weight else None
    dw_small = (ops.conv_backward(grad_small, x, weight_small, False, True)[1]
                if need_weight_small else None)
    return dx, dw, dw_small


@torch.library.custom_op("slak::dwconv2d_pair", mutates_args=())
def dwconv2d_pair(x: Tensor, weight: Tensor, weight_small: Tensor) -> tuple[Tensor, Tensor]:
    """``(conv(x, weight), conv(x, weight_small))`` for a contiguous ``x``; see ``can_pair``."""
    return pair_forward(x, weight, weight_small)


@dwconv2d_pair.register_fake
def _(x, weight, weight_small):
    ops.check_args(x, weight, None)
    ops.check_args(x, weight_small, None)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype), \
        torch.empty(x.shape, device=x.device, dtype=x.dtype)


@torch.library.custom_op("slak::dwconv2d_pair_backward", mutates_args=())
def dwconv2d_pair_backward(grad: Tensor, grad_small: Tensor, x: Tensor, weight: Tensor,
                           weight_small: Tensor, need_input: bool, need_weight: bool,
                           need_weight_small: bool) -> tuple[Tensor, Tensor, Tensor]:
    """See ``pair_backward``; a gradient not asked for comes back empty."""
    grads = pair_backward(grad, grad_small, x, weight, weight_small, need_input, need_weight,
                          need_weight_small)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@dwconv2d_pair_backward.register_fake
def _(grad, grad_small, x, weight, weight_small, need_input, need_weight, need_weight_small):
    return (torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_input else x.new_empty(0),
            x.new_empty(weight.shape) if need_weight else x.new_empty(0),
            x.new_empty(weight_small.shape) if need_weight_small else x.new_empty(0))


def _grads_in(x, grad, grad_small):
    # An output that the loss does not use comes back as None (or, compiled, zeros).
    grad = torch.zeros_like(x) if grad is None else grad
    grad_small = torch.zeros_like(x) if grad_small is None else grad_small
    # Contiguous outside the op: under torch.compile the producer writes them so.
    return grad.contiguous(), grad_small.contiguous()


def _compiled_backward(ctx, grad, grad_small):
    x, weight, weight_small = ctx.saved_tensors
    need_x, need_w, need_ws = ctx.needs_input_grad
    dx, dw, dws = torch.ops.slak.dwconv2d_pair_backward(
        *_grads_in(x, grad, grad_small), x, weight, weight_small, need_x, need_w, need_ws)
    return (dx if need_x else None, ops.as_parameter_grad(dw, weight) if need_w else None,
            ops.as_parameter_grad(dws, weight_small) if need_ws else None)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


dwconv2d_pair.register_autograd(_compiled_backward, setup_context=_setup_context)


class _EagerPair(torch.autograd.Function):
    """The same op for eager mode, without a custom op's dispatch cost (see ``ops._EagerConv``)."""

    @staticmethod
    def forward(ctx, x, weight, weight_small):
        _setup_context(ctx, (x, weight, weight_small), None)
        return pair_forward(x, weight, weight_small)

    @staticmethod
    def backward(ctx, grad, grad_small):
        x, weight, weight_small = ctx.saved_tensors
        dx, dw, dws = pair_backward(*_grads_in(x, grad, grad_small), x, weight, weight_small,
                                    *ctx.needs_input_grad)
        return dx, ops.as_parameter_grad(dw, weight), ops.as_parameter_grad(dws, weight_small)


def depthwise_conv2d_pair(x, weight, weight_small):
    """``(depthwise_conv2d(x, weight), depthwise_conv2d(x, weight_small))`` in one pass.

    Args:
        x: ``(N, C, H, W)``, any strides.
        weight: ``(C, 1, kh, kw)`` with ``kh <= kw``.
        weight_small: ``(C, 1, sh, sw)`` with ``sh <= kh`` and ``sw <= kw``, centred in it.
    Returns:
        Both outputs, channels-last when ``x`` is. Where ``can_pair`` says no, the two single
        convolutions compute them.
    """
    x, weight, weight_small = ops.autocast_inputs(x, weight, weight_small)
    if not can_pair(x, weight, weight_small):
        return ops.depthwise_conv2d(x, weight), ops.depthwise_conv2d(x, weight_small)
    out_format = ops.output_format(x)
    x = x.contiguous()   # pairs are line kernels along W: NCHW
    if torch.compiler.is_compiling():
        y, y_small = torch.ops.slak.dwconv2d_pair(x, weight, weight_small)
    elif not ops.needs_autograd(x, weight, weight_small):
        y, y_small = pair_forward(x, weight, weight_small)
    else:
        y, y_small = _EagerPair.apply(x, weight, weight_small)
    return y.contiguous(memory_format=out_format), y_small.contiguous(memory_format=out_format)
