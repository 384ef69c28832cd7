"""Images per second that ``main.py``'s training loader delivers, with no model behind it.

The training set, its transform (RandAugment, random erasing, ...) and the DataLoader are built
by ``main.py``'s own functions from ``main.py``'s flags, given after ``--``. It times
``--batches`` batches after the first one (the workers' start-up excluded). Set against the
training step's images per second (``train_throughput.py``), it tells whether a run on this host
will wait for data, and how many ``--num_workers`` keep it fed:

    python benchmarks/loader_throughput.py --batches 100 -- --data_set synthetic \\
        --input_size 224 --batch_size 64 --num_workers 14

On ``--data_set synthetic`` the set is made as large as the batches need unless
``--synthetic_train_size`` is given. With ``--prefetcher true`` the workers hand over uint8 images
and the batches are normalised and erased on ``--device``, as in training; ``--compare_prefetcher``
times the loader without and with it in one process (``--repeats`` pairs), e.g. on a GPU host:

    python benchmarks/loader_throughput.py --batches 100 --compare_prefetcher --repeats 3 -- \
        --data_set synthetic --input_size 224 --batch_size 64 --num_workers 14

Prints one JSON line per measurement (and, comparing, one with the median ratio).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import main as slak_main
from datasets import build_dataset
from utils import ConfigError, run_cli


def measure(opts, args):
    on_gpu = args.device.startswith("cuda")
    if args.prefetcher and on_gpu and not torch.cuda.is_available():
        raise ConfigError("--prefetcher true finishes the batches on --device cuda, and no GPU is "
                          "visible; pass --device cpu")
    if args.data_set == "synthetic" and not opts.size_given:
        args.synthetic_train_size = args.batch_size * (opts.batches + 1)
    dataset, _ = build_dataset(True, args)
    loader, _ = slak_main.build_loaders(args, dataset, None)
    if len(loader) < opts.batches + 1:
        raise ConfigError(f"the training set gives {len(loader)} batches of {args.batch_size}, "
                          f"fewer than --batches {opts.batches} plus one; lower --batches")
    batches = iter(loader)
    next(batches)  # the workers' start-up
    start = time.perf_counter()
    for _ in range(opts.batches):
        next(batches)
    if args.prefetcher and on_gpu:  # the last batch's normalisation and erasing
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(data_set=args.data_set, input_size=args.input_size, batch_size=args.batch_size,
                num_workers=args.num_workers, prefetcher=args.prefetcher, cpus=os.cpu_count(),
                batches=opts.batches,
                img_per_s=round(opts.batches * args.batch_size / seconds, 1))


def compare_prefetcher(opts, args):
    """The loader without and with ``--prefetcher``, ``opts.repeats`` times each, in alternating
    order; prints each measurement and returns the median of the repeats' ratios."""
    ratios = []
    for k in range(opts.repeats):
        rates = {}
        for prefetcher in (False, True) if k % 2 == 0 else (True, False):
            row = measure(opts, argparse.Namespace(**{**vars(args), "prefetcher": prefetcher}))
            print(json.dumps(row), flush=True)
            rates[prefetcher] = row["img_per_s"]
        ratios.append(rates[True] / rates[False])
    return dict(prefetcher_vs_workers=round(statistics.median(ratios), 3),
                ratios=[round(r, 3) for r in ratios])


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = slak_main.ArgumentParser(description=__doc__,  # errors in one line, as main.py's
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.help_command = "python benchmarks/loader_throughput.py --help"
    parser.add_argument("--batches", type=int, default=50, help="batches timed")
    parser.add_argument("--compare_prefetcher", action="store_true",
                        help="time the loader with --prefetcher false and true, in one process")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --compare_prefetcher: pairs of measurements, in alternating "
                             "order; the last line gives the median of their ratios")
    opts = parser.parse_args(argv[:split])
    if opts.batches < 1 or opts.repeats < 1:
        parser.error("--batches and --repeats must be at least 1")
    if opts.repeats > 1 and not opts.compare_prefetcher:
        parser.error("--repeats applies to --compare_prefetcher")
    main_argv = argv[split + 1:]
    opts.size_given = any(a.split("=")[0] == "--synthetic_train_size" for a in main_argv)
    args = slak_main.get_args_parser().parse_args(main_argv)
    print(json.dumps(run_cli(compare_prefetcher if opts.compare_prefetcher else measure,
                             opts, args)), flush=True)


if __name__ == "__main__":
    main()
