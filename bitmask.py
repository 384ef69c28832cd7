"""Bool masks kept as bitmaps, and zeroing a tensor where its bitmap has no bit set.

Dynamic sparsity keeps one mask per sparsified weight on the GPU for the whole run and applies
it after every optimizer step. As bitmaps the masks take an eighth of a bool tensor's memory
(6 MiB instead of 48 MiB for SLaK-T's 50.6M masked weights), and applying one reads an eighth of
the bytes. Bit ``i % 8`` of byte ``i // 8`` is entry ``i`` of the mask in logical (row-major)
order, whatever the memory layout of the tensor it masks.

``zero_unset_(tensor, bits)`` runs one Triton kernel on CUDA tensors (and in Triton's
interpreter on CPU tensors under ``TRITON_INTERPRET=1``, as CI tests it); elsewhere it unpacks
the bitmap and multiplies.
"""
import itertools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU-only torch builds come without Triton: the unpacking path everywhere
    triton = None

__all__ = ["pack_bits", "unpack_bits", "count_set_bits", "zero_unset_"]

_BLOCK = 1024
_KERNELS = {}
_POPCOUNT = {}  # device -> the number of set bits of each byte value


def pack_bits(mask):
    """A bool tensor as a flat uint8 bitmap, eight entries a byte, in logical order."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    # Distinct bits: their sum is their bitwise or. One shift and one sum, where or-ing the
    # eight bits one at a time took 28 operations: an adaptation packs every sparse layer's mask.
    return (flat << shifts).sum(1, dtype=torch.uint8)


def count_set_bits(bitmaps):
    """The number of set bits of each bitmap in the list ``bitmaps`` (flat uint8 tensors on one
    device), as a list of ints: one pass over all of them and one host synchronisation, where
    unpacking and summing each costs several operations per bitmap."""
    if not bitmaps:
        return []
    flat = torch.cat(bitmaps)
    per_byte = _POPCOUNT.get(flat.device)
    if per_byte is None:
        per_byte = _POPCOUNT[flat.device] = torch.tensor(
            [bin(byte).count("1") for byte in range(256)], dtype=torch.int64, device=flat.device)
    running = per_byte[flat.long()].cumsum(0)
    # The running count at each bitmap's last byte (views, stacked in one operation).
    totals = torch.stack([running[end - 1] for end in itertools.accumulate(
        b.numel() for b in bitmaps)]).tolist()
    return [total - before for total, before in zip(totals, [0] + totals[:-1])]


def unpack_bits(bits, shape):
    """The bool tensor of ``shape`` that :func:`pack_bits` packed into ``bits``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[:, None] >> shifts) & 1).view(-1)[:math.prod(shape)].view(shape).bool()


if triton is not None:
    def zero_unset_kernel(t_ptr, bits_ptr, numel, S1, S2, S3, st0, st1, st2, st3,
                          BLOCK: tl.constexpr):
        """``t[i] *= bit i`` for the logical indices ``i`` of a 4-D view ``(., S1, S2, S3)`` of
        ``t`` with strides ``st0..st3``: a multiplication, so that non-finite entries behave as
        under ``t.mul_(mask)``."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < numel
        byte = tl.load(bits_ptr + i // 8, mask=ok, other=0)
        keep = (byte >> (i % 8).to(tl.uint8)) & 1
        i3 = i % S3
        rest = i // S3
        i2 = rest % S2
        rest = rest // S2
        offset = (rest // S1) * st0 + (rest % S1) * st1 + i2 * st2 + i3 * st3
        t = tl.load(t_ptr + offset, mask=ok)
        tl.store(t_ptr + offset, t * keep.to(t.dtype), mask=ok)


def _kernel(interpret):
    # Wrapped at first use in each mode: triton.jit reads TRITON_INTERPRET when it wraps.
    if interpret not in _KERNELS:
        # One binary for every weight shape and layout: no specialisation on sizes or strides.
        _KERNELS[interpret] = triton.jit(zero_unset_kernel, do_not_specialize=[
            "numel", "S1", "S2", "S3", "st0", "st1", "st2", "st3"])
    return _KERNELS[interpret]


def _kernel_mode(tensor):
    """``False`` (compiled) or ``True`` (interpreted) where the kernel runs on ``tensor``, else
    None."""
    if triton is None or tensor.dim() > 4 or tensor.numel() == 0:
        return None
    if tensor.is_cuda:
        interpret = False
    elif tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        interpret = True
    else:
        return None
    # 32-bit offsets: every entry's offset must stay below 2**31.
    reach = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    return interpret if max(reach, tensor.numel() + _BLOCK) < 2 ** 31 - 1 else None


@torch.no_grad()
def zero_unset_(tensor, bits):
    """Multiply each entry of ``tensor`` by its bit in ``bits`` (``pack_bits`` of a mask of
    ``tensor``'s shape), in place, in any memory layout; returns ``tensor``."""
    interpret = _kernel_mode(tensor)
    if interpret is None:
        return tensor.mul_(unpack_bits(bits, tensor.shape))
    shape = (1,) * (4 - tensor.dim()) + tuple(tensor.shape)
    strides = (0,) * (4 - tensor.dim()) + tuple(tensor.stride())
    grid = (triton.cdiv(tensor.numel(), _BLOCK),)
    _kernel(interpret)[grid](tensor, bits, tensor.numel(), *shape[1:], *strides, BLOCK=_BLOCK)
    return tensor
