"""Masks as bitmaps: packing, and zeroing a tensor where its mask is unset, through the Triton
kernel (compiled on a GPU, Triton's interpreter on the CPU) and through the unpacking path."""
import math

import pytest
import torch
import torch.nn as nn

import bitmask
import sparse_core
from bitmask import count_set_bits, pack_bits, unpack_bits, zero_unset_

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def kernel_launches(monkeypatch):
    """Run the Triton kernel (the interpreter on a CPU-only machine) and count its launches."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    launches = []
    # No public hook tells which path zero_unset_ took (the kernel or unpacking the bits), so this
    # spies on the private kernel factory.
    real = bitmask._kernel

    def counting(interpret):
        launches.append(interpret)
        return real(interpret)
    monkeypatch.setattr(bitmask, "_kernel", counting)
    return launches


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9, 3), (5, 1, 13, 3), (2, 3, 4, 5)])
def test_pack_and_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(bits, shape), mask)
    # Eight entries a byte, in logical order: entry i is bit i % 8 of byte i // 8.
    flat = mask.flatten().tolist()
    assert all(((int(bits[i // 8]) >> (i % 8)) & 1) == flat[i] for i in range(len(flat)))


def layouts(shape, dtype):
    base = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    yield "contiguous", base.clone()
    if base.dim() == 4:
        yield "channels-last", base.clone().contiguous(memory_format=torch.channels_last)
    yield "transposed view", base.clone().transpose(0, -1).contiguous().transpose(0, -1)


@pytest.mark.parametrize("shape", [(37, 11), (6, 3, 5, 7), (4, 1, 13, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_unset_equals_multiplying_by_the_mask(shape, dtype, kernel_launches):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.5
    bits = pack_bits(mask.to(DEVICE))
    for name, t in layouts(shape, dtype):
        t[(0,) * len(shape)] = float("nan")   # a non-finite entry stays as t.mul_(mask) leaves it
        expected = t.clone().mul_(mask.to(DEVICE))
        strides = t.stride()
        assert zero_unset_(t, bits) is t
        assert t.stride() == strides, name
        torch.testing.assert_close(t, expected, rtol=0, atol=0, equal_nan=True, msg=name)
    assert kernel_launches, "the Triton kernel did not run"


def test_zero_unset_without_the_kernel_unpacks(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = torch.randn(5, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(t.shape) > 0.5
    expected = t * mask
    zero_unset_(t, pack_bits(mask))
    assert torch.equal(t, expected)


def test_sparse_training_masks_the_weights_through_the_kernel(kernel_launches):
    # A sparse step re-masks weights (channels-last convolutions included) with the kernel.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).to(DEVICE)
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    masking = sparse_core.Masking(model, optimizer, 10, sparsity=0.5, sparse_init="uniform",
                                  update_frequency=2)
    masking.init()
    images, targets = torch.randn(4, 3, 8, 8, device=DEVICE), torch.randint(0, 10, (4,), device=DEVICE)
    for _ in range(3):
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        masking.step()
    params = dict(model.named_parameters())
    assert masking.masks
    for name, mask in masking.masks.items():
        assert torch.all(params[name][~mask] == 0), name
        assert params[name][mask].abs().sum() > 0, name
    assert kernel_launches


def test_count_set_bits_counts_each_mask():
    g = torch.Generator().manual_seed(2)
    masks = [torch.rand(shape, generator=g) > 0.3 for shape in [(1,), (7,), (9, 3), (5, 1, 13, 3)]]
    masks.append(torch.zeros(4, 4, dtype=torch.bool))
    assert count_set_bits([pack_bits(m) for m in masks]) == [int(m.sum()) for m in masks]
    assert count_set_bits([]) == []
