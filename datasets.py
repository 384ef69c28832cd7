"""Data sets: ImageNet (``IMNET``), any ImageFolder, CIFAR-100 from disk, and a built-in synthetic set."""
import multiprocessing
import os

import numpy as np
from PIL import Image
from timm.data import create_transform
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                 IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import has_file_allowed_extension

from utils import ConfigError


class SyntheticImageDataset(Dataset):
    """A generated, learnable classification set that needs no files.

    Each class has a colour and an oriented stripe pattern; each sample is its class pattern with
    a random phase, colour jitter and pixel noise. Everything derives from ``seed``, so item ``i``
    is the same image in every process and every run. Items are PIL images, so the usual
    training transforms (crops, RandAugment, random erasing) apply as for real photographs.

    Args:
        size: number of samples.
        num_classes: number of classes (labels are ``i % num_classes``).
        image_size: side of the square images.
        seed: seeds the class patterns and the samples.
        split: 0 for training, 1 for validation (disjoint sample streams, same classes).
        transform: applied to each PIL image.
    """

    def __init__(self, size, num_classes, image_size, seed=0, split=0, transform=None):
        self.size, self.num_classes, self.image_size = size, num_classes, image_size
        self.seed, self.split, self.transform = seed, split, transform
        rng = np.random.default_rng([seed, 2])
        self.colours = rng.uniform(0.15, 0.85, size=(num_classes, 3))
        self.angles = rng.uniform(0, np.pi, size=num_classes)
        self.frequencies = rng.uniform(2.0, 6.0, size=num_classes)
        self.classes = [f"class_{c}" for c in range(num_classes)]

    def __len__(self):
        return self.size

    def render(self, index):
        """Return ``(image as HxWx3 uint8 array, label)`` for sample ``index``."""
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, self.split, index])
        # Single precision throughout: the loader workers render every training image, and in
        # double precision, with Gaussian noise, rendering cost more than the whole RandAugment
        # transform at 224x224.
        coords = np.linspace(0.0, 1.0, self.image_size, dtype=np.float32)
        angle = self.angles[label]
        phase = rng.uniform(0, 2 * np.pi)
        # sin(2 pi f (x cos a + y sin a) + phase), x along rows and y down columns, built from
        # the two axes and in place.
        stripes = (coords * np.float32(np.cos(angle)))[None, :] + \
            (coords * np.float32(np.sin(angle)))[:, None]
        stripes *= np.float32(2 * np.pi * self.frequencies[label])
        stripes += np.float32(phase)
        np.sin(stripes, out=stripes)
        colour = (self.colours[label] + rng.normal(0, 0.05, size=3)).astype(np.float32)
        stripes *= 0.25
        stripes += 0.75
        # Uniform pixel noise of standard deviation 0.08: a third of the cost of Gaussian draws.
        image = rng.random(size=(self.image_size, self.image_size, 3), dtype=np.float32)
        image -= 0.5
        image *= np.float32(0.16 * np.sqrt(3))
        image += colour[None, None, :] * stripes[..., None]
        np.clip(image, 0, 1, out=image)
        image *= 255
        return image.astype(np.uint8), label

    def __getitem__(self, index):
        array, label = self.render(index)
        image = Image.fromarray(array)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


# What PIL raises for a file that is not a readable image (truncated, foreign, empty), and what
# load_image raises for an image without an 8-bit picture.
UNREADABLE = (OSError, ValueError, SyntaxError)


def to_rgb(image):
    """The 8-bit RGB picture a PIL image shows.

    Transparent parts (palette or colour-key transparency, LA, PA, RGBA) are shown on white, as
    on a page; 16-bit grey (Pillow's ``I;16*`` modes, and ``I`` holding 0..65535, as 16-bit PNG,
    TIFF and PGM files open) keeps its high byte (``value >> 8``, as Pillow reads 16-bit colour
    PNGs); other modes (L, 1, CMYK, YCbCr, LAB, HSV) go through ``convert("RGB")``. An image with
    no 8-bit picture (``F``, floating point; ``I`` outside 0..65535) is a ``ValueError``.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"Pillow mode {mode} with values {values.min()}..{values.max()} has "
                             f"no 8-bit picture; save it with 8 or 16 bits")
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        raise ValueError("Pillow mode F (floating-point pixels) has no 8-bit picture; save it "
                         "with 8 or 16 bits")
    if mode in ("LA", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path):
    """The image file at ``path`` as the RGB picture it shows (:func:`to_rgb`); the image folders'
    loader. Raises one of :data:`UNREADABLE` for a file that is not such an image."""
    with open(path, "rb") as file:
        image = Image.open(file)
        image.load()
        return to_rgb(image)


def folder_id(path):
    """``(st_dev, st_ino)`` of the folder ``path`` leads to (links followed)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def walk_once(top, seen):
    """``[(folder, file names)]`` of ``top`` and the folders below it, links followed, each real
    folder once: a folder whose ``folder_id`` is in ``seen`` (an ancestor reached through a link
    loop, another class folder, or one already reached by another link) is not entered again.
    Unreadable folders are skipped, as ``os.walk`` does."""
    try:
        entries = sorted(os.scandir(top), key=lambda entry: entry.name)
    except OSError:
        return []
    files, folders = [], []
    for entry in entries:
        try:
            if not entry.is_dir():  # (a broken link is a file, reported when it is read)
                files.append(entry.name)
                continue
            key = folder_id(entry.path)
        except OSError:
            continue
        if key not in seen:
            seen.add(key)
            folders.append(entry.path)
    listing = [(top, files)]
    for folder in folders:
        listing += walk_once(folder, seen)
    return listing


class SafeImageFolder(datasets.ImageFolder):
    """An ``ImageFolder`` that skips unreadable images instead of ending the run.

    Images are decoded by :func:`load_image` (the picture each file shows). An image that cannot
    be decoded is reported in one warning line naming the file and replaced by the next readable
    one (deterministically, so a resumed epoch still replays exactly); ``skipped`` counts them
    across data-loader workers (forked processes share it). With ``check=True`` every image is
    decoded once at start-up and the unreadable ones are dropped. Linked folders are followed,
    each real folder once (:func:`walk_once`), so a link loop neither repeats images nor gives
    them another class. Empty class folders, folders without class folders and a class folder
    that is another one's link are a ``ConfigError``.
    """

    def __init__(self, root, transform=None, check=False):
        try:
            super().__init__(root, transform=transform, loader=load_image)
        except FileNotFoundError as exc:  # torchvision: no class folder, or a class without images
            raise ConfigError(f"{root}: {str(exc).split('. Supported')[0]}; every class folder "
                              f"needs at least one image") from None
        self.skipped = multiprocessing.Value("i", 0)
        if check:
            self._drop_unreadable()

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        """torchvision's ``(path, class index)`` list in its order (folders sorted by path, files
        by name), each real folder walked once (:func:`walk_once`)."""
        if is_valid_file is None:
            def is_valid_file(path):
                return has_file_allowed_extension(path, extensions)
        root_id, class_folders = folder_id(directory), {}
        for name in sorted(class_to_idx):
            path = os.path.join(directory, name)
            key = folder_id(path)
            if key == root_id:
                raise ConfigError(f"{path} is a link to the data folder {directory} itself; "
                                  f"remove the link")
            if key in class_folders:
                raise ConfigError(f"{path} is a link to the class folder {class_folders[key]}, "
                                  f"so its images would have two labels; remove the link")
            class_folders[key] = path
        seen = {root_id, *class_folders}
        instances, empty = [], []
        for name in sorted(class_to_idx):
            found = [(os.path.join(folder, file), class_to_idx[name])
                     for folder, files in sorted(walk_once(os.path.join(directory, name), seen))
                     for file in files if is_valid_file(os.path.join(folder, file))]
            if not found:
                empty.append(name)
            instances += found
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return instances

    def _drop_unreadable(self):
        readable = []
        for path, target in self.samples:
            try:
                self.loader(path)
                readable.append((path, target))
            except UNREADABLE as exc:
                print(f"Warning: dropping unreadable image {path} ({type(exc).__name__})", flush=True)
        dropped = len(self.samples) - len(readable)
        empty = sorted(set(self.classes) - {self.classes[t] for _, t in readable})
        if empty:
            raise ConfigError(f"{self.root}: no readable image in class folder(s) "
                              f"{', '.join(empty)}; fix or remove them")
        self.samples = self.imgs = readable
        self.targets = [t for _, t in readable]
        print(f"Checked {len(readable) + dropped} images under {self.root}: {dropped} unreadable "
              f"dropped", flush=True)

    def __getitem__(self, index):
        attempts = min(len(self.samples), 100)
        for attempt in range(attempts):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self.loader(path)
            except UNREADABLE as exc:
                with self.skipped.get_lock():
                    self.skipped.value += 1
                print(f"Warning: skipping unreadable image {path} ({type(exc).__name__}: "
                      f"{str(exc)[:100]}); pass --check_images true to drop such files at start-up",
                      flush=True)
                continue
            # Outside the try: a transform's error is a bug to report, not an unreadable file.
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise ConfigError(f"{self.root}: {attempts} images in a row cannot be read; check the "
                          f"data folder")


def check_same_classes(dataset_train, dataset_val):
    """Training and validation folders must name the same classes in the same order."""
    train, val = getattr(dataset_train, "classes", None), getattr(dataset_val, "classes", None)
    if train is None or val is None or list(train) == list(val):
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    what = (f"only in training: {', '.join(only_train[:5]) or '-'}; only in validation: "
            f"{', '.join(only_val[:5]) or '-'}" if only_train or only_val else "same names, other count")
    raise ConfigError(f"the training and validation folders have different class folders ({what}); "
                      f"labels would not match, so give folders with the same class names")


def normalization(args):
    """``(mean, std)`` per channel, of images scaled to [0, 1], that the inputs are normalised with."""
    return ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if args.imagenet_default_mean_and_std
            else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))


def build_transform(is_train, args):
    """timm's training transform (RandAugment, random erasing...) or resize + centre crop (none
    at ``--input_size`` 32 and below).

    With ``args.prefetcher`` the transform ends with the image as uint8, channels first:
    conversion to float, normalisation and random erasing are left to timm's ``PrefetchLoader``
    on the training device (see ``main.build_loaders``)."""
    mean, std = normalization(args)
    if is_train:
        auto_augment = None if args.aa is None or args.aa.lower() in ("", "none") else args.aa
        try:
            transform = create_transform(
                input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
                auto_augment=auto_augment, interpolation=args.train_interpolation,
                re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=mean, std=std,
                use_prefetcher=args.prefetcher)
        except (AssertionError, ValueError, KeyError) as exc:  # timm's policy parser
            raise ConfigError(f"--aa {args.aa}: timm cannot parse this augmentation policy ({exc}); "
                              f"give one such as rand-m9-mstd0.5-inc1, or none") from None
        if args.input_size <= 32:  # tiny images: random crop with padding instead of resized crops
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return transform
    # As the original: from 384 px the image is warped to a square (crop_pct ignored); below,
    # resized to size / crop_pct on the shorter side, then centre-cropped; at 32 px and below
    # (CIFAR-sized images) taken as it is.
    bicubic = transforms.InterpolationMode.BICUBIC
    size = args.input_size
    if size <= 32:
        resize = []
    elif size >= 384:
        resize = [transforms.Resize((size, size), interpolation=bicubic)]
    else:
        crop_pct = args.crop_pct if args.crop_pct else 224 / 256
        resize = [transforms.Resize(int(size / crop_pct), interpolation=bicubic),
                  transforms.CenterCrop(size)]
    to_input = [transforms.PILToTensor()] if args.prefetcher else \
        [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(resize + to_input)


def _require_dir(path, flag):
    if not path:
        raise ConfigError(f"{flag} is required for --data_set other than synthetic; give the data "
                          f"folder, or use --data_set synthetic to run without files")
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: folder not found; give an existing data folder, or use "
                          f"--data_set synthetic to run without files")
    return path


def build_dataset(is_train, args):
    """Return ``(dataset, nb_classes)`` for ``args.data_set``; raise ``ConfigError`` on bad paths."""
    transform = build_transform(is_train, args)
    if args.data_set == "synthetic":
        size = args.synthetic_train_size if is_train else args.synthetic_val_size
        return SyntheticImageDataset(size, args.nb_classes, args.input_size, seed=args.seed,
                                     split=0 if is_train else 1, transform=transform), args.nb_classes
    if args.data_set == "CIFAR":
        root = _require_dir(args.data_path, "--data_path")
        if not os.path.isdir(os.path.join(root, "cifar-100-python")):
            raise ConfigError(f"--data_path {root} holds no cifar-100-python/ folder; extract "
                              f"CIFAR-100 (python version) there (nothing is downloaded)")
        return datasets.CIFAR100(root, train=is_train, transform=transform, download=False), 100
    if args.data_set == "IMNET":
        root = os.path.join(_require_dir(args.data_path, "--data_path"), "train" if is_train else "val")
        _require_dir(root, "--data_path")
        if args.nb_classes != 1000:
            print(f"Note: --data_set IMNET has 1000 classes; --nb_classes {args.nb_classes} is "
                  f"ignored (use --data_set image_folder for another number of classes)")
        return SafeImageFolder(root, transform=transform, check=args.check_images), 1000
    if args.data_set == "image_folder":
        root = args.data_path if is_train else (args.eval_data_path or args.data_path)
        flag = "--eval_data_path" if not is_train and args.eval_data_path else "--data_path"
        dataset = SafeImageFolder(_require_dir(root, flag), transform=transform,
                                  check=args.check_images)
        if len(dataset.classes) != args.nb_classes:
            raise ConfigError(f"{root} has {len(dataset.classes)} class folders but --nb_classes is "
                              f"{args.nb_classes}; make them agree")
        return dataset, args.nb_classes
    raise ConfigError(f"unknown --data_set {args.data_set}")
