"""The DistributedDataParallel wrapper of every trainer (``distributed.data_parallel``), run by
two gloo processes on the CPU: gradients averaged, buffers broadcast from rank 0."""
import copy
import os

import torch
from torch import nn

import distributed
from conftest import spawn_gloo_processes


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)


def _local_gradients(model, rank):
    model = copy.deepcopy(model)
    images, targets = _batch(rank)
    nn.functional.cross_entropy(model(images), targets).backward()
    return [p.grad for p in model.parameters()]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = _model()
        expected = [sum(grads) / world for grads in
                    zip(*(_local_gradients(model, r) for r in range(world)))]
        ddp = distributed.data_parallel(model, torch.device("cpu"))
        for step in range(2):   # the second step fills the buckets a gradient at a time again
            ddp.zero_grad(set_to_none=True)
            images, targets = _batch(rank)
            nn.functional.cross_entropy(ddp(images), targets).backward()
        torch.save([p.grad for p in model.parameters()] + expected,
                   os.path.join(out_dir, f"rank{rank}.pth"))
        # No rank tears its group down while the other may still use it (DDP's reducer
        # included).
        del ddp
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_averages_the_gradients_of_all_processes(tmp_path):
    spawn_gloo_processes(_worker, tmp_path)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        got, expected = saved[:len(saved) // 2], saved[len(saved) // 2:]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def _buffers_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # DDP refuses SyncBatchNorm on the CPU (its training forward needs a GPU); these modules
    # only run eval forwards, so lift that check to see their buffers on gloo (PyTorch has no
    # public switch for it: this replaces the private check).
    torch.nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = \
        lambda self, module: None
    try:
        results = {}
        for kind, norm in (("sync", nn.SyncBatchNorm(8)), ("plain", nn.BatchNorm2d(8))):
            model = nn.Sequential(nn.Conv2d(3, 8, 3), norm).eval()
            norm.running_mean.fill_(float(rank))  # the ranks disagree before wrapping
            ddp = distributed.data_parallel(model, torch.device("cpu"))
            at_wrap = norm.running_mean.clone()
            norm.running_mean.fill_(10.0 + rank)  # and drift apart again
            ddp(torch.randn(2, 3, 8, 8))
            results[kind] = (at_wrap, norm.running_mean.clone())
            del ddp
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pth"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_buffers_come_from_rank_0_and_only_plain_batchnorms_are_broadcast_each_forward(tmp_path):
    """SyncBatchNorm statistics are reduced over all ranks, so every rank updates them alike:
    they are broadcast once, when wrapping, not before every forward as plain BatchNorms are."""
    spawn_gloo_processes(_buffers_worker, tmp_path)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        for kind, (at_wrap, after_forward) in results.items():
            assert torch.all(at_wrap == 0.0), (kind, rank)
            expected = 10.0 + rank if kind == "sync" else 10.0
            assert torch.all(after_forward == expected), (kind, rank)
