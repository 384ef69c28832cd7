"""Runs that fail safe: bad flags, files and data end in one line, exit 2, nothing written."""
import subprocess
import sys

import pytest

from conftest import REPO, SYNTHETIC, TINY_MODEL, cli_env, run_main

FAST = ["--warmup_epochs", "0", "--drop_path", "0", "--synthetic_val_size", "32"]


def one_error_line(result, message, code=2):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("bad_args,message", [
    (["--output_dir", "{file}"], "is a file"),
    (["--output_dir", "{file}/run"], "lies under the file"),
    (["--input_size", "16"], "--input_size 16 is below 32"),
    (["--drop_path", "1.0"], "--drop_path 1.0 must be in [0, 1)"),
    (["--lr", "-0.1"], "--lr -0.1 is negative"),
    (["--nb_classes", "0"], "--nb_classes 0"),
    (["--eval", "true", "--disable_eval", "true"], "leaves nothing to do"),
    (["--eval", "true"], "--eval true needs weights"),
    (["--enable_wandb", "true"], "pip install wandb"),
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
                            tmp_path / "none", "--weights", tmp_path / "none.pth"), "")
    one_error_line(run_tool("FLOPs_counter.py", "--kernel_size", "51", "49", "48", "13", "5"),
                   "positive odd")
    one_error_line(run_tool("FLOPs_counter.py", "--input_size", "16"), "below 32")
