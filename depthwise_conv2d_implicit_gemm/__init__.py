"""Depthwise large-kernel convolution, a drop-in for ``nn.Conv2d``.

``from depthwise_conv2d_implicit_gemm import DepthWiseConv2dImplicitGEMM`` is the import the
original release documented; it keeps working here.
"""
from .conv import DepthWiseConv2dImplicitGEMM
from .ops import depthwise_conv2d, pad_kernel_to
from .sum import depthwise_conv2d_sum

__all__ = ["DepthWiseConv2dImplicitGEMM", "depthwise_conv2d", "depthwise_conv2d_sum", "pad_kernel_to"]
