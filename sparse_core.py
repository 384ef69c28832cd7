"""Dynamic sparse training: masks, initial densities, prune/regrow, and their bookkeeping.

``Masking`` keeps one mask per sparsified weight, keyed by the parameter's name in
``model.state_dict()``, as a bitmap on the weight's device (``bitmask.py``; ``masks`` gives
them as bool tensors). Which weights: every 2-D and 4-D parameter (conv and linear weights), or
with ``only_L`` only the large-kernel branch convolutions (``LoRA1``/``LoRA2``, and
``lkb_origin`` for models built without ``Decom``). A layer whose density ends at >= 0.99 is
left dense and gets no mask.

Life cycle (as ``main.py``/``engine.py`` drive it)::

    masking = Masking.from_args(model, optimizer, args, total_steps)
    masking.init(images, targets, criterion)     # or masking.load_masks(ckpt["masks"])
    masking.mask_ema(ema.module)                 # the EMA starts masked too
    for each optimizer step:
        scaler.step(optimizer); ...
        stats = masking.step()                   # dict on adaptation steps, else None
        optimizer.zero_grad()
        masking.update_ema(ema, model)           # instead of ema.update(model)

``step()`` re-applies the masks to the weights after every optimizer step, whatever the
precision and also when a fp16 ``GradScaler`` skipped the step; SGD's momentum buffers are
masked with them, as the original does. Adam(W)'s moments are left alone, as the original leaves
them: they keep accumulating at masked positions and a regrown weight starts from that history
(``zero_state=True``, ``--sparse_zero_state``, zeroes all same-shaped optimizer state of masked
and regrown positions whenever the masks change instead).

Every ``update_frequency`` steps (unless ``fix``) each layer removes ``ceil(rate * active)`` of its
active weights with the smallest magnitude and regrows as many among all inactive positions
(just-pruned ones included; ``random``: uniformly at random, ``gradient``: largest |grad| of the
step just taken, ``momentum``: largest |exp_avg / (sqrt(exp_avg_sq) + 1e-8)| under Adam(W) or
|momentum_buffer| under SGD, ``momentum_neuron``: the momentum score, the regrowth shared out
among output neurons in proportion to their mean score). The weights are then masked again, so a
weight pruned and regrown in one adaptation keeps its value and a newly grown one starts at 0.
``rate`` follows a cosine decay from ``prune_rate`` to 0.005 over ``total_steps``, one step
of decay per optimizer step before that step's adaptation (the original's schedule).

The EMA (``update_ema``): masked entries are 0, an active entry whose EMA is exactly 0 (newly
grown) takes the weight's value, the others the usual decayed average.

Distributed training: all randomness comes from one generator seeded with ``seed`` (the
same on every rank) and the decisions use weights and gradients that DDP keeps identical, so
every rank computes the same masks; as a safety net rank 0's result is broadcast once per mask
decision (once at init and once per adaptation, one packed uint8 tensor), never per step.

The prune and grow rules are small pure functions (tensors in, mask out), one entry each in
``PRUNE`` and ``GROWTH`` (main.py's ``--prune`` and ``--growth`` choices), selected by ``prune``
and ``growth``: a new rule is one function and one line.
"""
import dataclasses
import inspect
import itertools
import math
from typing import Callable

import torch
import torch.distributed as dist

from bitmask import count_set_bits, pack_bits, unpack_bits, zero_unset_
from distributed import get_world_size, is_main_process

__all__ = ["Masking", "INIT", "SparseInit", "PRUNE", "GROWTH", "GROWTH_INPUTS", "growth_inputs", "magnitude_prune",
           "random_growth", "gradient_growth", "momentum_growth", "momentum_neuron_growth",
           "momentum_score", "erk_densities", "fit_densities", "sparsifiable", "DENSE_THRESHOLD",
           "PRUNE_RATE_FLOOR"]

# A layer whose density would end at or above this is kept dense (no mask).
DENSE_THRESHOLD = 0.99
# The original's prune-rate cosine decay ends here, not at 0.
PRUNE_RATE_FLOOR = 0.005
_LARGE_KERNEL_BRANCHES = ("LoRA1", "LoRA2", "lkb_origin")


# --------------------------------------------------------------------------------------------
# Prune / grow rules: one function each, registered under its flag's name in ``PRUNE`` or
# ``GROWTH``. Tensors in, mask out (the inputs are left as they are):
#
#     prune(weight, mask, n) -> mask          growth(mask, n, **inputs) -> mask
#
# ``n`` is the number of entries to remove or add when the tensors are one layer, or, when they
# are flat and hold many layers end to end (how ``Masking`` adapts all its layers in a few
# operations; only the per-layer top-k or sort stays per layer), the list of those layers as
# ``(start, shape, n)``. A growth rule names what it ranks by as keyword-only arguments, and
# ``Masking`` passes it exactly those of ``GROWTH_INPUTS``, laid out as ``mask``:
# ``generator`` (the random generator, the same on every rank), ``grad`` (the gradients of the
# step just taken) and ``momentum`` (``momentum_score`` of the optimizer's state), with zeros
# where a layer has none yet (an unused weight, no optimizer state).
# --------------------------------------------------------------------------------------------

GROWTH_INPUTS = ("generator", "grad", "momentum")


def _layers(mask, n):
    """``(flat mask, [(start, shape, n), ...])`` from a rule's ``mask`` and ``n``."""
    if isinstance(n, int):
        return mask.reshape(-1), [(0, tuple(mask.shape), n)]
    return mask, n


def _drop_smallest(score, mask, n):
    """``mask`` without, in each layer, the ``n`` active entries of smallest ``score`` (a
    temporary of the caller's, overwritten)."""
    flat_mask, layers = _layers(mask, n)
    flat = score.detach().float().reshape(-1).masked_fill_(~flat_mask, float("inf"))
    new = flat_mask.clone()
    for start, shape, count in layers:
        if count > 0:
            end = start + math.prod(shape)
            idx = torch.topk(flat[start:end], count, largest=False, sorted=False).indices
            # index_fill_ takes the value as a scalar; ``new[idx] = False`` would copy it to
            # the device first and wait for the GPU, twice per layer per adaptation.
            new[start:end].index_fill_(0, idx, False)
    return new.view(mask.shape)


def _add_largest(score, mask, n):
    """``mask`` plus, in each layer, the ``n`` entries of largest ``|score|`` with active
    entries scored 0.

    As the original: when fewer than ``n`` inactive entries score above 0, the zero-score picks
    (first by position) may be active ones already, and the layer ends with fewer weights.
    """
    flat_mask, layers = _layers(mask, n)
    flat = score.detach().float().reshape(-1).abs().masked_fill_(flat_mask, 0.0)  # abs: a copy
    new = flat_mask.clone()
    for start, shape, count in layers:
        if count > 0:
            end = start + math.prod(shape)
            # torch.sort as the original (its tie order among zero scores decides which picks
            # are lost)
            idx = torch.sort(flat[start:end], descending=True).indices[:count]
            new[start:end].index_fill_(0, idx, True)
    return new.view(mask.shape)


def magnitude_prune(weight, mask, n):
    """Deactivate the ``n`` active weights of smallest magnitude."""
    return _drop_smallest(weight.abs(), mask, n)


def random_growth(mask, n, *, generator):
    """Activate ``n`` inactive entries chosen uniformly at random (from ``generator``; each layer
    draws one score per entry, in order, whatever its ``n``)."""
    flat, layers = _layers(mask, n)
    score = torch.zeros(flat.shape, device=mask.device)
    for start, shape, _ in layers:
        score[start:start + math.prod(shape)].uniform_(generator=generator)
    return _add_largest(score, mask, n)


def gradient_growth(mask, n, *, grad):
    """Activate the ``n`` inactive entries with the largest |gradient|."""
    return _add_largest(grad, mask, n)


def momentum_growth(mask, n, *, momentum):
    """Activate the ``n`` inactive entries with the largest |momentum score|."""
    return _add_largest(momentum, mask, n)


def momentum_neuron_growth(mask, n, *, momentum):
    """Momentum growth within output neurons (dim 0 rows).

    Each neuron gets a share of the ``n`` regrown weights proportional to its mean |momentum|
    (largest remainders round, capped by its free slots) and grows its largest-|momentum|
    inactive entries; whatever the caps leave over goes to the largest remaining scores anywhere,
    so the layer keeps its count.
    """
    if not isinstance(n, int):  # many layers: each in its own shape, one after the other
        new = mask.clone()
        for start, shape, count in n:
            end = start + math.prod(shape)
            new[start:end].view(shape).copy_(momentum_neuron_growth(
                mask[start:end].view(shape), count, momentum=momentum[start:end].view(shape)))
        return new
    if n <= 0:
        return mask.clone()
    score = momentum.detach().abs().float().reshape(mask.shape[0], -1)
    inactive = ~mask.reshape(mask.shape[0], -1)
    free = inactive.sum(1)
    share = score.mean(1)
    share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1 / len(share))
    quota_f = share * n
    quota = quota_f.floor().long()
    left = n - int(quota.sum())
    if left > 0:  # largest remainders
        quota[torch.topk(quota_f - quota, left).indices] += 1
    quota = torch.minimum(quota, free)
    ranked = score.masked_fill(~inactive, float("-inf"))
    order = ranked.argsort(1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    new = (~inactive) | (inactive & (rank < quota[:, None]))
    new = new.reshape(mask.shape)
    return momentum_growth(new, n - int(new.sum() - mask.sum()), momentum=momentum)


PRUNE = {"magnitude": magnitude_prune}
GROWTH = {"random": random_growth, "gradient": gradient_growth, "momentum": momentum_growth,
          "momentum_neuron": momentum_neuron_growth}


def growth_inputs(rule):
    """The names of what the growth ``rule`` ranks by: its keyword-only arguments."""
    return [name for name, p in inspect.signature(rule).parameters.items()
            if p.kind is p.KEYWORD_ONLY]


# --------------------------------------------------------------------------------------------
# Layer densities
# --------------------------------------------------------------------------------------------

def sparsifiable(model, only_L=False):
    """``{name: parameter}`` of the weights that may be sparsified, in ``state_dict`` order."""
    names = set(model.state_dict().keys())
    chosen = {}
    for name, p in model.named_parameters():
        if name not in names or p.dim() not in (2, 4):
            continue
        if only_L and not (name.endswith(".conv.weight")
                           and any(f".{b}." in f".{name}" for b in _LARGE_KERNEL_BRANCHES)):
            continue
        chosen[name] = p
    return chosen


def fit_densities(raw, sizes, target, threshold=DENSE_THRESHOLD):
    """Scale per-layer densities so that their size-weighted mean is ``target``.

    Layers whose scaled density reaches ``threshold`` become dense (1.0) and the others are
    rescaled, repeated until consistent. ``raw`` and ``sizes`` are dicts keyed by layer name.
    """
    budget = target * sum(sizes.values())
    dense = set()
    while True:
        free = [k for k in raw if k not in dense]
        left = budget - sum(sizes[k] for k in dense)
        weight = sum(raw[k] * sizes[k] for k in free)
        scale = left / weight if weight > 0 else 0.0
        newly = {k for k in free if raw[k] * scale >= threshold}
        if not newly or left <= 0:
            break
        dense |= newly
    return {k: 1.0 if k in dense else max(0.0, min(1.0, raw[k] * scale)) for k in raw}


def erk_densities(shapes, target):
    """Erdős–Rényi-Kernel densities: proportional to ``sum(shape) / prod(shape)``."""
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    return fit_densities(raw, sizes, target)


def _random_mask(shape, density, generator, device):
    """A mask with exactly ``round(density * numel)`` entries on, drawn at random."""
    numel = math.prod(shape)
    k = int(round(density * numel))
    score = torch.rand(numel, generator=generator, device=device)
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    if k > 0:
        mask[torch.topk(score, k, sorted=False).indices] = True
    return mask.view(shape)


def _from_rank0(bitmaps):
    """Rank 0's ``bitmaps`` (a list of flat uint8 tensors) on every rank: one broadcast of their
    concatenation, returned as views of it. The bitmaps are an eighth of the bool masks' bytes,
    and splitting them back costs no operation per layer, where an adaptation of SLaK-T has 90."""
    if get_world_size() == 1 or not bitmaps:
        return bitmaps
    packed = torch.cat(bitmaps)
    dist.broadcast(packed, src=0)
    return list(packed.split([b.numel() for b in bitmaps]))


def _byte_aligned(tensors):
    """``tensors`` flattened into one, each starting at a multiple of 8 entries (zeros between):
    the layout in which the layers' bitmaps lie end to end in one buffer."""
    gap = tensors[0].new_zeros(7)
    return torch.cat([piece for t in tensors for piece in (t.reshape(-1), gap[:-t.numel() % 8])])


def _optimizer_state_tensors(optimizer, param):
    """Tensors of ``optimizer``'s state for ``param`` shaped like it (moments, momentum)."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]


def _momentum_buffer(optimizer, param):
    """SGD's momentum buffer of ``param`` ([] when there is none): masked with the weight."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    buf = state.get("momentum_buffer")
    return [buf] if torch.is_tensor(buf) and buf.shape == param.shape else []


def momentum_score(optimizer, param):
    """The original's momentum growth score: exp_avg / (sqrt(exp_avg_sq) + 1e-8) under Adam(W),
    the momentum buffer under SGD; None before the optimizer's first step."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    if "exp_avg" in state and "exp_avg_sq" in state:
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    return state.get("momentum_buffer")


# --------------------------------------------------------------------------------------------
# Initial masks
# --------------------------------------------------------------------------------------------

def _snip_raw_densities(masking, images, targets, criterion):
    """Per-layer share of the globally top-``density`` SNIP saliencies |w * dL/dw|."""
    model = masking.model
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # keep BN statistics as they were
    # This full-precision, full-batch pass would otherwise need about twice the memory of a
    # mixed-precision training step: per-block activation checkpointing (timm's
    # set_grad_checkpointing, where the model has it) keeps it below, with the same gradients.
    checkpoint_here = getattr(model, "grad_checkpointing", True) is False and \
        hasattr(model, "set_grad_checkpointing")
    if checkpoint_here:
        model.set_grad_checkpointing(True)
    try:
        with torch.enable_grad():
            loss = criterion(model(images), targets)
            names = list(masking.params)
            grads = torch.autograd.grad(loss, [masking.params[k] for k in names],
                                        allow_unused=True)
    finally:
        if checkpoint_here:
            model.set_grad_checkpointing(False)
    for k, b in model.named_buffers():
        b.copy_(buffers[k])
    scores = {k: (masking.params[k].detach() * g).abs().flatten().float() if g is not None
              else torch.zeros(masking.params[k].numel(), device=masking.params[k].device)
              for k, g in zip(names, grads)}
    flat = torch.cat(list(scores.values()))
    n_keep = int(round(masking.density * flat.numel()))
    if n_keep >= flat.numel():
        return {k: 1.0 for k in scores}
    threshold = torch.topk(flat, n_keep, sorted=True).values[-1]
    raw = {k: (s >= threshold).float().mean().item() for k, s in scores.items()}
    if get_world_size() > 1:  # each rank's batch would give other densities: rank 0's
        vec = torch.tensor([raw[k] for k in names], dtype=torch.float64, device=flat.device)
        dist.broadcast(vec, src=0)
        raw = dict(zip(names, vec.tolist()))
    return raw


def _random_masks(masking, densities):
    """Random masks at ``densities``; layers at ``DENSE_THRESHOLD`` or above stay dense."""
    masks = {}
    for k, p in masking.params.items():
        # Draw for every layer (dense ones too) so the generator advances identically.
        mask = _random_mask(p.shape, densities[k], masking.generator, p.device)
        if densities[k] < DENSE_THRESHOLD:
            masks[k] = mask
    return masks


def _sizes(masking):
    return {k: p.numel() for k, p in masking.params.items()}


def snip_init(masking, images, targets, criterion):
    """Per-layer densities from SNIP (|w * dL/dw| on one batch), random masks at them."""
    if images is None or criterion is None:
        raise ValueError("--sparse_init snip needs a batch and a criterion")
    raw = _snip_raw_densities(masking, images, targets, criterion)
    return _random_masks(masking, fit_densities(raw, _sizes(masking), masking.density))


def erk_init(masking, images=None, targets=None, criterion=None):
    """Erdős–Rényi-Kernel densities, random masks at them."""
    shapes = {k: tuple(p.shape) for k, p in masking.params.items()}
    return _random_masks(masking, erk_densities(shapes, masking.density))


def uniform_init(masking, images=None, targets=None, criterion=None):
    """The same density in every layer (but those kept dense), random masks at it."""
    densities = fit_densities({k: 1.0 for k in masking.params}, _sizes(masking), masking.density)
    return _random_masks(masking, densities)


def resume_init(masking, images=None, targets=None, criterion=None):
    """The non-zero pattern of the current weights (a checkpoint's zeros are its masks)."""
    masks = {k: p.detach() != 0 for k, p in masking.params.items()}
    return {k: m for k, m in masks.items() if m.sum().item() < DENSE_THRESHOLD * m.numel()}


@dataclasses.dataclass(frozen=True)
class SparseInit:
    """One ``--sparse_init`` rule: ``masks(masking, images, targets, criterion)`` gives the
    initial masks (dense layers left out); ``needs_batch``: it scores one training batch;
    ``needs_weights``: it reads the masks from loaded weights, so a checkpoint must be loaded."""
    masks: Callable
    needs_batch: bool = False
    needs_weights: bool = False


# --sparse_init: a new rule is a function as above and a line here.
INIT = {"snip": SparseInit(snip_init, needs_batch=True), "ERK": SparseInit(erk_init),
        "uniform": SparseInit(uniform_init), "resume": SparseInit(resume_init, needs_weights=True)}


class Masking:
    """Masks and dynamic sparse training for ``model``; see the module docstring.
    ``Masking.from_args`` builds it from main.py's flags.

    Args:
        model: the unwrapped ``nn.Module`` (not the DDP wrapper).
        optimizer: the optimizer over its parameters (its state is masked too), or None to only
            build masks.
        total_steps: optimizer steps of the whole run (the prune-rate cosine decay's length).
        sparsity: the fraction of the sparsifiable weights removed, in [0, 1).
        sparse_init: the initial masks, a rule's name in ``INIT``.
        growth, prune: the rules' names in ``GROWTH`` and ``PRUNE``.
        prune_rate: the fraction of each layer's active weights replaced at the first adaptation.
        update_frequency: optimizer steps between adaptations.
        fix: keep the initial masks (static sparse training).
        only_L: sparsify only the large-kernel branch convolutions.
        zero_state: zero all same-shaped optimizer state of masked and regrown positions whenever
            the masks change (the original leaves Adam's moments alone).
        seed: seeds the generator behind every random choice (the same on every rank).
        verbose: per-layer densities in the reports.
    """

    def __init__(self, model, optimizer, total_steps, *, sparsity, sparse_init="snip",
                 growth="random", prune="magnitude", prune_rate=0.3, update_frequency=100,
                 fix=False, only_L=False, zero_state=False, seed=0, verbose=False):
        self.model, self.optimizer = model, optimizer
        self.density = 1.0 - float(sparsity)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")
        self.sparse_init = sparse_init
        self.growth, self.prune = growth, prune
        if self.growth not in GROWTH:
            raise ValueError(f"--growth {self.growth}: choose one of {sorted(GROWTH)}")
        if self.prune not in PRUNE:
            raise ValueError(f"--prune {self.prune}: choose one of {sorted(PRUNE)}")
        if self.sparse_init not in INIT:
            raise ValueError(f"--sparse_init {self.sparse_init}: choose one of {sorted(INIT)}")
        # What the growth rule ranks by, gathered for it at each adaptation.
        self._growth_reads = growth_inputs(GROWTH[self.growth])
        unknown = sorted(set(self._growth_reads) - set(GROWTH_INPUTS))
        if unknown:
            raise ValueError(f"growth rule {self.growth} takes {unknown}; a growth rule's "
                             f"keyword-only arguments are among {list(GROWTH_INPUTS)}")
        self.zero_state = bool(zero_state)
        self.prune_rate = float(prune_rate)
        self.update_frequency = max(1, int(update_frequency))
        self.fix = bool(fix)
        self.verbose = bool(verbose)
        self.total_steps = max(1, int(total_steps))
        self.params = sparsifiable(model, bool(only_L))
        if not self.params:
            raise ValueError("no weights to sparsify in this model (with --only-L: no "
                             "LoRA1/LoRA2/lkb_origin convolutions)")
        # Bitmaps (``_store``): the masks, and which weights have been active at some point (the
        # "ever active" share of the reports), an eighth of bool masks' memory on the GPU.
        self._bits = self._ever_bits = None
        self._starts, self._mask_bits, self._ever_active_bits = [], {}, {}
        self._active = {}
        self.steps = 0
        self.pending = False  # an adaptation postponed because its step had no gradient
        device = next(iter(self.params.values())).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(seed) * 1_000_003 + 12345)
        # A rule ranking by gradients reads them just before the optimizer consumes them.
        self._grads = {}
        self._hook = None
        self._use_graph, self._graph, self._graph_key = True, None, None
        self._ema_dirty = True  # masks changed since the last EMA update
        self._ema_zeros = set()  # layers whose EMA had active entries at exactly 0
        if optimizer is not None and "grad" in self._growth_reads and not self.fix:
            self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)

    @classmethod
    def from_args(cls, model, optimizer, args, total_steps):
        """The ``Masking`` that main.py's sparsity flags ask for (``--sparsity``,
        ``--sparse_init``, ``--growth``, ``--prune``, ``--prune_rate``, ``-u``, ``--fix``,
        ``--only-L``, ``--sparse_zero_state``, ``--seed``, ``--verbose``)."""
        return cls(model, optimizer, total_steps, sparsity=args.sparsity,
                   sparse_init=args.sparse_init, growth=args.growth, prune=args.prune,
                   prune_rate=args.prune_rate, update_frequency=args.update_frequency,
                   fix=args.fix, only_L=args.only_L, zero_state=args.sparse_zero_state,
                   seed=args.seed, verbose=args.verbose)

    # ---------------------------------------------------------------------------- schedule
    def current_prune_rate(self, step=None):
        """The prune rate after ``step`` optimizer steps (default: now): cosine from
        ``prune_rate`` to ``PRUNE_RATE_FLOOR`` over ``total_steps``."""
        t = min(self.steps if step is None else step, self.total_steps)
        return PRUNE_RATE_FLOOR + 0.5 * (self.prune_rate - PRUNE_RATE_FLOOR) * (
            1.0 + math.cos(math.pi * t / self.total_steps))

    def _adapts_at(self, step):
        return not self.fix and step % self.update_frequency == 0 and step <= self.total_steps

    # ---------------------------------------------------------------------------- init
    @torch.no_grad()
    def init(self, images=None, targets=None, criterion=None):
        """Build masks (``INIT[sparse_init]``), zero masked weights, print the density report.

        A rule that ``needs_batch`` (``snip``) scores ``criterion(model(images), targets)``.
        Returns the report as a dict of scalars.
        """
        masks = INIT[self.sparse_init].masks(self, images, targets, criterion)
        self._store(masks)
        self._count_active()
        self._ema_dirty = True
        self.apply_masks(with_state=self.zero_state)
        stats = self.stats()
        self._report("init " + self.sparse_init, stats)
        return stats

    # ---------------------------------------------------------------------------- masks
    def _store(self, masks):
        """Keep ``{name: bool mask}`` (rank 0's, under DDP) as bitmaps: one flat buffer holding
        each layer's bits from a byte boundary, ``_mask_bits[name]`` its views, so that an
        adaptation unpacks, packs and stores all layers at once. The "ever active" record
        starts as a copy."""
        sizes = [-(-m.numel() // 8) for m in masks.values()]
        self._starts = [8 * s for s in itertools.accumulate([0] + sizes[:-1])]
        device = next(iter(self.params.values())).device
        packed = pack_bits(_byte_aligned(list(masks.values()))) if masks else \
            torch.zeros(0, dtype=torch.uint8, device=device)
        self._bits = _from_rank0([packed])[0]
        self._ever_bits = self._bits.clone()
        self._mask_bits = dict(zip(masks, self._bits.split(sizes)))
        self._ever_active_bits = dict(zip(masks, self._ever_bits.split(sizes)))

    @property
    def masks(self):
        """``{name: bool mask}`` of the sparse weights: a copy, unpacked from the bitmaps."""
        return {k: self._mask(k) for k in self._mask_bits}

    def _mask(self, name):
        return unpack_bits(self._mask_bits[name], self.params[name].shape)

    def _count_active(self):
        """Cache each mask's active count (adaptation keeps it): one host sync, not one per
        layer."""
        self._active = dict(zip(self._mask_bits, count_set_bits(list(self._mask_bits.values()))))

    @torch.no_grad()
    def apply_masks(self, with_state=False):
        """Zero the masked-out weights and SGD momentum buffers and, ``with_state``, all their
        same-shaped optimizer state (Adam moments too).

        On CUDA the per-step re-masking of the weights (one multiplication per sparse weight)
        is replayed as one CUDA graph (a hundred small kernels would otherwise cost more in
        launches than in work); the graph is recorded again whenever a tensor behind it
        changes.
        """
        tensors, masks = [], []
        for k, mask in self._mask_bits.items():
            p = self.params[k]
            state = _optimizer_state_tensors(self.optimizer, p) if with_state else \
                _momentum_buffer(self.optimizer, p)
            for t in [p] + state:
                tensors.append(t)
                masks.append(mask)
        if not tensors:
            return
        if self._use_graph and tensors[0].is_cuda and \
                not torch.cuda.is_current_stream_capturing():
            key = tuple(t.data_ptr() for t in tensors) + tuple(m.data_ptr() for m in masks)
            if self._graph is None or key != self._graph_key:
                self._graph = self._record(tensors, masks)
                self._graph_key = key
            if self._graph is not None:
                self._graph.replay()
                return
        for t, m in zip(tensors, masks):
            zero_unset_(t, m)

    def _record(self, tensors, masks):
        """A CUDA graph of ``zero_unset_(t, m)`` for all pairs, or None (then eager from now
        on)."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs need
                for t, m in zip(tensors, masks):
                    zero_unset_(t, m)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                for t, m in zip(tensors, masks):
                    zero_unset_(t, m)
            return graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: fall back to eager
            self._use_graph = False
            if is_main_process():
                print(f"[sparse] CUDA graph for re-masking unavailable ({exc}); eager re-masking",
                      flush=True)
            return None

    @torch.no_grad()
    def load_masks(self, masks):
        """Restore masks saved by a checkpoint (``checkpoint['masks']``) and zero masked weights."""
        unknown = sorted(set(masks) - set(self.params))
        if unknown:
            raise ValueError(f"checkpoint masks name weights this run does not sparsify: "
                             f"{unknown[:5]}; use the same --model/--only-L as the run that wrote it")
        loaded = {}
        for k, m in masks.items():
            p = self.params[k]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"checkpoint mask {k} has shape {tuple(m.shape)}, the weight "
                                 f"{tuple(p.shape)}")
            loaded[k] = m.to(device=p.device, dtype=torch.bool)
        self._store(loaded)
        self._count_active()
        self._ema_dirty = True
        self.apply_masks(with_state=self.zero_state)
        self._report("masks restored", self.stats())

    # ---------------------------------------------------------------------------- training
    def _before_optimizer_step(self, optimizer, args, kwargs):
        """Optimizer pre-step hook: keep the gradients gradient growth needs.

        Under float16 AMP they are still multiplied by the loss scale unless ``--clip_grad``
        unscaled them; growth ranks them within each layer, which one scale does not change.
        """
        if not self._mask_bits:
            return
        if self.pending or self._adapts_at(self.steps + 1):
            # GradScaler steps a fused optimizer even when the gradients overflowed, and tells it
            # so through ``found_inf`` (the fused kernel then skips the update): keep nothing, so
            # that the adaptation waits for a step with finite gradients, as for the other
            # optimizers, whose step the scaler skips.
            found_inf = getattr(optimizer, "found_inf", None)
            if found_inf is not None and bool(found_inf):
                return
            self._grads = {k: self.params[k].grad.detach().clone() for k in self._mask_bits
                           if self.params[k].grad is not None}

    def step(self):
        """Call after every optimizer step; returns adaptation stats on adaptation steps."""
        self.steps += 1
        if not self._mask_bits:
            return None
        adapt = self.pending or self._adapts_at(self.steps)
        if adapt and "grad" in self._growth_reads and not self._grads:
            # The step had no finite gradients (fp16 overflow: the scaler skipped it, or stepped
            # a fused optimizer that skips it itself; the pre-step hook kept none): adapt at the
            # next step.
            self.pending = True
            self.apply_masks()
            return None
        self.apply_masks()
        if not adapt:
            return None
        self.pending = False
        self._adapt()
        self._grads = {}
        stats = self.stats()
        self._report(f"step {self.steps}", stats)
        return stats

    @torch.no_grad()
    def _adapt(self):
        """Prune and regrow every masked layer. All layers are scored at once, in the byte-aligned
        flat layout of the bitmaps; only the selections (a top-k or a sort each) run per layer,
        on the same values as one layer at a time would give them."""
        rate = self.current_prune_rate()
        names = list(self._mask_bits)
        mask = unpack_bits(self._bits, (self._bits.numel() * 8,))
        layers = [(start, tuple(self.params[k].shape),
                   min(math.ceil(rate * self._active[k]), self._active[k]))
                  for k, start in zip(names, self._starts)]
        # At most two all-layer float temporaries live at once (each a copy of the masked
        # weights, 200 MB for SLaK-T's 50.6M): each is freed as the next is made.
        kept = PRUNE[self.prune](_byte_aligned([self.params[k].detach() for k in names]), mask,
                                 layers)
        new = GROWTH[self.growth](kept, layers, **self._growth_inputs(names))
        synced = _from_rank0([pack_bits(new)] + ([pack_bits(kept)] if self.zero_state else []))
        if self.zero_state:  # opt-in: everything not surviving the prune restarts at zero
            survived = unpack_bits(synced[1], (mask.numel(),))
            for k, start in zip(names, self._starts):
                p = self.params[k]
                p.mul_(self._layer(survived, k, start))
                for t in _optimizer_state_tensors(self.optimizer, p):
                    t.mul_(self._layer(survived, k, start))
        self._bits.copy_(synced[0])  # in place: the re-masking CUDA graph reads its views
        self._ever_bits |= synced[0]
        self._count_active()  # growth can fall short of the prune (see _add_largest)
        self.apply_masks()
        self._ema_dirty = True

    def _layer(self, flat, name, start):
        """Layer ``name``'s entries (from ``start``) of a flat all-layers tensor, in its shape."""
        p = self.params[name]
        return flat[start:start + p.numel()].view(p.shape)

    def _growth_inputs(self, names):
        """The keyword arguments of the growth rule (``GROWTH_INPUTS`` it names) for the layers
        ``names``, in the flat layout of the bitmaps; zeros where a layer has no gradient or
        optimizer state yet."""
        def flat(scores):
            return _byte_aligned([s if s is not None else torch.zeros_like(self.params[k])
                                  for k, s in zip(names, scores)])
        inputs = {}
        if "generator" in self._growth_reads:
            inputs["generator"] = self.generator
        if "grad" in self._growth_reads:
            inputs["grad"] = flat([self._grads.get(k) for k in names])
        if "momentum" in self._growth_reads:
            inputs["momentum"] = flat([momentum_score(self.optimizer, self.params[k])
                                       for k in names])
        return inputs

    @torch.no_grad()
    def mask_ema(self, ema_module):
        """Zero the masked-out entries of an EMA copy (its active entries are left as they are)."""
        ema = dict(ema_module.named_parameters())
        for k in self._mask_bits:
            if k in ema:
                ema[k].mul_(self._mask(k).to(ema[k].device))

    @torch.no_grad()
    def update_ema(self, model_ema, model):
        """``model_ema.update(model)`` with the masks: masked entries 0, an active entry whose EMA
        was exactly 0 (newly grown) takes the weight's value, the others the decayed average.

        Entries zero in both the EMA and the masked weights stay exactly zero through the update,
        so only layers whose masks changed, or that still had active zeros, are looked at.
        """
        ema = dict(model_ema.module.named_parameters())
        check = [k for k in self._mask_bits
                 if k in ema and (self._ema_dirty or k in self._ema_zeros)]
        was_zero = {k: ema[k] == 0 for k in check}
        model_ema.update(model)
        self._ema_dirty = False
        if not check:
            return
        still = []
        for k in check:
            e, mask = ema[k], self._mask(k).to(ema[k].device)
            w = self.params[k].detach().to(e.device, e.dtype)
            e.copy_(torch.where(mask, torch.where(was_zero[k], w, e), torch.zeros_like(e)))
            still.append(((e == 0) & mask).any())
        self._ema_zeros = {k for k, z in zip(check, torch.stack(still).tolist()) if z}

    # ---------------------------------------------------------------------------- reports
    @property
    def ever_active(self):
        """``{name: bool mask}`` of the weights that have been active at some point of training."""
        return {k: unpack_bits(b, self.params[k].shape) for k, b in self._ever_active_bits.items()}

    def layer_densities(self):
        """``{name: density}`` of every sparsifiable weight (1.0 for dense ones)."""
        return {k: (self._active[k] / p.numel() if k in self._mask_bits else 1.0)
                for k, p in self.params.items()}

    def stats(self):
        """Overall density, the prune rate now, the share of masked weights ever active."""
        total = sum(p.numel() for p in self.params.values())
        active = sum((self._active[k] if k in self._mask_bits else p.numel())
                     for k, p in self.params.items())
        masked_total = sum(self.params[k].numel() for k in self._mask_bits)
        ever = sum(count_set_bits(list(self._ever_active_bits.values())))
        out = {"density": active / total, "prune_rate": self.current_prune_rate(),
               "ever_active": ever / masked_total if masked_total else 1.0,
               "sparse_layers": float(len(self._mask_bits))}
        if self.verbose:
            out.update({f"density/{k}": d for k, d in self.layer_densities().items()})
        return out

    def _report(self, when, stats):
        if not is_main_process():
            return
        print(f"[sparse] {when}: density {stats['density']:.4f} (target {self.density:.4f}), "
              f"prune rate {stats['prune_rate']:.4f}, ever active {stats['ever_active']:.4f}, "
              f"{len(self._mask_bits)}/{len(self.params)} layers sparse", flush=True)
        if self.verbose:
            for k, d in self.layer_densities().items():
                print(f"[sparse]   {k:60s} {tuple(self.params[k].shape)!s:22s} density {d:.4f}",
                      flush=True)

    # ---------------------------------------------------------------------------- state
    def state_dict(self):
        """Everything but the masks: step counter, ever-active masks, RNG and growth state."""
        return {"steps": self.steps, "pending": self.pending,
                "ever_active": self.ever_active,
                "generator": self.generator.get_state(),
                "ema_zeros": sorted(self._ema_zeros), "ema_dirty": self._ema_dirty,
                "total_steps": self.total_steps, "prune_rate": self.prune_rate,
                "update_frequency": self.update_frequency}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self.pending = bool(state.get("pending", False))
        for k, m in state.get("ever_active", {}).items():
            if k in self.params:
                self._ever_active_bits[k].copy_(pack_bits(m.to(device=self.params[k].device,
                                                                dtype=torch.bool)))
        if "generator" in state:
            try:
                self.generator.set_state(state["generator"].cpu())
            except (RuntimeError, ValueError):  # saved on another device type (CPU <-> CUDA)
                self.generator.manual_seed(int(state["generator"].sum().item()) + self.steps)
        # Layers whose EMA may hold active zeros are looked at on the next EMA update.
        self._ema_zeros = set(state.get("ema_zeros", self._mask_bits))
        self._ema_dirty = bool(state.get("ema_dirty", True))
