"""One training epoch and one evaluation pass."""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from timm.utils import accuracy

from distributed import all_reduce_sum, get_rank, get_world_size
from metric_logger import MetricLogger, SmoothedValue
from optim_factory import set_schedule
from utils import TrainingDiverged


class SupervisedLoss:
    """``(model, samples, targets) -> (loss, logits)``; distillation provides the same interface."""

    def __init__(self, criterion):
        self.criterion = criterion

    def __call__(self, model, samples, targets):
        outputs = model(samples)
        return self.criterion(outputs, targets), outputs


def autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def stop_if_diverged(loss_value, epoch, step, device):
    """Raise ``TrainingDiverged`` in every process when the loss of any one is not finite.

    Each process puts its loss at its rank in one summed vector (a single all-reduce, at the
    logging cadence), so all stop at the same step, and rank 0, the one that prints, names the
    ranks whose loss diverged."""
    world = get_world_size()
    losses = [0.0] * world
    losses[get_rank()] = loss_value
    losses = all_reduce_sum(losses, device)
    diverged = [rank for rank, value in enumerate(losses) if not math.isfinite(value)]
    if not diverged:
        return
    where = "" if world == 1 else \
        f" on rank{'s' if len(diverged) > 1 else ''} {', '.join(map(str, diverged))} of {world}"
    raise TrainingDiverged(f"the loss is {losses[diverged[0]]}{where} at epoch {epoch}, step "
                           f"{step}; lower --lr, add --clip_grad 1.0, or use --amp_dtype bfloat16, "
                           f"check the data, then resume from the last checkpoint")


def train_one_epoch(model, loss_fn, data_loader, optimizer, device, epoch, scaler, *,
                    steps_per_epoch, start_steps, lr_schedule, wd_schedule, update_freq=1,
                    amp_dtype=None, max_norm=None, model_ema=None, mixup_fn=None, masking=None,
                    channels_last=False, log_writer=None, print_freq=10):
    """Train for one epoch of ``steps_per_epoch`` optimizer updates; returns averaged stats.

    Each update accumulates the gradients of ``update_freq`` micro-batches (DDP synchronises only
    on the last one), then steps the optimizer (through the fp16 GradScaler when enabled),
    re-applies the sparsity masks (adapting them every ``-u`` steps), zeroes the gradients and
    updates the EMA with the masks, in the original's order. The loss is read back from the device only
    every ``print_freq`` iterations, so the loop does not stall on host synchronisation; there
    every process stops if the loss of any is not finite (:func:`stop_if_diverged`).
    """
    model.train()
    metric_logger = MetricLogger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    can_skip_sync = hasattr(model, "no_sync")
    loss_sum, loss_count = torch.zeros((), device=device), 0
    optimizer.zero_grad(set_to_none=True)

    for data_iter_step, (samples, targets) in enumerate(
            metric_logger.log_every(data_loader, print_freq, header)):
        step = data_iter_step // update_freq
        if step >= steps_per_epoch:
            break
        it = start_steps + step  # global optimizer-step index
        if data_iter_step % update_freq == 0:
            set_schedule(optimizer, lr_schedule[it], wd_schedule[it])

        samples = samples.to(device, non_blocking=True)
        if channels_last:
            samples = samples.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        last_micro_step = (data_iter_step + 1) % update_freq == 0
        sync = nullcontext() if last_micro_step or not can_skip_sync else model.no_sync()
        with sync:
            with autocast(device, amp_dtype):
                loss, _ = loss_fn(model, samples, targets)
            scaler.scale(loss / update_freq).backward()
        loss_sum += loss.detach().float()
        loss_count += 1

        if last_micro_step:
            grad_norm = None
            if max_norm:
                scaler.unscale_(optimizer)
                # The model's parameters, as the original clipped them: a feature-distillation
                # projection trains unclipped beside the student.
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)  # skipped by the scaler on fp16 overflow
            scaler.update()
            # The original's order: mask (and adapt), zero the gradients, then the EMA, whose
            # decay is fixed from the first update (no step argument: no warm-up).
            sparse_stats = masking.step() if masking is not None else None
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                if masking is not None:
                    masking.update_ema(model_ema, model)
                else:
                    model_ema.update(model)
            if sparse_stats and log_writer is not None:
                log_writer.update(head="sparsity", step=it, **sparse_stats)

        if data_iter_step % print_freq == 0 or data_iter_step == len(data_loader) - 1:
            loss_value = (loss_sum / loss_count).item()
            loss_sum.zero_()
            loss_count = 0
            stop_if_diverged(loss_value, epoch, step, device)
            lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
            weight_decay = max(g["weight_decay"] for g in optimizer.param_groups)
            extra = {"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}
            grad_norm_value = grad_norm.item() if last_micro_step and grad_norm is not None else None
            metric_logger.update(loss=loss_value, lr=lr, weight_decay=weight_decay,
                                 grad_norm=grad_norm_value, **extra)
            if log_writer is not None:
                log_writer.update(head="train", step=it, loss=loss_value, lr=lr,
                                  weight_decay=weight_decay, grad_norm=grad_norm_value, **extra)

    metric_logger.synchronize_between_processes(device)
    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, channels_last=False, print_freq=10):
    """Top-1/top-5 accuracy (%) and cross-entropy over the whole set, exact across processes.

    Each process evaluates its own shard (no padding duplicates); sums are reduced at the end.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, n
    metric_logger = MetricLogger()
    for images, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        n = images.shape[0]
        acc1, acc5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               acc1.double() * n / 100, acc5.double() * n / 100,
                               torch.tensor(float(n), dtype=torch.float64, device=device)])
    loss_sum, correct1, correct5, count = all_reduce_sum(totals.tolist(), device)
    count = max(count, 1)
    stats = {"loss": loss_sum / count, "acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f"({int(count)} images)")
    return stats
