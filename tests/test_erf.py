"""ERF tools (erf/): analytic receptive fields, the area table, the CLIs on real photographs."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import analyze_erf  # erf/ is on pytest's pythonpath (pyproject.toml)
import visualize_erf
from conftest import REPO, cli_env

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea")


def depthwise(k, channels=3):
    """A k x k depthwise convolution with strictly positive weights (so every tap contributes)."""
    conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.uniform_(0.5, 1.0)
    return conv


def support(matrix):
    """Bounding box ``(top, bottom, left, right)`` (inclusive) of the nonzero entries, and count."""
    rows, cols = np.nonzero(matrix)
    return (rows.min(), rows.max(), cols.min(), cols.max()), len(rows)


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("size", [31, 32])
def test_single_depthwise_conv_erf_is_the_kernel_square(k, size):
    torch.manual_seed(0)
    images = torch.rand(2, 3, size, size) + 0.1  # positive, so the centre activations are > 0
    erf = visualize_erf.compute_erf(depthwise(k), images)
    # An odd map has one centre cell; an even one the middle 2 x 2, which widens the square by 1.
    side = k if size % 2 else k + 1
    top = (size - side) // 2
    box, count = support(erf)
    assert box == (top, top + side - 1, top, top + side - 1)
    assert count == side * side


@pytest.mark.parametrize("k", [3, 5])
def test_two_stacked_depthwise_convs_erf_is_2k_minus_1_square(k):
    torch.manual_seed(0)
    size = 33
    images = torch.rand(2, 3, size, size) + 0.1
    erf = visualize_erf.compute_erf(nn.Sequential(depthwise(k), depthwise(k)), images)
    side, top = 2 * k - 1, (size - (2 * k - 1)) // 2
    box, count = support(erf)
    assert box == (top, top + side - 1, top, top + side - 1)
    assert count == side * side


def test_images_with_non_finite_gradient_are_left_out():
    torch.manual_seed(0)
    conv = depthwise(3)
    images = torch.rand(2, 3, 9, 9) + 0.1

    class BlowUpFirst(nn.Module):
        def forward(self, x):
            return conv(x * torch.tensor([float("inf"), 1.0]).view(2, 1, 1, 1))

    erf = visualize_erf.compute_erf(BlowUpFirst(), images)
    np.testing.assert_allclose(erf, visualize_erf.compute_erf(conv, images[1:]))
    with pytest.raises(ValueError, match="finite"):
        visualize_erf.compute_erf(BlowUpFirst(), images[:1])


def test_centre_indices():
    assert visualize_erf.centre_indices(7) == [3]
    assert visualize_erf.centre_indices(8) == [3, 4]


def test_high_contribution_area_on_known_matrices():
    # Uniform 100 x 100: the smallest even centred square with >= half the mass is 72 (70^2 < 5000).
    uniform = np.ones((100, 100))
    assert analyze_erf.high_contribution_area(analyze_erf.normalise(uniform), 0.5) == (72, 0.5184)
    table = analyze_erf.area_table(uniform)
    assert [row["threshold"] for row in table] == [0.2, 0.3, 0.5, 0.99]
    assert table[-1]["side_length"] == 100  # 98^2 = 96% < 99%
    # A single hot centre cell of an odd matrix: a 1 x 1 square holds everything.
    point = np.zeros((51, 51))
    point[25, 25] = 3.0
    assert all(row["side_length"] == 1 for row in analyze_erf.area_table(point))
    with pytest.raises(ValueError, match="all zero"):
        analyze_erf.normalise(np.zeros((4, 4)))


def save_photos(folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage_data, name)()).save(folder / f"{name}.png")
    return folder


def test_find_images_layouts(tmp_path):
    flat = save_photos(tmp_path / "flat")
    assert [p.name for p in visualize_erf.find_images(flat)] == sorted(f"{n}.png" for n in PHOTOS)
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "n01").mkdir(parents=True)
        shutil.copy(flat / "coffee.png", imagenet / split / "n01" / "coffee.png")
    assert visualize_erf.find_images(imagenet) == [imagenet / "val" / "n01" / "coffee.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(visualize_erf.ERFError, match="no images"):
        visualize_erf.find_images(tmp_path / "empty")


def slak_args(*extra):
    return visualize_erf.get_args_parser().parse_args(
        ["--model", "SLaK", "--data_path", ".", "--width_factor", "0.25", "--depths", "1", "1", "1",
         "1", "--kernel_size", "13", "11", "9", "7", "3", *extra])


def test_weights_in_this_project_and_original_formats_load(tmp_path):
    torch.manual_seed(0)
    source = visualize_erf.build_model(slak_args("--layer_scale_init_value", "0.5")).model
    path = tmp_path / "checkpoint.pth"
    # The original's DDP checkpoints: under "model", with "module." prefixes and extra entries.
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
               path)
    loaded = visualize_erf.build_model(slak_args("--weights", str(path))).model
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    from utils import ConfigError
    with pytest.raises(ConfigError, match="holds a model of --Decom True; this run has --Decom False"):
        visualize_erf.build_model(slak_args("--weights", str(path), "--Decom", "false"))


def test_resnet_without_weights_offline_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty weights cache
    args = visualize_erf.get_args_parser().parse_args(["--model", "resnet101", "--data_path", "."])
    with pytest.raises(visualize_erf.ERFError, match="--weights FILE"):
        visualize_erf.build_model(args)


def run_script(script, *args):
    command = [sys.executable, str(REPO / "erf" / script), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def assert_not_blank(png):
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.std() > 0.05  # more than a flat background
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # a colour map, not two colours


def test_cli_end_to_end_on_photographs(tmp_path):
    from PIL import Image

    photos = save_photos(tmp_path / "photos")
    # A floating-point image has no 8-bit picture: skipped, as the training data loader skips it.
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).save(
        photos / "depth.tif")
    matrix_path = tmp_path / "out" / "slak_erf.npy"
    out = run_script("visualize_erf.py", "--model", "SLaK", "--data_path", photos,
                     "--save_path", matrix_path, "--num_images", 4, "--input_size", 256,
                     "--device", "cpu", "--width_factor", 0.25, "--depths", 1, 1, 3, 1,
                     "--Decom", "true", "--layer_scale_init_value", 1)
    assert "randomly initialised" in out and "[3/4]" in out and "(1 skipped)" in out
    assert "skipping" in out and "depth.tif" in out
    matrix = np.load(matrix_path)
    assert matrix.shape == (256, 256) and np.isfinite(matrix).all() and matrix.min() >= 0
    assert matrix.max() > 0

    heatmap = tmp_path / "out" / "slak_heatmap.png"
    out = run_script("analyze_erf.py", "--source", matrix_path, "--heatmap_save", heatmap)
    table = json.loads(heatmap.with_suffix(".json").read_text())["table"]
    assert [row["threshold"] for row in table] == [0.2, 0.3, 0.5, 0.99]
    sides = [row["side_length"] for row in table]
    assert all(0 < a <= b <= 256 for a, b in zip(sides, sides[1:]))
    for row in table:
        assert f"{row['side_length']:>11}  {row['area_ratio']:>10.4f}" in out
    assert_not_blank(heatmap)

    figure = tmp_path / "out" / "figure.png"
    run_script("erf_slak51_convnext7_convnext31.py", "--sources", matrix_path, matrix_path,
               matrix_path, "--titles", "a", "b", "c", "--save_path", figure)
    assert_not_blank(figure)


def test_51_kernels_have_a_larger_erf_than_7_kernels():
    """Random SLaK (width 0.25, depths 1 1 3 1), layer scale 1, same seed: 51-class kernels reach
    further than 7x7 ones."""
    transform = visualize_erf.image_transform(256)
    from PIL import Image

    images = torch.stack([transform(Image.fromarray(getattr(skimage_data, name)()))
                          for name in PHOTOS])
    area = {}
    for kernels in (["51", "49", "47", "13", "5"], ["7", "7", "7", "7", "5"]):
        args = visualize_erf.get_args_parser().parse_args(
            ["--model", "SLaK", "--data_path", ".", "--kernel_size", *kernels, "--Decom", "false",
             "--width_factor", "0.25", "--depths", "1", "1", "3", "1",
             "--layer_scale_init_value", "1"])
        torch.manual_seed(0)
        model = visualize_erf.build_model(args).eval()
        table = analyze_erf.area_table(visualize_erf.compute_erf(model, images))
        area[kernels[0]] = next(row["area_ratio"] for row in table if row["threshold"] == 0.5)
    # Measured: 0.26 against 0.12 (seeds 1 and 2: 0.28 against 0.11 and 0.10).
    assert area["51"] > 1.5 * area["7"], area


def test_official_convnext_checkpoint_loads_into_the_convnext_layout(tmp_path):
    """facebookresearch/ConvNeXt names its 7x7 convolution ``dwconv`` (biased, no BatchNorm)."""
    args = visualize_erf.get_args_parser().parse_args(
        ["--model", "ConvNeXt", "--data_path", ".", "--width_factor", "0.25", "--depths", "1", "1",
         "1", "1"])
    import timm

    import SLaK  # noqa: F401  (registers SLaK_tiny with timm)

    torch.manual_seed(0)
    deploy = timm.create_model("SLaK_tiny", kernel_size=[7, 7, 7, 7, 100], width_factor=0.25,
                               depths=[1, 1, 1, 1], deploy=True)
    official = {k.replace(".large_kernel.lkb_origin.conv.", ".dwconv."): v
                for k, v in deploy.state_dict().items()}
    assert any(".dwconv.bias" in k for k in official)
    torch.save(official, tmp_path / "convnext.pth")
    args.weights = str(tmp_path / "convnext.pth")
    model = visualize_erf.build_model(args).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), deploy.eval().forward_stages(x)[-1])


def test_resnet_last_feature_map_with_random_init():
    args = visualize_erf.get_args_parser().parse_args(
        ["--model", "resnet101", "--data_path", ".", "--random_init"])
    model = visualize_erf.build_model(args).eval()
    erf = visualize_erf.compute_erf(model, torch.randn(1, 3, 64, 64))
    assert erf.shape == (64, 64) and erf.max() > 0


def test_figure_without_sources_reads_the_matrices_docs_erf_md_saves(tmp_path, monkeypatch):
    """The original release's bare ``python erf/erf_slak51_convnext7_convnext31.py``."""
    import erf_slak51_convnext7_convnext31 as figure_script
    defaults = [tmp_path / name for name in ("convnext7_erf.npy", "convnext31_erf.npy",
                                             "slak_tiny_erf.npy")]
    monkeypatch.setattr(figure_script, "DEFAULT_SOURCES", [str(p) for p in defaults])
    monkeypatch.chdir(tmp_path)
    from utils import ConfigError
    with pytest.raises(ConfigError, match="convnext7_erf.npy: no such file.*visualize_erf.py"):
        figure_script.main([])
    for i, path in enumerate(defaults):
        matrix = np.zeros((64, 64), dtype=np.float32)
        matrix[32 - 4 * (i + 1):32 + 4 * (i + 1), 32 - 4 * (i + 1):32 + 4 * (i + 1)] = 1.0
        np.save(path, matrix)
    figure_script.main([])
    assert_not_blank(tmp_path / "erf_slak51_convnext7_convnext31.png")
