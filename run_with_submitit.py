"""Launch main.py on a SLURM cluster through submitit, one process per GPU.

    python run_with_submitit.py --nodes 4 --ngpus 8 --partition gpu --job_dir /shared/slak_t \
        --Decom True --sparse --width_factor 1.3 -u 2000 --sparsity 0.4 --sparse_init snip \
        --prune_rate 0.5 --growth random --epochs 300 --model SLaK_tiny --drop_path 0.1 \
        --batch_size 128 --lr 4e-3 --update_freq 1 --model_ema true --model_ema_eval true \
        --data_path /path/to/imagenet-1k --kernel_size 51 49 47 13 5

Every ``main.py`` flag is accepted and checked as ``main.py`` checks it before anything is
submitted. Each task sets the variables torchrun would set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and runs ``main.main``. A pre-empted or timed-out
job requeues itself and continues from the newest checkpoint in ``--output_dir``
(``--job_dir`` by default) through ``--auto_resume``.
"""
import argparse
import os

import main as trainer
from utils import ConfigError, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser("submitit launcher for SLaK", parents=[trainer.get_args_parser()],
                                     add_help=False)
    parser.add_argument("--ngpus", default=8, type=int, help="GPUs per node")
    parser.add_argument("--nodes", default=1, type=int)
    parser.add_argument("--timeout", default=72 * 60, type=int, help="minutes per job")
    parser.add_argument("--job_dir", default="", type=str, help="submitit logs (and default output_dir)")
    parser.add_argument("--partition", default=None, type=str)
    parser.add_argument("--cpus_per_task", default=10, type=int)
    parser.add_argument("--mem_gb_per_gpu", default=40, type=int)
    parser.add_argument("--comment", default="", type=str)
    parser.add_argument("--master_port", default=29500, type=int)
    return parser.parse_args(argv)


def task_environment(job_env, master_port):
    """The torchrun-style variables for one SLURM task of a submitit job."""
    return {"MASTER_ADDR": job_env.hostnames[0], "MASTER_PORT": str(master_port),
            "RANK": str(job_env.global_rank), "WORLD_SIZE": str(job_env.num_tasks),
            "LOCAL_RANK": str(job_env.local_rank)}


class Trainer:
    """The callable submitit pickles and runs in every task."""

    def __init__(self, args):
        self.args = args

    def __call__(self):
        import submitit
        os.environ.update(task_environment(submitit.JobEnvironment(), self.args.master_port))
        self.args.dist_url = "env://"
        trainer.main(self.args)

    def checkpoint(self):
        """Called by submitit on pre-emption/timeout: requeue and resume from the newest checkpoint.

        ``--resume`` (the checkpoint the run started from) gives way to ``--auto_resume`` once the
        job has written one of its own. In distillation ``--resume`` names the teacher and stays;
        the student continues through ``--distill_resume``.
        """
        import submitit
        from checkpoint import latest_checkpoint
        if self.args.distill_type is not None:
            self.args.distill_resume = True
        else:
            self.args.auto_resume = True
            if latest_checkpoint(self.args.output_dir):
                self.args.resume = ""
        return submitit.helpers.DelayedSubmission(Trainer(self.args))


def main(argv=None):
    args = parse_args(argv)
    # Bad flags fail here, in one line, not later in every task's log on the cluster. The GPU
    # check is left to the nodes: this (login) node often has none.
    try:
        trainer.check_args(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    except trainer.ConfigError as exc:
        raise ConfigError(str(exc)) from None
    try:
        import submitit
    except ImportError:
        raise ConfigError("run_with_submitit.py needs submitit; pip install submitit") from None
    if not args.job_dir:
        raise ConfigError("give --job_dir, a folder on a file system every node can see")
    args.output_dir = args.output_dir or args.job_dir
    executor = submitit.AutoExecutor(folder=os.path.join(args.job_dir, "%j"), slurm_max_num_timeout=30)
    extra = {"slurm_partition": args.partition} if args.partition else {}
    if args.comment:
        extra["slurm_comment"] = args.comment
    executor.update_parameters(mem_gb=args.mem_gb_per_gpu * args.ngpus, gpus_per_node=args.ngpus,
                               tasks_per_node=args.ngpus, cpus_per_task=args.cpus_per_task,
                               nodes=args.nodes, timeout_min=args.timeout, name="slak", **extra)
    job = executor.submit(Trainer(args))
    print(f"Submitted job {job.job_id}; logs in {args.job_dir}")


if __name__ == "__main__":
    run_cli(main)
