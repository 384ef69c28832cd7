"""Large-to-small kernel distillation (Huang et al., ICML 2023): a frozen teacher, a student, and
the losses between them. Teacher and student are SLaK-family models (a SLaK-family student is built
as a ConvNeXt) or any timm model (ViT, Swin, ResNet, ConvNeXt...).

``main.py --distill_type {None,KD,NKD,FD,KD_FD,NKD_FD}`` trains the student ``--model_s`` with
:class:`DistillationLoss`, which has the training loop's loss interface
``loss_fn(model, samples, targets) -> (loss, student_logits)``: it runs the teacher without
autograd, the student with it, and combines

- ``KD``: :class:`KDLoss`, Hinton's distillation at temperature ``--T`` weighted by ``--alpha``
  (or ``--hard``: half cross-entropy with the labels, half with the teacher's predicted class);
- ``NKD``: :class:`NKDLoss`, normalized KD at temperature 1 as the original's (at ``--T`` with
  ``--nkd_honour_T true``); it replaces the supervised loss, as in the original;
- ``FD``: :class:`FeatureDistillLoss` between the last-stage feature maps, weighted by ``--lr_fd``
  and added to the supervised loss (``FD``), to KD (``KD_FD``) or to NKD (``NKD_FD``). The maps
  are the outputs of the module that timm's ``feature_info`` names last (``stages.3`` of SLaK and
  ConvNeXt, ``layer4`` of ResNet, the last block of a ViT, the last stage of a Swin), turned into
  ``(N, C, H, W)`` by :func:`as_feature_map` (a ViT's class/distillation tokens dropped); the
  student's map, projected to the teacher's width, is resized bilinearly to the teacher's size;
- ``None``: the supervised loss only (the student trained alone, as a baseline).

:data:`DISTILL_MODES` is the table of these types: which logit loss, whether features are
distilled.

:func:`build_distillation` builds all of it from main.py's flags: the student, the teacher
(:func:`load_teacher`) and the feature loss, then the optimizer's extra parameter groups and the
training loss (:class:`Distillation`).

Targets are class indices ``(N,)`` or, under Mixup/CutMix, class probabilities ``(N, C)``; the
losses that need one class per image take the most probable one.
"""
from typing import Callable, NamedTuple, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

import SLaK
from checkpoint import load_state_dict_checked, open_checkpoint
from distributed import data_parallel
from model_factory import build_model
from optim_factory import param_groups
from slak_config import args_model_config
from utils import ConfigError

__all__ = ["DISTILL_MODES", "DistillMode", "DISTILL_TYPES", "FD_LOSS_TYPES", "STUDENT_OVERRIDES",
           "KDLoss", "NKDLoss", "FeatureDistillLoss", "last_stage", "as_feature_map", "LastStageTap",
           "DistillationLoss", "freeze", "add_param_groups", "kd_loss", "nkd_loss",
           "build_distillation_loss", "check_pretrained_classes", "load_teacher", "Distillation", "build_distillation"]

# --FDLoss_type spellings: the original's (smoothL1, MSE) and ours.
FD_LOSS_TYPES = {"smoothL1": "SmoothL1", "SmoothL1": "SmoothL1", "MSE": "MSE"}


def kd_loss(args, criterion):
    """``KD``'s logit loss from the flags: :class:`KDLoss` at ``--T``, ``--alpha``, ``--hard``.
    The original's KD supervises with plain cross-entropy on the labels (no label smoothing) when
    no mixup mixes them (``criterion`` is then not timm's SoftTargetCrossEntropy)."""
    mixed = isinstance(criterion, SoftTargetCrossEntropy)
    return KDLoss(args.T, args.alpha, args.hard, criterion if mixed else F.cross_entropy)


def nkd_loss(args, criterion):
    """``NKD``'s logit loss from the flags: :class:`NKDLoss` at temperature 1, as the original's
    ran whatever ``--T`` said (its published numbers come from that), or at ``--T`` with
    ``--nkd_honour_T true``."""
    if args.nkd_honour_T:
        return NKDLoss(args.T)
    if args.T != 1.0:
        print(f"Note: NKD runs at temperature 1, as the original's did, whatever --T says "
              f"(--T {args.T} is not used); pass --nkd_honour_T true to run it at --T")
    return NKDLoss(1.0)


class DistillMode(NamedTuple):
    """What one ``--distill_type`` trains the student with.

    Attributes:
        logit_loss: ``(args, criterion) -> loss module`` between student and teacher logits,
            which replaces the supervised ``criterion``; None: ``criterion`` alone.
        features: add :class:`FeatureDistillLoss` between the last-stage maps.
    """
    logit_loss: Optional[Callable]
    features: bool

    @property
    def uses_teacher(self):
        return self.logit_loss is not None or self.features


# --distill_type: a new logit loss is a function as above and a line here.
DISTILL_MODES = {
    "None": DistillMode(None, features=False),  # the student alone, as a baseline
    "KD": DistillMode(kd_loss, features=False),
    "NKD": DistillMode(nkd_loss, features=False),
    "FD": DistillMode(None, features=True),
    "KD_FD": DistillMode(kd_loss, features=True),
    "NKD_FD": DistillMode(nkd_loss, features=True),
}
DISTILL_TYPES = list(DISTILL_MODES)

# The student is the SLaK family at ConvNeXt settings: 7x7 kernels everywhere, no small branch
# (100 > 7), no decomposition, width 1 (the paper's ConvNeXt-T/S students).
STUDENT_OVERRIDES = dict(kernel_size=[7, 7, 7, 7, 100], width_factor=1.0, Decom=False)


def target_classes(target):
    """``(N,)`` class indices from class indices or from ``(N, C)`` (mixed) class probabilities."""
    return target.argmax(dim=1) if target.ndim == 2 else target


class KDLoss(nn.Module):
    """Knowledge distillation (Hinton et al., 2015).

    Args:
        temperature: softmax temperature T of both distributions.
        alpha: weight of the distillation term; the supervised term gets ``1 - alpha``.
        hard: distil the teacher's predicted class instead of its distribution.
        criterion: supervised loss ``(logits, target) -> scalar``; default cross-entropy, which
            takes class indices or class probabilities.

    ``forward(student_logits (N, C), teacher_logits (N, C), target)`` returns a scalar:
    ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * criterion(s, target)``
    (KL averaged over the batch), or with ``hard``
    ``0.5 * criterion(s, target) + 0.5 * CE(s, argmax t)``.
    """

    def __init__(self, temperature=1.0, alpha=1.0, hard=False, criterion=None):
        super().__init__()
        self.temperature, self.alpha, self.hard = float(temperature), float(alpha), hard
        self.criterion = criterion if criterion is not None else F.cross_entropy

    def forward(self, student_logits, teacher_logits, target):
        student_logits, teacher_logits = student_logits.float(), teacher_logits.detach().float()
        if self.hard:
            return 0.5 * self.criterion(student_logits, target) + \
                0.5 * F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
        T = self.temperature
        loss = self.alpha * T * T * F.kl_div(F.log_softmax(student_logits / T, dim=1),
                                             F.log_softmax(teacher_logits / T, dim=1),
                                             reduction="batchmean", log_target=True)
        if self.alpha != 1.0:
            loss = loss + (1.0 - self.alpha) * self.criterion(student_logits, target)
        return loss


class NKDLoss(nn.Module):
    """Normalized KD (Yang et al., "Rethinking Knowledge Distillation via Cross-Entropy").

    Args:
        temperature: temperature T of the non-target distributions (``--T``).
        gamma: weight of the non-target term.

    ``forward(student_logits (N, C), teacher_logits (N, C), target)`` returns the batch mean of
    ``-p_t[y] * log p_s[y]  -  gamma * T^2 * sum_{k != y} q_t[k] * log q_s[k]``, where ``y`` is the
    target class, ``p`` the softmax at temperature 1 and ``q`` the softmax at temperature T over
    the non-target classes only (renormalised without ``y``).
    """

    def __init__(self, temperature=1.0, gamma=1.0):
        super().__init__()
        self.temperature, self.gamma = float(temperature), float(gamma)

    def forward(self, student_logits, teacher_logits, target):
        student_logits, teacher_logits = student_logits.float(), teacher_logits.detach().float()
        if student_logits.shape[1] < 2:
            raise ValueError("NKD needs at least two classes")
        label = target_classes(target).view(-1, 1)
        log_p_student = F.log_softmax(student_logits, dim=1).gather(1, label)
        p_teacher = F.softmax(teacher_logits, dim=1).gather(1, label)
        target_term = -(p_teacher * log_p_student).mean()

        # Dropping the target logit (-inf) renormalises the softmax over the other classes.
        is_target = torch.zeros_like(student_logits, dtype=torch.bool).scatter_(1, label, True)
        T = self.temperature
        log_q_student = F.log_softmax(student_logits.masked_fill(is_target, float("-inf")) / T, dim=1)
        q_teacher = F.softmax(teacher_logits.masked_fill(is_target, float("-inf")) / T, dim=1)
        # 0 * log 0 at the target position is defined as 0 (masked before the product).
        non_target_term = -(q_teacher * log_q_student.masked_fill(is_target, 0.0)).sum(dim=1).mean()
        return target_term + self.gamma * T * T * non_target_term


class FeatureDistillLoss(nn.Module):
    """Feature distillation between the last-stage maps, through a trainable 1x1 projection.

    Args:
        student_channels: channels of the student's map.
        teacher_channels: channels of the teacher's map; when they differ, a 1x1 convolution
            (``projector``, trained with the student and saved with it) maps student to teacher
            width, otherwise ``projector`` is the identity.
        loss_type: ``"SmoothL1"`` (Huber with ``beta``) or ``"MSE"``.
        beta: SmoothL1 threshold between the quadratic and the linear part.

    ``forward(student_features (N, Cs, Hs, Ws), teacher_features (N, Ct, Ht, Wt), target=None)``
    returns the element mean of the loss between ``projector(student)``, resized bilinearly to
    ``(Ht, Wt)`` where the sizes differ (e.g. a ResNet student's 7x7 map against a ViT-S/16
    teacher's 14x14 tokens), and the teacher map (``target`` is unused; it keeps the losses'
    common signature).
    """

    def __init__(self, student_channels, teacher_channels, loss_type="SmoothL1", beta=2.0):
        super().__init__()
        if loss_type not in FD_LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r}: use one of {', '.join(FD_LOSS_TYPES)}")
        self.loss_type, self.beta = FD_LOSS_TYPES[loss_type], float(beta)
        self.projector = nn.Conv2d(student_channels, teacher_channels, kernel_size=1) \
            if student_channels != teacher_channels else nn.Identity()

    def forward(self, student_features, teacher_features, target=None):
        projected = self.projector(student_features).float()
        teacher_features = teacher_features.detach().float()
        if projected.shape[-2:] != teacher_features.shape[-2:]:
            projected = F.interpolate(projected, size=teacher_features.shape[-2:], mode="bilinear",
                                      align_corners=False)
        if projected.shape != teacher_features.shape:
            raise ValueError(f"feature distillation compares maps of the same shape; the projected "
                             f"student map is {tuple(projected.shape)} and the teacher's "
                             f"{tuple(teacher_features.shape)}")
        if self.loss_type == "MSE":
            return F.mse_loss(projected, teacher_features)
        return F.smooth_l1_loss(projected, teacher_features, beta=self.beta)


def last_stage(model):
    """``(module, channels)``: the module whose output is the model's last feature map (the last
    entry of timm's ``feature_info``) and that map's channels."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info naming its last stage, which "
                         f"feature distillation taps; use a timm model or one that defines it")
    last = info[-1] if isinstance(info, (list, tuple)) else info.get_dicts()[-1]
    return model.get_submodule(last["module"]), int(last["num_chs"])


def as_feature_map(features, model, channels):
    """A last-stage output as ``(N, C, H, W)``: NCHW maps pass, NHWC maps (Swin) are permuted,
    token sequences ``(N, L, C)`` (ViT) lose their prefix (class/distillation) tokens and are laid
    on their patch grid."""
    if features.ndim == 4:
        if features.shape[1] == channels:
            return features
        if features.shape[-1] == channels:
            return features.permute(0, 3, 1, 2)
    elif features.ndim == 3 and features.shape[-1] == channels:
        tokens = features[:, getattr(model, "num_prefix_tokens", 0):]
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        h, w = grid if grid is not None and grid[0] * grid[1] == tokens.shape[1] else \
            (round(tokens.shape[1] ** 0.5),) * 2
        if h * w == tokens.shape[1]:
            return tokens.transpose(1, 2).reshape(tokens.shape[0], channels, h, w)
    raise ValueError(f"cannot read a {channels}-channel feature map from a last-stage output of "
                     f"shape {tuple(features.shape)} ({type(model).__name__})")


class LastStageTap:
    """Keeps the last-stage feature map (:func:`last_stage`, the map FD compares) of forwards run
    inside ``with tap:``, as ``(N, C, H, W)``, so the model can be called through DDP or
    ``torch.compile`` as ``model(x)``.
    """

    def __init__(self, model):
        self.output, self.active = None, False
        module, self.channels = last_stage(model)
        self.model = model
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        if self.active:
            self.output = as_feature_map(output, self.model, self.channels)

    def __enter__(self):
        self.active, self.output = True, None
        return self

    def __exit__(self, *exc):
        self.active = False

    def take(self):
        """The kept map (the reference is dropped here, so it lives only as long as the caller's)."""
        output, self.output = self.output, None
        if output is None:
            raise RuntimeError("no last-stage output was recorded; run the model inside `with tap:`")
        return output


def freeze(model):
    """Eval mode and no parameter gradients, for the teacher; returns ``model``."""
    model.eval()
    model.requires_grad_(False)
    return model


def add_param_groups(optimizer, module, weight_decay):
    """Add ``module``'s trainable parameters to ``optimizer``, grouped as the student's are
    (``optim_factory.param_groups``: weights decayed, biases and norms not), with the key the
    training loop's weight-decay schedule reads."""
    for group in param_groups(module, weight_decay):
        optimizer.add_param_group({**group, "scheduled_weight_decay": group["weight_decay"] > 0})


class DistillationLoss:
    """The training loss in distillation mode: ``(model, samples, targets) -> (loss, logits)``.

    Args:
        distill_type: one of :data:`DISTILL_TYPES`.
        student: the bare student (``model`` may be it or its DDP/compiled wrapper).
        teacher: the frozen teacher, or None for ``"None"``.
        criterion: the student's supervised loss ``(logits, target) -> scalar``.
        logit_loss: the logit loss (:class:`KDLoss`, :class:`NKDLoss`) for the types whose
            :data:`DISTILL_MODES` entry has one, else None.
        feature_loss: :class:`FeatureDistillLoss` (or a DDP wrapper of it) for the types that
            distil features (``*FD``), else None.
        feature_weight: weight of the feature loss (``--lr_fd``).
        compile_teacher: run the teacher through ``torch.compile`` (``--compile true``).

    The teacher runs under ``torch.no_grad`` (no activations kept for backward); the returned
    logits are the student's.
    """

    def __init__(self, distill_type, student, teacher, criterion, logit_loss=None,
                 feature_loss=None, feature_weight=1.0, compile_teacher=False):
        if distill_type not in DISTILL_MODES:
            raise ValueError(f"distill_type {distill_type!r}: use one of {DISTILL_TYPES}")
        mode = DISTILL_MODES[distill_type]
        uses_teacher = mode.uses_teacher
        if uses_teacher and teacher is None:
            raise ValueError(f"distill_type {distill_type} needs a teacher")
        if (mode.logit_loss is not None) != (logit_loss is not None):
            raise ValueError(f"distill_type {distill_type} takes "
                             f"{'a' if mode.logit_loss else 'no'} logit_loss")
        if mode.features != (feature_loss is not None):
            raise ValueError(f"distill_type {distill_type} takes "
                             f"{'a' if mode.features else 'no'} feature_loss")
        self.distill_type, self.criterion = distill_type, criterion
        self.teacher = freeze(teacher) if uses_teacher else None
        self.run_teacher = torch.compile(self.teacher) if uses_teacher and compile_teacher \
            else self.teacher
        self.logit_loss, self.feature_loss, self.feature_weight = logit_loss, feature_loss, feature_weight
        self.student_tap = self.teacher_tap = None
        if feature_loss is not None:
            self.student_tap, self.teacher_tap = LastStageTap(student), LastStageTap(teacher)

    def __call__(self, model, samples, targets):
        if self.teacher is None:
            logits = model(samples)
            return self.criterion(logits, targets), logits
        with torch.no_grad():
            if self.teacher_tap is None:
                teacher_logits = self.run_teacher(samples)
            else:
                with self.teacher_tap:
                    teacher_logits = self.run_teacher(samples)
                teacher_features = self.teacher_tap.take()
        if self.student_tap is None:
            logits = model(samples)
        else:
            with self.student_tap:
                logits = model(samples)
            student_features = self.student_tap.take()

        if self.logit_loss is not None:
            loss = self.logit_loss(logits, teacher_logits, targets)
        else:
            loss = self.criterion(logits, targets)
        if self.feature_loss is not None:
            loss = loss + self.feature_weight * self.feature_loss(student_features, teacher_features,
                                                                  targets)
        return loss, logits


def build_distillation_loss(args, student, teacher, criterion, feature_loss=None):
    """:class:`DistillationLoss` from main.py's flags (``feature_loss`` built beforehand, since
    its projection must be in the optimizer and the checkpoint)."""
    logit_loss = DISTILL_MODES[args.distill_type].logit_loss
    logit_loss = logit_loss(args, criterion) if logit_loss is not None else None
    return DistillationLoss(args.distill_type, student, teacher, criterion, logit_loss,
                            feature_loss, args.lr_fd, compile_teacher=args.compile)


def check_pretrained_classes(name, num_classes):
    """Refuse timm's pretrained weights of ``name`` for a run of another number of classes: timm
    would replace their classifier by a random one, the teacher distilled. The classes come from
    timm's pretrained configuration; nothing is downloaded."""
    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError as exc:  # a pretrained tag timm does not know
        raise ConfigError(f"--model {name}: {exc}; see timm.list_pretrained() for the names with "
                          f"weights") from None
    classes = getattr(cfg, "num_classes", None)
    if classes and classes != num_classes:
        raise ConfigError(f"--teacher_pretrained true: timm's {name} weights classify {classes} "
                          f"classes and this run has {num_classes}, so the teacher's classifier "
                          f"would be random; give its weights for these classes with --resume, "
                          f"or a data set of {classes} classes")


def load_teacher(args, num_classes, device):
    """The frozen teacher: ``--model`` with the model flags, weights from ``--resume`` (ours, the
    original's or a plain state dict) or, with ``--teacher_pretrained true``, timm's."""
    if args.teacher_pretrained:
        check_pretrained_classes(args.model, num_classes)
        teacher = build_model(args, args.model, num_classes, pretrained=True)
        print(f"Teacher {args.model} with timm's pretrained weights")
    else:
        teacher = build_model(args, args.model, num_classes)
        _, state_dict = open_checkpoint(args.resume, "--resume", args_model_config(args))
        load_state_dict_checked(teacher, state_dict, "--resume", args.resume)
        print(f"Teacher {args.model} loaded from {args.resume}")
    teacher.to(device)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return freeze(teacher)


class Distillation:
    """What main.py trains with in distillation mode; built by :func:`build_distillation`.

    Attributes:
        student: the model trained, checkpointed, EMA'd and evaluated (``--model_s``).
        teacher: the frozen teacher (``--model``), or None when no teacher weights are given
            (``--distill_type None`` without ``--resume``).
        feature_loss: for ``*FD`` types the :class:`FeatureDistillLoss`, whose projection trains
            with the student and is saved with it (checkpoint key ``"distill"``); else None.
        model_config: the student's ``model_config``, recorded in and checked against its
            checkpoints.
    """

    def __init__(self, args, device, student, teacher, feature_loss, model_config):
        self.args, self.device = args, device
        self.student, self.teacher = student, teacher
        self.feature_loss, self.model_config = feature_loss, model_config

    def add_param_groups(self, optimizer):
        """Add the projection's parameters (if any) to the student's ``optimizer``."""
        if self.feature_loss is not None:
            add_param_groups(optimizer, self.feature_loss, self.args.weight_decay)

    def loss(self, criterion):
        """The training loss (:class:`DistillationLoss`), ``criterion`` the supervised loss."""
        feature_loss = self.feature_loss
        if self.args.distributed and feature_loss is not None and any(
                p.requires_grad for p in feature_loss.parameters()):
            # The projection trains beside the student, so its gradients are averaged across
            # processes too; the bare module stays in self.feature_loss for the checkpoint.
            feature_loss = data_parallel(feature_loss, self.device)
        return build_distillation_loss(self.args, self.student, self.teacher, criterion,
                                       feature_loss)


def build_distillation(args, nb_classes, device):
    """:class:`Distillation` from main.py's flags: the student ``--model_s`` (a SLaK-family name
    built with :data:`STUDENT_OVERRIDES`), the teacher from ``--resume`` or
    ``--teacher_pretrained``, and for ``*FD`` types the feature loss on ``device``."""
    overrides = STUDENT_OVERRIDES if args.model_s in SLaK.MODEL_DEPTHS_DIMS else {}
    student = build_model(args, args.model_s, nb_classes, flag="--model_s", **overrides)
    model_config = args_model_config(args, args.model_s, **overrides)
    teacher = None
    if args.resume or args.teacher_pretrained:
        teacher = load_teacher(args, nb_classes, device)
    feature_loss = None
    if DISTILL_MODES[args.distill_type].features:
        # Trained and saved with the student (checkpoint key "distill"): the 1x1 projection from
        # student to teacher width.
        feature_loss = FeatureDistillLoss(last_stage(student)[1], last_stage(teacher)[1],
                                          args.FDLoss_type).to(device)
    return Distillation(args, device, student, teacher, feature_loss, model_config)
