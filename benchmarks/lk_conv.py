"""Large-kernel depthwise convolutions of SLaK: our Triton kernels against cuDNN.

For every large-kernel branch shape of the chosen models (SLaK-T by default: per stage the
(K, 5), (5, K) and 5x5 depthwise convs at width 1.3 and a 224 input), at one batch size, times
forward and forward+backward (input and weight gradients) of

* ``ours``:  ``depthwise_conv2d`` (the Triton kernels behind ``DepthWiseConv2dImplicitGEMM``),
* ``cudnn``: ``F.conv2d`` with ``torch.backends.cudnn.benchmark = True``,

in float32 (TF32 per ``torch.backends.cudnn.allow_tf32``, PyTorch's default: on), float16 and
bfloat16, all in one process. Prints one JSON line per case, then a summary table with the
per-training-step totals (each stage's three branches times its number of blocks: 54
convolutions for SLaK-T). ``--step`` also times one whole step's 54 convolutions back to back
(separate tensors per block, as in training), which includes launch overheads.

``--profile`` adds, for cuDNN, ours and each ``--variants`` entry, the GPU time of the kernels
alone (torch.profiler), forward and forward+backward, i.e. the cost once launch overheads are
hidden by CUDA graphs or ``torch.compile`` (``speedup_gpu_*``); the per-kernel split is in
``*_gpu_kernels_us``.

    python benchmarks/lk_conv.py --batch 64 --models T --check --step --profile --json-out lk.jsonl

``--deployed`` times deployed units (``reparameterize()``, eval, no autograd; per stage and per
forward): both convolutions and the bias in one pass (``depthwise_conv2d_sum``) against two
convolutions and a sum:

    python benchmarks/lk_conv.py --deployed --batch 256 --dtypes bf16
"""
import argparse
import contextlib
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F

from depthwise_conv2d_implicit_gemm import depthwise_conv2d, heuristics

# (depths, base dims) per model; widths are int(dim * 1.3), kernels 51/49/47/13 with small 5,
# feature maps 56/28/14/7 for a 224x224 input (SPEC.md, "Models").
MODELS = {"T": ([3, 3, 9, 3], [96, 192, 384, 768]),
          "S": ([3, 3, 27, 3], [96, 192, 384, 768]),
          "B": ([3, 3, 27, 3], [128, 256, 512, 1024])}
KERNELS, SMALL, SIZES, WIDTH = [51, 49, 47, 13], 5, [56, 28, 14, 7], 1.3
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cases(model):
    """(stage, channels, size, kernel, blocks) for each large-kernel branch of ``model``."""
    depths, dims = MODELS[model]
    out = []
    for stage, (depth, dim, k, size) in enumerate(zip(depths, dims, KERNELS, SIZES)):
        c = int(dim * WIDTH)
        for kernel in [(k, SMALL), (SMALL, k), (SMALL, SMALL)]:
            out.append((stage + 1, c, size, kernel, depth))
    return out


def cudnn_conv(x, w):
    return F.conv2d(x, w, None, 1, (w.shape[2] // 2, w.shape[3] // 2), 1, x.shape[1])


@contextlib.contextmanager
def tuned(**fields):
    """Time ours with these ``heuristics.Tuning`` fields changed (launch plans are cached per
    tuning, so each variant gets its own)."""
    default = heuristics.TUNING
    heuristics.TUNING = dataclasses.replace(default, **fields)
    try:
        yield
    finally:
        heuristics.TUNING = default


def bench(fn, grads=()):
    """Median milliseconds of ``fn`` by CUDA events (``triton.testing.do_bench``, which also
    flushes L2 between repetitions so that inputs come from HBM as in training)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")


def time_case(impl, n, c, size, kernel, dtype):
    x = torch.randn(n, c, size, size, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(c, 1, *kernel, device="cuda", dtype=dtype) * 0.05).requires_grad_()
    gy = torch.randn(n, c, size, size, device="cuda", dtype=dtype)

    def fwd():
        with torch.no_grad():
            impl(x, w)

    def fwd_bwd():
        impl(x, w).backward(gy)

    return bench(fwd), bench(fwd_bwd, (x, w))


def profile_case(impl, n, c, size, kernel, dtype, iters=5):
    """GPU time per kernel (microseconds) of ``impl``, from the profiler, for the forward pass
    alone and for forward+backward: what the convolution costs once launch overheads are
    hidden (CUDA graphs, compile). Returns ``{"fwd": {kernel: us}, "fwdbwd": {kernel: us}}``."""
    x = torch.randn(n, c, size, size, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(c, 1, *kernel, device="cuda", dtype=dtype) * 0.05).requires_grad_()
    gy = torch.randn(n, c, size, size, device="cuda", dtype=dtype)

    def fwd():
        with torch.no_grad():
            impl(x, w)

    def fwd_bwd():   # autograd.grad: no accumulation into .grad, which is not the conv's work
        torch.autograd.grad(impl(x, w), (x, w), gy)

    out = {}
    for name, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        for _ in range(2):
            fn()
        out[name] = profiled_kernels(fn, iters)
    return out


def profiled_kernels(fn, iters=5):
    """GPU microseconds per call of ``fn``, by kernel name (its first 48 characters), from
    ``iters`` calls under the profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            key = evt.name[:48]
            kernels[key] = kernels.get(key, 0.0) + evt.time_range.elapsed_us() / iters
    return kernels


def unit_cases(args):
    """(model, dtype name, stage, units, channels, map size, kernel K) of every stage's units
    that ``args`` selects."""
    for model in args.models:
        depths, dims = MODELS[model]
        for dt_name in args.dtypes:
            for stage, (depth, dim, k, size) in enumerate(zip(depths, dims, KERNELS, SIZES), 1):
                if stage in args.stages:
                    yield f"SLaK-{model}", dt_name, stage, depth, int(dim * WIDTH), size, k


def time_deployed_unit(n, c, size, kernel, dtype):
    """Eager median ms and profiled GPU ms (with the kernels' split) of one deployed unit's
    forward (``reparameterize()``d ``SLaK.LargeKernelUnit``, no autograd) in ``dtype``."""
    from SLaK import LargeKernelUnit
    unit = LargeKernelUnit(c, kernel, SMALL, Decom=True).cuda().eval()
    unit.reparameterize()
    unit.to(dtype)
    x = torch.randn(n, c, size, size, device="cuda", dtype=dtype)

    def fwd():
        with torch.no_grad():
            unit(x)
    eager = bench(fwd)
    kernels = profiled_kernels(fwd)
    return eager, sum(kernels.values()) / 1e3, kernels


def deployed_main(args, emit):
    """Deployed units, one pass (``depthwise_conv2d_sum``) against two convolutions and a sum."""
    totals = {}
    for model, dt_name, stage, depth, c, size, k in unit_cases(args):
        rec = {"model": model, "deployed_stage": stage, "channels": c, "size": size, "kernel": k,
               "blocks": depth, "dtype": dt_name, "batch": args.batch,
               # Read the input once, write the output once: the memory-traffic floor.
               "traffic_mb": 2 * args.batch * c * size * size * DTYPES[dt_name].itemsize / 1e6}
        for name, fields in [("one_pass", {}), ("separate", {"cross_unit": False})] + [
                (f"one_pass{v}", json.loads(v)) for v in args.variants]:
            with tuned(**fields):
                eager, gpu, kernels = time_deployed_unit(args.batch, c, size, k, DTYPES[dt_name])
            rec[f"{name}_eager_ms"], rec[f"{name}_gpu_ms"] = eager, gpu
            rec[f"{name}_gpu_kernels_us"] = kernels
            for what, ms in (("eager", eager), ("gpu", gpu)):
                key = (model, dt_name, name, what)
                totals[key] = totals.get(key, 0.0) + ms * depth
        emit(rec)
    print(f"\nPer-forward totals of the deployed units, ms (batch {args.batch})")
    print(f"{'model':8} {'dtype':5} {'units':40} {'eager':>8} {'GPU':>8}")
    for (model, dt_name, name, what), ms in totals.items():
        if what == "eager":
            print(f"{model:8} {dt_name:5} {name:40} {ms:8.3f} "
                  f"{totals[model, dt_name, name, 'gpu']:8.3f}")


def check_case(c, size, kernel, dtype):
    """Relative errors (forward, input grad, weight grad) at batch 2 against float64 cuDNN."""
    x = torch.randn(2, c, size, size, device="cuda", dtype=torch.float64)
    w = torch.randn(c, 1, *kernel, device="cuda", dtype=torch.float64) * 0.05
    gy = torch.randn_like(x)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    cudnn_conv(xr, wr).backward(gy)
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    y = depthwise_conv2d(xs, ws)
    y.backward(gy.to(dtype))

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    return {"err_y": rel(y, cudnn_conv(x, w)), "err_dx": rel(xs.grad, xr.grad),
            "err_dw": rel(ws.grad, wr.grad)}


def time_step(model, n, dtype, impl):
    """One training step's large-kernel convs: forward and backward of every branch of every
    block, each block with its own tensors; returns median milliseconds."""
    work = []
    for stage, c, size, kernel, blocks in cases(model):
        for _ in range(blocks):
            x = torch.randn(n, c, size, size, device="cuda", dtype=dtype, requires_grad=True)
            w = (torch.randn(c, 1, *kernel, device="cuda", dtype=dtype) * 0.05).requires_grad_()
            work.append((x, w, torch.randn_like(x)))

    def step():
        for x, w, gy in work:
            impl(x, w).backward(gy)
    return bench(step, [t for x, w, _ in work for t in (x, w)]), len(work)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--models", nargs="+", default=["T"], choices=sorted(MODELS))
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--no-cudnn", action="store_true", help="time our kernels only")
    p.add_argument("--check", action="store_true", help="also check accuracy at batch 2")
    p.add_argument("--step", action="store_true", help="also time whole steps back to back")
    p.add_argument("--profile", action="store_true",
                   help="also report ours' GPU time per kernel (profiler), without launch gaps")
    p.add_argument("--variants", nargs="*", default=[],
                   help="extra launch configurations to time for ours, as JSON dicts of "
                        "heuristics.Tuning fields, e.g. '{\"num_stages\": 3}'")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--deployed", action="store_true",
                   help="time deployed units (after reparameterize(), no autograd) instead: "
                        "both convolutions in one pass against two and a sum")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/lk_conv.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    out = open(args.json_out, "a") if args.json_out else None
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "triton": __import__("triton").__version__,
           "allow_tf32": torch.backends.cudnn.allow_tf32, "batch": args.batch,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
    emit({"env": env})
    if args.deployed:
        deployed_main(args, emit)
        return

    variants = [("ours", {})] + [(f"ours{v}", json.loads(v)) for v in args.variants]
    totals = {}   # (model, dtype, impl, pass) -> ms per step
    for model in args.models:
        for dt_name in args.dtypes:
            dtype = DTYPES[dt_name]
            for stage, c, size, kernel, blocks in cases(model):
                if stage not in args.stages:
                    continue
                rec = {"model": f"SLaK-{model}", "stage": stage, "channels": c, "size": size,
                       "kernel": list(kernel), "blocks": blocks, "dtype": dt_name,
                       "batch": args.batch}
                if args.check:
                    rec.update(check_case(c, size, kernel, dtype))
                impls = [] if args.no_cudnn else [("cudnn", cudnn_conv, {})]
                impls += [(name, depthwise_conv2d, tiles) for name, tiles in variants]
                for name, fn, tiles in impls:
                    with tuned(**tiles):
                        f_ms, fb_ms = time_case(fn, args.batch, c, size, kernel, dtype)
                    rec[f"{name}_fwd_ms"], rec[f"{name}_fwdbwd_ms"] = f_ms, fb_ms
                    for pas, ms in (("fwd", f_ms), ("fwdbwd", fb_ms)):
                        key = (model, dt_name, name, pas)
                        totals[key] = totals.get(key, 0.0) + ms * blocks
                for name, fn, tiles in impls if args.profile else ():
                    with tuned(**tiles):
                        kernels = profile_case(fn, args.batch, c, size, kernel, dtype)
                    rec[f"{name}_gpu_kernels_us"] = kernels["fwdbwd"]
                    rec[f"{name}_gpu_fwd_ms"] = sum(kernels["fwd"].values()) / 1e3
                    rec[f"{name}_gpu_fwdbwd_ms"] = sum(kernels["fwdbwd"].values()) / 1e3
                    key = (model, dt_name, name, "gpu")
                    totals[key] = totals.get(key, 0.0) + rec[f"{name}_gpu_fwdbwd_ms"] * blocks
                if "cudnn_fwd_ms" in rec:
                    for pas in ("fwd", "fwdbwd", "gpu_fwd", "gpu_fwdbwd"):
                        if f"ours_{pas}_ms" in rec:
                            rec[f"speedup_{pas}"] = rec[f"cudnn_{pas}_ms"] / rec[f"ours_{pas}_ms"]
                emit(rec)
            if args.step:
                for name, fn in [("ours", depthwise_conv2d)] + (
                        [] if args.no_cudnn else [("cudnn", cudnn_conv)]):
                    ms, count = time_step(model, args.batch, dtype, fn)
                    emit({"model": f"SLaK-{model}", "dtype": dt_name, "impl": name,
                          "step_convs": count, "step_fwdbwd_ms": ms})
                    totals[(model, dt_name, name, "step")] = ms
                torch.cuda.empty_cache()

    print(f"\nPer-step totals, ms (sum over the 3 branches x blocks; batch {args.batch}, "
          f"{env['device']}, torch {env['torch']}, cuDNN {env['cudnn']}, triton {env['triton']})")
    names = sorted({k[2] for k in totals}, key=lambda s: (s != "cudnn", s))
    passes = ["fwd", "fwdbwd"] + (["step"] if args.step else []) + (
        ["gpu"] if args.profile else [])
    header = "model  dtype " + "".join(f"{n + ' ' + p:>26}" for n in names for p in passes)
    print(header)
    for model in args.models:
        for dt_name in args.dtypes:
            row = f"{'SLaK-' + model:6} {dt_name:5} "
            for n in names:
                for pas in passes:
                    v = totals.get((model, dt_name, n, pas))
                    row += f"{'-' if v is None else f'{v:.2f}':>26}"
            print(row)
    if out:
        out.close()


if __name__ == "__main__":
    main()
