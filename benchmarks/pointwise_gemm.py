"""The pointwise layers' GEMMs of SLaK (and ConvNeXt, for reference) through cuBLAS, with their
widths padded to multiples of each ``--aligns`` entry: how much the padding of
``fast_layers.aligned_linear`` buys.

Each block runs ``Linear(C, 4C)`` and ``Linear(4C, C)`` on every pixel: ``M = batch * H * W``
rows. For every stage and alignment ``a`` this times ``F.linear`` (bias included) with ``C``
and ``4C`` rounded up to multiples of ``a`` (1: unpadded), and reports per stage and per
forward (each stage's two GEMMs times its number of blocks), all in one process. The padding
copies themselves are not timed: under ``torch.compile`` they fuse into the LayerNorm and GELU
kernels around the GEMMs.

    python benchmarks/pointwise_gemm.py --batch 256 --models T --aligns 1 8 32 64
"""
import argparse
import functools
import json
import sys

import torch
import torch.nn.functional as F

from lk_conv import DTYPES, MODELS, SIZES, WIDTH


def round_up(value, multiple):
    return -(-value // multiple) * multiple


def gpu_ms(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_stage(rows, channels, align, dtype):
    """Milliseconds of the stage's two GEMMs with ``channels`` and ``4 * channels`` padded."""
    c, hidden = round_up(channels, align), round_up(4 * channels, align)
    times = []
    for k, n in ((c, hidden), (hidden, c)):
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        weight = torch.randn(n, k, device="cuda", dtype=dtype)
        bias = torch.randn(n, device="cuda", dtype=dtype)
        times.append(gpu_ms(functools.partial(F.linear, x, weight, bias)))
        del x, weight, bias
    return c, hidden, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["T"])
    parser.add_argument("--aligns", nargs="+", type=int, default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    parser.add_argument("--convnext", action="store_true",
                        help="also time ConvNeXt's widths (the models' base widths, unpadded)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/pointwise_gemm.py needs a CUDA GPU")
    if any(a < 1 for a in args.aligns):
        sys.exit("error: --aligns takes positive multiples, e.g. --aligns 1 8 32 64")
    dtype = DTYPES[args.dtype]
    totals = []
    for model in args.models:
        depths, dims = MODELS[model]
        variants = [(f"SLaK-{model}", [int(d * WIDTH) for d in dims], args.aligns)]
        if args.convnext:
            variants.append((f"ConvNeXt-{model}", dims, [1]))
        for name, widths, aligns in variants:
            for align in aligns:
                total = 0.0
                for stage, (blocks, channels, size) in enumerate(zip(depths, widths, SIZES), 1):
                    c, hidden, (first, second) = time_stage(args.batch * size * size, channels,
                                                            align, dtype)
                    total += blocks * (first + second)
                    print(json.dumps(dict(model=name, stage=stage, align=align, dtype=args.dtype,
                                          batch=args.batch, channels=c, hidden=hidden,
                                          first_ms=round(first, 4), second_ms=round(second, 4))),
                          flush=True)
                totals.append((name, align, total))
    print(f"\nPointwise GEMMs per forward, ms ({args.dtype}, batch {args.batch}, "
          f"{torch.cuda.get_device_name()})")
    print(f"{'model':12s} {'align':>5s} {'ms':>8s}")
    for name, align, total in totals:
        print(f"{name:12s} {align:5d} {total:8.3f}")


if __name__ == "__main__":
    main()
