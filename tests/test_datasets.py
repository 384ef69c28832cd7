"""The built-in synthetic data set (every item is the image its definition gives, in every
process and run), the training transform's --aa switch, and --prefetcher (normalisation and
random erasing on the device)."""
import argparse
import random

import numpy as np
import pytest
import torch

import main
from conftest import SYNTHETIC, TINY_MODEL, run_main
from datasets import SyntheticImageDataset, build_dataset, build_transform


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
