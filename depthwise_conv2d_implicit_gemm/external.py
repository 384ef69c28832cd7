"""The original release's CUDA extension (MegEngine's kernels), for side-by-side comparisons.

``LARGE_KERNEL_CONV_IMPL=<folder>`` makes ``depthwise_conv2d`` call the extension built by the
original release (``_depthwise_conv2d_implicit_gemm_C`` in that folder) instead of our kernels.
"""
import importlib
import sys

import torch

_EXTERNAL_MODULE = "_depthwise_conv2d_implicit_gemm_C"
_external = None


def load_external(folder):
    global _external
    if _external is None:
        sys.path.insert(0, folder)
        try:
            _external = importlib.import_module(_EXTERNAL_MODULE)
        except ImportError as e:
            raise ImportError(f"LARGE_KERNEL_CONV_IMPL={folder}: cannot import {_EXTERNAL_MODULE} "
                              f"from there ({e}); build the original's extension into that "
                              f"folder or unset the variable") from None
    return _external


class _ExternalConv(torch.autograd.Function):
    """MegEngine's kernels: ``forward_<dt>(x, w)``, ``backward_data_<dt>(dy, w)``,
    ``backward_filter_<dt>(dy, x, w)`` with ``<dt>`` in fp32/fp16, contiguous NCHW tensors."""

    @staticmethod
    def forward(ctx, x, weight, ext):
        ctx.ext = ext
        ctx.suffix = "fp16" if x.dtype == torch.float16 else "fp32"
        x, weight = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, weight)
        return getattr(ext, "forward_" + ctx.suffix)(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = getattr(ctx.ext, "backward_data_" + ctx.suffix)(grad, weight)
        dw = getattr(ctx.ext, "backward_filter_" + ctx.suffix)(grad, x, weight)
        return dx, dw, None


def external_conv(x, weight, bias, folder):
    ext = load_external(folder)
    # The extension has float32 and float16 kernels only; bfloat16 runs through float32.
    dtype = x.dtype if x.dtype in (torch.float32, torch.float16) else torch.float32
    y = _ExternalConv.apply(x.to(dtype), weight.to(dtype), ext).to(x.dtype)
    return y if bias is None else y + bias.view(1, -1, 1, 1)
