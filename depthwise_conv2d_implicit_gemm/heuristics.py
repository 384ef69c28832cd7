"""Launch heuristics: which kernels a call runs (its strategy) and with which tiles and hints.

Everything here is a pure function of shapes, strides, dtypes and alignment, plus the
parameters in ``TUNING`` and PyTorch's TF32 flag (``dot_args``); ``plans.py`` turns the answers
into kernel launches.
"""
import dataclasses

import torch

try:
    from triton import next_power_of_2
except ImportError:   # CPU-only torch builds come without Triton; nothing launches then
    def next_power_of_2(n):
        return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The heuristic's parameters, measured on the H100/H200 (BENCHMARKS.md).

    * ``max_block_a``: the longest tile along the kernel's long axis. A line up to 64 long is
      one tile (the band of a 51-tap kernel over a 56-wide image then costs one 64x64 Toeplitz
      block per tap); longer lines are tiled and only the band's chunks are visited.
    * ``tile_elements``: the output tile of one program for 32- and 64-wide tiles (enough
      tensor-core work per Toeplitz gather); 8 warps then hold 32 accumulators a thread (with
      4 warps stage 1 and 2 ran 1.8-2.8x slower).
    * ``narrow_tile_lines``: lines per program for 16-wide tiles (lines of at most 16 pixels
      that the whole-plane kernels do not take), where more, smaller programs measured faster.
    * ``wgrad_lines`` / ``wgrad_lines_fp32``: the reduction chunk of the weight-gradient GEMM.
    * ``plane_pixels``: maps of at most this many pixels run through the whole-plane kernels
      (SLaK's 7x7 stage: 2.2-3.6x less GPU time than the line kernels); 0 disables them.
    * ``transpose_align``: a tall kernel runs as the wide one on transposed images when the
      image height is a multiple of this (see ``choose_strategy``); 0 never transposes.
    * ``vectorize``: pass the alignment hints that let lines load and store as 16-byte vectors.
      Off, the paths built on them are off too: the ``transposed`` strategy, one-tile lines
      (``LA_ONE_BLOCK``) and with them the Toeplitz tiles in memory.
    * ``num_stages``: software pipelining depth; deeper kept more tiles in registers and
      measured slower in the forward passes.
    * ``toeplitz_in_memory``: where one 64-wide tile spans a line (lines of 33-64 pixels,
      SLaK's 56-pixel stage), the forward and input-gradient kernels read each tap's Toeplitz
      tile from memory, written once per call by a small kernel, instead of every program
      gathering it from the weights, which measured faster (BENCHMARKS.md). Narrower
      tiles gather a quarter of the elements or less, and measured no faster.
    * ``cross_unit``: a deployed unit's two convolutions (``depthwise_conv2d_sum``) in one
      kernel on maps of at most 64x64 pixels (``choose_sum_strategy``); off, they run as two
      convolutions and a sum.
    * ``cross_tile_elements``: that kernel's tile, whole images of one channel, at least two.
      Two 64x64, four 32x32 and sixteen 16x16 images per program measured fastest
      (BENCHMARKS.md, "Deployed units").
    """
    max_block_a: int = 64
    tile_elements: int = 8192
    narrow_tile_lines: int = 64
    wgrad_lines: int = 64
    wgrad_lines_fp32: int = 32
    plane_pixels: int = 64
    transpose_align: int = 4
    vectorize: bool = True
    num_stages: int = 1
    toeplitz_in_memory: bool = True
    cross_unit: bool = True
    cross_tile_elements: int = 4096


TUNING = Tuning()

PLANES, TRANSPOSED, LINES = "planes", "transposed", "lines"
CROSS, SEPARATE = "cross", "separate"
# The one-pass unit kernel (``dwconv_cross_kernel``) holds whole images of one channel, up to
# 64x64 pixels, in one tile.
CROSS_MAX_SIDE = 64


def choose_strategy(shape, kernel):
    """How a convolution of an ``(N, C, H, W)`` image with a ``(kh, kw)`` kernel runs, for the
    forward pass and both gradients alike:

    * ``planes``: maps of at most ``TUNING.plane_pixels`` pixels, one GEMM per block of images
      with a 2-D Toeplitz matrix (``kernels.dwconv_plane_*``).
    * ``transposed``: a tall kernel (``kh > kw``) as the wide one on transposed images. Along H
      the taps of the short axis shift each tile's contiguous lines by single elements, so the
      tiles would load element by element; transposed, lines start where the alignment hints
      allow vectors. One transposing copy of each input the kernels read costs less than that
      whenever the transposed lines start on ``transpose_align``-element boundaries (SLaK's 56-
      and 28-pixel stages). Results are written straight into the caller's layout.
    * ``lines``: the line kernels in the image's own orientation.
    """
    kh, kw = kernel
    h, w = shape[2], shape[3]
    if h * w <= TUNING.plane_pixels:
        return PLANES
    if kh > kw and TUNING.vectorize and TUNING.transpose_align and h % TUNING.transpose_align == 0:
        return TRANSPOSED
    return LINES


def choose_sum_strategy(shape):
    """How the sum of two biased convolutions of one ``(N, C, H, W)`` image runs (a deployed
    SLaK unit; ``sum.py``), when no autograd is needed:

    * ``planes``: maps of at most ``TUNING.plane_pixels`` pixels, as one convolution with the
      two kernels added (``kernels.dwconv_plane_fwd_kernel``).
    * ``cross``: maps of at most 64x64 pixels, both convolutions in one pass
      (``kernels.dwconv_cross_kernel``).
    * ``separate``: two convolutions and a sum.
    """
    h, w = shape[2], shape[3]
    if h * w <= TUNING.plane_pixels:
        return PLANES
    if TUNING.cross_unit and h <= CROSS_MAX_SIDE and w <= CROSS_MAX_SIDE:
        return CROSS
    return SEPARATE


def geometry(x, kernel):
    """Map NCHW onto the line kernels' (long axis A, short axis B) geometry.

    The Toeplitz product runs along the longer kernel side, so the loop over taps of the
    shorter side stays short (5 for SLaK's (K, 5) and (5, K) branches)."""
    kh, kw = kernel
    if kh > kw:   # A = H, B = W
        return dict(long_is_h=True, LA=x.shape[2], LB=x.shape[3], KA=kh, KB=kw, a_dim=2, b_dim=3)
    return dict(long_is_h=False, LA=x.shape[3], LB=x.shape[2], KA=kw, KB=kh, a_dim=3, b_dim=2)


def tiles(g, n_lines, dtype):
    """Tile sizes and warps of the line kernels for geometry ``g`` (see ``Tuning``)."""
    block_a = min(TUNING.max_block_a, max(16, next_power_of_2(g["LA"])))
    block_m = TUNING.tile_elements // block_a if block_a >= 32 else TUNING.narrow_tile_lines
    block_m = min(block_m, max(16, next_power_of_2(n_lines)))
    wgrad = TUNING.wgrad_lines_fp32 if dtype == torch.float32 else TUNING.wgrad_lines
    return dict(block_a=block_a, block_m=block_m, block_m_wgrad=wgrad,
                num_warps=8 if block_m * block_a >= 8192 else 4, num_warps_wgrad=4,
                num_stages=TUNING.num_stages)


def dot_args(t):
    """``DOT_PRECISION`` and ``DOT_UPCAST`` for operands like ``t`` (see kernels.py)."""
    upcast = t.dtype == torch.bfloat16 and not t.is_cuda
    # TF32 for float32 only where PyTorch would let cuDNN use it; the flag is read at call
    # time, inside the opaque op, so compiled graphs follow it too.
    if upcast or (t.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return dict(DOT_PRECISION="ieee", DOT_UPCAST=upcast)
    return dict(DOT_PRECISION="tf32", DOT_UPCAST=upcast)


def needs_index_64(*tensors):
    """Whether some element offset (sum of (size - 1) * stride) reaches 2**31."""
    return any(sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2 ** 31 - 1
               for t in tensors)


def vector_width(g, *tensors):
    """Elements per vector (up to 16 bytes) on which every image line of ``tensors`` starts,
    for the kernels' alignment hints; 1 when the long axis is H, whose tiles run contiguously
    across lines that the taps shift by single elements."""
    if g["long_is_h"]:
        return 1
    size = tensors[0].element_size()
    width = 16 // size
    while width > 1 and any(t.data_ptr() % (width * size) or t.stride(0) % width or
                            t.stride(1) % width or t.stride(g["b_dim"]) % width for t in tensors):
        width //= 2
    return width


def load_hints(t, g, *tensors):
    """``LA_ONE_BLOCK`` (the long axis's length when one tile spans it, else 0) and ``ALIGN``
    (``vector_width``) kernel arguments for the inputs ``tensors``."""
    if not TUNING.vectorize:
        return dict(LA_ONE_BLOCK=0, ALIGN=1)
    return dict(LA_ONE_BLOCK=g["LA"] if g["LA"] <= t["block_a"] else 0,
                ALIGN=vector_width(g, *tensors))


def store_hints(g, y, block_m, n_lines):
    """``Y_ALIGN``, ``Y_M_CONTIG`` and ``EVEN_M`` kernel arguments for the output ``y``.

    ``Y_ALIGN`` is ``ALIGN`` for the output's lines. ``Y_M_CONTIG`` applies where consecutive
    lines are adjacent elements (stride 1 along B: a transposed problem writing into the
    caller's NCHW tensor): it is the vector width along the lines, with every run of that many
    lines inside one image and aligned, so that the stores stay 16-byte vectors instead of a
    transposing copy afterwards. ``EVEN_M`` (no partial line block) drops the line mask, which
    Triton could not otherwise prove uniform across a vector."""
    hints = dict(Y_ALIGN=1, Y_M_CONTIG=1, EVEN_M=n_lines % block_m == 0)
    if not TUNING.vectorize:
        return hints
    if y.stride(g["b_dim"]) != 1:
        hints["Y_ALIGN"] = vector_width(g, y)
        return hints
    size = y.element_size()
    width = 16 // size
    while width > 1 and (y.data_ptr() % (width * size) or g["LB"] % width or block_m % width or
                         any(y.stride(d) % width for d in (0, 1, g["a_dim"]))):
        width //= 2
    hints["Y_M_CONTIG"] = width
    return hints


def output_format(x):
    """Memory format of every output: channels-last for channels-last inputs (like cuDNN),
    contiguous otherwise. Shared by real and fake implementations, whose strides must agree."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
