"""Refusals through the real command lines: out-of-range flags, runs with nothing to train,
checkpoints that cannot be what the run needs, a full disk, two runs in one folder. Each ends in
one line naming the problem and the fix, without a traceback, and writes nothing."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SYNTHETIC, TINY_MODEL, cli_env, one_line, run_main

FAST = ["--warmup_epochs", "0", "--drop_path", "0", "--synthetic_val_size", "32",
        "--batch_size", "16", "--synthetic_train_size", "32"]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


# --- Flag ranges: refused before anything is built (nothing printed on stdout) ----------------

@pytest.mark.parametrize("bad_args,message", [
    (["--width_factor", "0"], "--width_factor 0.0 must be a positive number"),
    (["--lr", "nan"], "--lr nan must be a finite number >= 0"),
    (["--lr", "inf"], "--lr inf must be a finite number >= 0"),
    (["--seed", "-1"], "--seed -1 must be in [0, 2**32)"),
    (["--smoothing", "1.5"], "--smoothing 1.5 must be in [0, 1)"),
    (["--epochs", "-1"], "--epochs -1 must be at least 0"),
    (["--batch_size", "0"], "--batch_size 0 must be at least 1"),
    (["--sparse", "--sparsity", "1.0"], "--sparsity 1.0 must be in [0, 1)"),
    (["--opt_betas", "0.9", "1.2"], "--opt_betas 0.9 1.2 must each be in [0, 1)"),
    (["-u", "0"], "--update_frequency 0 must be at least 1"),
    (["--device", "tpu"], "--device tpu is not a device PyTorch knows; pass cuda, cuda:N or cpu"),
    (["--device", "cuda:9"], "--device cuda:9 but "),
    (["--opt", "adamw_typo"], "--opt adamw_typo is not an optimizer timm knows"),
])
def test_main_refuses_an_out_of_range_flag_before_building_anything(tmp_path, bad_args, message):
    out = tmp_path / "out"
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--output_dir", out, *bad_args, check=False)
    one_line(result, message)
    assert result.stdout == ""  # no data set, no model: the flags are checked first
    assert not out.exists()


@pytest.mark.parametrize("script,bad_args,message", [
    ("main_KD.py", ["--distill_type", "KD", "--alpha", "2"], "--alpha 2.0 must be in [0, 1]"),
    ("export_onnx.py", ["--opset", "99", "--output", "{tmp}/x.onnx"],
     "--opset 99 must be an ONNX opset from 18"),
    ("FLOPs_counter.py", ["--sparse", "--sparsity", "1.5"], "--sparsity 1.5 must be in [0, 1)"),
    ("FLOPs_counter.py", ["--model", "SLaK_tinny"],
     "--model SLaK_tinny: FLOPs_counter.py counts SLaK-family models; pass one of SLaK_tiny"),
    ("erf/visualize_erf.py", ["--num_images", "0", "--data_path", "{tmp}"],
     "--num_images 0 must be at least 1"),
])
def test_every_entry_point_checks_its_flag_ranges(tmp_path, script, bad_args, message):
    bad_args = [a.format(tmp=tmp_path) for a in bad_args]
    result = run_main(*bad_args, check=False, script=REPO / script)
    one_line(result, message)
    assert list(tmp_path.iterdir()) == []


# --- Nothing to train: one line on stdout, exit 0, nothing written -----------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder of one trained epoch: checkpoint-0.pth (with the optimizer state)."""
    out = tmp_path_factory.mktemp("trained")
    run_main(*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "1", "--disable_eval", "true",
             "--output_dir", out)
    return out


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "Nothing to train: --epochs 0"),
    (["--epochs", "2", "--start_epoch", "2"], "Nothing to train: --start_epoch 2 is at or past --epochs 2"),
])
def test_nothing_to_train_says_why_and_exits_0(tmp_path, flags, message):
    out = tmp_path / "out"
    result = run_main(*TINY_MODEL, *SYNTHETIC, *FAST, *flags, "--output_dir", out, check=False)
    one_line(result, message, code=0, stream="stdout")
    assert result.stderr == "" and not out.exists()


def test_a_finished_run_has_nothing_to_train(trained):
    before = snapshot(trained)
    result = run_main(*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "1", "--output_dir", trained,
                      check=False)
    line = one_line(result, f"Nothing to train: --resume {trained / 'checkpoint-0.pth'} ends at "
                            f"epoch 0, the last of --epochs 1", code=0, stream="stdout")
    assert "raise --epochs" in line and "Start training" not in result.stdout
    assert snapshot(trained) == before


# --- Checkpoints that cannot be what the run asks for ------------------------------------------

def test_resume_and_finetune_together_are_refused(tmp_path, trained):
    checkpoint = trained / "checkpoint-0.pth"
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--resume", checkpoint, "--finetune", checkpoint,
                      "--output_dir", tmp_path / "out", check=False)
    one_line(result, "--resume continues a run (weights, optimizer, epoch) and --finetune starts "
                     "a new one from a checkpoint's weights; pass one of them")
    assert not (tmp_path / "out").exists()


def test_resume_of_a_folder_names_the_checkpoint_in_it(tmp_path, trained):
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--resume", trained, "--output_dir",
                      tmp_path / "out", check=False)
    one_line(result, f"--resume {trained} is a folder; pass a checkpoint file in it, e.g. "
                     f"{trained / 'checkpoint-0.pth'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("saved,flags,message", [
    ({"sparsity": 0.4, "only_L": False}, ["--sparsity", "0.8"],
     "continues a run of --sparsity 0.4 (its masks); this run has --sparsity 0.8: continue it "
     "with --sparsity 0.4, or start a new sparse run from its weights with --finetune"),
    ({"sparsity": 0.4, "only_L": False}, ["--sparsity", "0.4", "--only-L"],
     "continues a run of no --only-L (its masks); this run has --only-L: continue it without "
     "--only-L"),
])
def test_sparse_flags_that_contradict_the_checkpoints_masks_are_refused(tmp_path, trained, saved,
                                                                        flags, message):
    state = torch.load(trained / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    name = next(k for k in state["model"] if k.endswith("LoRA1.conv.weight"))
    state["masks"] = {name: state["model"][name] != 0}
    state["args"].update(sparse=True, **saved)
    torch.save(state, tmp_path / "checkpoint-0.pth")
    before = snapshot(tmp_path)
    result = run_main(*TINY_MODEL, *SYNTHETIC, *FAST, "--epochs", "2", "--sparse", *flags,
                      "--output_dir", tmp_path, check=False)
    one_line(result, f"--resume {tmp_path / 'checkpoint-0.pth'} {message}")
    assert snapshot(tmp_path) == before


def test_eval_of_a_checkpoint_with_nan_weights_is_refused(tmp_path, trained):
    state = torch.load(trained / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    name = next(k for k in state["model"] if k.endswith("LoRA1.conv.weight"))
    state["model"][name][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "diverged.pth")
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--eval", "true", "--resume", tmp_path / "diverged.pth",
                      check=False)
    one_line(result, f"--resume {tmp_path / 'diverged.pth'} holds NaN or infinite values in 1 of "
                     f"its {len(state['model'])} tensors (e.g. {name}): the run that saved it "
                     f"diverged; point --resume at an earlier checkpoint")
    assert "Accuracy" not in result.stdout


def test_a_timm_convnext_checkpoint_is_named_as_such(tmp_path):
    import timm
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto").state_dict(), path)
    for flag in (["--finetune"], ["--eval", "true", "--resume"]):
        result = run_main(*TINY_MODEL, *SYNTHETIC, *flag, path, check=False)
        one_line(result, f"{flag[-1]} {path} is a timm ConvNeXt checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convnext.pth"]


def test_an_ema_only_checkpoint_loads_with_model_key_model_ema(tmp_path, trained):
    state = torch.load(trained / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    path = tmp_path / "ema.pth"
    torch.save({"model_ema": state["model"]}, path)
    evaluate = [*TINY_MODEL, *SYNTHETIC, "--synthetic_val_size", "32", "--eval", "true",
                "--finetune", path]
    one_line(run_main(*evaluate, check=False),
             f"--finetune {path} holds its weights under 'model_ema', not under --model_key "
             f"model|module: pass --model_key model_ema")
    result = run_main(*evaluate, "--model_key", "model_ema")
    assert f"Fine-tuning from {path}: missing keys [], unexpected keys []" in result.stdout
    assert "Accuracy of the network on 32 test images" in result.stdout
    one_line(run_main(*TINY_MODEL, *SYNTHETIC, "--eval", "true", "--resume", path, check=False),
             f"start from them with main.py --finetune {path} --model_key model_ema")


def test_a_model_key_the_checkpoint_lacks_is_refused(tmp_path, trained):
    """--model_key model_ema on a checkpoint without EMA weights: not its other weights instead."""
    path = trained / "checkpoint-0.pth"
    one_line(run_main(*TINY_MODEL, *SYNTHETIC, "--eval", "true", "--finetune", path,
                      "--model_key", "model_ema", check=False),
             f"--finetune {path} has no weights under --model_key model_ema; it holds them under "
             f"'model': pass --model_key model")


# --- A full disk while saving: one line, the earlier checkpoint intact -------------------------

# Test-only: the save of the file named by DISK_FULL_AT goes to /dev/full (ENOSPC on write).
DISK_FULL = '''
import os
target = os.environ.get("DISK_FULL_AT")
if target:
    import torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if os.path.basename(str(getattr(f, "name", f))).startswith(target + ".tmp-"):
            with open("/dev/full", "wb") as full:
                return real_save(obj, full, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
'''


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DISK_FULL)
    env = dict(cli_env(), DISK_FULL_AT="checkpoint-1.pth")
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    out = tmp_path / "out"
    run = [*TINY_MODEL, *SYNTHETIC, *FAST, "--disable_eval", "true", "--epochs", "2",
           "--output_dir", out]
    result = subprocess.run([sys.executable, str(REPO / "main.py"), *map(str, run)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    one_line(result, f"could not write checkpoint {out / 'checkpoint-1.pth'}: No space left on "
                     f"device; free space or choose another --output_dir", code=1)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0.pth"]
    assert torch.load(out / "checkpoint-0.pth", map_location="cpu", weights_only=True)["epoch"] == 0
    # With space again, the same command continues from it.
    assert "Resuming training at epoch 1" in run_main(*run).stdout
    assert (out / "checkpoint-1.pth").exists()


# --- Two runs in one --output_dir ---------------------------------------------------------------

def test_a_second_run_into_a_busy_output_dir_is_refused_until_the_first_is_killed(tmp_path):
    out = tmp_path / "out"
    # Loader workers (forked children) run beside the main process: they must not hold the lock.
    run = [*TINY_MODEL, *SYNTHETIC, *FAST, "--disable_eval", "true", "--num_workers", "1",
           "--output_dir", out]
    first = subprocess.Popen([sys.executable, str(REPO / "main.py"), *map(str, run), "--epochs",
                              "100"], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:  # a checkpoint is written, and a new epoch (new workers) began
            if line.startswith("Epoch: [1]"):
                break
        assert first.poll() is None, first.stderr.read()
        second = run_main(*run, "--epochs", "100", check=False)
        one_line(second, f"--output_dir {out} is in use by another run (pid {first.pid}); wait "
                         f"for it to end, or pass another --output_dir")
        assert second.stdout == ""  # refused before the folder's checkpoints were read
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_main(*run, "--epochs", "2", check=False)
    assert third.returncode == 0 and third.stderr == "", third.stderr
