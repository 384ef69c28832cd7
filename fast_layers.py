"""Speed layers of the SLaK model: GEMMs on operands padded to aligned widths.

SLaK's width-1.3 channel counts (124, 249, 499, 998) are not multiples of 8, on which cuBLAS's
and cuDNN's fast half-precision kernels depend. The layers here pad their operands with zeros
where ``torch.compile`` fuses the padding into the neighbouring kernels, and slice the results
back: the same values up to summation order, the same weights and state-dict names as the
plain layers. ``SLaK.Block`` and ``SLaK.SLaK`` use them with ``align_pointwise`` (the default).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GEMM_ALIGN", "EVAL_POINTWISE_ALIGN", "aligned_linear", "PatchConv2d"]

# Rows of a half-precision GEMM operand start 16 bytes apart only when their length is a
# multiple of 8; otherwise cuBLAS falls back to slow kernels.
GEMM_ALIGN = 8
# Eval forwards pad the pointwise layers' GEMMs further: cuBLAS picks faster kernels for
# SLaK-T's widths rounded up to multiples of 32 or 64 (benchmarks/pointwise_gemm.py). Training
# keeps GEMM_ALIGN: autograd saves the padded hidden activations, and padding them to 32 took
# the SLaK-T step's peak memory over its target (BENCHMARKS.md).
EVAL_POINTWISE_ALIGN = 64


def aligned_linear(x, linear, align=GEMM_ALIGN):
    """``linear(x)`` computed on operands zero-padded to multiples of ``align`` along the
    reduction and output dimensions, then sliced back. The zeros add nothing, so the result is
    the same up to the GEMM's summation order; under ``torch.compile`` the padding and slicing
    fuse into the neighbouring LayerNorm, GELU and scale kernels."""
    return _aligned_linear(x, linear.weight, linear.bias, align)


def _aligned_linear(x, weight, bias, align=GEMM_ALIGN):
    n, k = weight.shape
    pad_k, pad_n = -k % align, -n % align
    if not (pad_k or pad_n):
        return F.linear(x, weight, bias)
    weight = F.pad(weight, (0, pad_k, 0, pad_n))
    bias = None if bias is None else F.pad(bias, (0, pad_n))
    return F.linear(F.pad(x, (0, pad_k)), weight, bias)[..., :n]


class PatchConv2d(nn.Conv2d):
    """A convolution whose kernel is its stride (no padding): a linear layer applied to each
    non-overlapping ``k x k`` patch, as SLaK's 2x2/2 downsampling layers are.

    Where the channel counts are not multiples of 8 (124, 249 and 499 at width 1.3), cuDNN's
    convolution pads its operands in a kernel of its own on every call. With ``align`` set,
    compiled forwards pad them where Inductor can fuse the padding into the neighbouring
    kernels: training forwards compute the layer as :func:`aligned_linear`'s padded GEMM over
    the patches laid out as rows; eval forwards run the convolution on input and output
    channels zero-padded to multiples of ``GEMM_ALIGN`` and slice the output back (as GEMMs
    they cost an extra copy per unit under CUDA graphs; BENCHMARKS.md). The zeros add nothing.
    Weights and state-dict names are ``nn.Conv2d``'s.
    """

    def __init__(self, in_channels, out_channels, patch, align=True):
        super().__init__(in_channels, out_channels, kernel_size=patch, stride=patch)
        self.align = align

    def forward(self, x):
        if not (self.align and torch.compiler.is_compiling()):
            return super().forward(x)
        if not self.training:
            return self._aligned_conv(x)
        n, c, h, w = x.shape
        k = self.stride[0]
        rows, cols = h // k, w // k   # the convolution drops a remainder, so the patches do
        patches = x[:, :, :rows * k, :cols * k].reshape(n, c, rows, k, cols, k)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(n, rows, cols, k * k * c)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, k * k * c)
        return _aligned_linear(patches, weight, self.bias).permute(0, 3, 1, 2)

    def _aligned_conv(self, x):
        pad_in, pad_out = -self.in_channels % GEMM_ALIGN, -self.out_channels % GEMM_ALIGN
        if not (pad_in or pad_out):
            return super().forward(x)
        weight = F.pad(self.weight, (0, 0, 0, 0, 0, pad_in, 0, pad_out))
        bias = None if self.bias is None else F.pad(self.bias, (0, pad_out))
        y = F.conv2d(F.pad(x, (0, 0, 0, 0, 0, pad_in)), weight, bias, self.stride)
        return y[:, :self.out_channels]
