r"""The floors of a SLaK training step's large-kernel convolutions: arithmetic and memory.

Nothing is timed and no GPU is needed: the work is counted from the model's layer shapes and
divided by a device's peak rates, so that the measured in-step time of the convolutions
(``train_throughput.py --profile``) can be read against what the hardware allows:

    python benchmarks/lk_floor.py --model SLaK_tiny --batch 64 --input_size 224 \
        --width_factor 1.3 --kernel_size 51 49 47 13 5

Each unit (``--Decom``) holds three depthwise convolutions, ``k x s``, ``s x k`` and ``s x s``
(``s`` the small kernel). A training step runs each forward, then its input gradient and its
weight gradient; with ``recompute_small`` (the model's default under ``torch.compile``) the small
branch's forward runs again in the backward pass. Counted per convolution:

- direct multiply-adds: one per tap that lands inside the map (zero padding costs nothing), the
  work of a CUDA-core kernel;
- Toeplitz multiply-adds: along the kernel's long axis each tap row is a banded Toeplitz matrix,
  and tensor cores multiply it in ``--block`` x ``--block`` tiles, so every tile of the band
  that holds a tap counts whole (the short axis, as the direct count);
- memory: the bytes a pass cannot avoid, in ``--bytes_per_element``: the forward reads the input
  and writes the output, the backward reads the output gradient and the input and writes the
  input gradient (the weight gradient from the same reads). For a unit whose three convolutions
  run as one pass (one read of the input, one write of their sum), that is five passes over its
  activation; run separately, five per convolution.

The arithmetic floor of a convolution is the faster of its two engines (direct work at the
CUDA cores' fp32 FMA rate, Toeplitz work at the dense bf16 tensor-core rate); the step's floor
adds them, and sets it beside the memory floor at the HBM bandwidth. Peak rates are NVIDIA's
data-sheet figures for the SXM parts (``--peaks`` chooses; measured rates are lower, e.g. a
device-to-device copy reaches about 4.3 of the H200's 4.8 TB/s).
"""
import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

# Data-sheet peaks: dense bf16 tensor-core FLOP/s (no sparsity), fp32 CUDA-core FLOP/s, HBM bytes/s.
PEAKS = {
    "H100-SXM": dict(tensor_flops=989e12, cuda_fp32_flops=66.9e12, hbm_bytes=3.35e12),
    "H200-SXM": dict(tensor_flops=989e12, cuda_fp32_flops=66.9e12, hbm_bytes=4.8e12),
}


def in_bounds_taps(length, kernel):
    """Sum over the ``length`` outputs of the taps of a centred ``kernel`` that land inside."""
    pad = kernel // 2
    return sum(min(length, i + kernel - pad) - max(0, i - pad) for i in range(length))


def toeplitz_blocks(length, kernel, block):
    """Tiles of ``block`` x ``block`` (input x output positions, the axis padded to whole tiles)
    of the banded Toeplitz matrix of a centred ``kernel`` along ``length`` that hold a tap."""
    pad, tiles = kernel // 2, math.ceil(length / block)
    count = 0
    for out_tile in range(tiles):
        lo = out_tile * block - pad  # input positions that the tile's outputs read
        hi = min(length, (out_tile + 1) * block) - 1 + kernel - 1 - pad
        lo, hi = max(0, lo), min(length - 1, hi)
        count += hi // block - lo // block + 1 if lo <= hi else 0
    return count


@dataclass
class Conv:
    unit: int  # the unit's index in the network: its convolutions share input and output
    stage: int
    map_size: int
    channels: int
    kernel: tuple  # (kh, kw)
    passes: int  # forward passes per step (2 where the backward recomputes it)

    def direct_macs(self, batch):
        (kh, kw), s = self.kernel, self.map_size
        return batch * self.channels * in_bounds_taps(s, kh) * in_bounds_taps(s, kw)

    def toeplitz_macs(self, batch, block):
        (kh, kw), s = self.kernel, self.map_size
        long_k, short_k = max(kh, kw), min(kh, kw)
        return (batch * self.channels * in_bounds_taps(s, short_k)
                * toeplitz_blocks(s, long_k, block) * block * block)


def step_convolutions(model, input_size, width_factor, kernel_size, recompute_small=True):
    """The depthwise convolutions of one SLaK training step, per unit in stage order."""
    import SLaK

    depths, dims = SLaK.MODEL_DEPTHS_DIMS[model]
    small = kernel_size[4]
    convs = []
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        map_size, channels = input_size // (4 * 2 ** stage), int(dim * width_factor)
        k = kernel_size[stage]
        for _ in range(depth):
            unit = len({c.unit for c in convs})
            convs += [Conv(unit, stage + 1, map_size, channels, (k, small), 1),
                      Conv(unit, stage + 1, map_size, channels, (small, k), 1)]
            if small < k:  # a small kernel at least the large one is no branch of its own
                convs.append(Conv(unit, stage + 1, map_size, channels, (small, small),
                                  2 if recompute_small else 1))
    return convs


def floors(convs, batch, block, bytes_per_element, peaks):
    """Per-stage counts and the step's floors (milliseconds) on ``peaks``."""
    rows, units, arithmetic_s = {}, set(), 0.0
    for conv in convs:
        row = rows.setdefault(conv.stage, dict(stage=conv.stage, map=conv.map_size,
                                               channels=conv.channels, units=0, convs=0,
                                               direct_gmacs=0.0, toeplitz_gmacs=0.0,
                                               unit_fused_gb=0.0, separate_gb=0.0))
        calls = conv.passes + 2  # forward(s), input gradient, weight gradient: as many MACs each
        direct, toeplitz = conv.direct_macs(batch) * calls, conv.toeplitz_macs(batch, block) * calls
        activation_gb = batch * conv.channels * conv.map_size ** 2 * bytes_per_element / 1e9
        row["convs"] += 1
        row["direct_gmacs"] += direct / 1e9
        row["toeplitz_gmacs"] += toeplitz / 1e9
        row["separate_gb"] += 5 * activation_gb
        if conv.unit not in units:  # one pass per unit: one read of the input, one write of the sum
            units.add(conv.unit)
            row["units"] += 1
            row["unit_fused_gb"] += 5 * activation_gb
        arithmetic_s += min(2 * direct / peaks["cuda_fp32_flops"],
                            2 * toeplitz / peaks["tensor_flops"])
    rows = list(rows.values())
    return rows, dict(
        arithmetic_ms=arithmetic_s * 1e3,
        memory_unit_fused_ms=sum(r["unit_fused_gb"] for r in rows) * 1e9 / peaks["hbm_bytes"] * 1e3,
        memory_separate_ms=sum(r["separate_gb"] for r in rows) * 1e9 / peaks["hbm_bytes"] * 1e3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="SLaK_tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--width_factor", type=float, default=1.3)
    p.add_argument("--kernel_size", type=int, nargs=5, default=[51, 49, 47, 13, 5])
    p.add_argument("--recompute_small", type=int, choices=[0, 1], default=1)
    p.add_argument("--block", type=int, default=16, help="tensor-core tile side along the long axis")
    p.add_argument("--bytes_per_element", type=int, default=2, help="2: bf16/fp16 activations")
    p.add_argument("--peaks", nargs="+", default=list(PEAKS), choices=list(PEAKS))
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)

    convs = step_convolutions(args.model, args.input_size, args.width_factor, args.kernel_size,
                              bool(args.recompute_small))
    result = dict(config=vars(args), convolutions=len(convs), devices={})
    print(f"{args.model}, batch {args.batch}, {args.input_size}x{args.input_size}, width "
          f"{args.width_factor}, kernels {args.kernel_size}: {len(convs)} depthwise convolutions "
          f"per step (forward, input and weight gradients each)")
    for name in args.peaks:
        rows, total = floors(convs, args.batch, args.block, args.bytes_per_element, PEAKS[name])
        result["stages"] = rows
        result["devices"][name] = total
    print("| stage | map | channels | units | direct GMAC | Toeplitz GMAC | unit-fused GB | separate GB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["stages"]:
        print(f"| {r['stage']} | {r['map']} | {r['channels']} | {r['units']} | {r['direct_gmacs']:.1f} "
              f"| {r['toeplitz_gmacs']:.1f} | {r['unit_fused_gb']:.2f} | {r['separate_gb']:.2f} |")
    print("| device (data-sheet peaks) | arithmetic floor, ms | memory floor, one pass per unit, ms "
          "| memory floor, convolutions apart, ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, total in result["devices"].items():
        print(f"| {name} | {total['arithmetic_ms']:.2f} | {total['memory_unit_fused_ms']:.2f} "
              f"| {total['memory_separate_ms']:.2f} |")
    print(json.dumps(result, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
