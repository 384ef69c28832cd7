"""The SLURM launcher builds main.py's arguments and the torchrun-style environment of each task."""
from types import SimpleNamespace

import run_with_submitit


def test_launcher_accepts_every_main_flag_and_its_own():
    args = run_with_submitit.parse_args([
        "--nodes", "2", "--ngpus", "4", "--job_dir", "/shared/run", "--Decom", "True", "--sparse",
        "-u", "2000", "--kernel_size", "51", "49", "47", "13", "5", "--model", "SLaK_small"])
    assert (args.nodes, args.ngpus, args.Decom, args.sparse, args.update_frequency) == (2, 4, True, True, 2000)
    assert args.kernel_size == [51, 49, 47, 13, 5] and args.model == "SLaK_small"


def test_task_environment_matches_torchrun_variables():
    job_env = SimpleNamespace(hostnames=["node-a", "node-b"], global_rank=5, num_tasks=8, local_rank=1)
    assert run_with_submitit.task_environment(job_env, 29501) == {
        "MASTER_ADDR": "node-a", "MASTER_PORT": "29501", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}


def requeue(monkeypatch, argv):
    """What ``Trainer.checkpoint`` (submitit's pre-emption hook) resubmits, with a stand-in submitit."""
    import sys
    fake = SimpleNamespace(helpers=SimpleNamespace(DelayedSubmission=lambda trainer: trainer))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    return run_with_submitit.Trainer(run_with_submitit.parse_args(argv)).checkpoint().args


def test_requeue_resumes_from_the_newest_checkpoint(monkeypatch, tmp_path):
    argv = ["--job_dir", str(tmp_path), "--output_dir", str(tmp_path), "--auto_resume", "false",
            "--resume", "/released/SLaK_tiny.pth", "--sparse_init", "resume"]
    args = requeue(monkeypatch, argv)  # pre-empted before its first checkpoint: start over as given
    assert args.auto_resume and args.resume == "/released/SLaK_tiny.pth"
    (tmp_path / "checkpoint-3.pth").write_bytes(b"")
    args = requeue(monkeypatch, argv)  # then: the newest checkpoint of the job, found at restart
    assert args.auto_resume and args.resume == ""


def test_requeue_of_a_distillation_keeps_the_teacher(monkeypatch):
    # --resume is the teacher in distillation; the student continues through --distill_resume.
    args = requeue(monkeypatch, ["--job_dir", "/shared/run", "--distill_type", "NKD",
                                 "--resume", "/ckpt/SLaK_tiny_teacher.pth"])
    assert args.resume == "/ckpt/SLaK_tiny_teacher.pth" and args.distill_resume
