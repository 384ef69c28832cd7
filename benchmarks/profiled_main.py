"""``main.py`` with the PyTorch profiler over a window of optimizer steps.

``train_throughput.py --end_to_end --profile`` runs this in place of ``main.py`` (plainly or under
``torchrun``); by hand:

    python benchmarks/profiled_main.py --iters 120 --steps 20 --json prof.json -- <main.py arguments>

The run is ``main.py``'s own, unchanged. Counting optimizer steps (a global post-step hook, so
dense, sparse and distillation runs alike), it profiles the ``--steps`` steps that end at the
run's middle step, then times the last ``--steps`` steps of the run without the profiler
(CUDA synchronised at both ends, so the figure is the steps' wall time). Per step, the JSON holds:

* ``gpu_ms``: the profiled steps' GPU kernel and copy time;
* ``wall_ms``: the unprofiled steps' wall time. Well above ``gpu_ms``, the host (Python, kernel
  launches, waits for the GPU) bounds the run, not the GPU;
* ``host_ms``: the profiled steps' host time in PyTorch operations (the profiler inflates it);
* the costliest operations on each side (``top_gpu``, ``top_host``).

The profiler's tables go to the same path with ``.txt`` in place of ``.json``.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

TOP = 12


def is_gpu_work(event):
    """A kernel or copy, as the profiler's own table totals them: not a named range
    (``record_function``, a compiled graph's call), whose GPU time spans kernels counted on their
    own."""
    return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def top(averages, key, steps, keep):
    rows = [(e.key, getattr(e, key) / 1e3 / steps) for e in averages
            if keep(e) and not e.key.startswith("ProfilerStep")]
    return [{"name": name[:120], "ms": round(ms, 3)}
            for name, ms in sorted(rows, key=lambda r: -r[1])[:TOP] if ms > 0]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps in each window")
    parser.add_argument("--iters", type=int, required=True,
                        help="optimizer steps the run will make (the windows are placed in them)")
    parser.add_argument("--json", required=True, help="where to write the figures")
    own, main_argv = sys.argv[1:], []
    if "--" in own:
        split = own.index("--")
        own, main_argv = own[:split], own[split + 1:]
    opts = parser.parse_args(own)
    profiled_end, timed_end = opts.iters // 2, opts.iters
    if opts.steps < 1 or profiled_end - opts.steps < 1 or timed_end - opts.steps < profiled_end + 1:
        parser.error(f"--iters {opts.iters} holds no two separate windows of --steps "
                     f"{opts.steps} after the first step; give at least {4 * opts.steps} iterations")

    device = main_argv[main_argv.index("--device") + 1] if "--device" in main_argv[:-1] else "cuda"
    cuda = torch.cuda.is_available() and device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    warmup = min(2, profiled_end - opts.steps)
    result = {}

    def summarise(prof):
        averages = prof.key_averages()
        result.update(
            gpu_ms=round(sum(e.self_device_time_total for e in averages if is_gpu_work(e))
                         / 1e3 / opts.steps, 3),
            host_ms=round(sum(e.self_cpu_time_total for e in averages) / 1e3 / opts.steps, 3),
            top_gpu=top(averages, "self_device_time_total", opts.steps, is_gpu_work),
            top_host=top(averages, "self_cpu_time_total", opts.steps, lambda e: True))
        Path(opts.json).with_suffix(".txt").write_text(
            averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                           row_limit=40, max_name_column_width=100) + "\n\n" +
            averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=100))

    # Step n of the profiler's schedule is the interval that ends at optimizer step n + 1.
    prof = profile(activities=activities, on_trace_ready=summarise,
                   schedule=schedule(wait=profiled_end - opts.steps - warmup, warmup=warmup,
                                     active=opts.steps, repeat=1))
    done, marks = [0], {}

    def after_step(*_):
        done[0] += 1
        if done[0] in (timed_end - opts.steps, timed_end):
            if cuda:
                torch.cuda.synchronize()
            marks[done[0]] = time.perf_counter()
        prof.step()

    register_optimizer_step_post_hook(after_step)
    import main as slak_main
    prof.start()
    try:
        slak_main.cli(main_argv)
    finally:
        prof.stop()
    if len(marks) < 2:
        raise SystemExit(f"error: main.py made {done[0]} optimizer steps, fewer than --iters "
                         f"{opts.iters}")
    wall = (marks[timed_end] - marks[timed_end - opts.steps]) / opts.steps * 1e3
    if int(os.environ.get("RANK", 0)) == 0:
        Path(opts.json).write_text(json.dumps(dict(steps=opts.steps, wall_ms=round(wall, 3),
                                                   **result)))


if __name__ == "__main__":
    main()
