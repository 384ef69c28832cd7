"""A trained large-kernel unit's three convolutions in one pass: ``slak::dwconv2d_unit``.

A SLaK unit convolves one image with a tall ``(K, s)``, a wide ``(s, K)`` and a small
``(s, s)`` kernel, normalises each result with its own BatchNorm and sums them. On maps of at
most 64x64 pixels one kernel (``kernels.dwconv_cross_kernel``) reads each image once for all
three convolutions, writes the three results, and adds up their BatchNorm statistics from its
float32 accumulators: per branch and channel, the sum and the sum of squares of ``z - shift``
(a per-channel shift, the running mean, keeps the variance ``E[(z - shift)^2] - E[z - shift]^2``
free of cancellation). The input gradient is one pass of the same kernel over the three output
gradients with rotated kernels, summed in its accumulator; the weight gradients are the single
convolutions' (``ops.conv_backward``).

The statistics are differentiable outputs (``d sum / dz = 1``, ``d sum of squares / dz =
2 (z - shift)``), so the BatchNorm arithmetic around the op stays plain PyTorch
(``SLaK.LargeKernelUnit``), which ``torch.compile`` fuses into the neighbouring kernels, and
its backward pass flows into the op's gradient formula.

Public entry points: ``can_fuse_unit`` and ``depthwise_conv2d_unit``; the ops, their fake
implementations and autograd follow ``ops.py``'s pattern (custom ops under ``torch.compile``,
an ``autograd.Function`` in eager mode).
"""
import os

import torch
from torch import Tensor

from . import ops
from .heuristics import CROSS_MAX_SIDE, TRANSPOSED, choose_strategy


def can_fuse_unit(x, weight_tall, weight_wide, weight_small):
    """Whether ``depthwise_conv2d_unit`` runs in one pass for these tensors: the Triton kernels
    run (CUDA, or the interpreter on the CPU), no external build is selected, the map is at
    most 64x64 pixels, the kernels are tall, wide and small, odd-sized, and the small kernel
    has at most the wide one's rows."""
    if not (ops.use_triton(x) and not os.environ.get("LARGE_KERNEL_CONV_IMPL") and x.dim() == 4
            and x.shape[2] <= CROSS_MAX_SIDE and x.shape[3] <= CROSS_MAX_SIDE):
        return False
    (th, tw), (wh, ww), (sh, sw) = (w.shape[2:] for w in (weight_tall, weight_wide, weight_small))
    return (th >= tw and wh <= ww and sh <= wh and
            all(k % 2 == 1 for k in (th, tw, wh, ww, sh, sw)))


def tall_reads_transposed(x, weight_tall):
    """Whether the tall kernel reads its source (the input forward, its output gradient
    backward) stored transposed, ``(N, C, W, H)``: where the single convolution would run on
    transposed images too (``heuristics.choose_strategy``), its columns are then contiguous
    lines. The transposed copies are made outside the ops, where under ``torch.compile`` the
    kernel producing the tensor writes them."""
    return choose_strategy(x.shape, weight_tall.shape[2:]) == TRANSPOSED


def _check(x, weight_tall, weight_wide, weight_small, shift):
    for w in (weight_tall, weight_wide, weight_small):
        ops.check_args(x, w, None)
    if shift.shape != (3, x.shape[1]) or shift.dtype != torch.float32:
        raise ValueError(f"shift must be float32 (3, C), got {shift.dtype} {tuple(shift.shape)}")


def unit_forward(x, x_tall, weight_tall, weight_wide, weight_small, shift):
    """``(z_wide, z_small, z_tall, stats)`` for a contiguous ``x`` (``x_tall``: ``x`` as the
    tall kernel reads it, see ``tall_reads_transposed``); ``stats`` ``(3, 2, C)`` float32
    (see ``plans.unit_conv``)."""
    _check(x, weight_tall, weight_wide, weight_small, shift)
    z_wide, z_small, z_tall = (torch.empty(x.shape, device=x.device, dtype=x.dtype)
                               for _ in range(3))
    stats = ops.plans.unit_conv(x, x_tall, tall_reads_transposed(x, weight_tall), weight_tall,
                                weight_wide, weight_small, shift.contiguous(), z_tall, z_wide,
                                z_small)
    return z_wide, z_small, z_tall, stats


def unit_backward(grad_wide, grad_small, grad_tall, x, weight_tall, weight_wide, weight_small,
                  needs):
    """``(dx, dw_tall, dw_wide, dw_small)`` from the branches' output gradients (contiguous;
    ``grad_tall`` stored transposed where ``tall_reads_transposed``); each None unless
    ``needs`` (four booleans) asks for it."""
    need_x, need_wt, need_ww, need_ws = needs
    transposed = tall_reads_transposed(x, weight_tall)
    dx = dwt = None
    if need_x:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        ops.plans.unit_input_grad(grad_tall, transposed, grad_wide, grad_small,
                                  *(w.to(x.dtype) for w in (weight_tall, weight_wide, weight_small)),
                                  dx)
    if need_wt and transposed:   # as the transposed single convolution computes it
        kh, kw = weight_tall.shape[2:]
        dwt = ops.plans.grad_weight(grad_tall, x.transpose(2, 3).contiguous(), kw, kh)
        dwt = dwt.transpose(2, 3).contiguous()
    elif need_wt:
        dwt = ops.conv_backward(grad_tall, x, weight_tall, False, True)[1]
    dww, dws = (ops.conv_backward(g, x, w, False, True)[1] if need else None
                for g, w, need in ((grad_wide, weight_wide, need_ww),
                                   (grad_small, weight_small, need_ws)))
    return dx, dwt, dww, dws


@torch.library.custom_op("slak::dwconv2d_unit", mutates_args=())
def dwconv2d_unit(x: Tensor, x_tall: Tensor, weight_tall: Tensor, weight_wide: Tensor,
                  weight_small: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See ``unit_forward``."""
    return unit_forward(x, x_tall, weight_tall, weight_wide, weight_small, shift)


@dwconv2d_unit.register_fake
def _(x, x_tall, weight_tall, weight_wide, weight_small, shift):
    _check(x, weight_tall, weight_wide, weight_small, shift)
    return (*(torch.empty(x.shape, device=x.device, dtype=x.dtype) for _ in range(3)),
            x.new_empty((3, 2, x.shape[1]), dtype=torch.float32))


@torch.library.custom_op("slak::dwconv2d_unit_backward", mutates_args=())
def dwconv2d_unit_backward(grad_wide: Tensor, grad_small: Tensor, grad_tall: Tensor, x: Tensor,
                           weight_tall: Tensor, weight_wide: Tensor, weight_small: Tensor,
                           needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See ``unit_backward``; a gradient not asked for comes back empty."""
    grads = unit_backward(grad_wide, grad_small, grad_tall, x, weight_tall, weight_wide,
                          weight_small, needs)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@dwconv2d_unit_backward.register_fake
def _(grad_wide, grad_small, grad_tall, x, weight_tall, weight_wide, weight_small, needs):
    shapes = (x.shape, weight_tall.shape, weight_wide.shape, weight_small.shape)
    return tuple(x.new_empty(shape) if need else x.new_empty(0)
                 for shape, need in zip(shapes, needs))


def _branch_grads(outputs, shift, tall_transposed, grads, grad_stats):
    """Each branch's whole output gradient (wide, small, tall): what reached its output ``z``
    directly, plus what reached it through the statistics (``d sum = 1``, ``d sum of squares
    = 2 (z - shift)``); the tall one stored transposed with ``tall_transposed``. Computed
    outside the op: under ``torch.compile`` Inductor fuses it with the BatchNorm backward and
    writes it in the layout the op reads."""
    out = []
    for b, (z, g) in enumerate(zip(outputs, grads)):
        total = torch.zeros_like(z) if g is None else g.to(z.dtype)
        if grad_stats is not None:
            dsum, dsq = (grad_stats[b, k][None, :, None, None] for k in (0, 1))
            total = (total.float() + dsum + 2 * (z.float() - shift[b][None, :, None, None]) * dsq
                     ).to(z.dtype)
        out.append(total.contiguous())
    if tall_transposed:
        out[2] = out[2].transpose(2, 3).contiguous()
    return out


def _setup_context(ctx, inputs, output):
    x, _, weight_tall, weight_wide, weight_small, shift = inputs
    z_wide, z_small, z_tall, _ = output
    ctx.save_for_backward(x, weight_tall, weight_wide, weight_small, z_wide, z_small, z_tall,
                          shift)


def _backward_with(backward, ctx, grad_wide, grad_small, grad_tall, grad_stats):
    """The gradients of the op's inputs (``x``; none for ``x_tall``, whose branch ``dx``
    includes; the three weights; none for ``shift``), the convolutions' part computed by
    ``backward`` (``unit_backward``, or its custom op)."""
    x, weight_tall, weight_wide, weight_small, *outputs, shift = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], *ctx.needs_input_grad[2:5]]
    grads = _branch_grads(outputs, shift, tall_reads_transposed(x, weight_tall),
                          (grad_wide, grad_small, grad_tall), grad_stats)
    dx, *dws = backward(*grads, x, weight_tall, weight_wide, weight_small, needs)
    return (dx if needs[0] else None, None,
            *(ops.as_parameter_grad(dw, w) if need else None
              for dw, w, need in zip(dws, (weight_tall, weight_wide, weight_small), needs[1:])),
            None)


def _compiled_backward(ctx, *grads):
    return _backward_with(torch.ops.slak.dwconv2d_unit_backward, ctx, *grads)


dwconv2d_unit.register_autograd(_compiled_backward, setup_context=_setup_context)


class _EagerUnit(torch.autograd.Function):
    """The same op for eager mode, without a custom op's dispatch cost (see ``ops._EagerConv``)."""

    @staticmethod
    def forward(ctx, x, x_tall, weight_tall, weight_wide, weight_small, shift):
        out = unit_forward(x, x_tall, weight_tall, weight_wide, weight_small, shift)
        _setup_context(ctx, (x, x_tall, weight_tall, weight_wide, weight_small, shift), out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _backward_with(unit_backward, ctx, *grads)


def depthwise_conv2d_unit(x, weight_tall, weight_wide, weight_small, shift):
    """A unit's three convolutions and their BatchNorm statistics, in one pass.

    Args:
        x: ``(N, C, H, W)``, any strides, at most 64x64 pixels (``can_fuse_unit``).
        weight_tall, weight_wide, weight_small: ``(C, 1, K, s)``, ``(C, 1, s, K)``,
            ``(C, 1, s, s)``.
        shift: ``(3, C)`` float32, subtracted before the statistics (wide, small, tall).
    Returns:
        ``(z_wide, z_small, z_tall, stats)``: the three convolutions, contiguous NCHW in the
        (autocast) dtype of ``x``, and ``stats`` ``(3, 2, C)`` float32: per branch (wide,
        small, tall) and channel the sum and the sum of squares of ``z - shift`` over
        ``N * H * W`` pixels. All differentiable.
    """
    x, weight_tall, weight_wide, weight_small = ops.autocast_inputs(
        x, weight_tall, weight_wide, weight_small)
    if not can_fuse_unit(x, weight_tall, weight_wide, weight_small):
        raise ValueError("depthwise_conv2d_unit: these tensors cannot run in one pass; "
                         "check can_fuse_unit first")
    x = x.contiguous()
    # The tall kernel's copy of the input (see tall_reads_transposed) carries no gradient of
    # its own: the op's input gradient includes the tall branch's.
    x_tall = (x.detach().transpose(2, 3).contiguous() if tall_reads_transposed(x, weight_tall)
              else x.detach())
    shift = shift.detach().float()
    args = (x, x_tall, weight_tall, weight_wide, weight_small, shift)
    if torch.compiler.is_compiling():
        return torch.ops.slak.dwconv2d_unit(*args)
    if not ops.needs_autograd(x, weight_tall, weight_wide, weight_small):
        return unit_forward(*args)
    return _EagerUnit.apply(*args)
