"""main.py end to end on the synthetic data: learning, logs, checkpoints, resume, DDP, bad input."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, SYNTHETIC, TINY_MODEL, cli_env, free_port, run_main, torchrun

FAST = ["--warmup_epochs", "0", "--lr", "2e-3", "--drop_path", "0", "--synthetic_val_size", "64"]
NO_AUG = ["--mixup", "0", "--cutmix", "0", "--aa", "None", "--reprob", "0", "--smoothing", "0",
          "--color_jitter", "0"]

ORIGINAL_FLAGS = """--batch_size --epochs --update_freq --model --drop_path --input_size
--layer_scale_init_value --model_ema --model_ema_decay --model_ema_force_cpu --model_ema_eval --opt
--opt_eps --opt_betas --clip_grad --momentum --weight_decay --weight_decay_end --lr --layer_decay
--min_lr --warmup_epochs --warmup_steps --color_jitter --aa --smoothing --train_interpolation
--crop_pct --reprob --remode --recount --resplit --mixup --cutmix --cutmix_minmax --mixup_prob
--mixup_switch_prob --mixup_mode --finetune --head_init_scale --model_key --model_prefix --data_path
--eval_data_path --nb_classes --imagenet_default_mean_and_std --data_set --output_dir --log_dir
--device --seed --resume --auto_resume --save_ckpt --save_ckpt_freq --save_ckpt_num --start_epoch
--eval --dist_eval --disable_eval --num_workers --pin_mem --world_size --local_rank --dist_on_itp
--dist_url --use_amp --enable_wandb --project --wandb_ckpt --Decom --width_factor --kernel_size --bn
--sparse --sparsity --sparse_init --growth --prune --redistribution --prune_rate --update-frequency
-u --fix --only-L --verbose --distill_type --model_s --T --alpha --hard --lr_fd --FDLoss_type
--distill_resume""".split()


def final_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_help_lists_every_original_flag():
    result = run_main("--help")
    listed = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))
    assert not [flag for flag in ORIGINAL_FLAGS if flag not in listed]


@pytest.mark.parametrize("bad_args,message", [
    (["--kernel_size", "51", "49", "47", "13"], "--kernel_size takes five integers"),
    (["--kernel_size", "51", "49", "48", "13", "5"], "positive odd"),
    (["--data_set", "IMNET", "--data_path", "/nonexistent/imagenet"], "folder not found"),
    (["--data_set", "image_folder"], "--data_path is required"),
    (["--model_ema_eval", "true"], "--model_ema true"),
    (["--compile_mode", "reduce-overhead"], "add --compile true"),
    (["--ddp_bucket_cap_mb", "0"], "--ddp_bucket_cap_mb 0.0 must be a positive size"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--aa", "bogus"], "--aa bogus: timm cannot parse"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, bad_args, message):
    out = tmp_path / "out"
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--output_dir", out, *bad_args, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_unreadable_resume_is_one_line_and_writes_nothing(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--output_dir", out, "--resume", broken, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be read" in lines[0], result.stderr
    assert not out.exists()


def test_training_learns_logs_and_eval_reproduces(tmp_path):
    out, tb = tmp_path / "out", tmp_path / "tb"
    run_main(*TINY_MODEL, *SYNTHETIC, *FAST, *NO_AUG, "--epochs", "3", "--batch_size", "32",
             "--synthetic_train_size", "384", "--model_ema", "true", "--model_ema_eval", "true",
             "--model_ema_decay", "0.9", "--output_dir", out, "--log_dir", tb, "--save_ckpt_num", "2")
    logs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in logs] == [0, 1, 2]
    best = max(entry["test_acc1"] for entry in logs)
    assert best > 50.0  # chance is 25% with 4 classes
    assert sorted(p.name for p in out.glob("*.pth")) == [
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-best-ema.pth", "checkpoint-best.pth"]
    assert list(tb.glob("events.out.tfevents.*"))

    result = run_main(*TINY_MODEL, *SYNTHETIC, "--synthetic_val_size", "64", "--eval", "true",
                      "--resume", out / "checkpoint-best.pth")
    reported = float(re.search(r"Acc@1 ([\d.]+)", result.stdout).group(1))
    assert reported == pytest.approx(best, abs=1e-3)


def test_auto_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = [*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "3", "--batch_size", "16",
              "--synthetic_train_size", "256", "--disable_eval", "true", "--model_ema", "true"]
    run_main(*common, "--output_dir", tmp_path / "full")

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), *map(str, common),
                                "--output_dir", str(interrupted)], cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-0.pth").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(1.0)  # well inside epoch 1
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "checkpoint-2.pth").exists()

    run_main(*common, "--output_dir", interrupted, "--auto_resume", "true")
    full, resumed = final_weights(tmp_path / "full" / "checkpoint-2.pth"), \
        final_weights(interrupted / "checkpoint-2.pth")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_gradient_accumulation_equals_large_batch(tmp_path):
    # Plain SGD makes the update linear in the gradient, so the comparison is not blurred by
    # Adam's normalisation of near-zero gradients.
    common = [*TINY_MODEL, *SYNTHETIC, *FAST, *NO_AUG, "--bn", "false", "--epochs", "1",
              "--synthetic_train_size", "64", "--disable_eval", "true", "--opt", "momentum",
              "--momentum", "0", "--lr", "0.05", "--layer_scale_init_value", "1"]
    run_main(*common, "--batch_size", "16", "--update_freq", "2", "--output_dir", tmp_path / "accum")
    run_main(*common, "--batch_size", "32", "--update_freq", "1", "--output_dir", tmp_path / "large")
    accum = final_weights(tmp_path / "accum" / "checkpoint-0.pth")
    large = final_weights(tmp_path / "large" / "checkpoint-0.pth")
    initial = SLaK_initial_weights()
    for key in large:
        step_large, step_accum = large[key] - initial[key], accum[key] - initial[key]
        # Relative to the update itself (a wrong scaling of accumulated gradients is a 50-100% error).
        assert step_large.norm() > 0, key
        assert ((step_accum - step_large).norm() / step_large.norm()).item() < 1e-3, key


def SLaK_initial_weights():
    """The weights main.py starts from with the test flags (same seed, same construction)."""
    import SLaK
    torch.manual_seed(0)
    return SLaK.SLaK(num_classes=4, width_factor=0.25, Decom=True, bn=False, layer_scale_init_value=1.0,
                     kernel_size=[13, 11, 9, 7, 3]).state_dict()


@pytest.mark.parametrize("launcher,dist_eval", [
    ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], "true"),
    # Rank 0 alone evaluates: nothing it runs may wait for the other rank.
    ([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2"], "false"),
], ids=["torchrun", "torch.distributed.launch, --dist_eval false"])
def test_two_process_gloo_training(tmp_path, launcher, dist_eval):
    out = tmp_path / "out"
    result = run_main(*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "1", "--batch_size", "16",
                      "--synthetic_train_size", "128", "--output_dir", out,
                      "--dist_eval", dist_eval, timeout=300,
                      launcher=launcher + ["--master_port", str(free_port())])
    assert (out / "checkpoint-0.pth").exists()
    logs = (out / "log.txt").read_text().splitlines()
    assert len(logs) == 1  # rank 0 alone writes
    assert result.stdout.count("Max accuracy") == 1  # rank 0 alone prints
    assert "2 processes" in result.stdout
    assert "(64 images)" in result.stdout  # the whole validation set, split or not


def test_dist_on_itp_takes_the_processes_from_openmpis_variables(tmp_path):
    """--dist_on_itp true: the processes are mpirun's; here two started by hand as it would."""
    port = str(free_port())
    command = [sys.executable, str(REPO / "main.py"), *TINY_MODEL, *SYNTHETIC, *FAST, "--epochs",
               "1", "--batch_size", "16", "--synthetic_train_size", "64", "--disable_eval", "true",
               "--dist_on_itp", "true", "--output_dir", tmp_path / "out"]
    ranks = [subprocess.Popen(list(map(str, command)), cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=dict(cli_env(), OMPI_COMM_WORLD_RANK=str(rank),
                                       OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(2)]
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    assert "16 per process x 1 accumulation x 2 processes" in outputs[0][0]
    assert (tmp_path / "out" / "checkpoint-0.pth").exists()
    # Without mpirun's variables: one line naming them.
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--dist_on_itp", "true", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --dist_on_itp true takes the processes from mpirun, but "
                               "OMPI_COMM_WORLD_RANK, ") and lines[0].endswith("drop --dist_on_itp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_torchrun_without_a_gpu_reports_the_device_flag_once():
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--device", "cuda", "--epochs", "1", check=False,
                      launcher=torchrun(2))
    assert result.returncode != 0
    assert result.stderr.count("error: --device cuda but no GPU is visible; pass --device cpu") == 1
    assert 'main.py", line' not in result.stderr  # (torchrun's own report follows it)


def test_one_process_ddp_trains_exactly_like_the_plain_run(tmp_path):
    # DDP (gloo, gradients as views into its buckets) with one process must change nothing:
    # same sampler order, same gradients, accumulation (no_sync) and set-to-None zeroing included;
    # nor does the size of its buckets (here many small ones).
    common = [*TINY_MODEL, *SYNTHETIC, *FAST, *NO_AUG, "--epochs", "1", "--batch_size", "8",
              "--update_freq", "2", "--synthetic_train_size", "64", "--disable_eval", "true",
              "--layer_scale_init_value", "1"]
    run_main(*common, "--output_dir", tmp_path / "plain")
    result = run_main(*common, "--output_dir", tmp_path / "ddp", "--ddp_bucket_cap_mb", "0.01",
                      launcher=torchrun(1))
    assert "1 processes" in result.stdout
    plain = final_weights(tmp_path / "plain" / "checkpoint-0.pth")
    ddp = final_weights(tmp_path / "ddp" / "checkpoint-0.pth")
    assert not torch.equal(plain["head.weight"], SLaK_initial_weights()["head.weight"])  # it trained
    assert plain.keys() == ddp.keys()
    for key in plain:
        torch.testing.assert_close(ddp[key], plain[key], rtol=0, atol=0, msg=key)


def _write_image_folder(root, classes, per_class, size=40):
    """An ImageFolder tree of small PNGs (solid colours plus noise) for the real-files code path."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 60 * c, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_training_and_finetune_to_other_classes(tmp_path):
    _write_image_folder(tmp_path / "train", classes=3, per_class=8)
    _write_image_folder(tmp_path / "val", classes=3, per_class=2)
    files = ["--data_set", "image_folder", "--data_path", tmp_path / "train",
             "--eval_data_path", tmp_path / "val", "--device", "cpu", "--input_size", "32",
             "--num_workers", "0", "--epochs", "1", "--batch_size", "8", *FAST]
    run_main(*TINY_MODEL, *files, "--nb_classes", "3", "--output_dir", tmp_path / "pretrain")

    mismatch = run_main(*TINY_MODEL, *files, "--nb_classes", "4", "--output_dir", tmp_path / "bad",
                        check=False)
    assert mismatch.returncode != 0 and "3 class folders but --nb_classes is 4" in mismatch.stderr
    # Fine-tuning to 4 classes: the 3-class classifier is dropped, everything else is loaded.
    _write_image_folder(tmp_path / "train4", classes=4, per_class=4)
    _write_image_folder(tmp_path / "val4", classes=4, per_class=1)
    result = run_main(*TINY_MODEL, "--data_set", "image_folder", "--data_path", tmp_path / "train4",
                      "--eval_data_path", tmp_path / "val4", "--nb_classes", "4", "--device", "cpu",
                      "--input_size", "32", "--num_workers", "0", "--epochs", "1", "--batch_size", "8",
                      *FAST, "--finetune", tmp_path / "pretrain" / "checkpoint-0.pth",
                      "--model_key", "model", "--output_dir", tmp_path / "finetune")
    assert "missing keys ['head.weight', 'head.bias']" in result.stdout
    assert "unexpected keys []" in result.stdout
    pretrained = final_weights(tmp_path / "pretrain" / "checkpoint-0.pth")
    assert final_weights(tmp_path / "finetune" / "checkpoint-0.pth")["head.weight"].shape[0] == 4
    assert pretrained["head.weight"].shape[0] == 3
