"""Progress meters of the training and evaluation loops: ``MetricLogger`` prints a progress line
with ETA; its ``SmoothedValue`` series are summed over all processes at the end of an epoch."""
import datetime
import time
from collections import defaultdict, deque

import numpy as np
import torch

from distributed import all_reduce_sum


class SmoothedValue:
    """A series whose recent window (median, average) and global average are reported."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device="cpu"):
        self.count, self.total = all_reduce_sum([self.count, self.total], device)
        self.count = int(self.count)

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self):
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Collects named meters and prints a progress line with ETA every ``print_freq`` iterations."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self, device="cpu"):
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def log_every(self, iterable, print_freq, header=""):
        total = len(iterable)
        width = len(str(total))
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)",
              flush=True)
