"""SNIP's one full-precision batch runs under per-block activation checkpointing (so its peak
memory stays below a training step's) and still gives the masks of the plain pass."""
import torch
import torch.nn as nn
import timm

import SLaK  # noqa: F401 - registers the SLaK models
import sparse_core


def snip_masks(model):
    torch.manual_seed(1)
    images, targets = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    masking = sparse_core.Masking(model, None, 10, sparsity=0.5, sparse_init="snip")
    masking.init(images, targets, nn.CrossEntropyLoss())
    return masking.masks


def test_snip_checkpoints_blocks_and_keeps_the_plain_masks():
    torch.manual_seed(0)
    model = timm.create_model("SLaK_tiny", num_classes=4, width_factor=0.25, Decom=True,
                              kernel_size=[13, 11, 9, 7, 3], drop_path_rate=0.1)
    plain = nn.Sequential()  # the same network behind a wrapper without set_grad_checkpointing
    plain.add_module("net", timm.create_model("SLaK_tiny", num_classes=4, width_factor=0.25,
                                              Decom=True, kernel_size=[13, 11, 9, 7, 3],
                                              drop_path_rate=0.1))
    plain.net.load_state_dict(model.state_dict())
    model.train(), plain.train()

    calls = []
    block = model.stages[0][0]
    handle = block.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
    masks = snip_masks(model)
    handle.remove()
    assert len(calls) == 2, "the SNIP pass should recompute each block in its backward"
    assert model.grad_checkpointing is False, "SNIP must leave the model's setting as it was"

    reference = {k.removeprefix("net."): m for k, m in snip_masks(plain).items()}
    assert masks.keys() == reference.keys()
    for k in masks:
        assert torch.equal(masks[k], reference[k]), k
