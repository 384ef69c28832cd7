"""Quick self-check: ``python -m depthwise_conv2d_implicit_gemm``.

On a GPU, prints the largest absolute and the relative difference of the output and of the
input and weight gradients between ``DepthWiseConv2dImplicitGEMM`` and ``nn.Conv2d`` (cuDNN)
with the same weights, for a few SLaK shapes and every supported dtype.
"""
import sys

import torch
import torch.nn as nn

from . import DepthWiseConv2dImplicitGEMM

SHAPES = [  # (batch, channels, size, kernel): SLaK-T stage 1 and stage 4 branches, a wide image
    (4, 124, 56, (51, 5)), (4, 124, 56, (5, 51)), (4, 998, 7, (5, 13)), (1, 8, 512, (5, 51))]


def main():
    if not torch.cuda.is_available():
        print("No CUDA GPU found: nothing to compare (on a CPU the module runs F.conv2d; "
              "TRITON_INTERPRET=1 runs the Triton kernels there, see tests/test_lk_conv.py).")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"allow_tf32={torch.backends.cudnn.allow_tf32}")
    print(f"{'shape':>28} {'dtype':>9} {'max|dy|':>9} {'rel dy':>9} {'rel dx':>9} {'rel dw':>9}")
    worst = 0.0
    for n, c, size, kernel in SHAPES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ours = DepthWiseConv2dImplicitGEMM(c, kernel).cuda().to(dtype)
            ref = nn.Conv2d(c, c, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=c,
                            bias=False).cuda().to(dtype)
            ref.load_state_dict(ours.state_dict())
            x = torch.randn(n, c, size, size, device="cuda", dtype=dtype)
            gy = torch.randn_like(x)
            results = []
            for conv in (ours, ref):
                xi = x.clone().requires_grad_()
                y = conv(xi)
                y.backward(gy)
                results.append((y.float(), xi.grad.float(), conv.weight.grad.float()))
            (y, dx, dw), (yr, dxr, dwr) = results

            def rel(a, b):
                return ((a - b).norm() / b.norm()).item()
            errs = [rel(y, yr), rel(dx, dxr), rel(dw, dwr)]
            worst = max(worst, *errs)
            print(f"{str((n, c, size, size)) + ' k' + str(kernel):>28} {str(dtype)[6:]:>9} "
                  f"{(y - yr).abs().max().item():9.2e} " + " ".join(f"{e:9.2e}" for e in errs))
    print(f"worst relative difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
