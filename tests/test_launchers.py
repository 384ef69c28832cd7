"""The SLURM launcher builds main.py's arguments and the torchrun-style environment of each task."""
import sys
from types import SimpleNamespace

import pytest

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


@pytest.mark.parametrize("bad,message", [(["--kernel_size", "4"], "--kernel_size"),
                                         (["--model_ema_eval", "true"], "--model_ema true")])
def test_bad_flags_fail_before_submission(monkeypatch, tmp_path, capsys, bad, message):
    """main.py's checks run on the submitting node (its GPU check excepted), so nothing is
    submitted and no job folder is made."""
    submitted = []
    fake = SimpleNamespace(AutoExecutor=lambda **kwargs: submitted.append(kwargs))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    from utils import ConfigError
    with pytest.raises(ConfigError) as exit_info:
        run_with_submitit.main(["--job_dir", str(tmp_path / "job"), "--device", "cuda", *bad])
    assert message in str(exit_info.value)
    assert "\n" not in str(exit_info.value)
    assert not submitted and not (tmp_path / "job").exists()


def test_valid_flags_submit_one_job_from_a_node_without_gpu(monkeypatch, tmp_path, capsys):
    calls = {}

    class Executor:
        def __init__(self, folder, slurm_max_num_timeout):
            calls["folder"] = folder

        def update_parameters(self, **params):
            calls["params"] = params

        def submit(self, job):
            calls["job"] = job
            return SimpleNamespace(job_id="42")

    monkeypatch.setitem(sys.modules, "submitit", SimpleNamespace(AutoExecutor=Executor))
    run_with_submitit.main(["--job_dir", str(tmp_path), "--nodes", "2", "--ngpus", "4",
                            "--device", "cuda", "--kernel_size", "51", "49", "47", "13", "5"])
    assert calls["params"]["nodes"] == 2 and calls["params"]["tasks_per_node"] == 4
    assert calls["job"].args.device == "cuda" and calls["job"].args.output_dir == str(tmp_path)
    assert "Submitted job 42" in capsys.readouterr().out
