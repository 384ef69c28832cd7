r"""Training-step throughput of SLaK-T against its baselines, side by side in one process.

Step mode (default) times forward + backward + AdamW step on random 224x224 batches, for every
combination of the chosen models, precisions, channels-last and torch.compile settings:

    python benchmarks/train_throughput.py --batch 64 --dtypes bf16 fp16 fp32 --compile both \
        --channels_last both --models slak slak_sparse slak_cudnn convnext_timm

Models: ``slak`` (SLaK-T, width 1.3, 51 49 47 13 5, Decom, our large-kernel convolution),
``slak_sparse`` (the same with dynamic sparsity, ``-u`` adaptations included in the timed steps),
``slak_unaligned`` (the same with ``align_pointwise=False``: compiled pointwise layers on
the width-1.3 channel counts as they are, not on operands padded to 8-element rows, and the
stem and downsampling layers through cuDNN's convolution), ``slak_cudnn_downsample`` (only the
latter: ``PatchConv2d.align`` off), ``slak_cudnn`` (the same network with its large-kernel
convolutions through cuDNN, ``F.conv2d``),
``slak_keep_small`` (the same with ``recompute_small``
off: autograd keeps each small branch's convolution output instead of recomputing it),
``slak_freelk`` (the same network with every large-kernel convolution replaced by the identity:
the ceiling that a free large-kernel convolution would give), ``slak_ddp`` (the default model
wrapped as ``main.py`` wraps it under ``torchrun --nproc_per_node 1``: SyncBatchNorm and
DistributedDataParallel over one NCCL process), ``slak_base`` (SLaK-B, width 1.3,
51 49 47 13 5, Decom), ``convnext_timm`` (timm's ``convnext_tiny``).

``--grad_checkpointing on|off|both`` times the models with per-block activation checkpointing
(``set_grad_checkpointing``) too; rows of ``slak_sparse`` also report the peak memory of the
SNIP batch that initialises the masks (``snip_peak_mem_gib``); e.g. SLaK-B's peak memory and images/s with and without it:

    python benchmarks/train_throughput.py --batch 64 --dtypes bf16 --compile on \
        --models slak_base --grad_checkpointing both

Inference mode (``--inference``) times eval-mode forwards without autograd, in the same process,
of ``slak`` (the train form), ``slak_deploy`` (after ``reparameterize()``: two biased convolutions
per unit, run in one pass by ``depthwise_conv2d_sum``), ``slak_deploy_separate`` (the same units
as two convolutions and a sum), ``slak_deploy_unaligned`` (``align_pointwise=False``),
``slak_deploy_cudnn_downsample`` (stem and downsampling layers through cuDNN's convolution),
``slak_deploy_cudnn`` (the deployed model through cuDNN) and ``convnext_timm``:

    python benchmarks/train_throughput.py --inference --batch 256 --dtypes bf16 --compile on \
        --compile_modes reduce-overhead --models slak slak_deploy slak_deploy_cudnn convnext_timm

End-to-end mode runs ``main.py`` on the synthetic data for ``--iters`` optimizer steps, so that
data loading, logging, EMA and sparsity are included. The model is SLaK-T (width 1.3, 51 49 47 13 5,
Decom) at 224x224 unless flags after ``--``, which go to ``main.py`` last, say otherwise:

    python benchmarks/train_throughput.py --end_to_end --iters 200 --batch 64 -- --compile true \
        --use_amp true --amp_dtype bfloat16 --channels_last true --sparse -u 100

``--ddp both`` runs it plainly and under ``torchrun --nproc_per_node 1`` (DDP, SyncBatchNorm)
and prints their ratio. ``--repeats N`` runs each case N times on the same machine, alternating
their order, and prints every repeat's ratio and their median: one pair is at the mercy of the
machine's noise, which moves a run by several per cent. It prints one JSON line per run with ``img_per_s_epoch`` (the whole epoch, first-step compilation
included) and ``img_per_s_steady`` (the iterations after the first logged window, or after
``--steady_after`` iterations where that is later, from the
progress lines and the epoch's total time; see :func:`parse_main_log`), and the last logged
window's seconds per iteration and, of those, seconds waiting for the loader
(``last_window_data_wait_s``: well above 0, the loader bounds the run), every logged window's
seconds per iteration with the host's busy CPUs over it (``window_iter_s``,
``window_host_busy_cores`` of ``host_cpus``, from ``/proc/stat``: whether the loader's workers
leave the training process a core); ``main.py``'s output is
kept in ``--output_dir`` as ``main_plain.log`` / ``main_ddp.log`` (its stderr beside them, as
``main_plain.stderr.log`` / ``main_ddp.stderr.log``; with ``--repeats``, numbered:
``main_plain_1.log``, ...). ``--device cpu`` runs the
same on the CPU, as a smoke test of this script (e.g. with ``-- --input_size 32 --width_factor
0.25``).

``--profile`` adds, per case, the GPU time of 5 more steps (or forwards) by part (large-kernel
convolutions, matmuls, norms, pointwise, layout copies, optimizer) and the costliest kernels.
With ``--end_to_end`` it runs ``main.py`` through ``benchmarks/profiled_main.py`` instead and adds
its figures to each row (``profile``: GPU time per step against the unprofiled wall time per step,
which tells a host-bound run from a GPU-bound one; see that script). The rows' img/s then include
the profiled steps and the profiler's own work: time throughput without ``--profile``.

Step mode prints one JSON line per case and a summary table; both modes end with a JSON line
naming the device and versions.
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import timm
import torch
import torch.nn as nn

import SLaK  # noqa: F401 - registers the SLaK models
from depthwise_conv2d_implicit_gemm import DepthWiseConv2dImplicitGEMM, heuristics
from distributed import data_parallel
from fast_layers import PatchConv2d

REPO = Path(__file__).resolve().parents[1]

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
SLAK_T = dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True, drop_path_rate=0.1)


TRAIN_MODELS = ["slak", "slak_unaligned", "slak_cudnn_downsample", "slak_keep_small",
                "slak_sparse", "slak_cudnn", "slak_freelk", "slak_ddp", "slak_base", "convnext_timm"]
INFERENCE_MODELS = ["slak", "slak_deploy", "slak_deploy_separate", "slak_deploy_unaligned",
                    "slak_deploy_cudnn_downsample", "slak_deploy_cudnn", "convnext_timm"]
# Heuristics (``heuristics.Tuning`` fields) that a model runs under, on top of ``--tuning``.
MODEL_TUNING = {"slak_deploy_separate": dict(cross_unit=False)}


@contextlib.contextmanager
def model_tuning(name):
    """Run (and trace) model ``name`` under its ``MODEL_TUNING``."""
    default = heuristics.TUNING
    heuristics.TUNING = dataclasses.replace(default, **MODEL_TUNING.get(name, {}))
    try:
        yield
    finally:
        heuristics.TUNING = default


def identity_forward(self, x):
    return x


def single_process_ddp(model):
    """``model`` as ``main.py`` trains it under ``torchrun --nproc_per_node 1``: SyncBatchNorm,
    then DistributedDataParallel over a one-process NCCL group (SyncBatchNorm runs no
    collective for one process, as in that run; DDP's gradient all-reduce and, under
    ``torch.compile``, its graph splits at bucket boundaries remain)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return data_parallel(model, torch.device("cuda", torch.cuda.current_device()))


def build(name, sparse_update_frequency):
    """Return ``(model, masking_factory)`` for a benchmark model name."""
    if name == "convnext_timm":
        return timm.create_model("convnext_tiny", drop_path_rate=0.1), None
    model = timm.create_model("SLaK_base" if name == "slak_base" else "SLaK_tiny",
                              align_pointwise=not name.endswith("unaligned"), **SLAK_T)
    if name.startswith("slak_deploy"):
        model.eval().reparameterize()
    for m in model.modules():
        if isinstance(m, PatchConv2d):
            m.align = not name.endswith(("unaligned", "cudnn_downsample"))
        if isinstance(m, SLaK.LargeKernelUnit):
            # slak_freelk: every convolution through its module, so that all become identities.
            m.recompute_small = name != "slak_keep_small"
    replacement = {"slak_cudnn": nn.Conv2d.forward, "slak_deploy_cudnn": nn.Conv2d.forward,
                   "slak_freelk": identity_forward}.get(name)
    if replacement is not None:
        for m in model.modules():
            if isinstance(m, DepthWiseConv2dImplicitGEMM):
                m.forward = types.MethodType(replacement, m)
    if name != "slak_sparse":
        return model, None

    def masking_factory(model, optimizer, images, targets, criterion, total_steps):
        import sparse_core
        masking = sparse_core.Masking(model, optimizer, total_steps, sparsity=0.4, sparse_init="snip",
                                      update_frequency=sparse_update_frequency)
        masking.init(images, targets, criterion)
        return masking
    return model, masking_factory


# Kernel-name patterns of the step's parts, first match wins (``--profile``).
KERNEL_CATEGORIES = [
    ("large-kernel convs", ("dwconv",)),
    ("matmuls (pointwise layers, head)", ("gemm", "cutlass", "sm90_", "sm80_", "nvjet", "cublas")),
    ("optimizer", ("multi_tensor", "fused_adam", "adamw", "foreach")),
    ("layout copies", ("copy", "transpose", "permute")),
    ("norms and reductions (Inductor)", ("triton_red", "triton_per")),
    ("pointwise (Inductor)", ("triton_poi",)),
]


def kernel_category(name):
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def profile_steps(step, first, count):
    """GPU milliseconds per step by ``KERNEL_CATEGORIES``, the ten costliest kernels, and the
    eager PyTorch operators that launched the most GPU time (in a compiled step, the code that
    Inductor did not generate: inside custom ops, fallbacks, the optimizer)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(first, first + count):
            step(i)
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.events():
        # GPU-side annotations (``Optimizer.step#AdamW.step``, ``DistributedDataParallel.forward``)
        # span kernels that are counted on their own.
        if evt.device_type == torch.autograd.DeviceType.CUDA and \
                not getattr(evt, "is_user_annotation", False):
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.time_range.elapsed_us() / count / 1e3
    categories = {}
    for name, ms in kernels.items():
        categories[kernel_category(name)] = categories.get(kernel_category(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    aten = sorted(((e.key, e.self_device_time_total / count / 1e3) for e in prof.key_averages()
                   if e.key.startswith("aten::")), key=lambda kv: -kv[1])[:10]
    return dict(gpu_ms=round(sum(kernels.values()), 2),
                top_aten_ops_ms={k: round(v, 3) for k, v in aten if v > 0},
                gpu_ms_by_part={k: round(v, 2) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
                top_kernels_ms={k[:70]: round(v, 3) for k, v in top})


def release_gpu_memory():
    """Free what a finished case left on the GPU before the next one is measured: compiled
    graphs with their CUDA-graph pools, and objects held in reference cycles (DDP's reducer and
    its buckets), which would otherwise count in the next case's peak memory."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def time_training_step(name, dtype_name, channels_last, compile_model, batch, steps, warmup,
                       sparse_update_frequency, compile_mode="default", grad_checkpointing=False,
                       profile=False):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, masking_factory = build(name, sparse_update_frequency)
    model.set_grad_checkpointing(grad_checkpointing)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if name == "slak_ddp":
        model = single_process_ddp(model)
    amp_dtype = DTYPES[dtype_name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # A few distinct batches so the timing is not of one cached input.
    batches = [(torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=memory_format),
                torch.randint(0, 1000, (batch,), device=device)) for _ in range(3)]
    masking, snip_peak = None, None
    if masking_factory is not None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        masking = masking_factory(model, optimizer, *batches[0], criterion, warmup + steps)
        torch.cuda.synchronize()
        snip_peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    train_model = torch.compile(model, mode=compile_mode) if compile_model else model

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

    # Peak memory over warm-up and timed steps: CUDA graphs (compile mode reduce-overhead)
    # allocate their memory pool while capturing during the warm-up.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        step(i)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    result = dict(model=name, dtype=dtype_name, channels_last=channels_last, compile=compile_model,
                  grad_checkpointing=grad_checkpointing,
                  batch=batch, steps=steps, step_ms=round(ms, 2), img_per_s=round(batch * 1000 / ms, 1),
                  peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
    if snip_peak is not None:  # the SNIP batch that initialises the masks, before the steps
        result["snip_peak_mem_gib"] = snip_peak
    if profile:
        result.update(profile_steps(step, warmup + steps, 5))
    return result


@torch.no_grad()
def time_inference(name, dtype_name, channels_last, compile_model, batch, steps, warmup,
                   compile_mode="default", profile=False):
    """Eval-mode forward passes of ``batch`` 224x224 images: images/s and peak memory (and with
    ``profile`` the GPU time by part, as for training steps)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, _ = build(name, None)
    model.eval().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = DTYPES[dtype_name]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = [torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=memory_format)
              for _ in range(2)]
    run_model = torch.compile(model, mode=compile_mode) if compile_model else model

    def forward(i):
        with model_tuning(name), torch.autocast("cuda", dtype=amp_dtype,
                                                enabled=amp_dtype is not None):
            return run_model(images[i % len(images)])

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        forward(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        forward(i)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    result = dict(mode="inference", model=name, dtype=dtype_name, channels_last=channels_last,
                  compile=compile_model, batch=batch, steps=steps, step_ms=round(ms, 2),
                  img_per_s=round(batch * 1000 / ms, 1),
                  peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
    if profile:
        result.update(profile_steps(forward, warmup + steps, 5))
    return result


# Progress lines of metric_logger.MetricLogger.log_every for training, e.g.
#   Epoch: [0]  [ 10/200]  eta: 0:00:31  lr: ...  loss: ...  time: 0.1571  data: 0.0008  max mem: ...
# where "time" is the mean duration of the last WINDOW iterations (metric_logger.SmoothedValue's
# default window), and the epoch's closing line
#   Epoch: [0] Total time: 0:00:32 (0.1603 s / it)
PROGRESS_LINE = re.compile(r"^Epoch: \[\d+\]\s+\[\s*(\d+)/(\d+)\].*\btime: ([\d.]+)\s+data: ", re.M)
# The same line's loader wait: the mean over the logged window of the time spent waiting for a batch.
DATA_WAIT = re.compile(r"^Epoch: \[\d+\]\s+\[.*\btime: ([\d.]+)\s+data: ([\d.]+)", re.M)
TOTAL_LINE = re.compile(r"^Epoch: \[\d+\] Total time: \S+ \(([\d.]+) s / it\)", re.M)


def parse_main_log(stdout, window=None, steady_after=0):
    """Seconds per training iteration from main.py's output of one epoch.

    Returns ``(epoch, steady, warmup_iters)``: ``epoch`` is the closing line's mean over every
    iteration; ``steady`` the mean over the iterations after the first ``warmup_iters``:
    periodic costs (sparse adaptations, EMA, logging) included, compilation and warm-up excluded.

    A progress line at iteration i gives the mean of the last ``window`` iterations, so the exact
    total time of iterations 0..i is known at every line of the first window (its mean times
    i + 1) and, from there, at every line ``window`` iterations after a known one (add ``window``
    times its mean). The warm-up ends at the last such line of the first window or, when
    ``steady_after`` asks for more, at the first such line at or after that many iterations;
    ``steady`` is (epoch total - that) / (iterations left). The 4 printed decimals cost at most
    0.1 ms per iteration of accuracy; zero "time" values (iterations shorter than that) are
    harmless. With a single iteration ``steady`` is the epoch figure. Raises ``ValueError`` when
    the output holds no complete training epoch, or when ``steady_after`` leaves no logged
    iteration to time.
    """
    if window is None:
        from metric_logger import SmoothedValue
        window = SmoothedValue().deque.maxlen
    total_match = TOTAL_LINE.search(stdout)
    progress = [(int(i), int(n), float(t)) for i, n, t in PROGRESS_LINE.findall(stdout)]
    if total_match is None or not progress:
        raise ValueError("no complete training epoch in main.py's output (no progress line or no "
                         "'Epoch: [..] Total time' line)")
    epoch = float(total_match.group(1))
    total = progress[0][1]
    if epoch <= 0:
        raise ValueError(f"main.py reports {epoch} s per iteration")
    elapsed = {}  # progress line index i -> total seconds of iterations 0..i
    for i, n, t in progress:
        if n != total:
            continue
        if i + 1 <= window:
            elapsed[i] = (i + 1) * t
        elif i - window in elapsed:
            elapsed[i] = elapsed[i - window] + window * t
    first = [i for i in elapsed if i + 1 <= window and i < total - 1]
    if not first:
        return epoch, epoch, 0
    k = max(first)
    if steady_after > k + 1:
        later = [i for i in elapsed if i + 1 >= steady_after and i < total - 1]
        if not later:
            raise ValueError(f"no progress line after {steady_after} of the {total} iterations "
                             f"leaves iterations to time: run more iterations")
        k = min(later)
    rest = epoch * total - elapsed[k]
    if rest <= 0:  # rounding of a very short run: nothing measurable after the warm-up
        return epoch, epoch, 0
    return epoch, rest / (total - k - 1), k + 1


class HostLoad:
    """The whole host's busy logical CPUs, on average between successive calls of
    :meth:`busy_cores`, from ``/proc/stat`` (Linux; None elsewhere): whether main.py's loader
    workers and the training process contend for the cores."""

    def __init__(self):
        try:
            with open("/proc/stat") as stat:
                self.cpus = sum(1 for line in stat if re.match(r"cpu\d+ ", line))
        except OSError:
            self.cpus = None
        self.last = self._read()

    @staticmethod
    def _read():
        """(busy, total) jiffies of all CPUs since boot; idle and I/O wait are not busy."""
        try:
            with open("/proc/stat") as stat:
                user, nice, system, idle, iowait, irq, softirq, steal = \
                    map(int, stat.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait

    def busy_cores(self):
        now = self._read()
        if now is None or self.last is None:
            return None
        (busy, total), (busy_before, total_before) = now, self.last
        self.last = now
        if total == total_before:
            return None
        return round(self.cpus * (busy - busy_before) / (total - total_before), 2)


def end_to_end(args, extra, ddp=False, repeat=None):
    """Run main.py for ``iters`` optimizer steps on synthetic data; images/s of the epoch.
    ``ddp``: under ``torchrun --standalone --nproc_per_node 1`` (DistributedDataParallel,
    SyncBatchNorm, NCCL on the GPU). ``repeat``: the run's number among ``--repeats``, which
    names its kept logs (None: a single run)."""
    out = Path(args.output_dir)
    update_freq = argparse.ArgumentParser(add_help=False)
    update_freq.add_argument("--update_freq", type=int, default=1)
    micro_batches = args.iters * max(1, update_freq.parse_known_args(extra)[0].update_freq)
    launcher = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if ddp else [])
    run = ("ddp" if ddp else "plain") + (f"_{repeat}" if repeat is not None else "")
    profile_json = out / f"profile_{run}.json"
    if args.profile:
        launcher += [str(REPO / "benchmarks" / "profiled_main.py"), "--iters", str(args.iters),
                     "--steps", str(min(20, args.iters // 4)), "--json", str(profile_json), "--"]
        profile_json.unlink(missing_ok=True)
    else:
        launcher.append(str(REPO / "main.py"))
    command = [*launcher, "--data_set", "synthetic",
               "--device", args.device, "--input_size", "224", "--nb_classes", "1000",
               "--model", "SLaK_tiny", "--width_factor", "1.3", "--Decom", "true",
               "--kernel_size", *map(str, SLAK_T["kernel_size"]), "--drop_path", "0.1",
               "--epochs", "1", "--warmup_steps", "10", "--batch_size", str(args.batch),
               "--synthetic_train_size", str(args.batch * micro_batches), "--disable_eval", "true",
               "--save_ckpt", "false", "--auto_resume", "false", "--output_dir", str(out),
               "--num_workers", str(args.num_workers), "--pin_mem", str(args.device != "cpu"),
               *extra]
    out.mkdir(parents=True, exist_ok=True)
    stderr_log = out / f"main_{run}.stderr.log"  # kept, e.g. for TORCH_LOGS=recompiles
    host = HostLoad()
    lines, busy_cores = [], []
    start = time.time()
    # main.py's output is read as it comes, to sample the host's load at every progress line.
    with open(stderr_log, "w") as stderr, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1")) as process:
        for line in process.stdout:
            lines.append(line)
            if PROGRESS_LINE.search(line):
                busy_cores.append(host.busy_cores())
    wall = time.time() - start
    stdout, stderr_text = "".join(lines), stderr_log.read_text()
    if process.returncode != 0:
        print(stdout[-3000:], stderr_text[-3000:], sep="\n", file=sys.stderr)
        last = next((line for line in reversed(stderr_text.splitlines()) if line.strip()), "")
        raise SystemExit(f"error: main.py failed (exit {process.returncode}): {last}\n"
                         f"command: {' '.join(command)}")
    try:
        epoch, steady, warmup = parse_main_log(stdout, steady_after=args.steady_after)
    except ValueError as exc:
        print(stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"error: {exc}\ncommand: {' '.join(command)}") from None
    log = out / f"main_{run}.log"
    log.write_text(stdout)
    batch = args.batch  # images per iteration (one micro-batch of one process)
    # A loader that cannot keep up shows as waiting for data in the last logged window.
    iter_window, data_window = map(float, DATA_WAIT.findall(stdout)[-1])
    row = dict(mode="end_to_end", ddp=ddp, repeat=repeat, device=args.device,
               command=" ".join(command[1:]),
               wall_s=round(wall, 1), iterations=micro_batches, warmup_iterations=warmup,
               img_per_s_epoch=round(batch / epoch, 1), img_per_s_steady=round(batch / steady, 1),
               last_window_iter_s=iter_window, last_window_data_wait_s=data_window, log=str(log),
               window_iter_s=[float(t) for _, _, t in PROGRESS_LINE.findall(stdout)],
               window_host_busy_cores=busy_cores, host_cpus=host.cpus)
    if args.profile:
        row["profile"] = json.loads(profile_json.read_text())
    print(json.dumps(row), flush=True)
    return row


def end_to_end_repeats(args, extra):
    """The end-to-end runs of ``--ddp`` and ``--repeats``, and, with ``--ddp both``, the ratio
    of each repeat's runs and their median.

    Repeats alternate the order of the two runs (plain then torchrun, torchrun then plain, ...)
    so that a drift of the machine over the runs (its clocks, its other load) weighs on both
    alike. Every run after the first of its kind also finds Inductor's cache warm, which shortens
    its compilation (excluded from the steady rate) but not its steady iterations.
    """
    cases = {"on": [True], "off": [False], "both": [False, True]}[args.ddp]
    rows, ratios = [], []
    for k in range(args.repeats):
        repeat = k + 1 if args.repeats > 1 else None
        order = cases if k % 2 == 0 else cases[::-1]
        runs = {ddp: end_to_end(args, extra, ddp, repeat) for ddp in order}
        rows += runs.values()
        if len(runs) == 2:
            ratios.append(runs[True]["img_per_s_steady"] / runs[False]["img_per_s_steady"])
            print(f"torchrun (1 process) vs plain{f', repeat {repeat}' if repeat else ''}: "
                  f"{ratios[-1]:.3f}", flush=True)
    if len(ratios) > 1:
        print(f"torchrun (1 process) vs plain over {len(ratios)} repeats: median "
              f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=None,
                        choices=list(dict.fromkeys(TRAIN_MODELS + INFERENCE_MODELS)),
                        help=f"training steps: {' '.join(TRAIN_MODELS)} (default: all but "
                             f"slak_freelk); --inference: {' '.join(INFERENCE_MODELS)} (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--compile", default="both", choices=["on", "off", "both"])
    parser.add_argument("--compile_modes", nargs="+", default=["default"],
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="torch.compile modes to time (reduce-overhead: CUDA graphs)")
    parser.add_argument("--channels_last", default="on", choices=["on", "off", "both"])
    parser.add_argument("--grad_checkpointing", default="off", choices=["on", "off", "both"],
                        help="training steps: per-block activation checkpointing")
    parser.add_argument("--sparse_update_frequency", "-u", type=int, default=100)
    parser.add_argument("--profile", action="store_true",
                        help="also split the GPU time of 5 more steps (or forwards) by part "
                             "(profiler); end-to-end: run main.py through profiled_main.py")
    parser.add_argument("--tuning", type=json.loads, default={},
                        help="step and inference modes: heuristics.Tuning fields for the whole "
                             "process, as a JSON dict, e.g. '{\"transpose_align\": 2}'")
    parser.add_argument("--json", default=None, help="also write all rows to this file")
    parser.add_argument("--end_to_end", action="store_true", help="time main.py instead")
    parser.add_argument("--inference", action="store_true",
                        help="time eval-mode forwards (no autograd) instead of training steps")
    parser.add_argument("--iters", type=int, default=200, help="end-to-end: optimizer steps")
    parser.add_argument("--steady_after", type=int, default=0,
                        help="end-to-end: time the steady rate after at least this many iterations "
                             "(default: after the first logged window)")
    parser.add_argument("--num_workers", type=int, default=12)
    parser.add_argument("--output_dir", default="/tmp/slak_e2e")
    parser.add_argument("--ddp", default="off", choices=["on", "off", "both"],
                        help="end-to-end: also (on: only) under torchrun with one process")
    parser.add_argument("--repeats", type=int, default=1,
                        help="end-to-end: run each case this many times, alternating their order; "
                             "with --ddp both, print each repeat's ratio and their median")
    parser.add_argument("--device", default="cuda",
                        help="end-to-end: main.py's --device (cpu for a smoke test); step mode: cuda only")
    args, extra = parser.parse_known_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give at least 1")
    if args.repeats > 1 and not args.end_to_end:
        parser.error("--repeats applies to --end_to_end; step mode times its cases once, "
                     "side by side in one process")

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU (step mode times GPU training steps; the end-to-end "
                         "mode runs on the CPU with --device cpu)")
    if not args.end_to_end and not args.device.startswith("cuda"):
        raise SystemExit("error: step mode times CUDA training steps; --device cpu works with --end_to_end")

    if args.models is None:
        args.models = INFERENCE_MODELS if args.inference else \
            [m for m in TRAIN_MODELS if m not in ("slak_freelk", "slak_ddp")]
    wrong = [m for m in args.models if m not in (INFERENCE_MODELS if args.inference else TRAIN_MODELS)]
    if wrong and not args.end_to_end:
        parser.error(f"--models {' '.join(wrong)}: not timed in "
                     f"{'inference' if args.inference else 'training-step'} mode")

    if args.grad_checkpointing != "off" and (args.inference or args.end_to_end):
        parser.error("--grad_checkpointing applies to training steps; for --end_to_end pass "
                     "main.py's -- --grad_checkpointing true")

    if not 0 <= args.steady_after < args.iters:
        parser.error(f"--steady_after {args.steady_after} must be at least 0 and below --iters "
                     f"{args.iters}")

    if args.tuning:
        if args.end_to_end:
            parser.error("--tuning applies to step and inference modes")
        try:
            heuristics.TUNING = dataclasses.replace(heuristics.TUNING, **args.tuning)
        except TypeError as exc:
            parser.error(f"--tuning: {exc}")

    if args.end_to_end:
        extra = [e for e in extra if e != "--"]
        rows = end_to_end_repeats(args, extra)
    else:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        choices = {"on": [True], "off": [False], "both": [False, True]}
        rows = []
        for dtype_name in args.dtypes:
            for channels_last in choices[args.channels_last]:
                compile_cases = [(c, m) for c in choices[args.compile]
                                 for m in (args.compile_modes if c else ["default"])]
                train_cases = [(c, m, g) for c, m in compile_cases
                               for g in choices[args.grad_checkpointing]]
                for compile_model, mode, grad_ckpt in train_cases:
                    for name in args.models:
                        try:
                            if args.inference:
                                row = time_inference(name, dtype_name, channels_last, compile_model,
                                                     args.batch, args.steps, args.warmup, mode,
                                                     args.profile)
                            else:
                                row = time_training_step(name, dtype_name, channels_last,
                                                         compile_model, args.batch, args.steps,
                                                         args.warmup, args.sparse_update_frequency,
                                                         mode, grad_ckpt, args.profile)
                        except Exception as exc:  # report and go on with the other cases
                            row = dict(model=name, dtype=dtype_name, channels_last=channels_last,
                                       compile=compile_model, grad_checkpointing=grad_ckpt,
                                       error=f"{type(exc).__name__}: {exc}"[:300])
                        # The case's model, optimizer and batches went with its frame.
                        release_gpu_memory()
                        row["compile_mode"] = mode if compile_model else None
                        print(json.dumps(row), flush=True)
                        rows.append(row)
        print_summary(rows)
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if torch.distributed.is_initialized():   # the one-process group of slak_ddp
        torch.distributed.destroy_process_group()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        platform.processor() or platform.machine()
    print(json.dumps(dict(device=device, torch=torch.__version__, tuning=args.tuning,
                          cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                          timm=timm.__version__)))


def compile_label(row):
    return row.get("compile_mode") or "default" if row["compile"] else "off"


def model_label(row):
    return row["model"] + (" ckpt" if row.get("grad_checkpointing") else "")


def print_summary(rows):
    print(f"\n{'model':<18} {'dtype':<5} {'cl':<3} {'compile':<16} {'img/s':>8} {'ms/step':>8} "
          f"{'peak GiB':>8}")
    for r in rows:
        head = f"{model_label(r):<18} {r['dtype']:<5} {int(r['channels_last']):<3} {compile_label(r):<16} "
        if "error" in r:
            print(head + f"error: {r['error'][:60]}")
        else:
            print(head + f"{r['img_per_s']:>8} {r['step_ms']:>8} {r['peak_mem_gib']:>8}")
    # The reference of every ratio: the fastest compiled ConvNeXt-T of the same precision here.
    ok = [r for r in rows if "error" not in r]
    for dtype in dict.fromkeys(r["dtype"] for r in ok):
        refs = [r for r in ok if r["model"] == "convnext_timm" and r["dtype"] == dtype and r["compile"]]
        if not refs:
            continue
        ref = max(refs, key=lambda r: r["img_per_s"])
        print(f"reference: convnext_timm {dtype} cl={int(ref['channels_last'])} "
              f"compile={compile_label(ref)} {ref['img_per_s']} img/s, {ref['peak_mem_gib']} GiB")
        for r in ok:
            if r["model"].startswith("slak") and r["dtype"] == dtype:
                print(f"ratio {model_label(r)} {dtype} cl={int(r['channels_last'])} "
                      f"compile={compile_label(r)}: {r['img_per_s'] / ref['img_per_s']:.3f} "
                      f"(memory {r['peak_mem_gib'] / ref['peak_mem_gib']:.2f}x)")


if __name__ == "__main__":
    main()
