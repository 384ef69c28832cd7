"""The ``nn.Conv2d`` subclass used for every large-kernel branch of SLaK."""
import torch.nn as nn
from torch.nn.modules.utils import _pair

from .ops import check_odd_kernel, depthwise_conv2d


class DepthWiseConv2dImplicitGEMM(nn.Conv2d):
    """Depthwise convolution, stride 1, "same" padding (``k // 2`` per axis).

    Args:
        channels: input and output channels (one filter per channel).
        kernel: odd kernel size, an int or a ``(kh, kw)`` pair.
        bias: whether to add a learnable per-channel bias.

    Parameters are those of ``nn.Conv2d`` (``weight`` of shape ``(channels, 1, kh, kw)`` and
    optional ``bias``), so checkpoints are interchangeable with a plain depthwise conv. The
    forward maps ``(N, channels, H, W)`` to the same shape through ``ops.depthwise_conv2d``
    (Triton kernels on CUDA, ``F.conv2d`` on the CPU).
    """

    def __init__(self, channels, kernel, bias=False):
        kh, kw = _pair(kernel)
        check_odd_kernel(kh, kw)
        super().__init__(channels, channels, (kh, kw), padding=(kh // 2, kw // 2),
                         groups=channels, bias=bias)

    def forward(self, x):
        return depthwise_conv2d(x, self.weight, self.bias)
