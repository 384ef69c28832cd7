"""ONNX translation of the ``slak::dwconv2d`` custom op, for ``torch.onnx.export(dynamo=True)``.

``torch.export`` traces the large-kernel convolution as ``torch.ops.slak.dwconv2d`` (the op
``depthwise_conv2d`` dispatches to while compiling or exporting); this table turns it into the
standard ONNX depthwise ``Conv`` (``group`` = channels, same padding), so any ONNX runtime runs it:

    torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=onnx_translation_table())
"""
import torch

from . import ops  # noqa: F401 - defines torch.ops.slak.dwconv2d


def _dwconv2d_onnx(x, weight, bias=None):
    # Called by the exporter with ONNX values whose shapes are known: weight is (C, 1, kh, kw).
    from onnxscript import opset18 as onnx_op
    channels, _, kh, kw = weight.shape
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return onnx_op.Conv(*inputs, group=channels, kernel_shape=[kh, kw], strides=[1, 1],
                        dilations=[1, 1], pads=[kh // 2, kw // 2, kh // 2, kw // 2])


def onnx_translation_table():
    """``{op overload: ONNX translation}`` for ``torch.onnx.export``'s ``custom_translation_table``."""
    return {torch.ops.slak.dwconv2d.default: _dwconv2d_onnx}
