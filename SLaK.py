"""SLaK: Sparse Large-Kernel ConvNets (Liu et al., ICLR 2023).

A ConvNeXt whose 7x7 depthwise convolution is replaced by a large-kernel unit: for stage kernel
K and small kernel s, either two rectangular depthwise convolutions (K, s) + (s, K) ("Decom"), or
one (K, K) convolution, plus an (s, s) convolution when s < K; each branch is conv then
BatchNorm and the unit returns their sum. ``kernel_size = (7, 7, 7, 7, 100)`` gives the
original's ConvNeXt baseline: one 7x7 depthwise convolution per block, followed by BatchNorm
(ConvNeXt's own has a bias and no BatchNorm).

Module attribute names (``large_kernel``, ``LoRA1``, ``LoRA2``, ``lkb_origin``, ``small_conv``,
``downsample_layers``, ``gamma``...) are the original release's, because they are the names in
its published checkpoints.
"""
import argparse
import contextlib
import functools
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, trunc_normal_
from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model,
                         register_notrace_function, register_notrace_module)
from timm.models._features import feature_take_indices

from depthwise_conv2d_implicit_gemm import (DepthWiseConv2dImplicitGEMM, depthwise_conv2d,
                                             depthwise_conv2d_sum, pad_kernel_to)
from fast_layers import EVAL_POINTWISE_ALIGN, GEMM_ALIGN, PatchConv2d, aligned_linear

__all__ = ["SLaK", "LargeKernelUnit", "Block", "validate_kernel_size", "checkpoint_filter_fn",
           "checkpoint_blocks", "MODEL_DEPTHS_DIMS"]

# Checkpoints of the original release pickle their argparse.Namespace and NumPy scalars (its
# schedules are NumPy arrays); allow exactly those on top of torch's weights-only set, for every
# loader (checkpoint.py, timm's pretrained=True, the dense-prediction adapters).
try:  # NumPy 2 (numpy.core is its deprecated alias there)
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import scalar as _np_scalar
torch.serialization.add_safe_globals([argparse.Namespace, _np_scalar, np.dtype,
                                      type(np.dtype(np.float64))])

# torch.fx cannot trace the large-kernel convolution (it dispatches on device, dtype and shape in
# Python); timm's FX paths (FeatureGraphNet, create_feature_extractor with timm's leaf list) keep
# it, and the unit around it (below), as leaves.
register_notrace_module(DepthWiseConv2dImplicitGEMM)
register_notrace_function(depthwise_conv2d)
register_notrace_function(depthwise_conv2d_sum)

# Stem (4) x three downsampling layers (2 each): the smallest input that reaches the last stage.
TOTAL_STRIDE = 32

# Family layouts: name -> (depths, dims) before width_factor.
MODEL_DEPTHS_DIMS = {
    "SLaK_tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "SLaK_small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "SLaK_base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "SLaK_large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
}


def validate_kernel_size(kernel_size):
    """Check a 5-entry ``[K1, K2, K3, K4, s]`` list; raise ``ValueError`` naming the fix.

    Stage kernels must be positive and odd. The small kernel must be positive, and odd unless it
    is larger than every stage kernel (then no small branch is built: ``7 7 7 7 100`` = ConvNeXt).
    """
    kernel_size = list(kernel_size)
    if len(kernel_size) != 5 or not all(isinstance(k, int) for k in kernel_size):
        raise ValueError(f"--kernel_size takes five integers (four stage kernels and the small "
                         f"kernel, e.g. 51 49 47 13 5), got {kernel_size}")
    *stage_kernels, small = kernel_size
    bad = [k for k in stage_kernels if k <= 0 or k % 2 == 0]
    if bad:
        raise ValueError(f"--kernel_size stage kernels must be positive odd integers, got {bad} "
                         f"in {kernel_size}")
    if small <= 0 or (small % 2 == 0 and small <= max(stage_kernels)):
        raise ValueError(f"--kernel_size small kernel {small} must be a positive odd integer (or "
                         f"larger than every stage kernel to disable the small branch)")
    return kernel_size


def conv_bn(channels, kernel, bn=True):
    """A depthwise branch: ``conv`` (no bias) then optional ``bn``."""
    layers = OrderedDict(conv=DepthWiseConv2dImplicitGEMM(channels, kernel, bias=False))
    if bn:
        layers["bn"] = nn.BatchNorm2d(channels)
    return nn.Sequential(layers)


def fuse_conv_bn(branch):
    """Return ``(weight, bias)`` of one convolution equal to ``branch`` in eval mode."""
    weight = branch.conv.weight
    bias = branch.conv.bias if branch.conv.bias is not None else torch.zeros_like(weight[:, 0, 0, 0])
    if not hasattr(branch, "bn"):
        return weight, bias
    bn = branch.bn
    if bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics normalises with each batch's "
                         "own and folds into no convolution; build it with "
                         "track_running_stats=True to reparameterize")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shifted = (bias - bn.running_mean) * scale
    if bn.affine:
        scale, shifted = scale * bn.weight, shifted * bn.weight + bn.bias
    return weight * scale.view(-1, 1, 1, 1), shifted


def _after_conv(branch, z):
    """The rest of a ``conv_bn`` branch after its convolution (its BatchNorm, if any)."""
    return branch.bn(z) if hasattr(branch, "bn") else z


def _hooked(module):
    """Whether ``module`` or a module inside it has forward hooks, which a fused path that skips
    their calls would skip (the FLOPs counter counts convolutions through them)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


@register_notrace_module  # it picks its convolutions at run time (device, hooks, compilation)
class LargeKernelUnit(nn.Module):
    """The large-kernel depthwise unit of a SLaK block; output = sum of its branches.

    Args:
        channels: channels in and out.
        kernel_size: the stage kernel K.
        small_kernel: s; an (s, s) branch ``small_conv`` is added when s < K.
        Decom: use ``LoRA1`` (K, s) + ``LoRA2`` (s, K) instead of ``lkb_origin`` (K, K).
        bn: BatchNorm after each branch's convolution.
        deploy: build the re-parameterised inference form (biased convolutions, no BN, small
            kernel merged); see :meth:`reparameterize`.
        recompute_small: under ``torch.compile``, recompute the small branch's convolution
            output in the backward pass, where its BatchNorm's backward needs it, from the
            input that the other branches keep anyway, instead of keeping it: one (s, s)
            depthwise convolution per unit more, for one image-sized tensor per unit less
            (SLaK-T's peak training memory, BENCHMARKS.md). The same values either way.
            (Eagerly the BatchNorm keeps its input whatever the convolution does.) Also the
            attribute of the same name.

    Input and output: ``(N, channels, H, W)``.
    """

    def __init__(self, channels, kernel_size, small_kernel, Decom=False, bn=True, deploy=False,
                 recompute_small=True):
        super().__init__()
        self.kernel_size, self.small_kernel, self.Decom = kernel_size, small_kernel, Decom
        self.deploy = deploy
        self.recompute_small = recompute_small
        if deploy:
            # Two biased branches (K, s) + (s, K), or one biased (K, K) branch.
            if Decom:
                self.LoRA1 = self._biased(channels, (kernel_size, small_kernel))
                self.LoRA2 = self._biased(channels, (small_kernel, kernel_size))
            else:
                self.lkb_origin = self._biased(channels, (kernel_size, kernel_size))
            return
        if Decom:
            self.LoRA1 = conv_bn(channels, (kernel_size, small_kernel), bn)
            self.LoRA2 = conv_bn(channels, (small_kernel, kernel_size), bn)
        else:
            self.lkb_origin = conv_bn(channels, (kernel_size, kernel_size), bn)
        if small_kernel < kernel_size:
            self.small_conv = conv_bn(channels, (small_kernel, small_kernel), bn)

    @staticmethod
    def _biased(channels, kernel):
        return nn.Sequential(OrderedDict(conv=DepthWiseConv2dImplicitGEMM(channels, kernel, bias=True)))

    def forward(self, x):
        if x.is_cuda:
            # The large-kernel convolutions read image lines along W: one copy of a
            # channels-last input here (fused into its producer under torch.compile) is
            # shared by all branches, instead of a copy per branch and per pass inside each.
            x = x.contiguous()
        if self.Decom:
            if self.deploy and not _hooked(self.LoRA1) and not _hooked(self.LoRA2):
                # Both biased convolutions in one pass where the kernels allow it.
                return depthwise_conv2d_sum(x, self.LoRA1.conv.weight, self.LoRA1.conv.bias,
                                            self.LoRA2.conv.weight, self.LoRA2.conv.bias)
            out = self.LoRA1(x) + self.LoRA2(x)
        else:
            out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self._small_branch(x)
        return out

    def _small_branch(self, x):
        conv = self.small_conv.conv
        if (self.recompute_small and hasattr(self.small_conv, "bn") and torch.is_grad_enabled()
                and torch.compiler.is_compiling() and not _hooked(conv)):
            # The partitioner recomputes what a checkpoint wraps rather than keeping its output.
            z = torch.utils.checkpoint.checkpoint(conv, x, use_reentrant=False,
                                                  preserve_rng_state=False)
        else:
            z = conv(x)
        return _after_conv(self.small_conv, z)

    @torch.no_grad()
    def reparameterize(self):
        """Fold BatchNorms (and the small branch) into biased convolutions, in place.

        Exact in eval mode: the unit's output is unchanged up to float rounding.
        """
        if self.deploy:
            return
        main = ["LoRA1", "LoRA2"] if self.Decom else ["lkb_origin"]
        fused = {name: fuse_conv_bn(getattr(self, name)) for name in main}
        if hasattr(self, "small_conv"):
            # The small kernel is centred inside the first branch's kernel, so it adds there.
            w_small, b_small = fuse_conv_bn(self.small_conv)
            w, b = fused[main[0]]
            fused[main[0]] = (w + pad_kernel_to(w_small, w.shape[2:]), b + b_small)
            del self.small_conv
        for name, (w, b) in fused.items():
            channels, _, kh, kw = w.shape
            branch = self._biased(channels, (kh, kw)).to(device=w.device, dtype=w.dtype)
            branch.conv.weight.copy_(w)
            branch.conv.bias.copy_(b)
            setattr(self, name, branch)
        self.deploy = True


class Block(nn.Module):
    """SLaK block: large-kernel unit -> LayerNorm -> Linear(4d) -> GELU -> Linear(d) -> scale -> residual.

    Args:
        dim: channels.
        drop_path: stochastic depth rate of the residual branch.
        layer_scale_init_value: initial per-channel scale ``gamma``; no scale when <= 0.
        kernel_size: ``(K, s)``, the stage kernel and the small kernel.
        Decom, bn, deploy: see :class:`LargeKernelUnit`.
        align_pointwise: compiled forwards run the two Linear layers through
            :func:`aligned_linear` (eager ones never: there the padding would be extra copies),
            to multiples of ``GEMM_ALIGN`` in training and ``EVAL_POINTWISE_ALIGN`` in eval
            (BENCHMARKS.md, "Pointwise GEMMs", has its effect).
    """

    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6, kernel_size=(7, 5),
                 Decom=False, bn=True, deploy=False, align_pointwise=True):
        super().__init__()
        self.align_pointwise = align_pointwise
        self.large_kernel = LargeKernelUnit(dim, kernel_size[0], kernel_size[1], Decom, bn, deploy)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.large_kernel(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C) for LayerNorm and Linear
        if self.align_pointwise and torch.compiler.is_compiling():
            align = GEMM_ALIGN if self.training else EVAL_POINTWISE_ALIGN
            x = aligned_linear(self.act(aligned_linear(self.norm(x), self.pwconv1, align)),
                               self.pwconv2, align)
        else:
            x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


@contextlib.contextmanager
def _keep_batchnorm_statistics(module):
    """Undo the running-statistics update of the BatchNorms in ``module`` made inside the block."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.training and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    try:
        yield
    finally:  # also when checkpointing stops the recomputation early, by raising inside it
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _recompute_contexts(block):
    # The recomputation in the backward pass would count each batch twice in the running
    # statistics; it leaves them as the forward pass left them. (Compiled graphs recompute
    # without re-applying the update, so they need nothing.)
    return contextlib.nullcontext(), _keep_batchnorm_statistics(block)


def checkpoint_blocks(blocks, x):
    """Run ``blocks`` in order, each under activation checkpointing (``set_grad_checkpointing``).

    Non-reentrant checkpointing works under DDP and torch.compile and for inputs that need no
    gradient, and restores the RNG state before recomputing, so DropPath drops the same samples
    both times; gradients and BatchNorm statistics equal those of the plain forward.
    """
    for block in blocks:
        if torch.compiler.is_compiling():
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = torch.utils.checkpoint.checkpoint(
                block, x, use_reentrant=False,
                context_fn=functools.partial(_recompute_contexts, block))
    return x


def _global_pool(pool_type):
    """timm's global pooling for the head; only poolings that keep the width fit the LayerNorm
    after them (AssertionError otherwise, as timm's heads raise)."""
    pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
    if pool.feat_mult() != 1:
        raise AssertionError(f"global_pool={pool_type!r} changes the pooled width, which the "
                             f"head's LayerNorm cannot take; use 'avg', 'max', 'avgmax' or ''")
    return pool


class SLaK(nn.Module):
    """Sparse Large-Kernel network, with timm's model API (as timm's ConvNeXt has it).

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        depths: blocks per stage.
        dims: channels per stage before ``width_factor``.
        drop_path_rate: stochastic depth rate of the last block (rising linearly from 0).
        layer_scale_init_value: initial layer scale; no scale when <= 0.
        head_init_scale: factor applied to the initial classifier weight and bias.
        kernel_size: ``[K1, K2, K3, K4, s]``: a kernel per stage and the small kernel.
        width_factor: stage widths are ``int(d * width_factor)``.
        Decom: decompose each K x K kernel into (K, s) + (s, K).
        bn: BatchNorm in each large-kernel branch.
        deploy: build the re-parameterised inference form (see :meth:`reparameterize`).
        align_pointwise: see :class:`Block`; it also sets the downsampling layers'
            :class:`PatchConv2d` ``align`` (the weights and their names are the same).
        global_pool: timm's pooling type of the head (``'avg'``, ``'max'``, ``'avgmax'``, or
            ``''`` for none: the LayerNorm and classifier then act at every position).
        drop_rate: dropout before the classifier.
        device, dtype: where and in which dtype the parameters are created (timm's factory
            arguments; ``device='meta'`` builds the model without allocating it).

    ``forward(x)``: ``(N, in_chans, H, W)`` -> logits ``(N, num_classes)``.
    ``forward_features(x)``: the last stage's map ``(N, num_features, H / 32, W / 32)``; as in
    timm's ConvNeXt, the final LayerNorm ``norm`` follows the pooling, in the head.
    ``forward_head(x, pre_logits=True)``: pooled, normalised features ``(N, head_hidden_size)``.
    ``forward_stages(x)``: the four stage outputs ``[(N, C_i, H / 2**(i+2), W / 2**(i+2))]``.
    """

    def __init__(self, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 drop_path_rate=0.0, layer_scale_init_value=1e-6, head_init_scale=1.0,
                 kernel_size=(51, 49, 47, 13, 5), width_factor=1.0, Decom=False, bn=True,
                 deploy=False, align_pointwise=True, global_pool="avg", drop_rate=0.0,
                 device=None, dtype=None):
        super().__init__()
        kernel_size = validate_kernel_size(kernel_size)
        dims = [int(d * width_factor) for d in dims]
        self.dims, self.depths, self.kernel_size = dims, list(depths), kernel_size
        self.in_chans, self.num_classes, self.drop_rate = in_chans, num_classes, drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        # Every tensor is created on ``device`` (so 'meta' allocates nothing), then cast to dtype.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            # downsample_layers[0] is the stem (4x4/4 conv, LayerNorm); the others LayerNorm,
            # 2x2/2 conv.
            stem = nn.Sequential(PatchConv2d(in_chans, dims[0], 4, align_pointwise),
                                 LayerNorm2d(dims[0], eps=1e-6))
            self.downsample_layers = nn.ModuleList([stem])
            for i in range(3):
                self.downsample_layers.append(nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6),
                    PatchConv2d(dims[i], dims[i + 1], 2, align_pointwise)))

            # On the CPU whatever the device: Python numbers (no .tolist() on 'meta').
            rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
            self.stages = nn.ModuleList()
            for i, depth in enumerate(depths):
                first = sum(depths[:i])
                self.stages.append(nn.Sequential(*[
                    Block(dims[i], rates[first + j], layer_scale_init_value,
                          (kernel_size[i], kernel_size[4]), Decom, bn, deploy, align_pointwise)
                    for j in range(depth)]))
            self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}")
                                 for i, d in enumerate(dims)]

            # The head: pool, LayerNorm, dropout, Linear (the order of timm's
            # NormMlpClassifierHead; norm and head are the original's checkpoint names).
            self.global_pool = _global_pool(global_pool)
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
            self.apply(self._init_weights)
            if num_classes > 0:
                self.head.weight.data.mul_(head_init_scale)
                self.head.bias.data.mul_(head_init_scale)
        if dtype is not None:
            self.to(dtype=dtype)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        """Layer ids for timm's layer-wise LR decay: stem, then each block (or stage), a
        downsampling layer with the block after it, the final norm with the last; then the
        classifier."""
        return dict(stem=r"^downsample_layers\.0",
                    blocks=[(r"^downsample_layers\.(\d+)", None), (r"^stages\.(\d+)", None),
                            (r"^norm", (99999,))] if coarse else [
                        (r"^downsample_layers\.(\d+)", (0,)),
                        (r"^stages\.(\d+)\.(\d+)", None),
                        (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None, reset_other=False):
        """A new classifier of ``num_classes`` outputs (none for 0), on the model's device and
        dtype; ``global_pool`` (``''`` for none) replaces the pooling when given;
        ``reset_other`` also removes the final LayerNorm."""
        weight = self.downsample_layers[0][0].weight   # the stem's: the model's device and dtype
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _global_pool(global_pool).train(self.training)
        if reset_other:
            self.norm = nn.Identity().train(self.training)
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=weight.device,
                                  dtype=weight.dtype).train(self.training)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity().train(self.training)

    def _stage(self, i, x):
        """Downsampling layer ``i`` (the stem for 0), then stage ``i``."""
        x = self.downsample_layers[i](x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_blocks(self.stages[i], x)
        return self.stages[i](x)

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False,
                              output_fmt="NCHW", intermediates_only=False):
        """The stage outputs ``indices`` selects (timm's ``feature_take_indices``: None for all,
        an int n for the last n, or a list of stage numbers), and ``forward_features``' map.

        ``norm`` has nothing to apply: SLaK's final LayerNorm follows the pooling (as in timm's
        ConvNeXt). ``stop_early`` stops after the last stage selected (no final map then).
        Returns ``intermediates`` or ``(final_map, intermediates)``, all NCHW.
        """
        if output_fmt != "NCHW":
            raise AssertionError(f"output_fmt={output_fmt!r}: SLaK's stage maps are NCHW only")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early else len(self.stages) - 1
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Remove the stages after the last of ``indices`` and, with ``prune_head`` (or when
        stages were removed), the head (pooling, LayerNorm, classifier), so that the model ends
        at the selected map; returns the absolute indices. ``prune_norm`` has no map norm to
        remove (the LayerNorm is the head's)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_stages(self, x):
        """The output of each stage, before any normalisation."""
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_features(self, x):
        for i in range(len(self.stages)):
            x = self._stage(i, x)
        return x

    def forward_head(self, x, pre_logits=False):
        if self.global_pool.is_identity():
            # No pooling: the LayerNorm and the classifier act at every position.
            x = self.head_drop(self.norm(x.permute(0, 2, 3, 1)))
            return (x if pre_logits else self.head(x)).permute(0, 3, 1, 2)
        x = self.head_drop(self.norm(self.global_pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def reparameterize(self):
        """Turn the model into its inference form in place (call after ``.eval()``); returns self."""
        for m in self.modules():
            if isinstance(m, LargeKernelUnit):
                m.reparameterize()
        return self


def checkpoint_filter_fn(checkpoint, model=None):
    """Extract a model state dict from a checkpoint of this project or of the original release.

    Accepts a bare state dict or one under ``model`` / ``state_dict`` / ``module``, strips
    ``module.`` (DDP) prefixes, and drops non-model entries such as sparsity masks. When ``model``
    is given, classifier weights whose shape differs from the model's are dropped (fine-tuning to
    another number of classes).
    """
    state_dict = checkpoint
    for key in ("model", "state_dict", "module"):
        if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v
                  for k, v in state_dict.items() if torch.is_tensor(v)}
    if model is not None:
        own = model.state_dict()
        for key in ("head.weight", "head.bias"):
            if key in state_dict and (key not in own or own[key].shape != state_dict[key].shape):
                del state_dict[key]
    return state_dict


def _cfg(**kwargs):
    """The original release's evaluation settings (those of ConvNeXt) for timm's data pipeline;
    ``min_input_size``: the smallest input that leaves the last stage a pixel."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="downsample_layers.0.0", classifier="head",
                min_input_size=(3, TOTAL_STRIDE, TOTAL_STRIDE), **kwargs)


# Read by timm's register_model below; no weights are hosted, so a checkpoint file is passed
# with pretrained_cfg_overlay=dict(file=PATH).
default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_DEPTHS_DIMS})


def _pretrained_file(kwargs):
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = kwargs.get("pretrained_cfg")
    cfg_file = cfg.get("file") if isinstance(cfg, dict) else getattr(cfg, "file", None)
    return overlay.get("file") or cfg_file


def _pretrained_filter_fn(checkpoint, model):
    """``checkpoint_filter_fn`` for timm's strict load: a classifier of another shape is replaced
    by the model's own (left at its initialisation), so any other disagreement still fails."""
    state_dict = checkpoint_filter_fn(checkpoint, model)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in own and key not in state_dict:
            state_dict[key] = own[key]
    return state_dict


def _create(name, pretrained=False, **kwargs):
    if pretrained and not _pretrained_file(kwargs):
        raise ValueError(f"{name}: no weights are downloaded; pass a checkpoint with "
                         f"pretrained_cfg_overlay=dict(file=PATH), or load one with --finetune "
                         f"or --resume")
    depths, dims = MODEL_DEPTHS_DIMS[name]
    kwargs.setdefault("depths", depths)
    kwargs.setdefault("dims", dims)
    if pretrained:
        # timm would drop the classifier of any checkpoint when num_classes is not the cfg's
        # 1000, a fine-tuned checkpoint's too; checkpoint_filter_fn drops it only when its shape
        # differs from the model's.
        kwargs["pretrained_cfg_overlay"] = dict(
            {"num_classes": kwargs.get("num_classes", 1000)}, **kwargs.get("pretrained_cfg_overlay") or {})
    # timm loads the file (its EMA weights when it holds them, as timm does everywhere), and
    # the filter maps the original release's and this project's checkpoint layouts.
    # features_only=True: timm's FeatureGetterNet over forward_intermediates (the four stages).
    return build_model_with_cfg(SLaK, name, pretrained, pretrained_filter_fn=_pretrained_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
                                **kwargs)


@register_model
def SLaK_tiny(pretrained=False, **kwargs):
    return _create("SLaK_tiny", pretrained, **kwargs)


@register_model
def SLaK_small(pretrained=False, **kwargs):
    return _create("SLaK_small", pretrained, **kwargs)


@register_model
def SLaK_base(pretrained=False, **kwargs):
    return _create("SLaK_base", pretrained, **kwargs)


@register_model
def SLaK_large(pretrained=False, **kwargs):
    return _create("SLaK_large", pretrained, **kwargs)
