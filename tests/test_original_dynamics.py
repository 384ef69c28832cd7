"""Replay of a short sparse training run of the original release through our own components.

The reference file (``tests/data/original_sparse_dynamics.pt``, or ``$SLAK_DYNAMICS_REFERENCE``)
holds the original's initial weights and masks, the batches, the LR schedule and what the
original computed: each step's loss, the masks after each adaptation, the final weights and the
final EMA (format: the reference's README). The run here goes through the SLaK model class,
``optim_factory.create_optimizer``, ``sparse_core.Masking``, timm's ``ModelEmaV3`` with
``Masking.update_ema`` and ``engine.train_one_epoch`` itself, fed the stored batches; every key
of ``hyper`` is honoured.
"""
import argparse
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

import SLaK
import sparse_core
from engine import SupervisedLoss, train_one_epoch
from optim_factory import create_optimizer

REFERENCE = Path(os.environ.get("SLAK_DYNAMICS_REFERENCE") or
                 Path(__file__).parent / "data" / "original_sparse_dynamics.pt")


class Recorder:
    """A log writer that keeps the per-step training loss."""

    def __init__(self):
        self.losses = {}

    def update(self, head, step, **values):
        if head == "train":
            self.losses[step] = values["loss"]


def relative_difference(ours, theirs):
    """||ours - theirs|| / ||theirs|| over every floating tensor of two state dicts."""
    keys = [k for k, v in theirs.items() if v.is_floating_point()]
    diff = sum(float((ours[k].double() - theirs[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(theirs[k].double().pow(2).sum()) for k in keys)
    return (diff / norm) ** 0.5


def test_original_dynamics_replay():
    ref = torch.load(REFERENCE, map_location="cpu", weights_only=False)
    hyper = ref["hyper"]
    steps, u = int(hyper["steps"]), int(hyper["u"])
    torch.manual_seed(int(hyper["seed"]))

    model = SLaK.SLaK(**ref["config"])
    model.load_state_dict(ref["init_unmasked"])
    model.train()
    # The original's order: EMA of the unmasked weights, then the optimizer, then the masks.
    model_ema = ModelEmaV3(model, decay=float(hyper["ema_decay"]))
    args = argparse.Namespace(
        opt=hyper["opt"], lr=float(hyper["lr"]), weight_decay=float(ref["weight_decay"]),
        momentum=0.9, layer_decay=float(hyper["layer_decay"]), opt_eps=1e-8, opt_betas=None,
        device="cpu")
    optimizer = create_optimizer(args, model)
    scales = {id(p): g.get("lr_scale", 1.0) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert scales[id(p)] == pytest.approx(ref["lr_scale"][name], rel=1e-6), name
    masking = sparse_core.Masking(model, optimizer, steps, sparsity=1.0 - float(hyper["density"]),
                                  sparse_init="uniform", growth=hyper["growth"],
                                  prune_rate=float(hyper["prune_rate"]), update_frequency=u,
                                  seed=int(hyper["seed"]))
    masking.load_masks(ref["masks"])

    recorder = Recorder()
    lr_schedule = [float(v) for v in ref["lr_schedule"]]
    wd_schedule = [float(ref["weight_decay"])] * steps
    compared = total = 0
    for epoch, start in enumerate(range(0, steps, u)):  # one "epoch" per adaptation period
        n = min(u, steps - start)
        train_one_epoch(model, SupervisedLoss(nn.CrossEntropyLoss()), ref["batches"][start:start + n],
                        optimizer, torch.device("cpu"), epoch, torch.amp.GradScaler("cpu", enabled=False),
                        steps_per_epoch=n, start_steps=start, lr_schedule=lr_schedule,
                        wd_schedule=wd_schedule, model_ema=model_ema, masking=masking,
                        log_writer=recorder, print_freq=1)
        if start + n in ref["masks_after"]:
            for k, theirs in ref["masks_after"][start + n].items():
                compared += int((masking.masks[k] == theirs.bool()).sum())
                total += theirs.numel()
    assert set(recorder.losses) == set(range(steps))
    for step, loss in enumerate(ref["losses"]):
        assert abs(recorder.losses[step] - loss) < 1e-5, (step, recorder.losses[step], loss)
    agreement = compared / total
    print(f"masks after {len(ref['masks_after'])} adaptations: {compared}/{total} entries equal "
          f"({100 * agreement:.4f}%)")
    assert total > 0 and agreement >= 0.9999
    weights = relative_difference(model.state_dict(), ref["final"])
    ema = relative_difference(model_ema.module.state_dict(), ref["final_ema"])
    print(f"final weights relative difference {weights:.2e}, final EMA {ema:.2e}")
    assert weights < 1e-5 and ema < 1e-5
