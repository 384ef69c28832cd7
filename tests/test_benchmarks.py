"""benchmarks/train_throughput.py: the end-to-end mode's reading of main.py's progress lines, and
real end-to-end runs on the CPU (a reduced SLaK, a few iterations), plainly and through the
profiler (benchmarks/profiled_main.py); the GPU-only benchmarks refuse a machine without CUDA in
one line."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput",
                                                  REPO / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def progress(i, total, seconds):
    return (f"Epoch: [0]  [{i:>{len(str(total))}}/{total}]  eta: 0:00:01  lr: 0.000100  "
            f"loss: 6.9 (6.9)  weight_decay: 0.0500 (0.0500)  time: {seconds:.4f}  data: 0.0010")


def test_steady_rate_skips_the_first_window_and_survives_zero_times():
    # 30 iterations: the first takes 5 s (compilation), the others 0.1 s. MetricLogger prints at
    # 0, 10, 20 and 29 the mean of the last 20 iterations; the closing line the epoch's mean.
    log = "\n".join([
        "Start training for 1 epochs",
        progress(0, 30, 5.0),
        "[sparse] step 10: density 0.6000",
        progress(10, 30, (5.0 + 10 * 0.1) / 11),
        progress(20, 30, 0.1),
        progress(29, 30, 0.1),
        f"Epoch: [0] Total time: 0:00:07 ({(5.0 + 29 * 0.1) / 30:.4f} s / it)",
        "Averaged stats: lr: 0.000100  loss: 6.9 (6.9)",
    ])
    bench = load_benchmark()
    epoch, steady, warmup = bench.parse_main_log(log)
    assert warmup == 11 and epoch == pytest.approx(7.9 / 30, abs=1e-4)
    assert steady == pytest.approx(0.1, rel=2e-3)

    # Iterations too short for 4 decimals: the progress lines read 0.0000, the total does not.
    fast = "\n".join([progress(0, 30, 0.0), progress(10, 30, 0.0), progress(20, 30, 0.0),
                      "Epoch: [0] Total time: 0:00:00 (0.0001 s / it)"])
    assert bench.parse_main_log(fast) == (0.0001, pytest.approx(0.0001 * 30 / 19), 11)
    assert bench.parse_main_log("\n".join([progress(0, 1, 0.2),
                                           "Epoch: [0] Total time: 0:00:00 (0.2000 s / it)"])) == \
        (0.2, 0.2, 0)
    with pytest.raises(ValueError, match="no complete training epoch"):
        bench.parse_main_log(progress(0, 30, 0.0))  # killed before the epoch ended


def test_steady_rate_after_a_given_iteration_follows_the_logged_windows():
    # 60 iterations: compilation (5 s), then 0.1 s, except iterations 11-20 (0.3 s: the first
    # sparse adaptation's one-time work). Lines every 10 iterations, each the mean of the last 20.
    seconds = [5.0] + [0.1] * 10 + [0.3] * 10 + [0.1] * 39
    lines = [progress(i, 60, sum(seconds[max(0, i - 19):i + 1]) / min(20, i + 1))
             for i in (0, 10, 20, 30, 40, 50, 59)]
    log = "\n".join(lines + [f"Epoch: [0] Total time: 0:00:10 ({sum(seconds) / 60:.4f} s / it)"])
    bench = load_benchmark()
    _, steady, warmup = bench.parse_main_log(log)
    assert warmup == 11 and steady == pytest.approx(sum(seconds[11:]) / 49, rel=2e-3)
    # Past the slow window: iterations 31-59, every one 0.1 s.
    _, steady, warmup = bench.parse_main_log(log, steady_after=25)
    assert warmup == 31 and steady == pytest.approx(0.1, rel=5e-3)
    with pytest.raises(ValueError, match="run more iterations"):
        bench.parse_main_log(log, steady_after=59)


def run_benchmark(*args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), *args],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


def test_end_to_end_on_cpu_prints_positive_rates(tmp_path):
    result = run_benchmark("--end_to_end", "--device", "cpu", "--iters", "24", "--batch", "8",
                           "--num_workers", "0", "--output_dir", tmp_path / "e2e", "--",
                           "--input_size", "32", "--nb_classes", "4", "--width_factor", "0.25",
                           "--kernel_size", "13", "11", "9", "7", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    row = next(r for r in rows if r.get("mode") == "end_to_end")
    assert row["iterations"] == 24 and row["warmup_iterations"] == 11
    assert row["img_per_s_epoch"] > 0 and row["img_per_s_steady"] > 0
    assert "--kernel_size 13 11 9 7 3" in row["command"]
    assert 0 <= row["last_window_data_wait_s"] <= row["last_window_iter_s"]
    assert "Total time" in (tmp_path / "e2e" / "main_plain.log").read_text()
    # One host-load sample per logged window (a window within one clock tick has none).
    busy, cpus = row["window_host_busy_cores"], row["host_cpus"]
    assert len(busy) == len(row["window_iter_s"]) == 4 and row["window_iter_s"][-1] == \
        row["last_window_iter_s"]
    assert cpus >= 1 and any(b is not None for b in busy)
    assert all(0 <= b <= cpus for b in busy if b is not None)


def test_end_to_end_repeats_alternate_plain_and_torchrun_runs_and_give_the_median_ratio(tmp_path):
    result = run_benchmark("--end_to_end", "--device", "cpu", "--iters", "12", "--batch", "8",
                           "--num_workers", "0", "--ddp", "both", "--repeats", "2",
                           "--output_dir", tmp_path / "e2e", "--", "--input_size", "32",
                           "--nb_classes", "4", "--width_factor", "0.25",
                           "--kernel_size", "13", "11", "9", "7", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"mode"')]
    assert [(r["repeat"], r["ddp"]) for r in rows] == [(1, False), (1, True), (2, True), (2, False)]
    assert "torchrun --standalone --nproc_per_node 1" not in rows[0]["command"]
    assert "--nproc_per_node 1" in rows[1]["command"]
    steady = {(r["repeat"], r["ddp"]): r["img_per_s_steady"] for r in rows}
    ratios = sorted(steady[k, True] / steady[k, False] for k in (1, 2))
    median = next(line for line in result.stdout.splitlines() if "over 2 repeats" in line)
    assert f"median {sum(ratios) / 2:.3f}" in median and f"range {ratios[0]:.3f}" in median
    for name in ("plain_1", "ddp_1", "plain_2", "ddp_2"):
        assert "Total time" in (tmp_path / "e2e" / f"main_{name}.log").read_text()


def test_end_to_end_repeats_apply_to_main_runs_only():
    result = run_benchmark("--repeats", "3", "--device", "cpu")
    assert result.returncode != 0 and "--repeats applies to --end_to_end" in result.stderr


def test_end_to_end_profile_times_main_steps_with_and_without_the_profiler(tmp_path):
    result = run_benchmark("--end_to_end", "--device", "cpu", "--iters", "24", "--batch", "8",
                           "--num_workers", "0", "--profile", "--output_dir", tmp_path / "e2e",
                           "--", "--input_size", "32", "--nb_classes", "4", "--width_factor",
                           "0.25", "--kernel_size", "13", "11", "9", "7", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = next(json.loads(line) for line in result.stdout.splitlines()
               if line.startswith('{"mode"'))
    profile = row["profile"]
    assert profile["steps"] == 6 and profile["wall_ms"] > 0 and profile["host_ms"] > 0
    assert profile["gpu_ms"] == 0 and profile["top_host"]  # no GPU: host time only
    assert "Self CPU" in (tmp_path / "e2e" / "profile_plain.txt").read_text()


def test_profiled_main_refuses_windows_that_do_not_fit(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profiled_main.py"),
                             "--iters", "10", "--steps", "5", "--json", str(tmp_path / "p.json"),
                             "--", "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode != 0 and "at least 20 iterations" in result.stderr
    assert not (tmp_path / "p.json").exists()


def test_end_to_end_reports_a_failing_main_in_one_line(tmp_path):
    result = run_benchmark("--end_to_end", "--device", "cpu", "--iters", "2", "--batch", "8",
                           "--num_workers", "0", "--output_dir", tmp_path / "e2e", "--",
                           "--kernel_size", "4")
    assert result.returncode != 0
    assert "error: main.py failed (exit 2): error: --kernel_size" in result.stderr


def test_step_mode_needs_cuda_and_says_so():
    result = run_benchmark("--device", "cpu")
    assert result.returncode != 0 and "--end_to_end" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("script,args", [("lk_conv.py", []), ("pointwise_gemm.py", []),
                                         ("sparse_overhead.py", []),
                                         ("distill_memory.py", ["--device", "cuda"])])
def test_gpu_benchmarks_without_cuda_say_so_in_one_line(script, args):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                            capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode != 0
    assert "CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def run_loader_benchmark(*args):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader_throughput.py"),
                           *map(str, args)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("prefetcher", [False, True])
def test_loader_throughput_times_the_training_loader_of_main(tmp_path, prefetcher):
    result = run_loader_benchmark("--batches", "3", "--", "--data_set", "synthetic", "--device",
                                  "cpu", "--input_size", "32", "--batch_size", "4",
                                  "--num_workers", "1", "--aa", "rand-m9-mstd0.5-inc1",
                                  "--prefetcher", str(prefetcher))
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["img_per_s"] > 0 and row["batches"] == 3
    assert (row["data_set"], row["input_size"], row["batch_size"], row["num_workers"],
            row["prefetcher"]) == ("synthetic", 32, 4, 1, prefetcher)


def test_loader_throughput_compares_the_prefetcher_in_one_process():
    result = run_loader_benchmark("--batches", "2", "--compare_prefetcher", "--repeats", "2", "--",
                                  "--data_set", "synthetic", "--device", "cpu", "--input_size",
                                  "32", "--batch_size", "4", "--num_workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    *rows, summary = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["prefetcher"] for r in rows] == [False, True, True, False]
    ratios = [rows[1]["img_per_s"] / rows[0]["img_per_s"], rows[2]["img_per_s"] / rows[3]["img_per_s"]]
    assert summary["ratios"] == [round(r, 3) for r in ratios]
    assert summary["prefetcher_vs_workers"] == round(sum(ratios) / 2, 3)


def test_loader_throughput_bad_input_is_one_line(tmp_path):
    missing = run_loader_benchmark("--", "--data_set", "IMNET", "--data_path", tmp_path / "none",
                                   "--device", "cpu")
    too_few = run_loader_benchmark("--batches", "5", "--", "--data_set", "synthetic", "--device",
                                   "cpu", "--synthetic_train_size", "8", "--batch_size", "4",
                                   "--num_workers", "0")
    repeats = run_loader_benchmark("--repeats", "2", "--", "--data_set", "synthetic")
    cases = [(missing, "--data_path"), (too_few, "lower --batches"),
             (repeats, "--repeats applies to --compare_prefetcher")]
    if not torch.cuda.is_available():
        cases.append((run_loader_benchmark("--", "--data_set", "synthetic", "--prefetcher", "true"),
                      "pass --device cpu"))
    for result, needle in cases:
        assert result.returncode == 2 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_lk_floor_counts_the_taps_and_tiles_a_brute_force_count_finds(tmp_path):
    """benchmarks/lk_floor.py: its direct multiply-adds are those of F.conv2d over ones (taps in
    the map), its Toeplitz tiles those of the explicit banded matrix, per stage."""
    import torch.nn.functional as F

    out = tmp_path / "floor.json"
    kernels, block, batch = [13, 11, 9, 7, 3], 4, 2
    subprocess.run([sys.executable, REPO / "benchmarks" / "lk_floor.py", "--model", "SLaK_tiny",
                    "--batch", str(batch), "--input_size", "96", "--width_factor", "0.25",
                    "--kernel_size", *map(str, kernels), "--block", str(block), "--json", out],
                   check=True, cwd=REPO, env=cli_env(), capture_output=True)
    result = json.loads(out.read_text())
    assert result["convolutions"] == 3 * (3 + 3 + 9 + 3)

    def taps(size, kh, kw):
        ones = torch.ones(1, 1, size, size, dtype=torch.float64)
        return F.conv2d(ones, torch.ones(1, 1, kh, kw, dtype=torch.float64),
                        padding=(kh // 2, kw // 2)).sum().item()

    def tiles(size, k):
        a, b = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        band = ((a - b + k // 2) >= 0) & ((a - b + k // 2) < k)  # input a feeds output b
        padded = -size % block
        band = F.pad(band.float(), (0, padded, 0, padded))
        return int((band.unfold(0, block, block).unfold(1, block, block).sum((-1, -2)) > 0).sum())

    for row, depth, k in zip(result["stages"], [3, 3, 9, 3], kernels):
        size, channels, small = row["map"], row["channels"], kernels[4]
        per_unit = 2 * taps(size, k, small) * 3 + taps(size, small, small) * 4  # recomputed small
        assert row["direct_gmacs"] * 1e9 == pytest.approx(batch * channels * depth * per_unit)
        short = taps(size, small, 1) / size  # in-map taps of the short axis, per line
        # each in-map short-axis tap is one row of the image times the band's tiles
        per_unit = (2 * 3 * short * tiles(size, k) + 4 * short * tiles(size, small)) * block * block
        assert row["toeplitz_gmacs"] * 1e9 == pytest.approx(batch * channels * depth * per_unit)
        assert row["unit_fused_gb"] * 1e9 == pytest.approx(5 * depth * batch * channels * size ** 2 * 2)
