"""The built-in synthetic data set (every item is the image its definition gives, in every
process and run), the training transform's --aa switch, and --prefetcher (normalisation and
random erasing on the device)."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

import main
from conftest import SYNTHETIC, TINY_MODEL, run_main
from datasets import SyntheticImageDataset, build_dataset, build_transform, normalization


def defined_image(ds, index):
    """Item ``index`` as the class docstring defines it, written plainly: the class colour
    (jittered) times an oriented stripe pattern with a random phase, plus pixel noise."""
    label = index % ds.num_classes
    rng = np.random.default_rng([ds.seed, ds.split, index])
    single = np.float32  # images are computed in single precision
    coords = np.linspace(0.0, 1.0, ds.image_size, dtype=single)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    angle = ds.angles[label]
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(single(2 * np.pi * ds.frequencies[label])
                     * (xx * single(np.cos(angle)) + yy * single(np.sin(angle))) + single(phase))
    colour = (ds.colours[label] + rng.normal(0, 0.05, size=3)).astype(single)
    image = colour[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    noise = single(0.16 * np.sqrt(3)) * (rng.random(size=image.shape, dtype=single) - 0.5)
    image = image + noise  # uniform, standard deviation 0.08
    assert image.dtype == single
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


@pytest.mark.parametrize("size,classes,seed,split", [(32, 4, 0, 0), (57, 10, 3, 1), (224, 1000, 0, 0)])
def test_items_are_the_defined_images_bit_for_bit(size, classes, seed, split):
    ds = SyntheticImageDataset(100, classes, size, seed=seed, split=split)
    again = SyntheticImageDataset(100, classes, size, seed=seed, split=split)
    for index in range(0, 100, 7):
        image, label = ds.render(index)
        expected, expected_label = defined_image(ds, index)
        assert label == expected_label and image.dtype == np.uint8
        np.testing.assert_array_equal(image, expected)
        np.testing.assert_array_equal(again.render(index)[0], image)
    # The two splits draw different samples of the same classes.
    other = SyntheticImageDataset(100, classes, size, seed=seed, split=1 - split)
    assert not np.array_equal(other.render(0)[0], ds.render(0)[0])


@pytest.mark.parametrize("aa", ["none", "None", ""])
def test_aa_none_in_any_case_turns_randaugment_off(aa):
    args = argparse.Namespace(input_size=64, imagenet_default_mean_and_std=True, color_jitter=0.4,
                              train_interpolation="bicubic", reprob=0.0, remode="pixel",
                              recount=1, aa=aa, prefetcher=False)
    assert "RandAugment" not in repr(build_transform(True, args))
    args.aa = "rand-m9-mstd0.5-inc1"
    assert "RandAugment" in repr(build_transform(True, args))


def first_batches(*flags):
    """The first training and validation batches of main.py's loaders for ``flags``."""
    args = main.get_args_parser().parse_args([*SYNTHETIC, "--input_size", "64", "--batch_size", "6",
                                              "--synthetic_train_size", "12",
                                              "--synthetic_val_size", "6", *flags])
    train, val = main.build_loaders(args, build_dataset(True, args)[0], build_dataset(False, args)[0])
    batches = []
    for loader in (train, val):
        random.seed(0)  # the augmentations' random numbers (timm draws from all three)
        np.random.seed(0)
        torch.manual_seed(0)
        batches.append(next(iter(loader)))
    return batches


@pytest.mark.parametrize("workers", ["0", "2"])
def test_prefetcher_gives_the_workers_batches_normalised_on_the_device(workers):
    # The same augmentations (RandAugment included) from the same seeds: the batches differ only
    # by the rounding of a normalisation computed as (x - 255 mean) / (255 std).
    flags = ["--reprob", "0", "--num_workers", workers]
    for (images, targets), (fetched, fetched_targets) in zip(
            first_batches(*flags), first_batches(*flags, "--prefetcher", "true")):
        assert fetched.dtype == torch.float32 and fetched.shape == images.shape
        torch.testing.assert_close(fetched, images, rtol=0, atol=1e-5)
        assert torch.equal(fetched_targets, targets)


def test_prefetcher_erases_on_the_device_with_reprob():
    (kept, _), _ = first_batches("--reprob", "0", "--prefetcher", "true")
    (erased, _), _ = first_batches("--reprob", "1", "--prefetcher", "true")
    changed = (erased != kept).flatten(1).sum(1)
    # Every image has one random rectangle of pixel noise (pixel mode), and nothing else changed.
    assert bool((changed > 0).all())
    assert bool((changed < erased[0].numel()).all())


def test_main_trains_and_evaluates_with_the_prefetcher(tmp_path):
    result = run_main(*TINY_MODEL, *SYNTHETIC, "--prefetcher", "true", "--num_workers", "2",
                      "--batch_size", "8", "--synthetic_train_size", "32",
                      "--synthetic_val_size", "16", "--epochs", "1", "--warmup_epochs", "0",
                      "--output_dir", tmp_path)
    assert "* Acc@1" in result.stdout and "(16 images)" in result.stdout
    assert (tmp_path / "checkpoint-best.pth").exists()


# --- Image files: each decodes to the picture it shows, or is skipped with one warning ----------

def folder_args(data_path, *flags):
    """main.py's arguments for an image folder of two classes at 32x32."""
    return main.get_args_parser().parse_args(
        ["--data_set", "image_folder", "--data_path", str(data_path), "--nb_classes", "2",
         "--input_size", "32", "--device", "cpu", "--num_workers", "0", *flags])


def over_white(colour, alpha):
    """``colour`` (uint8, ...x C) seen through ``alpha`` (0..255) on a white page."""
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255
    return np.asarray(colour, dtype=np.float64) * a + 255 * (1 - a)


def image_modes_folder(root):
    """Class ``a``: a 16-bit grey gradient and an 8-bit RGB photograph; class ``b``: a palette
    image with opaque, transparent and half-transparent entries, a grey image with alpha, and a
    floating-point TIFF (no 8-bit picture). Returns {file name: the 32x32x3 picture it shows
    (float, white where transparent), or None for the file with no 8-bit picture}."""
    from PIL import Image
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    shown = {}

    grey16 = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(grey16).save(root / "a" / "grey16.png")  # opens as Pillow's I;16
    shown["grey16.png"] = np.repeat((grey16 >> 8)[..., None], 3, axis=2).astype(np.float64)

    rgb = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "rgb.png")
    shown["rgb.png"] = rgb.astype(np.float64)

    palette = np.array([[255, 0, 0], [0, 0, 255], [0, 0, 0], [0, 255, 0]], dtype=np.uint8)
    alphas = np.array([255, 0, 128, 255])  # red, transparent blue, half-transparent black, green
    index = rng.integers(0, 4, size=(32, 32)).astype(np.uint8)
    image = Image.frombytes("P", (32, 32), index.tobytes())
    image.putpalette(palette.flatten().tolist())
    image.save(root / "b" / "palette.png", transparency=bytes(alphas.tolist()))
    shown["palette.png"] = over_white(palette[index], alphas[index])

    grey, alpha = (rng.integers(0, 256, size=(32, 32), dtype=np.uint8) for _ in range(2))
    Image.fromarray(np.stack([grey, alpha], axis=2)).save(root / "b" / "grey_alpha.png")  # LA
    shown["grey_alpha.png"] = over_white(np.repeat(grey[..., None], 3, axis=2), alpha)

    Image.fromarray(rng.random((32, 32), dtype=np.float32)).save(root / "b" / "float.tiff")  # F
    shown["float.tiff"] = None
    return shown


def shown_pixels(image, args):
    """An eval-transformed image (no resize at 32 px) back as the HxWx3 picture, 0..255."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalization(args))
    return ((image * std + mean) * 255).permute(1, 2, 0).double().numpy()


def test_images_decode_to_the_picture_they_show_or_are_skipped(tmp_path, capsys):
    shown = image_modes_folder(tmp_path / "data")
    args = folder_args(tmp_path / "data")
    dataset, _ = build_dataset(False, args)
    assert dataset.classes == ["a", "b"] and len(dataset) == 5
    checked = 0
    for index, (path, label) in enumerate(dataset.samples):
        expected = shown[os.path.basename(path)]
        image, target = dataset[index]
        if expected is None:  # skipped with the warning: the next image stands in for it
            assert f"skipping unreadable image {path} (ValueError" in capsys.readouterr().out
            continue
        assert target == label
        # Within rounding: 8-bit and 16-bit grey exactly, transparency as seen on white.
        np.testing.assert_allclose(shown_pixels(image, args), expected, rtol=0,
                                   atol=1e-3 if "alpha" not in path and "palette" not in path else 1)
        checked += 1
    assert checked == 4 and "skipping" not in capsys.readouterr().out
    dataset, _ = build_dataset(False, folder_args(tmp_path / "data", "--check_images", "true"))
    assert f"dropping unreadable image {tmp_path / 'data' / 'b' / 'float.tiff'}" in \
        capsys.readouterr().out
    assert len(dataset) == 4


def linked_folder(root, outside):
    """Two classes whose folders hold link loops and repeated links; returns the (path below
    ``root``, class) of each real image as it should be listed."""
    from PIL import Image
    for folder in ("a", "b/deep"):
        (root / folder).mkdir(parents=True)
    outside.mkdir()
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    for path in ("a/0.png", "a/1.png", "b/0.png", "b/deep/1.png"):
        Image.fromarray(pixels).save(root / path)
    Image.fromarray(pixels).save(outside / "2.png")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # to an ancestor
    (root / "b" / "deep" / "up").symlink_to(root / "b", target_is_directory=True)
    (root / "a" / "to_b").symlink_to(root / "b", target_is_directory=True)  # to the other class
    (root / "b" / "shared").symlink_to(outside, target_is_directory=True)  # followed once,
    (root / "b" / "shared_again").symlink_to(outside, target_is_directory=True)  # not twice
    return [("a/0.png", 0), ("a/1.png", 0), ("b/0.png", 1), ("b/deep/1.png", 1),
            ("b/shared/2.png", 1)]


def test_linked_folders_list_each_real_image_once_under_its_class(tmp_path):
    expected = linked_folder(tmp_path / "data", tmp_path / "outside")
    dataset, _ = build_dataset(False, folder_args(tmp_path / "data"))
    assert [(os.path.relpath(path, tmp_path / "data"), label) for path, label in dataset.samples] \
        == expected


def test_image_folders_with_all_modes_and_link_loops_train_and_evaluate(tmp_path):
    image_modes_folder(tmp_path / "modes")
    linked_folder(tmp_path / "links", tmp_path / "outside")
    result = run_main(*TINY_MODEL, "--data_set", "image_folder", "--data_path", tmp_path / "links",
                      "--eval_data_path", tmp_path / "modes", "--nb_classes", "2", "--device",
                      "cpu", "--input_size", "32", "--num_workers", "0", "--epochs", "1",
                      "--batch_size", "2", "--warmup_epochs", "0", "--output_dir", tmp_path / "out")
    assert "; 2 updates per epoch" in result.stdout  # the five real images of the linked folder
    warnings = [line for line in result.stdout.splitlines() if "unreadable image" in line]
    assert warnings and all("float.tiff (ValueError" in line for line in warnings)
    assert "(5 images)" in result.stdout  # the floating-point image replaced by the next one


def test_a_class_folder_that_links_to_another_is_one_line(tmp_path):
    linked_folder(tmp_path / "data", tmp_path / "outside")
    (tmp_path / "data" / "c").symlink_to(tmp_path / "data" / "a", target_is_directory=True)
    result = run_main(*TINY_MODEL, "--data_set", "image_folder", "--data_path", tmp_path / "data",
                      "--nb_classes", "3", "--device", "cpu", "--input_size", "32",
                      "--output_dir", tmp_path / "out", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (f"error: {tmp_path / 'data' / 'c'} is a link to the class folder "
                        f"{tmp_path / 'data' / 'a'}, so its images would have two labels; remove "
                        f"the link")
    assert not (tmp_path / "out").exists()


# --- The eval transform: at 32 px and below the image is taken as it is, as the original ---------

@pytest.mark.parametrize("prefetcher", ["false", "true"])
def test_eval_at_32_pixels_and_below_neither_resizes_nor_crops(prefetcher):
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    args = main.get_args_parser().parse_args([*SYNTHETIC, "--prefetcher", prefetcher])
    image = build_transform(False, args)(Image.fromarray(pixels))
    if prefetcher == "true":  # uint8, normalised on the device
        assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    else:
        np.testing.assert_allclose(shown_pixels(image, args), pixels, rtol=0, atol=1e-3)
    # Above 32 px: resized by 1 / crop_pct, centre-cropped, as before.
    args = main.get_args_parser().parse_args([*SYNTHETIC, "--input_size", "64"])
    assert [type(t).__name__ for t in build_transform(False, args).transforms][:2] == \
        ["Resize", "CenterCrop"]
