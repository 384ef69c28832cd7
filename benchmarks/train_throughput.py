"""Training-step throughput of SLaK-T against its baselines, side by side in one process.

Step mode (default) times forward + backward + AdamW step on random 224x224 batches, for every
combination of the chosen models, precisions, channels-last and torch.compile settings:

    python benchmarks/train_throughput.py --batch 64 --dtypes bf16 fp16 fp32 --compile both \
        --channels_last both --models slak slak_sparse slak_cudnn convnext_timm

Models: ``slak`` (SLaK-T, width 1.3, 51 49 47 13 5, Decom, our large-kernel convolution),
``slak_sparse`` (the same with dynamic sparsity, ``-u`` adaptations included in the timed steps),
``slak_cudnn`` (the same network with its large-kernel convolutions through cuDNN, ``F.conv2d``),
``convnext_timm`` (timm's ``convnext_tiny``).

End-to-end mode runs ``main.py`` on the synthetic data for a number of iterations, so that data
loading, logging, EMA and sparsity are included, and reports images per second of the epoch:

    python benchmarks/train_throughput.py --end_to_end --iters 200 --batch 64 -- --compile true ...

Each case prints one JSON line; a summary table comes last.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402

import SLaK  # noqa: E402,F401 - registers the SLaK models
from depthwise_conv2d_implicit_gemm import DepthWiseConv2dImplicitGEMM  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SLAK_T = dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True, drop_path_rate=0.1)


def build(name, sparse_update_frequency):
    """Return ``(model, masking_factory)`` for a benchmark model name."""
    if name == "convnext_timm":
        return timm.create_model("convnext_tiny", drop_path_rate=0.1), None
    model = timm.create_model("SLaK_tiny", **SLAK_T)
    if name == "slak_cudnn":
        for m in model.modules():
            if isinstance(m, DepthWiseConv2dImplicitGEMM):
                m.forward = types.MethodType(nn.Conv2d.forward, m)
    if name != "slak_sparse":
        return model, None

    def masking_factory(model, optimizer, images, targets, criterion, total_steps):
        import sparse_core
        args = argparse.Namespace(sparsity=0.4, sparse_init="snip", growth="random", prune="magnitude",
                                  prune_rate=0.3, update_frequency=sparse_update_frequency, fix=False,
                                  only_L=False, redistribution="none", verbose=False, seed=0)
        masking = sparse_core.Masking(model, optimizer, args, total_steps)
        masking.init(images, targets, criterion)
        return masking
    return model, masking_factory


def time_training_step(name, dtype_name, channels_last, compile_model, batch, steps, warmup,
                       sparse_update_frequency):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, masking_factory = build(name, sparse_update_frequency)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = DTYPES[dtype_name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # A few distinct batches so the timing is not of one cached input.
    batches = [(torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=memory_format),
                torch.randint(0, 1000, (batch,), device=device)) for _ in range(3)]
    masking = None
    if masking_factory is not None:
        masking = masking_factory(model, optimizer, *batches[0], criterion, warmup + steps)
    train_model = torch.compile(model) if compile_model else model

    def step(i):
        images, targets = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(train_model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if masking is not None:
            masking.step()

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        step(i)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    result = dict(model=name, dtype=dtype_name, channels_last=channels_last, compile=compile_model,
                  batch=batch, steps=steps, step_ms=round(ms, 2), img_per_s=round(batch * 1000 / ms, 1),
                  peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
    del model, optimizer, train_model, batches, masking
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return result


def end_to_end(args, extra):
    """Run main.py for ``iters`` optimizer steps on synthetic data; images/s of the whole epoch."""
    out = Path(args.output_dir)
    command = [sys.executable, str(REPO / "main.py"), "--data_set", "synthetic", "--device", "cuda",
               "--input_size", "224", "--nb_classes", "1000", "--epochs", "1", "--warmup_steps", "10",
               "--batch_size", str(args.batch), "--synthetic_train_size", str(args.batch * args.iters),
               "--disable_eval", "true", "--save_ckpt", "false", "--auto_resume", "false",
               "--output_dir", str(out), "--num_workers", str(args.num_workers), *extra]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - start
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:])
        raise SystemExit(f"main.py failed ({result.returncode})")
    # "epoch": the whole epoch, first-step compilation included; "steady": the progress line's
    # window average over the last iterations.
    seconds_per_it = float(re.search(r"Total time: \S+ \(([\d.]+) s / it\)", result.stdout).group(1))
    window = [float(t) for t in re.findall(r"Epoch: \[0\].*?time: ([\d.]+)", result.stdout)]
    row = dict(mode="end_to_end", command=" ".join(command[1:]), wall_s=round(wall, 1),
               img_per_s_epoch=round(args.batch / seconds_per_it, 1),
               img_per_s_steady=round(args.batch / window[-1], 1))
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=["slak", "slak_sparse", "slak_cudnn", "convnext_timm"],
                        choices=["slak", "slak_sparse", "slak_cudnn", "convnext_timm"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--compile", default="both", choices=["on", "off", "both"])
    parser.add_argument("--channels_last", default="on", choices=["on", "off", "both"])
    parser.add_argument("--sparse_update_frequency", "-u", type=int, default=100)
    parser.add_argument("--json", default=None, help="also write all rows to this file")
    parser.add_argument("--end_to_end", action="store_true", help="time main.py instead")
    parser.add_argument("--iters", type=int, default=200, help="end-to-end: optimizer steps")
    parser.add_argument("--num_workers", type=int, default=12)
    parser.add_argument("--output_dir", default="/tmp/slak_e2e")
    args, extra = parser.parse_known_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark times GPU training steps")

    if args.end_to_end:
        rows = [end_to_end(args, [e for e in extra if e != "--"])]
    else:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        choices = {"on": [True], "off": [False], "both": [False, True]}
        rows = []
        for dtype_name in args.dtypes:
            for channels_last in choices[args.channels_last]:
                for compile_model in choices[args.compile]:
                    for name in args.models:
                        try:
                            row = time_training_step(name, dtype_name, channels_last, compile_model,
                                                     args.batch, args.steps, args.warmup,
                                                     args.sparse_update_frequency)
                        except Exception as exc:  # report and go on with the other cases
                            row = dict(model=name, dtype=dtype_name, channels_last=channels_last,
                                       compile=compile_model, error=f"{type(exc).__name__}: {exc}"[:300])
                            torch._dynamo.reset()
                            torch.cuda.empty_cache()
                        print(json.dumps(row), flush=True)
                        rows.append(row)
        print_summary(rows)
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                          cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                          timm=timm.__version__)))


def print_summary(rows):
    print(f"\n{'model':<14} {'dtype':<5} {'cl':<3} {'compile':<7} {'img/s':>8} {'ms/step':>8} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14} {r['dtype']:<5} {int(r['channels_last']):<3} {int(r['compile']):<7} "
                  f"error: {r['error'][:60]}")
            continue
        print(f"{r['model']:<14} {r['dtype']:<5} {int(r['channels_last']):<3} {int(r['compile']):<7} "
              f"{r['img_per_s']:>8} {r['step_ms']:>8} {r['peak_mem_gib']:>8}")
    by_key = {(r["model"], r["dtype"], r["channels_last"], r["compile"]): r for r in rows if "error" not in r}
    for (model, dtype, cl, comp), r in by_key.items():
        ref = by_key.get(("convnext_timm", dtype, cl, True))
        if model.startswith("slak") and ref:
            print(f"ratio {model} {dtype} cl={int(cl)} compile={int(comp)} / compiled convnext_timm: "
                  f"{r['img_per_s'] / ref['img_per_s']:.3f}  (memory {r['peak_mem_gib'] / ref['peak_mem_gib']:.2f}x)")


if __name__ == "__main__":
    main()
