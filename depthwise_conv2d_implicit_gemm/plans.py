"""Launch plans: one kernel launch per call signature, computed once and cached.

The heuristics behind a launch and Triton's own argument binding cost more host time than a
small stage's GPU work, so an eager call with a known signature only looks its plan up and
calls the compiled binary (Triton 3.3 and later). Every function here takes tensors already in
the geometry the kernels run in (``ops.py`` transposes for the ``transposed`` strategy).
"""
import functools
import inspect

import torch
import triton

from . import heuristics
from .kernels import (dwconv_cross_kernel, dwconv_fwd_kernel, dwconv_plane_fwd_kernel,
                      dwconv_plane_wgrad_kernel, dwconv_toeplitz_kernel, dwconv_wgrad_kernel,
                      get_kernels)

_MAX_PLANS = 4096

# The compiled binary's launcher takes every argument, constants included (as ``launch`` passes
# them), from Triton 3.3 on; before, only the others. There every call goes through the JIT
# function's own binding: the same kernel, more host time per call.
LAUNCH_COMPILED = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3)


class Plan:
    """One launch of a kernel for one call signature: the kernel (wrapped for the GPU or the
    interpreter), grid, the arguments after the tensors (sizes, strides, then compile-time
    constants, in the kernel's order), and the compiled binary once the first launch has
    produced it. ``scratch``: what the launcher allocates besides the output."""

    __slots__ = ("name", "kernel", "grid", "args", "num_warps", "num_stages", "compiled",
                 "scratch")

    def __init__(self, kernel_fn, interpret, grid, values, num_warps, num_stages, scratch=None):
        self.name = kernel_fn.__name__
        self.kernel = get_kernels(interpret)[self.name]
        # The leading ``*_ptr`` arguments are the tensors, passed at launch.
        params = [p for p in inspect.signature(kernel_fn).parameters.values()
                  if not p.name.endswith("_ptr")]
        missing = [p.name for p in params if p.name not in values and p.default is p.empty]
        assert not missing, f"{self.name}: no value for {missing}"
        self.args = tuple(values.get(p.name, p.default) for p in params)
        # The compiled binary's launcher takes all three grid dimensions.
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.num_warps, self.num_stages = num_warps, num_stages
        self.compiled, self.scratch = None, scratch


_cache = {}


def _key(tag, extra, *tensors):
    """Everything a plan depends on: shapes, strides, dtypes, devices and 16-byte alignment
    of the tensors (the alignment hints and Triton's pointer specialisation), TF32, tuning.
    The device also decides compiled kernels or the interpreter: CPU tensors reach the
    kernels only under ``TRITON_INTERPRET=1``."""
    return (tag, extra, torch.backends.cudnn.allow_tf32, heuristics.TUNING,
            *((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16) if t is not None
              else None for t in tensors))


def _cached(key, make):
    plan = _cache.get(key)
    if plan is None:
        if len(_cache) >= _MAX_PLANS:   # e.g. ERF runs over many image sizes
            _cache.clear()
        plan = _cache[key] = make()
    return plan


def launch(plan, tensors):
    if plan.compiled is not None:
        plan.compiled[plan.grid](*tensors, *plan.args)
    else:
        compiled = plan.kernel[plan.grid](*tensors, *plan.args, num_warps=plan.num_warps,
                                          num_stages=plan.num_stages)
        if compiled is not None and LAUNCH_COMPILED:   # the interpreter has no binary to call
            plan.compiled = compiled


def width_contiguous(t):
    # The line kernels read image lines along W; they accept any strides, but only unit stride
    # along W gives coalesced loads, so other layouts (channels-last included) are copied.
    return t if t.stride(3) == 1 else t.contiguous()


def plane_contiguous(t):
    """``t`` if each ``(n, c)`` plane is one contiguous run (what the plane kernels address),
    else a contiguous copy."""
    return t if t.stride(3) == 1 and t.stride(2) == t.shape[3] else t.contiguous()


# --- line kernels ---------------------------------------------------------------------------

def conv(x, weight, bias, flip, y):
    """The line convolution of ``x`` into ``y`` (same shape, any strides): the forward pass, or
    with ``flip`` (the kernel rotated by 180 degrees, ``x`` the output gradient) the input
    gradient."""
    x = width_contiguous(x)
    if y.numel() == 0:
        return
    plan = _cached(_key("conv", flip, x, weight, bias, y),
                   lambda: _conv_plan(x, weight, bias, flip, y))
    toeplitz = weight
    if plan.scratch is not None:   # TOEPLITZ_IN_MEMORY
        toeplitz = toeplitz_tiles(plan.scratch, weight, x)
    launch(plan, (x, weight, toeplitz, bias if bias is not None else weight, y))


def _toeplitz_plan(weight, interpret, a_dim, b_dim, flip, a_major, block):
    """The launch of ``dwconv_toeplitz_kernel`` for ``weight``'s long axis ``a_dim`` (taps of
    the other spatial axis, ``b_dim``, enumerate the tiles), stored ``[a, k]`` if ``a_major``
    else ``[k, a]``, and the shape of the tiles ``(C, taps, block, block)``."""
    C, KA, KB = weight.shape[0], weight.shape[a_dim], weight.shape[b_dim]
    values = dict(KA=KA, KB=KB, swc=weight.stride(0), swa=weight.stride(a_dim),
                  swb=weight.stride(b_dim), FLIP=flip, LONG_IS_H=a_major,
                  BLOCK_A=block, BLOCK_K=block)
    return Plan(dwconv_toeplitz_kernel, interpret, (C * KB,), values, 4, 1), (C, KB, block, block)


def toeplitz_tiles(toeplitz, weight, like):
    """Run a ``_toeplitz_plan`` result; the tiles come back in ``like``'s dtype."""
    plan, shape = toeplitz
    tiles = torch.empty(shape, device=like.device, dtype=like.dtype)
    launch(plan, (weight, tiles))
    return tiles


def _conv_plan(x, weight, bias, flip, y):
    N, C = x.shape[:2]
    g = heuristics.geometry(x, weight.shape[2:])
    n_lines = N * g["LB"]
    t = heuristics.tiles(g, n_lines, x.dtype)
    a_dim, b_dim = g["a_dim"], g["b_dim"]
    load = heuristics.load_hints(t, g, x)
    scratch = None
    if heuristics.TUNING.toeplitz_in_memory and load["LA_ONE_BLOCK"] and t["block_a"] >= 64:
        scratch = _toeplitz_plan(weight, not x.is_cuda, a_dim, b_dim, flip, g["long_is_h"],
                                 t["block_a"])
    values = dict(
        N=N, LA=g["LA"], LB=g["LB"], KA=g["KA"], KB=g["KB"],
        sxn=x.stride(0), sxc=x.stride(1), sxa=x.stride(a_dim), sxb=x.stride(b_dim),
        syn=y.stride(0), syc=y.stride(1), sya=y.stride(a_dim), syb=y.stride(b_dim),
        swc=weight.stride(0), swa=weight.stride(a_dim), swb=weight.stride(b_dim),
        HAS_BIAS=bias is not None, FLIP=flip, LONG_IS_H=g["long_is_h"],
        **heuristics.dot_args(x), INDEX_64=heuristics.needs_index_64(x, y),
        **load, **heuristics.store_hints(g, y, t["block_m"], n_lines),
        BLOCK_M=t["block_m"], BLOCK_A=t["block_a"], BLOCK_K=t["block_a"],
        TOEPLITZ_IN_MEMORY=scratch is not None)
    grid = (triton.cdiv(n_lines, t["block_m"]), triton.cdiv(g["LA"], t["block_a"]), C)
    return Plan(dwconv_fwd_kernel, not x.is_cuda, grid, values, t["num_warps"], t["num_stages"],
                scratch=scratch)


def cross_conv(x, weight_tall, weight_wide, bias, y):
    """``conv(x, weight_tall) + conv(x, weight_wide) + bias`` in one pass
    (``dwconv_cross_kernel``) for maps of at most 64x64 pixels; ``x`` and ``y`` contiguous."""
    if y.numel() == 0:
        return
    plan = _cached(_key("cross", None, x, weight_tall, weight_wide, bias, y),
                   lambda: _cross_plan(x, weight_tall, weight_wide, bias, y))
    wide, tall = plan.scratch
    launch(plan, (x, toeplitz_tiles(wide, weight_wide, x), toeplitz_tiles(tall, weight_tall, x),
                  bias if bias is not None else x, y))


def _cross_plan(x, weight_tall, weight_wide, bias, y):
    N, C, H, W = x.shape
    hp, wp = (max(16, triton.next_power_of_2(n)) for n in (H, W))
    images = min(max(2, heuristics.TUNING.cross_tile_elements // (hp * wp)),
                 triton.next_power_of_2(N))
    g = heuristics.geometry(x, (1, 3))   # rows along W, as the wide kernel reads them
    values = dict(
        N=N, KBW=weight_wide.shape[2], KBT=weight_tall.shape[3],
        sxn=x.stride(0), sxc=x.stride(1), syn=y.stride(0), syc=y.stride(1),
        H=H, W=W, HP=hp, WP=wp, G=images, HAS_BIAS=bias is not None,
        **heuristics.dot_args(x), INDEX_64=heuristics.needs_index_64(x, y),
        ALIGN=heuristics.vector_width(g, x) if heuristics.TUNING.vectorize else 1,
        Y_ALIGN=heuristics.vector_width(g, y) if heuristics.TUNING.vectorize else 1)
    interpret = not x.is_cuda
    # Tiles [k, a]: along W for the wide kernel, along H for the tall one.
    scratch = (_toeplitz_plan(weight_wide, interpret, 3, 2, False, False, wp),
               _toeplitz_plan(weight_tall, interpret, 2, 3, False, False, hp))
    warps = 8 if images * hp * wp >= 8192 else 4
    return Plan(dwconv_cross_kernel, interpret, (triton.cdiv(N, images), C), values, warps,
                heuristics.TUNING.num_stages, scratch=scratch)


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def grad_weight(grad, x, kh, kw):
    """Weight gradient ``(C, 1, kh, kw)`` of the line convolution, in the dtype of ``x``."""
    x = width_contiguous(x)
    grad = width_contiguous(grad)
    N, C = x.shape[:2]
    if N * x.shape[2] * x.shape[3] == 0:
        return torch.zeros((C, 1, kh, kw), device=x.device, dtype=x.dtype)
    plan = _cached(_key("wgrad", (kh, kw), x, grad), lambda: _grad_weight_plan(grad, x, kh, kw))
    out_shape, n_scratch = plan.scratch
    # Partial gradients in float32 when several slots share a tap, else dw itself.
    out = torch.empty(out_shape, device=x.device,
                      dtype=x.dtype if out_shape[0] == 1 else torch.float32)
    scratch = torch.empty(n_scratch, device=x.device, dtype=torch.float32)
    launch(plan, (x, grad, out, scratch))
    return out[0] if out_shape[0] == 1 else out.sum(0).to(x.dtype)


def _grad_weight_plan(grad, x, kh, kw):
    N, C = x.shape[:2]
    g = heuristics.geometry(x, (kh, kw))
    LA, KA, KB = g["LA"], g["KA"], g["KB"]
    n_lines = N * g["LB"]
    t = heuristics.tiles(g, n_lines, x.dtype)
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
        LONG_IS_H=g["long_is_h"], **heuristics.dot_args(x),
        INDEX_64=heuristics.needs_index_64(x, grad),
        BLOCK_M=block_m, BLOCK_A=block_a, BLOCK_K=block_a,
        KA_PAD=triton.next_power_of_2(KA), **heuristics.load_hints(t, g, x, grad))
    return Plan(dwconv_wgrad_kernel, not x.is_cuda, (C * KB, n_ablk * n_kchunk, split), values,
                t["num_warps_wgrad"], t["num_stages"],
                scratch=(out_shape, programs * split * block_a * block_a))


# --- whole-plane kernels (small maps) -------------------------------------------------------

def plane_conv(x, weight, bias, flip, y):
    """``conv`` for small maps; ``y`` has contiguous planes."""
    x = plane_contiguous(x)
    if y.numel() == 0:
        return
    plan = _cached(_key("plane", flip, x, weight, bias, y),
                   lambda: _plane_conv_plan(x, weight, bias, flip, y))
    launch(plan, (x, weight, bias if bias is not None else weight, y))


def _plane_conv_plan(x, weight, bias, flip, y):
    N, C, H, W = x.shape
    block_m = min(64, max(16, triton.next_power_of_2(N)))
    values = dict(
        N=N, H=H, W=W, KH=weight.shape[2], KW=weight.shape[3],
        sxn=x.stride(0), sxc=x.stride(1), syn=y.stride(0), syc=y.stride(1),
        swc=weight.stride(0), swh=weight.stride(2), sww=weight.stride(3),
        HAS_BIAS=bias is not None, FLIP=flip, **heuristics.dot_args(x),
        INDEX_64=heuristics.needs_index_64(x, y),
        BLOCK_M=block_m, PLANE=max(16, triton.next_power_of_2(H * W)))
    return Plan(dwconv_plane_fwd_kernel, not x.is_cuda, (triton.cdiv(N, block_m), C), values,
                4, 1)


def plane_grad_weight(grad, x, kh, kw):
    """``grad_weight`` for small maps."""
    x = plane_contiguous(x)
    grad = plane_contiguous(grad)
    N, C, H, W = x.shape
    dw = torch.empty((C, 1, kh, kw), device=x.device, dtype=x.dtype)
    if N * H * W == 0:
        return dw.zero_()
    plan = _cached(_key("plane_wgrad", (kh, kw), x, grad),
                   lambda: _plane_grad_weight_plan(grad, x, dw))
    scratch = torch.empty(C * plan.scratch ** 2, device=x.device, dtype=torch.float32)
    launch(plan, (x, grad, dw, scratch))
    return dw


def _plane_grad_weight_plan(grad, x, dw):
    N, C, H, W = x.shape
    kh, kw = dw.shape[2:]
    plane = max(16, triton.next_power_of_2(H * W))
    values = dict(
        N=N, H=H, W=W, KH=kh, KW=kw, sxn=x.stride(0), sxc=x.stride(1),
        sdn=grad.stride(0), sdc=grad.stride(1),
        swc=dw.stride(0), swh=dw.stride(2), sww=dw.stride(3),
        **heuristics.dot_args(x), INDEX_64=heuristics.needs_index_64(x, grad),
        BLOCK_M=min(64, max(16, triton.next_power_of_2(N))), PLANE=plane,
        TAPS_PAD=triton.next_power_of_2(kh * kw))
    return Plan(dwconv_plane_wgrad_kernel, not x.is_cuda, (C,), values, 4, 1, scratch=plane)
