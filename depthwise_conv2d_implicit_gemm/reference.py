"""Plain-PyTorch reference for the depthwise "same" convolution; tests compare against it."""
import torch
import torch.nn.functional as F


def depthwise_conv2d_reference(x, weight, bias=None):
    """Depthwise conv, stride 1, padding ``(kh // 2, kw // 2)``.

    Args:
        x: ``(N, C, H, W)``.
        weight: ``(C, 1, kh, kw)`` with odd ``kh`` and ``kw``.
        bias: ``(C,)`` or None.
    Returns:
        ``(N, C, H, W)``, computed by ``F.conv2d`` (cuDNN on the GPU, ATen on the CPU).
    """
    kh, kw = weight.shape[-2:]
    return F.conv2d(x, weight, bias, stride=1, padding=(kh // 2, kw // 2), groups=x.shape[1])


def depthwise_conv2d_reference_grads(x, weight, bias, grad_out):
    """``(dx, dw, db)`` of ``depthwise_conv2d_reference`` for the output gradient ``grad_out``.

    Shapes are those of ``x``, ``weight`` and ``bias`` (``db`` is None without a bias).
    """
    kh, kw = weight.shape[-2:]
    dx, dw, db = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None if bias is None else [bias.shape[0]], [1, 1],
        [kh // 2, kw // 2], [1, 1], False, [0, 0], x.shape[1], [True, True, bias is not None])
    return dx, dw, db
