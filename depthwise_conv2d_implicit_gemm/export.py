"""ONNX translation of the ``slak::dwconv2d`` and ``slak::dwconv2d_sum`` custom ops, for
``torch.onnx.export(dynamo=True)``.

``torch.export`` traces the large-kernel convolution as ``torch.ops.slak.dwconv2d`` (the op
``depthwise_conv2d`` dispatches to while compiling or exporting); this table turns it into the
standard ONNX depthwise ``Conv`` (``group`` = channels, same padding), so any ONNX runtime runs it
(a deployed unit's ``slak::dwconv2d_sum``, which appears where its Triton kernels run, becomes
two such convolutions and an ``Add``):

    torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=onnx_translation_table())
"""
import torch

from . import ops, sum  # noqa: F401 - define torch.ops.slak.dwconv2d and dwconv2d_sum


def _dwconv2d_onnx(x, weight, bias=None):
    # Called by the exporter with ONNX values whose shapes are known: weight is (C, 1, kh, kw).
    from onnxscript import opset18 as onnx_op
    channels, _, kh, kw = weight.shape
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return onnx_op.Conv(*inputs, group=channels, kernel_shape=[kh, kw], strides=[1, 1],
                        dilations=[1, 1], pads=[kh // 2, kw // 2, kh // 2, kw // 2])


def _dwconv2d_sum_onnx(x, weight_a, bias_a, weight_b, bias_b):
    from onnxscript import opset18 as onnx_op
    return onnx_op.Add(_dwconv2d_onnx(x, weight_a, bias_a), _dwconv2d_onnx(x, weight_b, bias_b))


def onnx_translation_table():
    """``{op overload: ONNX translation}`` for ``torch.onnx.export``'s ``custom_translation_table``."""
    return {torch.ops.slak.dwconv2d.default: _dwconv2d_onnx,
            torch.ops.slak.dwconv2d_sum.default: _dwconv2d_sum_onnx}
