"""Runs that fail safe: bad flags, files and data end in one line, exit 2, nothing written."""
import json
import signal
import subprocess
import sys

import pytest

from conftest import REPO, SYNTHETIC, TINY_MODEL, cli_env, free_port, one_line, run_main

FAST = ["--warmup_epochs", "0", "--drop_path", "0", "--synthetic_val_size", "32"]


def one_error_line(result, message, code=2):
    """The single ``error: ...`` line of stderr, which holds ``message``."""
    line = one_line(result, message, code)
    assert line.startswith("error: "), line
    return line


@pytest.mark.parametrize("bad_args,message", [
    (["--output_dir", "{file}"], "is a file"),
    (["--output_dir", "{file}/run"], "lies under the file"),
    (["--input_size", "16"], "--input_size 16 is below 32"),
    (["--drop_path", "1.0"], "--drop_path 1.0 must be in [0, 1)"),
    (["--lr", "-0.1"], "--lr -0.1 must be a finite number >= 0"),
    (["--nb_classes", "0"], "--nb_classes 0"),
    (["--eval", "true", "--disable_eval", "true"], "leaves nothing to do"),
    (["--eval", "true"], "--eval true needs weights"),
    (["--enable_wandb", "true"], "pip install wandb"),
    (["--batch_size", "7"], "--batch_size 7 is odd, and mixup and cutmix pair"),
])
def test_bad_flags_are_one_line_before_anything_is_written(tmp_path, bad_args, message):
    if "wandb" in message and __import__("importlib").util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    afile = tmp_path / "afile"
    afile.write_text("")
    out = tmp_path / "out"
    bad_args = [a.replace("{file}", str(afile)) for a in bad_args]
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--output_dir", out, *bad_args, check=False)
    one_error_line(result, message)
    assert not out.exists() and afile.read_text() == ""


def test_nan_loss_stops_with_one_line(tmp_path):
    result = run_main(*TINY_MODEL, *SYNTHETIC, *FAST, "--opt", "sgd", "--lr", "1e12", "--epochs", "1",
                      "--batch_size", "16", "--synthetic_train_size", "64", "--disable_eval", "true",
                      "--output_dir", tmp_path / "out", check=False)
    line = one_error_line(result, "the loss is nan at epoch 0, step", code=3)
    assert "--clip_grad" in line


def test_a_loss_not_finite_on_one_process_stops_every_process_with_one_line(tmp_path):
    """Two processes (gloo) fine-tune from finite weights whose classifier rules one class out:
    the final norm outputs ones, and that class's row of huge negative weights sums them to a
    logit of -inf, so the cross-entropy is infinite only for a batch of that class, which rank 1
    alone draws (one image each, at 64 px: the BatchNorms of the last stage see 2x2 maps). Every
    process stops at the same step; rank 0 prints the one line."""
    import timm
    import torch
    from torch.utils.data import DistributedSampler

    import SLaK  # noqa: F401 - registers the SLaK family in timm
    sampler = DistributedSampler(range(2), num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler.set_epoch(0)  # main.py's: rank 1 trains on synthetic item i alone, of class i % 2
    ruled_out = list(sampler)[0] % 2
    weights = timm.create_model("SLaK_tiny", num_classes=2, width_factor=0.25, Decom=True,
                                kernel_size=[13, 11, 9, 7, 3]).state_dict()
    weights["norm.weight"].zero_()
    weights["norm.bias"].fill_(1.0)
    weights["head.weight"][ruled_out] = -1e38  # finite; their sum over the features is not
    torch.save(weights, tmp_path / "weights.pth")
    command = [sys.executable, REPO / "main.py", *TINY_MODEL, *SYNTHETIC, *FAST, "--nb_classes",
               "2", "--synthetic_train_size", "2", "--batch_size", "1", "--input_size", "64",
               "--mixup", "0",
               "--cutmix", "0", "--smoothing", "0", "--epochs", "1", "--disable_eval", "true",
               "--finetune", tmp_path / "weights.pth", "--output_dir", tmp_path / "out"]
    port = str(free_port())
    ranks = [subprocess.Popen(list(map(str, command)), cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=dict(cli_env(), RANK=str(rank), LOCAL_RANK=str(rank),
                                       WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(2)]
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert [process.returncode for process in ranks] == [3, 3], outputs
    assert outputs[1][1].strip() == "", outputs[1][1]
    lines = outputs[0][1].strip().splitlines()
    assert len(lines) == 1, outputs[0][1]
    assert lines[0].startswith("error: the loss is inf on rank 1 of 2 at epoch 0, step 0; ")
    assert "--clip_grad" in lines[0] and "check the data" in lines[0]
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def run_tool(script, *args):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)


def test_other_entry_points_share_the_one_line_errors(tmp_path):
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not numpy")
    one_error_line(run_tool("erf/analyze_erf.py", "--source", broken), "not a readable .npy")
    one_error_line(run_tool("erf/erf_slak51_convnext7_convnext31.py", "--sources", broken, broken,
                            broken), "not a readable .npy")
    one_error_line(run_tool("erf/visualize_erf.py", "--model", "SLaK", "--data_path",
                            tmp_path / "none", "--weights", tmp_path / "none.pth"),
                   f"--data_path {tmp_path / 'none'} is not a folder")
    one_error_line(run_tool("FLOPs_counter.py", "--kernel_size", "51", "49", "48", "13", "5"),
                   "positive odd")
    one_error_line(run_tool("FLOPs_counter.py", "--input_size", "16"), "below 32")


# --- Exact resume: a run killed at any instant and auto-resumed ends as an uninterrupted one ----

RESUME_RUN = [*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "3", "--batch_size", "16",
              "--synthetic_train_size", "64", "--model_ema", "true", "--model_ema_eval", "true",
              "--model_ema_decay", "0.5", "--save_ckpt_num", "2"]

# Test-only: makes torch.save die half-way through writing the file named by KILL_DURING_SAVE_OF.
KILL_DURING_SAVE = '''
import os
target = os.environ.get("KILL_DURING_SAVE_OF")
if target:
    import torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if os.path.basename(str(getattr(f, "name", f))).startswith(target + ".tmp-"):
            f.write(b"half a checkpoint")
            f.flush()
            os._exit(137)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
'''


def start_main(*args, env=None):
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=REPO,
                            env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_when(process, after, line_starts):
    """SIGKILL ``process`` at the first stdout line starting with ``line_starts`` after ``after``."""
    seen = False
    for line in process.stdout:
        seen = seen or line.startswith(after)
        if seen and line.startswith(line_starts):
            process.kill()
            break
    process.wait()
    assert seen, "the run ended before the kill point"


def run_folder(path):
    """What a run leaves: log lines, and per checkpoint its epoch, best accuracies and weights."""
    import torch
    logs = [json.loads(line) for line in (path / "log.txt").read_text().splitlines()]
    checkpoints = {}
    for file in sorted(path.iterdir()):
        if file.suffix == ".pth":
            state = torch.load(file, map_location="cpu", weights_only=True)
            checkpoints[file.name] = (state["epoch"], state["max_accuracy"], state["max_accuracy_ema"],
                                      state["model"], state["model_ema"])
    return logs, checkpoints, sorted(p.name for p in path.iterdir())


def assert_same_run(full, other):
    import torch
    logs_a, ckpts_a, names_a = run_folder(full)
    logs_b, ckpts_b, names_b = run_folder(other)
    assert names_a == names_b
    assert logs_a == logs_b
    for name, (epoch, acc, acc_ema, model, ema) in ckpts_a.items():
        epoch_b, acc_b, acc_ema_b, model_b, ema_b = ckpts_b[name]
        assert (epoch, acc, acc_ema) == (epoch_b, acc_b, acc_ema_b), name
        assert all(torch.equal(model[k], model_b[k]) for k in model), name
        assert all(torch.equal(ema[k], ema_b[k]) for k in ema), name


def test_resume_is_exact_after_a_kill_during_validation_or_a_save(tmp_path):
    import os
    full = tmp_path / "full"
    run_main(*RESUME_RUN, "--output_dir", full)
    assert [entry["epoch"] for entry in run_folder(full)[0]] == [0, 1, 2]

    # Killed while validating epoch 1 (its training is done, nothing of it is written yet).
    during_validation = tmp_path / "validation"
    kill_when(start_main(*RESUME_RUN, "--output_dir", during_validation), "Epoch: [1]", "Test:")
    run_main(*RESUME_RUN, "--output_dir", during_validation)
    assert_same_run(full, during_validation)

    # Killed half-way through writing checkpoint-1.pth (its log line and best are written).
    during_save = tmp_path / "save"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_DURING_SAVE)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    env["KILL_DURING_SAVE_OF"] = "checkpoint-1.pth"
    process = start_main(*RESUME_RUN, "--output_dir", during_save, env=env)
    process.communicate()
    assert process.returncode == 137
    assert not (during_save / "checkpoint-1.pth").exists()
    assert [p for p in during_save.iterdir() if ".tmp-" in p.name]
    assert [entry["epoch"] for entry in run_folder(during_save)[0]] == [0, 1]
    run_main(*RESUME_RUN, "--output_dir", during_save)
    assert_same_run(full, during_save)


def test_sigterm_names_the_newest_checkpoint_and_the_resume_command(tmp_path):
    out = tmp_path / "out"
    process = start_main(*RESUME_RUN, "--epochs", "5", "--output_dir", out)
    for line in process.stdout:
        if line.startswith("Epoch: [1]"):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"newest complete checkpoint {out / 'checkpoint-0.pth'}" in lines[0]
    assert "resume with: python main.py" in lines[0]


# --- Data: unreadable images, class folders that disagree, empty classes -------------------------

def image_folder(root, classes, per_class=4, size=36):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 50 * c, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")
    return root


def folder_run(train, val, *extra, nb_classes=3):
    return run_main(*TINY_MODEL, *FAST, "--data_set", "image_folder", "--data_path", train,
                    "--eval_data_path", val, "--nb_classes", nb_classes, "--device", "cpu",
                    "--input_size", "32", "--num_workers", "0", "--pin_mem", "false",
                    "--epochs", "1", "--batch_size", "4", *extra, check=False)


def test_an_unreadable_image_is_skipped_with_one_warning_and_counted(tmp_path):
    train = image_folder(tmp_path / "train", ["a", "b", "c"])
    val = image_folder(tmp_path / "val", ["a", "b", "c"], per_class=1)
    broken = train / "b" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG
    result = folder_run(train, val, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "unreadable image" in line]
    assert warnings and all(str(broken) in line for line in warnings)
    log = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert log["train_skipped_images"] == len(warnings)

    checked = folder_run(train, val, "--check_images", "true", "--output_dir", tmp_path / "checked")
    assert checked.returncode == 0, checked.stderr
    assert f"dropping unreadable image {broken}" in checked.stdout
    assert "skipping unreadable" not in checked.stdout
    assert json.loads((tmp_path / "checked" / "log.txt").read_text())["train_skipped_images"] == 0


def test_a_training_folder_of_unreadable_images_is_one_line_from_the_loader_workers(tmp_path):
    train = image_folder(tmp_path / "train", ["a", "b"], per_class=2)
    val = image_folder(tmp_path / "val", ["a", "b"], per_class=1)
    for image in train.glob("*/*.jpg"):
        image.write_bytes(image.read_bytes()[:40])
    result = folder_run(train, val, "--num_workers", "1", "--output_dir", tmp_path / "out",
                        nb_classes=2)
    one_error_line(result, f"{train}: 4 images in a row cannot be read; check the data folder")


def test_class_folders_that_disagree_or_are_empty_are_one_line(tmp_path):
    train = image_folder(tmp_path / "train", ["cat", "dog", "fox"])
    val = image_folder(tmp_path / "val", ["cat", "dog", "owl"], per_class=1)
    out = tmp_path / "out"
    line = one_error_line(folder_run(train, val, "--output_dir", out), "different class folders")
    assert "only in training: fox" in line and "only in validation: owl" in line
    (train / "fox" / "0.jpg").unlink()
    for image in (train / "fox").iterdir():
        image.unlink()
    one_error_line(folder_run(train, train, "--output_dir", out), "fox")
    assert not out.exists()


def test_imagenet_layout_says_nb_classes_is_ignored_and_needs_no_val_without_eval(tmp_path):
    image_folder(tmp_path / "imnet" / "train", ["n01", "n02"])  # --disable_eval true: no val/
    result = run_main(*TINY_MODEL, *FAST, "--data_set", "IMNET", "--data_path", tmp_path / "imnet",
                      "--nb_classes", "2", "--device", "cpu", "--input_size", "32", "--num_workers",
                      "0", "--epochs", "1", "--batch_size", "4", "--disable_eval", "true")
    assert "--nb_classes 2 is ignored" in result.stdout


# --- Checkpoints say what they are; every loader checks them through checkpoint.open_checkpoint --

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    run_main(*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "1", "--batch_size", "16",
             "--synthetic_train_size", "32", "--disable_eval", "true", "--output_dir", out)
    return out / "checkpoint-0.pth"


def test_checkpoints_record_their_model_and_mismatched_flags_are_one_line(tmp_path, tiny_checkpoint):
    import argparse

    import torch
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert state["model_config"] == dict(model="SLaK_tiny", kernel_size=[13, 11, 9, 7, 3],
                                         Decom=True, width_factor=0.25, bn=True, nb_classes=4,
                                         deploy=False, sparse=False)
    # The original's: its argparse namespace under "args"; a bare state dict: shapes only.
    original = tmp_path / "original.pth"
    torch.save({"model": state["model"], "args": argparse.Namespace(
        model="SLaK_tiny", kernel_size=[13, 11, 9, 7, 3], Decom=True, width_factor=0.25, bn=True,
        nb_classes=4, sparse=False)}, original)
    bare = tmp_path / "bare.pth"
    torch.save(state["model"], bare)
    other = ["--model", "SLaK_tiny", "--width_factor", "0.5", "--Decom", "false",
             "--kernel_size", "15", "11", "9", "7", "3"]
    for path, how in ((tiny_checkpoint, "was trained with"), (original, "was trained with"),
                      (bare, "holds a model of")):
        result = run_main(*other, *SYNTHETIC, "--eval", "true", "--resume", path, check=False)
        one_error_line(result, f"--resume {path} {how} --kernel_size 13 11 9 7 3 --Decom True "
                               f"--width_factor 0.25; this run has --kernel_size 15 11 9 7 3 "
                               f"--Decom False --width_factor 0.5: pass the checkpoint's flags")


def test_resuming_a_sparse_run_without_sparse_is_one_line(tmp_path, tiny_checkpoint):
    import torch
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    state["masks"] = {"stages.0.0.large_kernel.LoRA1.weight": torch.ones(2, dtype=torch.bool)}
    sparse_run = tmp_path / "checkpoint-0.pth"
    torch.save(state, sparse_run)
    result = run_main(*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "2", "--batch_size", "16",
                      "--output_dir", tmp_path, "--auto_resume", "true", check=False)
    one_error_line(result, f"--resume {sparse_run} continues a sparse run: add --sparse with the "
                           f"run's sparsity flags, or start a dense run from its weights with "
                           f"--finetune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth"]


@pytest.mark.parametrize("content,message", [
    (b"", "is an empty file"), (b"\x80\x02garbage", "cannot be read"),
    ("list", "holds no model weights"), ("foreign", "holds no SLaK/ConvNeXt weights")])
def test_unusable_files_are_one_line_for_every_loader(tmp_path, content, message):
    import torch
    path = tmp_path / "bad.pth"
    if content == "list":
        torch.save([1, 2], path)
    elif content == "foreign":
        torch.save({"model": {"conv1.weight": torch.zeros(3)}}, path)
    else:
        path.write_bytes(content)
    out = tmp_path / "out"
    for flag in (["--eval", "true", "--resume"], ["--finetune"]):
        result = run_main(*TINY_MODEL, *SYNTHETIC, "--output_dir", out, *flag, path, check=False)
        one_error_line(result, message)
    if content == "":
        one_error_line(run_tool("FLOPs_counter.py", "--resume", path), message)
        one_error_line(run_tool("erf/visualize_erf.py", "--model", "SLaK", "--data_path", tmp_path,
                                "--weights", path), message)
    assert not out.exists()


def test_a_run_over_another_runs_checkpoints_is_one_line_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    run = [*TINY_MODEL, *SYNTHETIC, *FAST, "--batch_size", "16", "--synthetic_train_size", "32",
           "--output_dir", out]
    run_main(*run, "--epochs", "2")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert "checkpoint-1.pth" in before
    # Started afresh, it would rewrite the log and lose its own checkpoint-0 to the rotation.
    result = run_main(*run, "--epochs", "1", "--auto_resume", "false", check=False)
    one_error_line(result, "holds checkpoint-1.pth, of epochs this run would train again")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    # Continuing it is what the message says, and works.
    assert "Resuming training at epoch 2" in run_main(*run, "--epochs", "3").stdout
