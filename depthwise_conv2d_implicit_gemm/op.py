"""``slak::`` custom ops around the Triton kernels: dispatch, launch heuristics, autograd, fake.

Public entry point: ``depthwise_conv2d(x, weight, bias)``. It applies autocast the way
``F.conv2d`` does. Under ``torch.compile`` it calls ``torch.ops.slak.dwconv2d``, whose autograd
formula calls ``slak::dwconv2d_backward`` (input and weight gradients in one op, so that they
share their inputs' transposing copies); both have fake implementations, so
``torch.compile(fullgraph=True)`` traces forward and backward without graph breaks, the kernels
themselves staying opaque to the compiler. Eager calls go through an
``autograd.Function`` running the same two computations with less dispatch overhead.

Where the work runs:

* CUDA tensors in float32/float16/bfloat16: the Triton kernels of ``kernels.py``.
* CPU tensors: ``F.conv2d`` (the reference), unless ``TRITON_INTERPRET=1`` is set, in which
  case the same Triton kernels run in Triton's interpreter (this is how CI tests them).
* ``LARGE_KERNEL_CONV_IMPL=<folder>``: MegEngine's extension built by the original release
  (``_depthwise_conv2d_implicit_gemm_C``), for comparisons; see ``_external_conv``.
"""
import functools
import importlib
import inspect
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

try:
    import triton

    from .kernels import (dwconv_fwd_kernel, dwconv_plane_fwd_kernel, dwconv_plane_wgrad_kernel,
                          dwconv_wgrad_kernel, get_kernels)
except ImportError:   # CPU-only torch builds come without Triton: F.conv2d everywhere
    triton = None
from .reference import depthwise_conv2d_reference, depthwise_conv2d_reference_grads

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernel launches per kind, so tests can assert that the Triton path (not the fallback) ran.
launch_counts = {"fwd": 0, "grad_input": 0, "grad_weight": 0}

# The compiled kernel of the last launch of each kind (register/spill reports in diagnostics).
last_kernel = {}

# Tile sizes forced by ``tile_override``; None means the heuristic of ``_tiles`` decides.
_TILE_OVERRIDE = None


@contextmanager
def tile_override(**tiles):
    """Force launch parameters (``block_m``, ``block_a``, ``block_m_wgrad``, ``num_warps``,
    ``num_warps_wgrad``, ``num_stages``, ``vectorize``; ``transpose_tall=False`` disables
    ``_transposes_tall``) inside the ``with`` block; tests use tiny tiles so that small images
    span several tiles, benchmarks use it to compare configurations."""
    global _TILE_OVERRIDE
    previous, _TILE_OVERRIDE = _TILE_OVERRIDE, dict(tiles)
    try:
        yield
    finally:
        _TILE_OVERRIDE = previous


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(x):
    if triton is None:
        if x.is_cuda:
            warnings.warn("Triton is not installed: DepthWiseConv2dImplicitGEMM falls back to "
                          "the much slower F.conv2d; install triton to use its kernels")
        return False
    return x.dtype in _TRITON_DTYPES and (x.is_cuda or (x.device.type == "cpu" and _interpret()))


def _output_format(x):
    """Memory format of every output: channels-last for channels-last inputs (like cuDNN),
    contiguous otherwise. Shared by real and fake implementations, whose strides must agree."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _geometry(x, weight):
    """Map NCHW onto the kernels' (long axis A, short axis B) geometry.

    The Toeplitz product runs along the longer kernel side, so the loop over taps of the
    shorter side stays short (5 for SLaK's (K, 5) and (5, K) branches)."""
    kh, kw = weight.shape[-2:]
    long_is_h = kh > kw
    if long_is_h:   # A = H, B = W
        return dict(long_is_h=True, LA=x.shape[2], LB=x.shape[3], KA=kh, KB=kw, a_dim=2, b_dim=3)
    return dict(long_is_h=False, LA=x.shape[3], LB=x.shape[2], KA=kw, KB=kh, a_dim=3, b_dim=2)


def _tiles(g, n_lines, dtype):
    """Launch parameters: a small heuristic, documented because it is the whole tuning story.

    * ``block_a`` (= ``block_k``): the long axis in one tile when it fits in 64 (the band of a
      51-tap kernel over a 56-wide image then costs one 64x64 Toeplitz block per tap), else
      64-wide tiles walking the band.
    * ``block_m``: lines per program, so that one program's output tile holds 8K elements
      (enough tensor-core work per Toeplitz gather) for 32- and 64-wide tiles, 1K for 16-wide
      ones (7- and 14-pixel maps, where more, smaller programs measured faster: stage-4
      forward 47-50 us with 2K, 38-39 us with 1K; BENCHMARKS.md).
    * ``num_warps``: 8 for 8K-element tiles, so that a thread holds 32 accumulators; with 4
      the stage-1 and stage-2 forward passes ran 1.8-2.8x slower on an H100 (BENCHMARKS.md).
    * ``block_m_wgrad``: the reduction chunk of the weight-gradient GEMM.
    * ``vectorize``: tell the kernels what they cannot prove (``_vector_width``, and the long
      axis's length when one tile spans it), so that image lines load and store as 16-byte
      vectors where their alignment allows.
    * ``num_stages=1``: deeper pipelining keeps more tiles in registers, and where the hints
      let Triton stage the image tiles through asynchronous copies (two stages), the step's
      forward passes measured 6% slower and forward+backward the same (BENCHMARKS.md).
    """
    block_a = min(64, max(16, triton.next_power_of_2(g["LA"])))
    block_m = 8192 // block_a if block_a >= 32 else 64
    block_m = min(block_m, max(16, triton.next_power_of_2(n_lines)))
    t = dict(block_a=block_a, block_m=block_m, block_m_wgrad=64 if dtype != torch.float32 else 32,
             num_warps=8 if block_m * block_a >= 8192 else 4, num_warps_wgrad=4, num_stages=1,
             vectorize=True)
    if _TILE_OVERRIDE:
        t.update(_TILE_OVERRIDE)
    return t


def _dot_args(t):
    """``DOT_PRECISION`` and ``DOT_UPCAST`` for operands like ``t`` (see kernels.py)."""
    upcast = t.dtype == torch.bfloat16 and not t.is_cuda
    # TF32 for float32 only where PyTorch would let cuDNN use it; the flag is read at call
    # time, inside the opaque op, so compiled graphs follow it too.
    if upcast or (t.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return dict(DOT_PRECISION="ieee", DOT_UPCAST=upcast)
    return dict(DOT_PRECISION="tf32", DOT_UPCAST=upcast)


def _needs_index_64(*tensors):
    """Whether some element offset (sum of (size - 1) * stride) reaches 2**31."""
    return any(sum((n - 1) * s for n, s in zip(t.shape, t.stride())) >= 2 ** 31 - 1
               for t in tensors)


def _width_contiguous(t):
    # The kernels read image lines along W; they accept any strides, but only unit stride
    # along W gives coalesced loads, so other layouts (channels-last included) are copied.
    return t if t.stride(3) == 1 else t.contiguous()


def _vector_width(g, *tensors):
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


def _hints(t, g, *tensors):
    """``LA_ONE_BLOCK`` and ``ALIGN`` kernel arguments (see ``_tiles``: ``vectorize``)."""
    if not t["vectorize"]:
        return dict(LA_ONE_BLOCK=0, ALIGN=1)
    return dict(LA_ONE_BLOCK=g["LA"] if g["LA"] <= t["block_a"] else 0,
                ALIGN=_vector_width(g, *tensors))


def _transposes_tall(x, kh, kw):
    """Whether a tall kernel (``kh > kw``) runs as the wide one on transposed images.

    Along H the taps of the short axis shift each tile's contiguous lines by single elements,
    so the tiles load element by element; transposed, the lines start where the alignment
    hints allow vectors. One transposing copy of each input the kernels read (the image in the
    forward pass, the output gradient once for both gradients) costs less than that whenever
    the transposed lines (``H`` long) start on at least 4-element boundaries (SLaK's 56- and
    28-pixel stages; BENCHMARKS.md); ``tile_override(transpose_align=...)`` changes that bound.
    Results are written straight into the caller's layout (``_store_hints``)."""
    tiles = _TILE_OVERRIDE or {}
    return kh > kw and x.shape[2] % tiles.get("transpose_align", 4) == 0 and \
        tiles.get("transpose_tall", True) and tiles.get("vectorize", True)


def _transposed(t):
    """``(N, C, H, W)`` -> contiguous ``(N, C, W, H)``."""
    return t.transpose(2, 3).contiguous()


def _store_hints(t, g, y, block_m, n_lines):
    """``Y_ALIGN``, ``Y_M_CONTIG`` and ``EVEN_M`` kernel arguments for the output ``y``.

    ``Y_ALIGN`` is ``ALIGN`` for the output's lines. ``Y_M_CONTIG`` applies where consecutive
    lines are adjacent elements (stride 1 along B: a transposed problem writing into the
    caller's NCHW tensor): it is the vector width along the lines, with every run of that many
    lines inside one image and aligned, so that the stores stay 16-byte vectors instead of a
    transposing copy afterwards. ``EVEN_M`` (no partial line block) drops the line mask, which
    Triton could not otherwise prove uniform across a vector."""
    hints = dict(Y_ALIGN=1, Y_M_CONTIG=1, EVEN_M=n_lines % block_m == 0)
    if not t["vectorize"]:
        return hints
    if y.stride(g["b_dim"]) != 1:
        hints["Y_ALIGN"] = _vector_width(g, y)
        return hints
    size = y.element_size()
    width = 16 // size
    while width > 1 and (y.data_ptr() % (width * size) or g["LB"] % width or block_m % width or
                         any(y.stride(d) % width for d in (0, 1, g["a_dim"]))):
        width //= 2
    hints["Y_M_CONTIG"] = width
    return hints


# Maps of at most this many pixels run through the whole-plane kernels.
_PLANE_PIXELS = 64


def _runs_as_planes(x):
    """Whether ``x``'s maps are small enough for the whole-plane kernels (``kernels.py``,
    ``dwconv_plane_*``): SLaK's 7x7 stage 4 there took 2.2-3.6x less GPU time than the line
    kernels (BENCHMARKS.md); ``tile_override(plane=False)`` keeps the line kernels."""
    return x.shape[2] * x.shape[3] <= _PLANE_PIXELS and (_TILE_OVERRIDE or {}).get("plane", True)


def _plane_contiguous(t):
    """``t`` if each ``(n, c)`` plane is one contiguous run (what the plane kernels address),
    else a contiguous copy."""
    return t if t.stride(3) == 1 and t.stride(2) == t.shape[3] else t.contiguous()


def _launch_conv(x, weight, bias, flip, kind):
    """Forward (``flip=False``) or input gradient (``flip=True``, ``x`` = output gradient)."""
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if _runs_as_planes(x):
        _run_plane_conv(_plane_contiguous(x), weight, bias, flip, kind, y)
    elif _transposes_tall(x, *weight.shape[2:]):
        _run_conv(_transposed(x), weight.transpose(2, 3), bias, flip, kind, y.transpose(2, 3))
    else:
        _run_conv(x, weight, bias, flip, kind, y)
    return y.contiguous(memory_format=_output_format(x))


class _Plan:
    """One launch of a kernel for one call signature: the kernel (wrapped for the GPU or the
    interpreter), grid, the arguments after the tensors (sizes, strides, then compile-time
    constants, in the kernel's order), and the compiled binary once the first launch has
    produced it."""

    __slots__ = ("kernel", "grid", "args", "num_warps", "num_stages", "compiled", "alloc")

    def __init__(self, kernel_fn, interpret, grid, values, num_warps, num_stages, alloc=None):
        self.kernel = get_kernels(interpret)[kernel_fn.__name__]
        params = list(inspect.signature(kernel_fn).parameters.values())[_N_TENSOR_ARGS:]
        missing = [p.name for p in params if p.name not in values and p.default is p.empty]
        assert not missing, f"{kernel_fn.__name__}: no value for {missing}"
        self.args = tuple(values.get(p.name, p.default) for p in params)
        # The compiled binary's launcher takes all three grid dimensions.
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.num_warps, self.num_stages = num_warps, num_stages
        self.compiled, self.alloc = None, alloc


# Each kernel's leading arguments are its four tensors.
_N_TENSOR_ARGS = 4
# Plans by call signature. The heuristics behind a plan and Triton's own argument binding cost
# more host time than a small stage's GPU work, so an eager call with a known signature only
# looks its plan up and calls the compiled binary.
_PLANS = {}
_MAX_PLANS = 4096


def _plan_key(tag, extra, *tensors):
    """Everything a plan depends on: shapes, strides, dtypes, devices and 16-byte alignment
    of the tensors (the alignment hints and Triton's pointer specialisation), TF32, tiles.
    The device also decides compiled kernels or the interpreter: CPU tensors reach the
    kernels only under ``TRITON_INTERPRET=1``."""
    return (tag, extra, torch.backends.cudnn.allow_tf32,
            tuple(sorted(_TILE_OVERRIDE.items())) if _TILE_OVERRIDE else None,
            *((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16) if t is not None
              else None for t in tensors))


def _cached_plan(key, make):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:   # e.g. ERF runs over many image sizes
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _launch(plan, tensors, kind):
    if plan.compiled is not None:
        plan.compiled[plan.grid](*tensors, *plan.args)
    else:
        compiled = plan.kernel[plan.grid](*tensors, *plan.args, num_warps=plan.num_warps,
                                          num_stages=plan.num_stages)
        if compiled is not None:   # the interpreter has no binary to call
            plan.compiled = last_kernel[kind] = compiled
    launch_counts[kind] += 1


def _run_conv(x, weight, bias, flip, kind, y):
    """Launch the convolution kernel on ``x`` writing ``y`` (same shape, any strides)."""
    x = _width_contiguous(x)
    if y.numel() == 0:
        return
    key = _plan_key("conv", flip, x, weight, bias, y)
    plan = _cached_plan(key, lambda: _conv_plan(x, weight, bias, flip, y))
    _launch(plan, (x, weight, bias if bias is not None else weight, y), kind)


def _conv_plan(x, weight, bias, flip, y):
    N, C = x.shape[:2]
    g = _geometry(x, weight)
    n_lines = N * g["LB"]
    t = _tiles(g, n_lines, x.dtype)
    a_dim, b_dim = g["a_dim"], g["b_dim"]
    values = dict(
        N=N, LA=g["LA"], LB=g["LB"], KA=g["KA"], KB=g["KB"],
        sxn=x.stride(0), sxc=x.stride(1), sxa=x.stride(a_dim), sxb=x.stride(b_dim),
        syn=y.stride(0), syc=y.stride(1), sya=y.stride(a_dim), syb=y.stride(b_dim),
        swc=weight.stride(0), swa=weight.stride(a_dim), swb=weight.stride(b_dim),
        HAS_BIAS=bias is not None, FLIP=flip, LONG_IS_H=g["long_is_h"],
        **_dot_args(x), INDEX_64=_needs_index_64(x, y), **_hints(t, g, x),
        **_store_hints(t, g, y, t["block_m"], n_lines),
        BLOCK_M=t["block_m"], BLOCK_A=t["block_a"], BLOCK_K=t["block_a"])
    grid = (triton.cdiv(n_lines, t["block_m"]), triton.cdiv(g["LA"], t["block_a"]), C)
    return _Plan(dwconv_fwd_kernel, not x.is_cuda, grid, values, t["num_warps"], t["num_stages"])


def _run_plane_conv(x, weight, bias, flip, kind, y):
    """``_run_conv`` for small maps; ``x`` and ``y`` have contiguous planes."""
    if y.numel() == 0:
        return
    plan = _cached_plan(_plan_key("plane", flip, x, weight, bias, y),
                        lambda: _plane_conv_plan(x, weight, bias, flip, y))
    _launch(plan, (x, weight, bias if bias is not None else weight, y), kind)


def _plane_conv_plan(x, weight, bias, flip, y):
    N, C, H, W = x.shape
    block_m = min(64, max(16, triton.next_power_of_2(N)))
    values = dict(
        N=N, H=H, W=W, KH=weight.shape[2], KW=weight.shape[3],
        sxn=x.stride(0), sxc=x.stride(1), syn=y.stride(0), syc=y.stride(1),
        swc=weight.stride(0), swh=weight.stride(2), sww=weight.stride(3),
        HAS_BIAS=bias is not None, FLIP=flip, **_dot_args(x), INDEX_64=_needs_index_64(x, y),
        BLOCK_M=block_m, PLANE=max(16, triton.next_power_of_2(H * W)))
    return _Plan(dwconv_plane_fwd_kernel, not x.is_cuda, (triton.cdiv(N, block_m), C), values,
                 4, 1)


def _launch_plane_grad_weight(grad, x, kh, kw):
    """``_launch_grad_weight`` for small maps."""
    x = _plane_contiguous(x)
    grad = _plane_contiguous(grad)
    N, C, H, W = x.shape
    dw = torch.empty((C, 1, kh, kw), device=x.device, dtype=x.dtype)
    if N * H * W == 0:
        return dw.zero_()
    plan = _cached_plan(_plan_key("plane_wgrad", (kh, kw), x, grad),
                        lambda: _plane_grad_weight_plan(grad, x, dw))
    scratch = torch.empty(C * plan.alloc ** 2, device=x.device, dtype=torch.float32)
    _launch(plan, (x, grad, dw, scratch), "grad_weight")
    return dw


def _plane_grad_weight_plan(grad, x, dw):
    N, C, H, W = x.shape
    kh, kw = dw.shape[2:]
    plane = max(16, triton.next_power_of_2(H * W))
    values = dict(
        N=N, H=H, W=W, KH=kh, KW=kw, sxn=x.stride(0), sxc=x.stride(1),
        sdn=grad.stride(0), sdc=grad.stride(1),
        swc=dw.stride(0), swh=dw.stride(2), sww=dw.stride(3),
        **_dot_args(x), INDEX_64=_needs_index_64(x, grad),
        BLOCK_M=min(64, max(16, triton.next_power_of_2(N))), PLANE=plane,
        TAPS_PAD=triton.next_power_of_2(kh * kw))
    return _Plan(dwconv_plane_wgrad_kernel, not x.is_cuda, (C,), values, 4, 1, alloc=plane)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _launch_grad_weight(grad, x, kh, kw):
    """Weight gradient ``(C, 1, kh, kw)`` in the dtype of ``x``; ``grad`` and ``x`` are in
    the geometry the kernels run in (transposed already for a transposed tall kernel)."""
    x = _width_contiguous(x)
    grad = _width_contiguous(grad)
    N, C = x.shape[:2]
    if N * x.shape[2] * x.shape[3] == 0:
        return torch.zeros((C, 1, kh, kw), device=x.device, dtype=x.dtype)
    plan = _cached_plan(_plan_key("wgrad", (kh, kw), x, grad),
                        lambda: _grad_weight_plan(grad, x, kh, kw))
    out_shape, n_scratch = plan.alloc
    # Partial gradients in float32 when several slots share a tap, else dw itself.
    out = torch.empty(out_shape, device=x.device,
                      dtype=x.dtype if out_shape[0] == 1 else torch.float32)
    scratch = torch.empty(n_scratch, device=x.device, dtype=torch.float32)
    _launch(plan, (x, grad, out, scratch), "grad_weight")
    return out[0] if out_shape[0] == 1 else out.sum(0).to(x.dtype)


def _grad_weight_plan(grad, x, kh, kw):
    N, C = x.shape[:2]
    g = _geometry(x, torch.empty((0, 0, kh, kw)))
    LA, KA, KB = g["LA"], g["KA"], g["KB"]
    n_lines = N * g["LB"]
    t = _tiles(g, n_lines, x.dtype)
    block_a = t["block_a"]
    block_m = min(t["block_m_wgrad"], max(16, triton.next_power_of_2(n_lines)))
    n_ablk = triton.cdiv(LA, block_a)
    # Chunks of the band clipped to the image (see the kernel): at most this many per block.
    n_kchunk = triton.cdiv(min(block_a + 2 * (KA // 2), LA), block_a)
    programs = C * KB * n_ablk * n_kchunk
    # Split the line reduction only when there are too few programs to fill the GPU, and
    # keep at least four reduction steps per program to amortise its diagonal epilogue.
    n_mtiles = triton.cdiv(n_lines, block_m)
    split = max(1, min(triton.cdiv(2 * _num_sms(x.device), programs), n_mtiles // 4))
    n_slots = n_ablk * n_kchunk * split   # 1 for images up to 64 wide: dw written directly
    out_shape = (n_slots, C, 1, kh, kw)
    out_strides = torch.empty(out_shape, device="meta").stride()
    # Kernel taps (i, j) are (short, long) axis; the weight's last two dims are (kh, kw).
    s_i, s_j = (out_strides[4], out_strides[3]) if g["long_is_h"] else out_strides[3:]
    a_dim, b_dim = g["a_dim"], g["b_dim"]
    values = dict(
        N=N, LA=LA, LB=g["LB"], KA=KA, KB=KB, N_KCHUNK=n_kchunk, SPLIT_M=split,
        sxn=x.stride(0), sxc=x.stride(1), sxa=x.stride(a_dim), sxb=x.stride(b_dim),
        sdn=grad.stride(0), sdc=grad.stride(1), sda=grad.stride(a_dim), sdb=grad.stride(b_dim),
        swslot=out_strides[0], swc=out_strides[1], swi=s_i, swj=s_j,
        LONG_IS_H=g["long_is_h"], **_dot_args(x), INDEX_64=_needs_index_64(x, grad),
        BLOCK_M=block_m, BLOCK_A=block_a, BLOCK_K=block_a,
        KA_PAD=triton.next_power_of_2(KA), **_hints(t, g, x, grad))
    return _Plan(dwconv_wgrad_kernel, not x.is_cuda, (C * KB, n_ablk * n_kchunk, split), values,
                 t["num_warps_wgrad"], t["num_stages"],
                 alloc=(out_shape, programs * split * block_a * block_a))


def _check(x, weight, bias):
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"depthwise conv expects x (N, C, H, W) and weight (C, 1, kh, kw), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel {(kh, kw)} must be odd on both axes for 'same' padding")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"input ({x.dtype}), weight ({weight.dtype}) and bias must share a dtype; "
                        f"cast them, or run under autocast")


# The two computations, shared by the custom ops (traced by torch.compile) and by the eager
# autograd.Function below.

def conv_forward(x, weight, bias):
    """x ``(N, C, H, W)``, weight ``(C, 1, kh, kw)``, bias ``(C,)`` or None -> ``(N, C, H, W)``."""
    _check(x, weight, bias)
    if _use_triton(x):
        return _launch_conv(x, weight, bias, flip=False, kind="fwd")
    return depthwise_conv2d_reference(x, weight, bias).contiguous(memory_format=_output_format(x))


def conv_backward(grad, x, weight, need_input, need_weight):
    """``(dx, dw)`` from the output gradient: the input gradient ``(N, C, H, W)`` (the same
    convolution with the kernel rotated by 180 degrees) and the weight gradient
    ``(C, 1, kh, kw)`` in the dtype of ``x``; each is None unless asked for."""
    # Autograd hands back the output's dtype, which is the input's: casts only for direct calls.
    grad = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    kh, kw = weight.shape[2:]
    if not _use_triton(x):
        dx, dw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [kh // 2, kw // 2], [1, 1], False,
            [0, 0], x.shape[1], [need_input, need_weight, False])
        return (dx.contiguous(memory_format=_output_format(grad)) if need_input else None,
                dw.contiguous() if need_weight else None)
    dx = dw = None
    if _runs_as_planes(x):
        if need_input:
            dx = _launch_conv(grad, weight, None, flip=True, kind="grad_input")
        if need_weight:
            dw = _launch_plane_grad_weight(grad, x, kh, kw)
        return dx, dw
    if _transposes_tall(x, kh, kw):
        # Both gradients read the output gradient along transposed lines: transpose it once.
        grad_t = _transposed(grad)
        weight_t = weight.transpose(2, 3)
        if need_input:
            dx = torch.empty(grad.shape, device=grad.device, dtype=grad.dtype)
            _run_conv(grad_t, weight_t, None, True, "grad_input", dx.transpose(2, 3))
            dx = dx.contiguous(memory_format=_output_format(grad))
        if need_weight:
            dw = _launch_grad_weight(grad_t, _transposed(x), kw, kh).transpose(2, 3).contiguous()
        return dx, dw
    if need_input:
        dx = _launch_conv(grad, weight, None, flip=True, kind="grad_input")
    if need_weight:
        dw = _launch_grad_weight(grad, x, kh, kw)
    return dx, dw


def _backward_impl(grad, x, weight, has_bias, needs, backward):
    need_x, need_w, need_b = needs
    dx, dw = backward(grad, x, weight, need_x, need_w)
    if dw is not None:
        dw = dw if dw.dtype == weight.dtype else dw.to(weight.dtype)
        if dw.stride() != weight.stride():
            # A gradient laid out like its parameter (e.g. a channels-last model's weights) is
            # one DDP can reduce in place, without the "grad strides do not match" copy and
            # warning.
            dw = torch.empty_like(weight).copy_(dw)
    db = grad.sum((0, 2, 3)).to(weight.dtype) if (has_bias and need_b) else None
    return dx, dw, db


@torch.library.custom_op("slak::dwconv2d", mutates_args=())
def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Depthwise conv, stride 1, same padding: x ``(N, C, H, W)``, weight ``(C, 1, kh, kw)``,
    bias ``(C,)`` or None -> ``(N, C, H, W)``."""
    return conv_forward(x, weight, bias)


@dwconv2d.register_fake
def _(x, weight, bias):
    _check(x, weight, bias)
    return torch.empty_like(x, memory_format=_output_format(x))


@torch.library.custom_op("slak::dwconv2d_backward", mutates_args=())
def dwconv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, need_input: bool,
                      need_weight: bool) -> tuple[Tensor, Tensor]:
    """See ``conv_backward``; a gradient not asked for comes back empty (custom ops return
    tensors only)."""
    dx, dw = conv_backward(grad, x, weight, need_input, need_weight)
    return (x.new_empty(0) if dx is None else dx), (x.new_empty(0) if dw is None else dw)


@dwconv2d_backward.register_fake
def _(grad, x, weight, need_input, need_weight):
    dx = torch.empty_like(grad, memory_format=_output_format(grad)) if need_input else x.new_empty(0)
    dw = x.new_empty(weight.shape) if need_weight else x.new_empty(0)
    return dx, dw


def _compiled_backward(grad, x, weight, need_input, need_weight):
    dx, dw = torch.ops.slak.dwconv2d_backward(grad, x, weight, need_input, need_weight)
    return (dx if need_input else None), (dw if need_weight else None)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    return _backward_impl(grad, x, weight, ctx.has_bias, ctx.needs_input_grad,
                          _compiled_backward)


dwconv2d.register_autograd(_backward, setup_context=_setup_context)


class _EagerConv(torch.autograd.Function):
    """The same op for eager mode: a custom op's dispatch costs about 0.3 ms of CPU per
    forward+backward on the benchmark machine, more than the GPU time of a small SLaK
    stage, so eager calls skip it (the kernels and formulas are the ones above)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _backward_impl(grad, x, weight, ctx.has_bias, ctx.needs_input_grad,
                              conv_backward)


# --------------------------------------------------------------------------------------------
# External MegEngine build (LARGE_KERNEL_CONV_IMPL), kept for side-by-side comparisons only.

_EXTERNAL_MODULE = "_depthwise_conv2d_implicit_gemm_C"
_external = None


def _load_external(folder):
    global _external
    if _external is None:
        sys.path.insert(0, folder)
        try:
            _external = importlib.import_module(_EXTERNAL_MODULE)
        except ImportError as e:
            raise ImportError(f"LARGE_KERNEL_CONV_IMPL={folder}: cannot import {_EXTERNAL_MODULE} "
                              f"from there ({e}); build the original's extension into that "
                              f"folder or unset the variable") from None
    return _external


class _ExternalConv(torch.autograd.Function):
    """MegEngine's kernels: ``forward_<dt>(x, w)``, ``backward_data_<dt>(dy, w)``,
    ``backward_filter_<dt>(dy, x, w)`` with ``<dt>`` in fp32/fp16, contiguous NCHW tensors."""

    @staticmethod
    def forward(ctx, x, weight, ext):
        ctx.ext = ext
        ctx.suffix = "fp16" if x.dtype == torch.float16 else "fp32"
        x, weight = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, weight)
        return getattr(ext, "forward_" + ctx.suffix)(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        dx = getattr(ctx.ext, "backward_data_" + ctx.suffix)(grad, weight)
        dw = getattr(ctx.ext, "backward_filter_" + ctx.suffix)(grad, x, weight)
        return dx, dw, None


def _external_conv(x, weight, bias, folder):
    ext = _load_external(folder)
    # The extension has float32 and float16 kernels only; bfloat16 runs through float32.
    dtype = x.dtype if x.dtype in (torch.float32, torch.float16) else torch.float32
    y = _ExternalConv.apply(x.to(dtype), weight.to(dtype), ext).to(x.dtype)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------

def depthwise_conv2d(x, weight, bias=None):
    """Depthwise conv, stride 1, same padding, any odd ``(kh, kw)``; the drop-in ``F.conv2d``.

    Args:
        x: ``(N, C, H, W)``, any strides.
        weight: ``(C, 1, kh, kw)``.
        bias: ``(C,)`` or None.
    Returns:
        ``(N, C, H, W)``, channels-last when ``x`` is.
    """
    if x.is_cuda and torch.is_autocast_enabled("cuda") or (
            x.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        # Autocast does not see custom ops; cast as it casts conv2d (all to the autocast dtype).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    folder = os.environ.get("LARGE_KERNEL_CONV_IMPL")
    if folder and x.is_cuda:
        return _external_conv(x, weight, bias, folder)
    if torch.compiler.is_compiling():
        return torch.ops.slak.dwconv2d(x, weight, bias)
    if not torch.is_grad_enabled() or not (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return conv_forward(x, weight, bias)   # inference: no autograd node to build
    return _EagerConv.apply(x, weight, bias)
