"""Step-time overhead of dynamic sparsity (sparse_core.Masking) on one GPU.

Times training steps of the same model dense and with ``Masking`` (SNIP init, magnitude prune,
random regrowth every ``-u`` steps; masks re-applied to the weights after every step, the
AdamW state left alone as the original does),
the way ``engine.train_one_epoch`` drives it: forward/backward under autocast, optimizer step,
``masking.step()``, ``zero_grad``. Random data already on the GPU, so only the step is timed.
Each mode is timed over ``--steps`` steps (a multiple of ``-u``, so adaptations are included at
their real frequency) after ``--warmup`` steps, alternating dense/sparse ``--rounds`` times; the
median round is reported.

    python benchmarks/sparse_overhead.py --batch 64 -u 100 --steps 200 --dtype bf16

Prints one JSON line per round and a final JSON line with ``overhead_pct``.
"""
import argparse
import json
import statistics
import sys
import time

import timm
import torch
import torch.nn as nn

import SLaK  # noqa: F401 - registers the SLaK models
import sparse_core

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SLaK_tiny")
    p.add_argument("--kernel_size", type=int, nargs=5, default=[51, 49, 47, 13, 5])
    p.add_argument("--width_factor", type=float, default=1.3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("-u", "--update_frequency", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--growth", default="random", choices=list(sparse_core.GROWTH))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--model_ema", action="store_true", help="timm ModelEmaV3 updated every step")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the per-step re-masking, masking weights and optimizer "
                        "state, and one adaptation in isolation")
    return p.parse_args()


def build(args, sparse, device):
    torch.manual_seed(0)
    model = timm.create_model(args.model, kernel_size=args.kernel_size, width_factor=args.width_factor,
                              Decom=True).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    masking = None
    if sparse:
        masking = sparse_core.Masking(model, optimizer, 100_000, sparsity=args.sparsity,
                                      sparse_init="snip", growth=args.growth, prune_rate=0.3,
                                      update_frequency=args.update_frequency)
        x = torch.randn(8, 3, args.input_size, args.input_size, device=device)
        masking.init(x, torch.randint(0, 1000, (8,), device=device), nn.CrossEntropyLoss())
    return model, optimizer, masking


def run_steps(model, optimizer, masking, images, targets, n, amp_dtype, scaler, ema=None):
    criterion = nn.CrossEntropyLoss()
    for _ in range(n):
        with torch.autocast("cuda", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = criterion(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if masking is not None:
            masking.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            if masking is not None:
                masking.update_ema(ema, model)
            else:
                ema.update(model)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/sparse_overhead.py needs a CUDA GPU (it times CUDA training steps)")
    if args.steps % args.update_frequency:
        raise SystemExit("--steps must be a multiple of -u so adaptations count at their real rate")
    device = torch.device("cuda")
    amp_dtype = DTYPES[args.dtype]
    images = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    times = {"dense": [], "sparse": []}
    setups = {mode: build(args, mode == "sparse", device) for mode in times}
    emas = {}
    for mode, (model, _, masking) in setups.items():
        if args.model_ema:
            from timm.utils import ModelEmaV3
            emas[mode] = ModelEmaV3(model, decay=0.9999)
            if masking is not None:
                masking.mask_ema(emas[mode].module)
    scaler = torch.amp.GradScaler("cuda", enabled=args.dtype == "fp16")
    for mode, (model, optimizer, masking) in setups.items():
        run_steps(model, optimizer, masking, images, targets, args.warmup, amp_dtype, scaler,
                  emas.get(mode))
        if masking is not None:
            masking.steps = 0  # timed steps then include adaptations at steps u, 2u, ...
    torch.cuda.synchronize()
    for r in range(args.rounds):
        for mode, (model, optimizer, masking) in setups.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_steps(model, optimizer, masking, images, targets, args.steps, amp_dtype, scaler,
                      emas.get(mode))
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.steps * 1e3
            times[mode].append(ms)
            print(json.dumps({"round": r, "mode": mode, "ms_per_step": round(ms, 3)}), flush=True)
    if args.breakdown:
        model, optimizer, masking = setups["sparse"]
        # Per step ``step()`` re-masks the weights (and SGD momentum) as one CUDA graph; all
        # optimizer state is masked only with --sparse_zero_state, when masks change.
        remask_state = lambda: masking.apply_masks(with_state=True)  # noqa: E731
        for name, fn, n in (("remask_weights_ms", masking.apply_masks, 50),
                            ("apply_masks_with_state_ms", remask_state, 10),
                            ("adaptation_ms", masking._adapt, 3)):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            print(json.dumps({name: round((time.perf_counter() - t0) / n * 1e3, 3)}), flush=True)
    dense, sparse = statistics.median(times["dense"]), statistics.median(times["sparse"])
    print(json.dumps({"model": args.model, "batch": args.batch, "dtype": args.dtype,
                      "u": args.update_frequency, "growth": args.growth, "model_ema": args.model_ema,
                      "gpu": torch.cuda.get_device_name(), "dense_ms": round(dense, 3),
                      "sparse_ms": round(sparse, 3),
                      "overhead_pct": round(100 * (sparse - dense) / dense, 2)}), flush=True)


if __name__ == "__main__":
    main()
