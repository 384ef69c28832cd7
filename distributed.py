"""Process-group setup for torchrun, ``torch.distributed.launch`` and SLURM, rank helpers, and
the DistributedDataParallel wrapper every trainer here uses."""
import datetime
import inspect
import os

import torch
import torch.distributed as dist

from utils import ConfigError


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(values, device):
    """Sum a list of floats over all processes; returns a list of floats."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def data_parallel(module, device, bucket_cap_mb=None):
    """``module`` in DistributedDataParallel on ``device`` (``cuda:<index>``, or the CPU with gloo).

    Gradients are views into DDP's communication buckets (``gradient_as_bucket_view``): after
    the all-reduce DDP copies no bucket back into separate gradient tensors, and none stay
    allocated beside the buckets. With ``zero_grad(set_to_none=True)`` each step's fresh
    gradients are still copied into the buckets once: from PyTorch 2.12 on, in one batched copy
    and one division per bucket (``batched_grad_copy``) instead of a scaled copy per parameter,
    each a kernel launched from the host. The values are the same as with the default (up to the
    last bit of a division by a world size that is not a power of two).

    Buffers are broadcast from rank 0 once, here. DDP's default broadcasts them again before
    every forward; that is skipped when every module holding buffers is a SyncBatchNorm: its
    running statistics come from statistics reduced over all processes, so every rank updates
    them identically, and the broadcast would only copy every BatchNorm's buffers each step.
    Other buffers (plain BatchNorms on the CPU) keep the per-forward broadcast.

    ``bucket_cap_mb``: the size of DDP's gradient buckets (None: PyTorch's default, 25 MB).
    Under ``torch.compile`` each bucket is also a graph piece (Dynamo splits the graph at bucket
    boundaries so that each bucket's all-reduce can start while the backward pass goes on):
    larger buckets mean fewer pieces to launch each step, and a later first all-reduce.
    """
    options = dict(device_ids=[device.index] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True)
    if bucket_cap_mb is not None:
        options["bucket_cap_mb"] = bucket_cap_mb
    ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    if "batched_grad_copy" in ddp_args:  # PyTorch >= 2.12
        options["batched_grad_copy"] = True
    owners = [m for m in module.modules() if next(m.buffers(recurse=False), None) is not None]
    if all(isinstance(m, torch.nn.SyncBatchNorm) for m in owners):
        if "forward_sync_buffers" in ddp_args:  # PyTorch >= 2.13: still broadcast at init
            options["forward_sync_buffers"] = False
        else:  # the older spelling skips the broadcast at init too: do that one here
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)
            options["broadcast_buffers"] = False
    return torch.nn.parallel.DistributedDataParallel(module, **options)


def init_distributed_mode(args):
    """Start the process group when launched by torchrun, ``torch.distributed.launch`` or SLURM.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` and
    ``args.dist_backend`` (NCCL on CUDA, gloo on CPU). A plain ``python main.py`` stays
    single-process. With ``--dist_on_itp true`` the processes are OpenMPI's (``mpirun``, as on
    Microsoft's ITP clusters), meeting at ``MASTER_ADDR:MASTER_PORT``.
    """
    if getattr(args, "dist_on_itp", False):
        needed = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  "MASTER_ADDR", "MASTER_PORT"]
        missing = [name for name in needed if name not in os.environ]
        if missing:
            raise ConfigError(f"--dist_on_itp true takes the processes from mpirun, but "
                              f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                              f"set; launch with mpirun and set "
                              f"MASTER_ADDR and MASTER_PORT, or drop --dist_on_itp")
        args.rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
        args.world_size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
        args.gpu = int(os.environ["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world_size),
                          LOCAL_RANK=str(args.gpu))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / torch.distributed.launch
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank >= 0 else 0))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            raise SystemExit("error: under SLURM set MASTER_ADDR to the first node's host name "
                             "(run_with_submitit.py does this for you)")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(args.rank), str(args.world_size)
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return

    args.distributed = True
    # --device cuda without a GPU is refused by the flag checks that follow: the group is still
    # made (over gloo) so that rank 0 alone reports it, as it reports every other bad flag.
    use_cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    barrier()
    if not is_main_process():
        _silence_print()


def _silence_print():
    """Only rank 0 prints, unless ``force=True`` is passed."""
    import builtins
    builtin_print = builtins.print

    def print(*args, **kwargs):  # noqa: A001 - deliberately shadows the builtin
        if kwargs.pop("force", False):
            builtin_print(*args, **kwargs)

    builtins.print = print
